"""Scenarios 2 and 3, added latency and time to first chunk, with an idle queue.

One keep-alive connection per target; requests are sequential and interleaved between the
targets (the order rotates every round), so noise on the shared machine falls on every
column alike. Latency: send -> whole non-streamed answer read. First chunk: send -> the
first NDJSON line of a streamed generate (5 tokens). The proxy's figure is set against
direct as the difference of the percentiles. The CPU time the process in between (the
proxy, HAProxy) used over the measured requests, divided by their number, says how much of
the added latency is its own work: it is idle while the other targets are measured.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp

from .. import client
from ..context import Bench
from ..procfs import cpu_seconds
from ..report import Row
from ..stats import median, ms, percentile
from ..targets import Target

WARM_UP = 50

Probe = Callable[[aiohttp.ClientSession, str], Awaitable[float]]


async def whole_answer(s: aiohttp.ClientSession, url: str) -> float:
    data = client.body("hi")
    started = time.perf_counter()
    await client.generate(s, url, data)
    return time.perf_counter() - started


async def first_line(s: aiohttp.ClientSession, url: str) -> float:
    data = client.body("hi", tokens=5, stream=True)
    started = time.perf_counter()
    async with s.post(url + "/api/generate", data=data, headers=client.headers()) as response:
        line = await response.content.readline()
        elapsed = time.perf_counter() - started
        rest = await response.read()
    if response.status != 200 or not line.endswith(b"\n") or not rest:
        raise client.BenchError(f"{url}: unexpected streamed answer {response.status}")
    return elapsed


async def interleaved(
    targets: list[Target], probe: Probe, count: int
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """Latencies per target, and the in-between process's CPU µs per request (direct: none)."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    sessions = {t.name: client.session(connections=1) for t in targets}
    try:
        for t in targets:
            for _ in range(WARM_UP):
                await probe(sessions[t.name], t.url)
        cpu = {t.name: cpu_seconds(t.pid) for t in targets}
        for i in range(count):
            k = i % len(targets)
            for t in targets[k:] + targets[:k]:
                samples[t.name].append(await probe(sessions[t.name], t.url))
        per_request: dict[str, float | None] = {
            t.name: None if t.name == "direct" else (cpu_seconds(t.pid) - cpu[t.name]) / count * 1e6
            for t in targets
        }
    finally:
        for s in sessions.values():
            await s.close()
    return samples, per_request


def _rows(
    name: str, samples: dict[str, list[float]], cpu: dict[str, float | None], goal: float
) -> list[Row]:
    in_ms = {target: ms(values) for target, values in samples.items()}
    p50 = {target: median(values) for target, values in in_ms.items()}
    p99 = {target: percentile(values, 99) for target, values in in_ms.items()}
    count = len(next(iter(samples.values())))
    return [
        Row(name, f"p50, {count} requests", "ms", dict(p50), "diff").judge(
            f"added <= {goal:g} ms", lambda r: r.value("proxy") - r.value("direct") <= goal
        ),
        Row(name, f"p99, {count} requests", "ms", dict(p99), "diff"),
        Row(name, "CPU per request, process in between", "µs", cpu),
    ]


async def run_latency(bench: Bench) -> list[Row]:
    samples, cpu = await interleaved(bench.targets, whole_answer, bench.sizes.latency_requests)
    bench.details["latency_ms"] = {k: ms(v) for k, v in samples.items()}
    return _rows("2 added latency", samples, cpu, 0.3)


async def run_first_chunk(bench: Bench) -> list[Row]:
    samples, cpu = await interleaved(bench.targets, first_line, bench.sizes.ttfc_requests)
    bench.details["first_chunk_ms"] = {k: ms(v) for k, v in samples.items()}
    return _rows("3 time to first chunk", samples, cpu, 0.5)
