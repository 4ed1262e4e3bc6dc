"""Scenario 12, waiters over two replicas: N requests (10 000) waiting, half at each of two
proxy replicas on the Redis backend, behind one blocker on the one slot.

Two proxies of their own (``replica-1``, ``replica-2``, one redis-server the scenario
starts) in front of the bench's fake. A gated blocker through replica 1 takes the slot; each
replica's RSS and Redis's ``used_memory`` are read; N/2 requests are sent to each replica,
each on its own connection; each replica confirms its N/2 wait (``wait_queued``: its own
waiters); RSS and ``used_memory`` are read again; the gate opens and the drain is timed.
Memory per waiter: in each replica, (RSS after - before) / (N/2); in Redis, (used_memory
after - before) / N. Needs the Redis queue (``replicas/dispatcher.py``, another branch):
without it each replica would be a queue and a slot of its own, so the rows say so.
"""

from __future__ import annotations

import contextlib
import time

import redis.asyncio as redis

from .. import client
from ..children import start_proxy
from ..context import Bench
from ..procfs import rss_bytes
from ..redis_child import redis_url, start_redis
from ..report import Row
from ..targets import Proxied
from .workers import NEEDS_QUEUE, redis_queue_present

NAME = "12 waiters on two replicas"
TIMEOUT = 60.0
PER_REQUEST = 0.02


def missing(why: str) -> list[Row]:
    return [Row(NAME, f"memory per waiter: {why}", "", {})]


async def run(bench: Bench) -> list[Row]:
    if not redis_queue_present():
        return missing(NEEDS_QUEUE)
    size = max(bench.sizes.queue_sizes)
    half = size // 2
    workdir = bench.workdir
    async with contextlib.AsyncExitStack() as stack:
        redis_child = await start_redis(workdir)
        if redis_child is None:
            return missing("needs redis-server (make redis)")
        stack.push_async_callback(redis_child.stop)
        url = redis_url(redis_child)
        replicas: list[Proxied] = []
        for i in (1, 2):
            child = await start_proxy(workdir, bench.fake.url, "asyncio", url, f"replica-{i}")
            stack.push_async_callback(child.stop)
            replicas.append(Proxied(child, f"replica-{i}"))
        r = redis.Redis.from_url(url)
        stack.push_async_callback(r.aclose)

        async def used_memory() -> int:
            return int((await r.info("memory"))["used_memory"])

        fake = bench.fake
        await fake.mark()
        gate = fake.new_gate("spread")
        limit = TIMEOUT + size * PER_REQUEST
        async with client.session() as s, client.Load() as load:
            load.start(client.generate(s, replicas[0].url, client.body(f"gate:{gate}")))
            await fake.wait(TIMEOUT, started=1)
            rss_before = [rss_bytes(t.pid) for t in replicas]
            redis_before = await used_memory()
            data = client.body("queued")
            for target in replicas:
                for _ in range(half):
                    load.start(client.generate(s, target.url, data))
            for target in replicas:
                await target.wait_here(half, limit)
            for target in replicas:  # and the dispatcher's scheduler holds them all
                await target.wait_dispatched(size, limit)
            rss_after = [rss_bytes(t.pid) for t in replicas]
            redis_after = await used_memory()
            opened = time.perf_counter()
            await fake.open_gate(gate)
            await load.done(limit)
            drain = time.perf_counter() - opened
    per_replica = [(a - b) / half / 1024 for a, b in zip(rss_after, rss_before, strict=True)]
    in_redis = (redis_after - redis_before) / size / 1024
    bench.details["spread"] = {
        "size": size,
        "rss_per_waiter_kb": per_replica,
        "redis_per_waiter_kb": in_redis,
        "drain_s": drain,
    }
    return [
        Row(NAME, f"RSS per waiter, replica 1, N={size}", "KB", {"proxy-redis": per_replica[0]}),
        Row(NAME, f"RSS per waiter, replica 2, N={size}", "KB", {"proxy-redis": per_replica[1]}),
        Row(NAME, f"Redis memory per waiter, N={size}", "KB", {"proxy-redis": in_redis}),
        Row(NAME, f"drain per request, N={size}", "ms", {"proxy-redis": drain / size * 1000}),
    ]
