"""Scenario 5, queue scale: 10, 1 000 and 10 000 requests waiting behind a blocker.

For each size and target: a gated blocker takes the slot; the holder's RSS is read; N
requests are sent, each on its own connection (one session, ``TCPConnector(limit=0)``), and
the target confirms N wait; RSS is read again; the holder's CPU time is read over a window
of pure waiting; then the gate opens and the drain (gate opened -> N answers read) is timed.
The holder is the proxy, HAProxy, or for direct the fake itself (its figures include the
fake's per-request record, so they are a reference, not a baseline to subtract).
Sizes run smallest first in the same processes: memory freed by a smaller run can be reused
by the next, so the per-request RSS of a larger run may be read a little low.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass

from .. import client
from ..context import Bench
from ..procfs import CpuMeter, listen_overflows, rss_bytes
from ..report import Compare, Row
from ..targets import Target

NAME = "5 queue scale"
TIMEOUT = 30.0
PER_REQUEST = 0.02  # seconds allowed per request, to fill and to drain


@dataclass(frozen=True)
class Scale:
    size: int
    fill_s: float  # first request sent -> all N confirmed waiting
    listen_overflows: int  # connections the holder's full accept queue turned away meanwhile
    rss_per_request_kb: float
    cpu_percent: float  # of one core, while all N wait
    drain_s: float

    @property
    def dispatch_ms(self) -> float:
        return self.drain_s / self.size * 1000


async def measure(bench: Bench, target: Target, size: int) -> Scale:
    fake = bench.fake
    await fake.mark()
    gate = fake.new_gate(f"scale-{target.name}-{size}")
    limit = TIMEOUT + size * PER_REQUEST
    async with client.session() as s, client.Load() as load:
        load.start(client.generate(s, target.url, client.body(f"gate:{gate}")))
        await fake.wait(TIMEOUT, started=1)
        rss_before = rss_bytes(target.pid)
        overflows = listen_overflows()
        sent = time.perf_counter()
        data = client.body("queued")
        for _ in range(size):
            load.start(client.generate(s, target.url, data))
        await target.wait_waiting(size, limit)
        fill = time.perf_counter() - sent
        overflows = listen_overflows() - overflows
        rss_after = rss_bytes(target.pid)
        meter = CpuMeter.start(target.pid, time.perf_counter())
        await asyncio.sleep(bench.sizes.cpu_window)  # the measuring window, not a wait for an event
        cpu = meter.share(time.perf_counter())
        opened = time.perf_counter()
        await fake.open_gate(gate)
        await load.done(limit)
        drain = time.perf_counter() - opened
    rss = (rss_after - rss_before) / size / 1024
    return Scale(size, fill, overflows, rss, cpu * 100, drain)


async def run(bench: Bench) -> list[Row]:
    found: dict[int, dict[str, Scale]] = {}
    for size in bench.sizes.queue_sizes:
        found[size] = {t.name: await measure(bench, t, size) for t in bench.targets}
    bench.details["scale"] = {
        str(size): {name: asdict(s) | {"dispatch_ms": s.dispatch_ms} for name, s in row.items()}
        for size, row in found.items()
    }
    return rows_for(found)


FIGURES: tuple[tuple[str, str, str, Compare], ...] = (  # Scale attribute, metric, unit
    ("rss_per_request_kb", "RSS per waiting request", "KB", ""),
    ("cpu_percent", "CPU while they wait", "%", ""),
    ("fill_s", "time to queue them", "s", "ratio"),
    ("listen_overflows", "accept queue overflows", "count", ""),
    ("dispatch_ms", "drain per request", "ms", "ratio"),
)


def rows_for(found: dict[int, dict[str, Scale]]) -> list[Row]:
    """One row per figure and size; targets on the largest size (and RSS from 1 000 up:
    below that a few pages of allocator noise swamp the figure)."""
    smallest, largest = min(found), max(found)
    base = found[smallest]["proxy"].dispatch_ms if "proxy" in found[smallest] else math.nan
    rows: list[Row] = []
    for figure, metric, unit, compare in FIGURES:
        for size, by_target in found.items():
            values: dict[str, float | None] = {n: getattr(s, figure) for n, s in by_target.items()}
            row = Row(NAME, f"{metric}, N={size}", unit, values, compare)
            if figure == "rss_per_request_kb" and size >= 1000:
                row.judge("<= 16 KB", lambda r: r.value("proxy") <= 16)
            elif figure == "cpu_percent" and size == largest:
                row.judge("~0 % (<= 1 %)", lambda r: r.value("proxy") <= 1.0)
            elif figure == "dispatch_ms" and size == largest and largest != smallest:
                row.judge(f"<= 2x N={smallest}", lambda r: r.value("proxy") <= 2 * base)
            rows.append(row)
    return rows
