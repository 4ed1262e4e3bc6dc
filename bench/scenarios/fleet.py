"""Scenario 8, a fleet against round robin: two servers, two models.

Two fakes with residency (one model each at a time, one slot, load 0.6 s, job 0.1 s). 24
batch requests, the models in pairs (A A B B ...), are sent at once. Fronts: the proxy with
both servers under `upstreams:` and `queue.affinity` as in scenario 7 (skipped with a note
where this build refuses it), and nginx round robin over the same two fakes (Debian's
nginx, started here; skipped with a note when it is not installed: scripts/ensure-nginx).
Round robin sends each server both models in turn, so every job reloads; the fleet can keep
one model per server: 2 loads.
"""

from __future__ import annotations

import sys
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
)
from ..fleet import ports as ports_of
from ..nginx import find_nginx, nginx_round_robin
from ..report import Row

NAME = "8 fleet vs round robin"
BATCH = 24
TIMEOUT = 60.0


async def measure(workdir: Path, front: str) -> dict[str, float] | None:
    resident = await start_resident(workdir, f"resident-{front}", count=2)
    urls = [f"http://127.0.0.1:{p}" for p in ports_of(resident)]
    try:
        if front == "proxy":
            config = fleet_config(workdir, urls, affinity=AFFINITY)
            if (why := await refusal(workdir, "check-fleet", config)) is not None:
                skipped("8", front, why)
                return None
            proxy: Child = await start_front(workdir, "proxy-fleet", config)
            try:
                began, jobs = await drive(proxy.url)
            finally:
                await proxy.stop()
        else:
            nginx = find_nginx()
            if nginx is None:
                print("[bench] scenario 8: nginx skipped, not installed", file=sys.stderr)
                return None
            async with nginx_round_robin(nginx, workdir, ports_of(resident)) as balancer:
                began, jobs = await drive(balancer.url)
        servers = await stats(resident)
    finally:
        await resident.stop()
    return {
        "makespan": max(j.done for j in jobs) - began,
        "loads": float(loads(servers)),
        "max_in_flight": float(max(s["max_in_flight"] for s in servers)),
    }


async def drive(url: str) -> tuple[float, list[Sent]]:
    jobs = [Sent(f"batch-{i}", (A, B)[i // 2 % 2], "scripts") for i in range(BATCH)]
    async with client.session() as s, client.Load() as load:
        began = time.perf_counter()
        for job in jobs:
            load.start(send(s, url, job))
        await load.done(TIMEOUT)
    return began, jobs


async def run(bench: Bench) -> list[Row]:
    found: dict[str, dict[str, float] | None] = {}
    with tempfile.TemporaryDirectory(prefix="seadragon-bench-fleet-") as tmp:
        for front in ("nginx", "proxy"):
            found[front] = await measure(Path(tmp) / front, front)
    bench.details["fleet"] = found

    def column(key: str) -> dict[str, float | None]:
        return {name: (f[key] if f is not None else None) for name, f in found.items()}

    rows = [
        Row(NAME, "makespan", "s", column("makespan")),
        Row(NAME, "model loads", "count", column("loads")),
        Row(NAME, "most in flight at one server", "count", column("max_in_flight")),
    ]
    proxy, nginx = found["proxy"], found["nginx"]
    if proxy is not None and nginx is not None:
        ratio = proxy["makespan"] / nginx["makespan"]
        rows.insert(1, Row(NAME, "makespan, proxy / nginx", "x", {"proxy": ratio}))
        rows[1].judge("<= 0.35", lambda r: r.value("proxy") <= 0.35)
    if proxy is not None:
        rows[-2].judge("<= 3", lambda r: r.value("proxy") <= 3)
        rows[-1].judge("<= 1 (slots)", lambda r: r.value("proxy") <= 1)
    return rows
