"""Scenario 9, the fleet's dispatch cost: 10 000 waiters over 8 servers and 20 models
against 10 waiters.

Eight fakes with residency in one process (no load cost, no job time: what is timed is
the proxy choosing and handing over), three models each at most, under `upstreams:`
(skipped with a note where this build refuses it). Each server first gets a gated blocker;
then N requests over 20 models (seeded) are sent and confirmed waiting in the proxy; the
gates open and the drain is timed: per dispatch = drain / N. Target: with 10 000 waiters
within 2x of the cost with 10.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from .. import client
from ..context import Bench
from ..fleet import Sent, fleet_config, refusal, send, skipped, start_front, start_resident
from ..fleet import ports as ports_of
from ..report import Row

NAME = "9 fleet dispatch"
SERVERS = 8
MODELS = tuple(f"model-{i:02d}:1b" for i in range(20))
SIZES = (10, 10_000)
TIMEOUT = 60.0
PER_REQUEST = 0.02
SEED = 9


async def measure(workdir: Path) -> dict[int, float] | None:
    resident = await start_resident(
        workdir, "resident-dispatch", count=SERVERS, load=0, job=0, models=MODELS, max_loaded=3
    )
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports_of(resident)]
        config = fleet_config(workdir, urls, max_loaded=3)
        if (why := await refusal(workdir, "check-dispatch", config)) is not None:
            skipped("9", "proxy", why)
            return None
        proxy = await start_front(workdir, "proxy-dispatch", config)
        rng = random.Random(SEED)
        out: dict[int, float] = {}
        arrived = 0
        try:
            for size in SIZES:
                limit = TIMEOUT + size * PER_REQUEST
                async with client.session() as s, client.Load() as load:
                    gate = f"block-{size}"
                    for i in range(SERVERS):
                        load.start(send(s, proxy.url, Sent(f"gate:{gate}", MODELS[i], "scripts")))
                    arrived += SERVERS
                    await resident.control().call("wait", TIMEOUT, arrived=arrived)
                    for i in range(size):
                        job = Sent(f"waiter-{i}", rng.choice(MODELS), "scripts")
                        load.start(send(s, proxy.url, job))
                    await proxy.control().call("wait_queued", limit, n=size)
                    opened = time.perf_counter()
                    await resident.control().call("gate", TIMEOUT, name=gate)
                    await load.done(limit)
                    out[size] = (time.perf_counter() - opened) / size * 1000
                    arrived += size
        finally:
            await proxy.stop()
    finally:
        await resident.stop()
    return out


async def run(bench: Bench) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="seadragon-bench-dispatch-") as tmp:
        found = await measure(Path(tmp))
    bench.details["dispatch"] = found
    small, large = SIZES
    rows = [
        Row(NAME, f"per dispatch, {n} waiters", "ms", {"proxy": found[n] if found else None})
        for n in SIZES
    ]
    ratio = found[large] / found[small] if found else None
    rows.append(Row(NAME, f"{large} / {small} waiters", "x", {"proxy": ratio}))
    if found:
        rows[-1].judge("<= 2", lambda r: r.value("proxy") <= 2)
    return rows
