"""Scenario 11, workers: requests per second of ``seadragon-proxy serve --workers N`` for
N = 1, 2, 4 on one port, in front of a fake Ollama of its own with 8 slots.

Two loads, each for a fixed time with ``CONCURRENCY`` requests always in flight on
keep-alive connections: small non-queued requests (``GET /api/tags``) and short inference
requests (a one-token, non-streamed generate, queued for the 8 slots). One worker is plain
``serve`` (memory backend); 2 and 4 are ``--workers N`` through a redis-server the bench
starts. With several workers the 8 slots are only 8 in total once the Redis queue (another
branch, ``seadragon_proxy.replicas.dispatcher``) is there: until then every worker would
have 8 slots of its own, so the inference figure is left out and the row says "needs the
Redis queue". The load generator is one Python process on the same machine: on 2 cores it
competes with the workers, so these figures are a floor, not the proxy's ceiling.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .. import client
from ..children import ROOT, START_TIMEOUT, Child, die_with_parent, proxy_config, start_fake
from ..context import Bench
from ..redis_child import free_port, redis_url, start_redis
from ..report import Row

NAME = "11 workers"
WORKERS = (1, 2, 4)
SLOTS = 8
CONCURRENCY = 64
NEEDS_QUEUE = "needs the Redis queue"


def redis_queue_present() -> bool:
    """The shared queue (the redisqueue branch) is installed."""
    return importlib.util.find_spec("seadragon_proxy.replicas.dispatcher") is not None


def config(workdir: Path, upstream: str, redis: str | None, port: int) -> dict[str, Any]:
    doc = proxy_config(workdir, upstream)
    doc["upstream"]["slots"] = SLOTS
    doc["server"]["port"] = port
    if redis is not None:
        doc["queue"]["backend"] = "redis"
        doc["queue"]["redis"] = {"url": redis, "lease": 5, "prefix": "bench:"}
        doc["server"]["replica"] = "bench"
    return doc


async def start_serve(workdir: Path, path: Path, workers: int, url: str) -> Child:
    """``serve --workers N`` (or plain ``serve``); returns once every worker answers
    ``/health`` (the log is at warning, so no line says so: start-up is polled, never a
    measured request)."""
    args = ["seadragon_proxy", "serve", "--config", str(path)]
    if workers > 1:
        args += ["--workers", str(workers)]
    log = workdir / f"serve-{workers}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr, cwd=ROOT, preexec_fn=die_with_parent,
        )  # fmt: skip
    child = Child(f"serve --workers {workers}", process, log)
    seen: set[str] = set()
    connector = aiohttp.TCPConnector(force_close=True)  # each try a new connection
    try:
        async with aiohttp.ClientSession(connector=connector) as s:
            async with asyncio.timeout(START_TIMEOUT):
                while len(seen) < workers:
                    if process.returncode is not None:
                        raise client.BenchError(f"{child.name} exited:\n{child.log_tail()}")
                    try:
                        async with s.get(url + "/health") as r:
                            seen.add(str((await r.json()).get("replica", "solo")))
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.02)
    except BaseException:
        await child.stop()
        raise
    return child


async def rate(url: str, seconds: float, send: Any) -> float:
    """Requests answered per second with ``CONCURRENCY`` always in flight."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await send(s, url)
            done += 1

    async with client.session(connections=CONCURRENCY) as s:
        for _ in range(CONCURRENCY):  # warm the connections
            await send(s, url)
        started = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    return done / elapsed


async def tags(s: aiohttp.ClientSession, url: str) -> None:
    async with s.get(url + "/api/tags") as r:
        await r.read()
        if r.status != 200:
            raise client.BenchError(f"/api/tags answered {r.status}")


async def short_generate(s: aiohttp.ClientSession, url: str) -> None:
    await client.generate(s, url, client.body("short"), source="chat")


async def run(bench: Bench) -> list[Row]:
    seconds = bench.sizes.cpu_window
    shared = redis_queue_present()
    found: dict[int, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="seadragon-bench-workers-") as tmp:
        workdir = Path(tmp)
        fake = await start_fake(workdir, "asyncio", parallel=SLOTS, name="fake-8")
        redis = await start_redis(workdir)
        try:
            for workers in WORKERS:
                if workers > 1 and redis is None:
                    found[workers] = {"tags": None, "generate": None}
                    continue
                url_redis = redis_url(redis) if workers > 1 and redis is not None else None
                path = workdir / f"seadragon-{workers}.yaml"
                port = free_port()
                path.write_text(yaml.safe_dump(config(workdir, fake.url, url_redis, port)))
                url = f"http://127.0.0.1:{port}"
                child = await start_serve(workdir, path, workers, url)
                try:
                    figures: dict[str, float | None] = {"tags": await rate(url, seconds, tags)}
                    figures["generate"] = (
                        await rate(url, seconds, short_generate) if workers == 1 or shared else None
                    )
                finally:
                    await child.stop()
                found[workers] = figures
        finally:
            if redis is not None:
                await redis.stop()
            await fake.stop()
    bench.details["workers"] = {str(k): v for k, v in found.items()}
    rows = []
    for workers, figures in found.items():
        label = "1 worker (memory)" if workers == 1 else f"{workers} workers (redis)"
        missing = "" if redis is not None or workers == 1 else ", needs redis-server"
        rows.append(Row(NAME, f"/api/tags, {label}{missing}", "req/s", {"proxy": figures["tags"]}))
        note = ""
        if figures["generate"] is None and workers > 1 and not shared:
            note = f", {NEEDS_QUEUE}"
        rows.append(
            Row(
                NAME,
                f"generate, {SLOTS} slots, {label}{note or missing}",
                "req/s",
                {"proxy": figures["generate"]},
            )
        )
    return rows
