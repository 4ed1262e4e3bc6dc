"""Scenario 4, streaming throughput: one generation of 50 000 small NDJSON lines, written
as fast as the fake can, read by the client as fast as it arrives.

Bytes per second at the client (send -> end of stream), repeated and interleaved between
targets; the median of the repeats. The fake's own time to write the stream is kept in the
JSON (``fake_write_s``): when it is close to the client's time, the fake was the limit,
and the CPU share of the process in between (proxy, HAProxy) says how much headroom it had.
Bytes relayed per CPU second of that process is what it could relay with a core to itself,
whatever the fake's speed (which varies with the machine's load).
"""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp

from .. import client
from ..context import Bench
from ..procfs import cpu_seconds
from ..report import Row
from ..stats import median
from ..targets import Target

TIMEOUT = 60.0
NAME = "4 streaming throughput"


async def one_stream(bench: Bench, s: aiohttp.ClientSession, target: Target) -> dict[str, float]:
    tokens = bench.sizes.stream_tokens
    await bench.fake.mark()
    data = client.body("stream", tokens=tokens, stream=True)
    size = 0
    lines = 0
    cpu = cpu_seconds(target.pid)
    started = time.perf_counter()
    async with s.post(target.url + "/api/generate", data=data, headers=client.headers()) as r:
        async for chunk in r.content.iter_any():
            size += len(chunk)
            lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds(target.pid) - cpu
    if r.status != 200 or lines != tokens + 1:
        raise client.BenchError(f"{target.name}: {r.status}, {lines} lines of {tokens + 1}")
    (record,) = await bench.fake.records()
    return {
        "bytes": size,
        "seconds": elapsed,
        "mb_per_s": size / elapsed / 1e6,
        "fake_write_s": record.finished - record.started,
        "cpu_percent": cpu / elapsed * 100,  # of the fake itself for direct
        "mb_per_cpu_s": size / cpu / 1e6 if cpu else math.nan,
    }


async def run(bench: Bench) -> list[Row]:
    found: dict[str, list[dict[str, float]]] = {t.name: [] for t in bench.targets}
    async with client.session() as s:
        for t in bench.targets:  # warm-up: a short stream each
            await client.generate(s, t.url, client.body("warm", tokens=500, stream=True))
        for i in range(bench.sizes.stream_repeats):
            k = i % len(bench.targets)
            for t in bench.targets[k:] + bench.targets[:k]:
                async with asyncio.timeout(TIMEOUT):
                    found[t.name].append(await one_stream(bench, s, t))
    bench.details["throughput"] = found
    rate: dict[str, float | None] = {
        name: median([run["mb_per_s"] for run in runs]) for name, runs in found.items()
    }
    repeats = bench.sizes.stream_repeats

    def in_between(figure: str) -> dict[str, float | None]:
        return {
            name: None if name == "direct" else median([run[figure] for run in runs])
            for name, runs in found.items()
        }

    return [
        Row(
            NAME, f"{bench.sizes.stream_tokens} lines, median of {repeats}", "MB/s", rate, "ratio"
        ).judge(">= 0.9x direct", lambda r: r.value("proxy") >= 0.9 * r.value("direct")),
        Row(NAME, "CPU of the process in between", "%", in_between("cpu_percent")),
        Row(NAME, "relayed per CPU second of it", "MB", in_between("mb_per_cpu_s")),
    ]
