"""Scenario 7, fewer model swaps: one server holding one model, two models asked for.

A fake with residency (one model at a time, one slot, a load costs 0.6 s, a job 0.1 s).
24 batch requests alternating the two models are sent at once; once the front holds them
all, 4 coding requests (the second model) follow. Fronts: direct (Ollama's FIFO), the proxy
with strict priority (Part 1's `upstream:`), the proxy with `queue.affinity` (the fleet's
config; skipped with a note where this build refuses it). The best order loads 3 times
(A; B for the coding work and B's batch; A again): about 0.27x direct's makespan.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import client
from ..children import Child
from ..context import Bench
from ..fleet import (
    AFFINITY,
    A,
    B,
    Sent,
    fleet_config,
    loads,
    refusal,
    send,
    skipped,
    start_front,
    start_resident,
    stats,
    strict_config,
)
from ..report import Row

NAME = "7 fewer swaps"
BATCH, CODING = 24, 4
TIMEOUT = 60.0


async def measure(workdir: Path, front: str) -> dict[str, float] | None:
    resident = await start_resident(workdir, f"resident-{front}")
    proxy: Child | None = None
    try:
        fake_url = f"http://127.0.0.1:{resident.port}"
        if front == "direct":
            url = fake_url
        else:
            config = (
                strict_config(workdir, fake_url)
                if front == "proxy"
                else fleet_config(workdir, [fake_url], affinity=AFFINITY)
            )
            if (why := await refusal(workdir, f"check-{front}", config)) is not None:
                skipped("7", front, why)
                return None
            proxy = await start_front(workdir, f"proxy-{front}", config)
            url = proxy.url
        batch = [Sent(f"batch-{i}", (A, B)[i % 2], "scripts") for i in range(BATCH)]
        coding = [Sent(f"coding-{i}", B, "coding") for i in range(CODING)]
        async with client.session() as s, client.Load() as load:
            began = time.perf_counter()
            for job in batch:
                load.start(send(s, url, job))
            if proxy is None:
                await resident.control().call("wait", TIMEOUT, arrived=BATCH)
            else:  # one is at the fake, the rest wait in the proxy
                await resident.control().call("wait", TIMEOUT, arrived=1)
                await proxy.control().call("wait_queued", TIMEOUT, n=BATCH - 1)
            for job in coding:
                load.start(send(s, url, job))
            await load.done(TIMEOUT)
        servers = await stats(resident)
    finally:
        if proxy is not None:
            await proxy.stop()
        await resident.stop()
    arrived = {r["prompt"]: r["arrived"] for r in servers[0]["records"]}
    # a batch request sent to the server while some coding request was waiting for it
    overtaken = sum(
        1 for job in batch if any(c.sent < arrived[job.prompt] < arrived[c.prompt] for c in coding)
    )
    return {
        "makespan": max(j.done for j in batch + coding) - began,
        "loads": float(loads(servers)),
        "overtaken": float(overtaken),
        "coding_max": max(c.done - c.sent for c in coding),
    }


async def run(bench: Bench) -> list[Row]:
    found: dict[str, dict[str, float] | None] = {}
    with tempfile.TemporaryDirectory(prefix="seadragon-bench-swaps-") as tmp:
        for front in ("direct", "proxy", "affinity"):
            found[front] = await measure(Path(tmp) / front, front)
    bench.details["swaps"] = found

    def column(key: str) -> dict[str, float | None]:
        return {name: (f[key] if f is not None else None) for name, f in found.items()}

    rows = [
        Row(NAME, "makespan", "s", column("makespan"), "ratio"),
        Row(NAME, "model loads", "count", column("loads"), "diff"),
        Row(NAME, "batch sent while coding waited", "count", column("overtaken"), "diff"),
        Row(NAME, "coding request, sent to answered, max", "s", column("coding_max"), "diff"),
    ]
    if found["affinity"] is not None:
        direct = found["direct"]
        rows[0].judge(
            "affinity <= 0.35x direct",
            lambda r: direct is not None and r.value("affinity") <= 0.35 * r.value("direct"),
        )
        rows[1].judge("affinity <= 3", lambda r: r.value("affinity") <= 3)
        rows[2].judge("affinity 0", lambda r: r.value("affinity") == 0)
    return rows
