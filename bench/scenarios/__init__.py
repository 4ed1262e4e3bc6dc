"""The scenarios; each is ``async def run(bench) -> list[Row]`` and measures every target
in turn (or interleaved, where drift on a noisy machine would bias the comparison).
7-9 are the fleet's: they start fakes with residency (and nginx, a fleet proxy) of their own;
10 is fair shares; 11-12 are the replicas' (workers, waiters on two replicas)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..context import Bench
from ..report import Row
from . import (
    dispatch,
    fairness,
    fleet,
    handoff,
    latency,
    priority,
    scale,
    spread,
    swaps,
    throughput,
    workers,
)

Scenario = Callable[[Bench], Awaitable[list[Row]]]

SCENARIOS: dict[str, tuple[str, Scenario, float]] = {
    # number: (name, run, time limit in seconds)
    "1": ("handoff gap", handoff.run, 60),
    "2": ("added latency", latency.run_latency, 60),
    "3": ("time to first chunk", latency.run_first_chunk, 60),
    "4": ("streaming throughput", throughput.run, 60),
    "5": ("queue scale", scale.run, 300),  # four fronts at 10 000 waiters
    "6": ("priority under load", priority.run, 60),
    "7": ("fewer model swaps", swaps.run, 120),
    "8": ("fleet against round robin", fleet.run, 90),
    "9": ("fleet dispatch cost", dispatch.run, 150),
    "10": ("fair shares", fairness.run, 120),
    "11": ("workers", workers.run, 90),
    "12": ("waiters on two replicas", spread.run, 150),
}
