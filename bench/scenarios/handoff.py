"""Scenario 1, handoff gap: how long the upstream sits idle between one job and the next.

A gated blocker holds the slot while N short non-streamed generates queue up (the target
confirms all N wait); then the gate opens. The gap after job n is the fake's ``started`` of
job n+1 minus its ``finished`` of job n, both stamped in the fake's process. ``finished``
is stamped when the fake's handler returns, just before aiohttp writes the small JSON body,
so every column includes that write. Direct: the fake's own turn queue hands over.

Through the proxy, the scheduler's listener also stamps each slot release and grant (the
same clock, CLOCK_MONOTONIC, in another process), which splits the gap in two: the fake's
last byte -> the proxy releases the slot, and the slot granted -> the next request is in
at the fake (its body read). The grant follows the release in the same call.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field

from .. import client
from ..context import Bench
from ..report import Row
from ..stats import median, ms, percentile
from ..targets import Proxied, Record, Target

TIMEOUT = 30.0
NAME = "1 handoff gap"


@dataclass(frozen=True)
class Handoff:
    gaps_ms: list[float]
    wall_ms: float  # gate opened -> every answer read by the client
    release_ms: list[float] = field(default_factory=list)  # last byte -> slot released
    send_ms: list[float] = field(default_factory=list)  # slot granted -> next request in

    @property
    def median_ms(self) -> float:
        return median(self.gaps_ms)

    @property
    def p99_ms(self) -> float:
        return percentile(self.gaps_ms, 99)

    @property
    def max_ms(self) -> float:
        return max(self.gaps_ms)


def breakdown(
    records: list[Record], granted: list[float], released: list[float]
) -> tuple[list[float], list[float]]:
    """Per gap: the fake's last byte -> slot released, and slot granted -> next arrival.
    With one slot the k-th grant and release belong to the k-th job the fake started."""
    if not (len(records) == len(granted) == len(released)):
        return [], []
    release = [released[k] - r.finished for k, r in enumerate(records[:-1])]
    send = [r.arrived - granted[k] for k, r in enumerate(records) if k > 0]
    return ms(release), ms(send)


async def measure(bench: Bench, target: Target, jobs: int) -> Handoff:
    fake = bench.fake
    await fake.mark()
    traced = target if isinstance(target, Proxied) else None
    if traced is not None:
        await traced.trace_start()
    gate = fake.new_gate(f"handoff-{target.name}")
    async with client.session() as s, client.Load() as load:
        load.start(client.generate(s, target.url, client.body(f"gate:{gate}")))
        await fake.wait(TIMEOUT, started=1)
        for i in range(jobs):
            load.start(client.generate(s, target.url, client.body(f"job {i}")))
        await target.wait_waiting(jobs, TIMEOUT)
        opened = time.perf_counter()
        await fake.open_gate(gate)
        await load.done(TIMEOUT)
        wall = time.perf_counter() - opened
    records = sorted(await fake.records(), key=lambda r: r.started)
    gaps = [b.started - a.finished for a, b in itertools.pairwise(records)]
    if traced is None:
        return Handoff(ms(gaps), wall * 1000)
    release, send = breakdown(records, *await traced.trace_stop())
    return Handoff(ms(gaps), wall * 1000, release, send)


async def run(bench: Bench) -> list[Row]:
    jobs = bench.sizes.handoff_jobs
    found = {t.name: await measure(bench, t, jobs) for t in bench.targets}
    bench.details["handoff"] = {name: asdict(h) for name, h in found.items()}

    def column(figure: str) -> dict[str, float | None]:
        return {name: getattr(h, figure) for name, h in found.items()}

    def proxy_only(values: list[float]) -> dict[str, float | None]:
        return {name: None for name in found} | {"proxy": median(values)}

    proxy = found.get("proxy")
    return [
        Row(NAME, "gap median", "ms", column("median_ms"), "diff").judge(
            "<= 0.3 ms", lambda r: r.value("proxy") <= 0.3
        ),
        Row(NAME, "gap p99", "ms", column("p99_ms"), "diff").judge(
            "<= 1 ms", lambda r: r.value("proxy") <= 1.0
        ),
        Row(NAME, "gap max", "ms", column("max_ms"), "diff"),
        Row(
            NAME,
            "  of which: last byte -> slot released, median",
            "ms",
            proxy_only(proxy.release_ms if proxy else []),
        ),
        Row(
            NAME,
            "  of which: slot granted -> request at fake, median",
            "ms",
            proxy_only(proxy.send_ms if proxy else []),
        ),
        Row(NAME, f"wall time, {jobs} jobs", "ms", column("wall_ms"), "ratio"),
    ]
