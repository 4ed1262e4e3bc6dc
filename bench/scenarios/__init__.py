"""The eight scenarios; each is ``async def run(bench) -> list[Row]`` and measures every
target in turn (or interleaved, where drift on a noisy machine would bias the comparison)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..context import Bench
from ..report import Row
from . import handoff, latency, priority, scale, spread, throughput, workers

Scenario = Callable[[Bench], Awaitable[list[Row]]]

SCENARIOS: dict[str, tuple[str, Scenario, float]] = {
    # number: (name, run, time limit in seconds)
    "1": ("handoff gap", handoff.run, 60),
    "2": ("added latency", latency.run_latency, 60),
    "3": ("time to first chunk", latency.run_first_chunk, 60),
    "4": ("streaming throughput", throughput.run, 60),
    "5": ("queue scale", scale.run, 150),
    "6": ("priority under load", priority.run, 60),
    "7": ("workers", workers.run, 90),
    "8": ("waiters on two replicas", spread.run, 150),
}
