"""Several replicas, one queue (queue.backend: redis): real proxies on real ports in front of
one fake Ollama, sharing a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.replicas.dispatcher import Dispatcher
from seadragon_proxy.server import start_server
from seadragon_proxy.settings import load_settings
from seadragon_proxy.typedefs import RECORDER, REPLICA, SCHEDULER

from .conftest import BASE_CONFIG, MODEL, Proxy, Watch, merge
from .redisserver import RedisServer
from .served import Served, spawn_serve

LEASE = 2  # seconds: short, and still well above a loaded machine's scheduling delays

ReplicaFactory = Callable[..., Awaitable[Proxy]]


def replica_config(
    tmp_path: Path, fake: FakeOllama, redis: RedisServer, name: str, extra: dict[str, Any]
) -> Path:
    home = tmp_path / name
    home.mkdir()
    config = merge(
        BASE_CONFIG,
        {
            "upstream": {"url": fake.url},
            "queue": {"backend": "redis", "redis": {"url": redis.url, "lease": LEASE}},
            "server": {"replica": name},
            "whitelist": {"database": str(home / "seadragon.db")},
        },
    )
    config = merge(config, extra)
    path = home / "seadragon.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
async def make_replica(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[ReplicaFactory]:
    started: list[Proxy] = []

    async def factory(name: str, extra: dict[str, Any] | None = None) -> Proxy:
        path = replica_config(tmp_path, fake, redis_server, name, extra or {})
        server = await start_server(load_settings(path))
        session = aiohttp.ClientSession()
        proxy = Proxy(server, fake, path, {}, session, Watch(server.app[SCHEDULER]))
        server.app[RECORDER].listeners.append(proxy.on_record)
        started.append(proxy)
        replica = server.app[REPLICA]
        assert replica is not None and await replica.link.wait_up(5)
        return proxy

    yield factory
    for gate in list(fake._gates.values()):
        gate.set()
    for proxy in started:
        await proxy.session.close()
        await proxy.server.stop()


def dispatcher_of(proxy: Proxy) -> Dispatcher:
    replica = proxy.server.app[REPLICA]
    assert replica is not None
    return replica.dispatcher


class Changes:
    """Wakes a test when any replica's dispatcher or remote queue changes: no clock."""

    def __init__(self, *proxies: Proxy) -> None:
        self._changed = asyncio.Event()
        for proxy in proxies:
            replica = proxy.server.app[REPLICA]
            assert replica is not None
            replica.dispatcher.listeners.append(lambda _: self._changed.set())
            replica.queue.listeners.append(lambda *_: self._changed.set())

    async def until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


async def leader(*proxies: Proxy, timeout: float = 10) -> Proxy:
    """The replica holding the dispatcher lease once it has synced (it admits tickets)."""
    await Changes(*proxies).until(
        lambda: any(dispatcher_of(p).dispatching for p in proxies), timeout
    )
    return next(p for p in proxies if dispatcher_of(p).dispatching)


def gen(proxy: Proxy, prompt: str, source: str) -> asyncio.Task[tuple[int, Any]]:
    return asyncio.create_task(proxy.generate(prompt, source))


async def queue_view(proxy: Proxy) -> dict[str, Any]:
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
        return doc


async def test_two_replicas_keep_the_global_priority_order_and_the_slots(
    make_replica: ReplicaFactory, fake: FakeOllama
) -> None:
    one = await make_replica("proxy-1")
    two = await make_replica("proxy-2")
    boss = await leader(one, two)
    gate = fake.gate("block")
    blocker = gen(one, "gate:block", "scripts")
    await fake.wait_for(1)
    late = gen(one, "late", "scripts")  # waits at replica 1
    await boss.watch.queued(1)
    urgent = gen(two, "urgent", "coding")  # arrives later, at replica 2, and outranks it
    await boss.watch.queued(2)

    for proxy in (one, two):  # either replica's view lists every replica's waiters
        view = await queue_view(proxy)
        assert [(e["source"], e["replica"]) for e in view["entries"]] == [
            ("coding", "proxy-2"),
            ("scripts", "proxy-1"),
        ]
        assert [p["replica"] for p in view["processing"]] == ["proxy-1"]
        assert view["slots"] == 1

    gate.set()
    results = await asyncio.gather(blocker, late, urgent)
    assert [status for status, _ in results] == [200, 200, 200]
    assert [s.prompt for s in fake.inference] == ["gate:block", "urgent", "late"]
    assert fake.max_in_flight == 1
    assert (await queue_view(two))["entries"] == []


async def test_waiter_hanging_up_at_one_replica_passes_the_turn_on(
    make_replica: ReplicaFactory, fake: FakeOllama
) -> None:
    one = await make_replica("proxy-1")
    two = await make_replica("proxy-2")
    boss = await leader(one, two)
    gate = fake.gate("block")
    blocker = gen(one, "gate:block", "scripts")
    await fake.wait_for(1)
    gone = gen(two, "gone", "coding")
    await boss.watch.queued(1)
    after = gen(one, "after", "scripts")
    await boss.watch.queued(2)
    gone.cancel()  # the client hangs up: replica 2 says dropped, the dispatcher lets it go
    await boss.watch.queued(1)
    gate.set()
    assert (await blocker)[0] == 200 and (await after)[0] == 200
    assert [s.prompt for s in fake.inference] == ["gate:block", "after"]


async def test_the_queue_limit_counts_every_replicas_waiters(
    make_replica: ReplicaFactory, fake: FakeOllama
) -> None:
    extra = {"queue": {"max_size": 1}}
    one = await make_replica("proxy-1", extra)
    two = await make_replica("proxy-2", extra)
    boss = await leader(one, two)
    gate = fake.gate("block")
    blocker = gen(one, "gate:block", "scripts")
    await fake.wait_for(1)
    waiting = gen(one, "waiting", "scripts")
    await boss.watch.queued(1)
    status, doc = await two.generate("one too many", "coding")
    assert status == 503
    assert doc["error"] == "server busy, please try again.  maximum pending requests exceeded"
    gate.set()
    assert (await blocker)[0] == 200 and (await waiting)[0] == 200


async def test_max_wait_is_timed_by_the_waiters_replica_and_it_leaves_the_shared_line(
    make_replica: ReplicaFactory, fake: FakeOllama
) -> None:
    one = await make_replica("proxy-1")
    two = await make_replica("proxy-2", {"queue": {"max_wait": 0.2}})
    boss = await leader(one, two)
    gate = fake.gate("block")
    blocker = gen(one, "gate:block", "scripts")
    await fake.wait_for(1)
    impatient = gen(two, "impatient", "coding")
    await boss.watch.queued(1)
    status, doc = await impatient
    assert status == 503 and "queue.max_wait (0.2 s)" in doc["error"]
    await boss.watch.queued(0)  # dropped: the dispatcher no longer holds it
    gate.set()
    assert (await blocker)[0] == 200
    assert [s.prompt for s in fake.inference] == ["gate:block"]


async def link_state(link: Any, *, up: bool, timeout: float = 10) -> None:
    changed = asyncio.Event()
    link.add_state_listener(lambda _: changed.set())
    async with asyncio.timeout(timeout):
        while link.up != up:
            changed.clear()
            await changed.wait()


async def test_redis_outage_503_names_redis_streams_finish_metadata_works_then_resumes(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer
) -> None:
    one = await make_replica("proxy-1")
    await leader(one)
    replica = one.server.app[REPLICA]
    assert replica is not None
    gate = fake.gate("stream")
    running = gen(one, "gate:stream", "scripts")
    await fake.wait_for(1)
    await redis_server.stop(signal.SIGKILL)
    await link_state(replica.link, up=False)

    status, doc = await one.generate("refused", "coding")
    assert status == 503
    assert "Redis at redis://127.0.0.1" in doc["error"] and "unreachable" in doc["error"]
    async with one.session.get(one.url + "/api/tags") as r:
        assert r.status == 200  # metadata never touches the queue
    async with one.session.get(one.url + "/api/admin/queue") as r:
        assert r.status == 503 and "Redis at" in (await r.json())["error"]
    gate.set()
    status, lines = await running
    assert status == 200 and lines[-1]["done"] is True  # the running stream went on

    await redis_server.start()  # same port: the link reconnects, no restart
    await link_state(replica.link, up=True)
    await leader(one)
    status, lines = await one.generate("after", "coding")
    assert status == 200 and lines[-1]["done"] is True


async def test_a_stream_that_ends_while_its_replica_is_cut_off_frees_the_slot_on_return(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer
) -> None:
    """Only replica 2 loses Redis (its ACL user is switched off): the dispatcher never sees
    an outage, so only replica 2 saying "finished" on its return can free the slot."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", "p2", "on", ">pw", "~*", "&*", "+@all")
        lease = {"queue": {"redis": {"lease": 30}}}  # no heartbeat expiry to help
        one = await make_replica("proxy-1", lease)
        boss = await leader(one)
        cut_url = redis_server.url.replace("redis://", "redis://p2:pw@")
        two = await make_replica("proxy-2", {"queue": {"redis": {"lease": 30, "url": cut_url}}})
        replica = two.server.app[REPLICA]
        assert replica is not None
        gate = fake.gate("stream")
        running = gen(two, "gate:stream", "scripts")
        await fake.wait_for(1)
        await boss.watch.until(lambda: boss.scheduler.in_flight == 1)
        waiter = gen(one, "waiter", "coding")
        await boss.watch.queued(1)

        await admin.execute_command("ACL", "SETUSER", "p2", "off")
        await admin.execute_command("CLIENT", "KILL", "USER", "p2")
        await link_state(replica.link, up=False)
        gate.set()
        assert (await running)[0] == 200  # ended while replica 2 could not say so
        await asyncio.gather(*replica.queue._tasks)  # its "finished" tried and failed
        assert len(replica.queue._outbox) == 1
        assert boss.scheduler.in_flight == 1 and not waiter.done()

        await admin.execute_command("ACL", "SETUSER", "p2", "on")
        status, lines = await waiter  # replica 2 is back and says "finished"
        assert status == 200 and lines[-1]["done"] is True
        assert [s.prompt for s in fake.inference] == ["gate:stream", "waiter"]
    finally:
        await admin.aclose()


async def test_a_waiter_at_a_replica_that_loses_redis_gets_503(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer
) -> None:
    one = await make_replica("proxy-1")
    boss = await leader(one)
    gate = fake.gate("stream")
    running = gen(one, "gate:stream", "scripts")
    await fake.wait_for(1)
    waiter = gen(one, "waiter", "coding")
    await boss.watch.queued(1)
    await redis_server.stop(signal.SIGKILL)
    status, doc = await waiter
    assert status == 503 and "Redis" in doc["error"]
    gate.set()
    assert (await running)[0] == 200


# -- kill -9 ---------------------------------------------------------------------------------


async def spawn_replica(
    tmp_path: Path,
    fake: FakeOllama,
    redis: RedisServer,
    name: str,
    extra: dict[str, Any] | None = None,
) -> Served:
    extra = merge({"log": {"format": "json"}}, extra or {})
    path = replica_config(tmp_path, fake, redis, name, extra)
    served = Served(await spawn_serve(path), path)
    served.url = (await served.wait_for("listening"))["url"]
    return served


async def test_kill_9_of_a_replica_holding_a_slot_frees_it_within_the_lease(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    one = await make_replica("proxy-1")
    boss = await leader(one)
    other = await spawn_replica(tmp_path, fake, redis_server, "proxy-9")
    session = aiohttp.ClientSession()
    gate = fake.gate("held")
    try:
        body = {"model": MODEL, "prompt": "gate:held"}
        headers = {"X-Test-Source": "chat"}
        held = asyncio.create_task(
            session.post(other.url + "/api/generate", json=body, headers=headers)
        )
        await fake.wait_for(1)
        await boss.watch.until(lambda: boss.scheduler.in_flight == 1)
        doomed = asyncio.create_task(
            session.post(
                other.url + "/api/generate", json={**body, "prompt": "doomed"}, headers=headers
            )
        )
        await boss.watch.queued(1)  # the doomed replica's waiter is in the shared line
        waiting = gen(one, "survivor", "scripts")
        await boss.watch.queued(2)
        os.kill(other.process.pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        async with asyncio.timeout(LEASE + 5):
            status, lines = await waiting  # the dead replica's slot and waiter are given back
        assert status == 200 and lines[-1]["done"] is True
        assert loop.time() - killed < LEASE + 1
        assert [s.prompt for s in fake.inference] == ["gate:held", "survivor"]
        for task in (held, doomed):
            with pytest.raises(aiohttp.ClientError):
                async with asyncio.timeout(10):
                    await task
        assert (await queue_view(one))["entries"] == []
    finally:
        gate.set()
        await session.close()
        await other.stop()


async def test_kill_9_of_the_dispatcher_another_takes_over_and_the_order_holds(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    first = await spawn_replica(tmp_path, fake, redis_server, "proxy-0")
    try:
        await first.wait_for("dispatcher_synced")
        one = await make_replica("proxy-1")
        replica = one.server.app[REPLICA]
        assert replica is not None
        gate = fake.gate("block")
        blocker = gen(one, "gate:block", "scripts")
        await fake.wait_for(1)
        low = gen(one, "low", "scripts")
        high = gen(one, "high", "chat")
        await Changes(one).until(lambda: replica.queue.waiting == 2)
        assert not dispatcher_of(one).leading
        os.kill(first.process.pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        killed = loop.time()
        boss = await leader(one, timeout=LEASE + 5)
        assert dispatcher_of(one).terms[-1] - killed < LEASE + 1  # took the lease in time
        await boss.watch.queued(2)  # re-announced: both waiters, the running one as running
        assert boss.scheduler.in_flight == 1
        gate.set()
        async with asyncio.timeout(10):
            results = await asyncio.gather(blocker, low, high)
        assert [status for status, _ in results] == [200, 200, 200]
        assert [s.prompt for s in fake.inference] == ["gate:block", "high", "low"]
        assert fake.max_in_flight == 1
    finally:
        await first.stop()


async def test_a_dispatcher_stopping_resigns_and_another_takes_over_at_once(
    make_replica: ReplicaFactory, fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> None:
    long_lease = {"queue": {"redis": {"lease": 30}}}
    first = await spawn_replica(tmp_path, fake, redis_server, "proxy-0", long_lease)
    try:
        await first.wait_for("dispatcher_synced")
        one = await make_replica("proxy-1", long_lease)
        waiting = Changes(one)
        assert not dispatcher_of(one).leading
        loop = asyncio.get_running_loop()
        stopped = loop.time()
        first.process.send_signal(signal.SIGTERM)
        await waiting.until(lambda: dispatcher_of(one).dispatching, timeout=10)
        assert loop.time() - stopped < 10  # not the 30 s lease: it resigned
        assert await first.process.wait() == 0  # a clean exit, the lease handed on
        status, lines = await one.generate("after", "coding")
        assert status == 200 and lines[-1]["done"] is True
    finally:
        await first.stop()


async def test_backend_memory_needs_no_redis(make_proxy: Any) -> None:
    proxy = await make_proxy({"queue": {"redis": {"url": "redis://127.0.0.1:1/0"}}})
    assert proxy.server.app[REPLICA] is None
    assert proxy.live.settings.queue.backend == "memory"
    status, lines = await proxy.generate("hello", "coding")
    assert status == 200 and lines[-1]["done"] is True
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert "replica" not in (await r.json())["entries"] and r.status == 200


async def test_a_grant_names_the_server_and_the_other_replica_sends_there(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A fleet of two behind two replicas: the dispatcher chooses the server, and a request
    that waited at the other replica goes to the server its grant names."""
    fakes = [FakeOllama(), FakeOllama()]
    for fake in fakes:
        await fake.start()
    upstreams = [
        {"name": "a", "url": fakes[0].url, "slots": 1},
        {"name": "b", "url": fakes[1].url, "slots": 1},
    ]
    proxies: list[Proxy] = []
    try:
        for name in ("r1", "r2"):
            extra = {"upstreams": upstreams, "upstream": {"slots": None}}
            path = replica_config(tmp_path, fakes[0], redis_server, name, extra)
            doc = yaml.safe_load(path.read_text())
            doc["upstream"].pop("url"), doc["upstream"].pop("slots")
            path.write_text(yaml.safe_dump(doc))
            server = await start_server(load_settings(path))
            session = aiohttp.ClientSession()
            proxy = Proxy(server, fakes[0], path, {}, session, Watch(server.app[SCHEDULER]))
            proxies.append(proxy)
            replica = server.app[REPLICA]
            assert replica is not None and await replica.link.wait_up(5)
        r1, r2 = proxies
        await leader(r1, r2)
        busy = gen(r1, "gate:one", "scripts")  # takes one server
        waits = [asyncio.ensure_future(f.wait_for(1)) for f in fakes]
        await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        held = next(i for i, f in enumerate(fakes) if f.inference)
        status, _ = await r2.generate("hello", "coding")  # the other server, via r2's grant
        assert status == 200
        assert len(fakes[1 - held].inference) == 1 and len(fakes[held].inference) == 1
        for fake in fakes:
            fake.gate("one").set()
        assert (await busy)[0] == 200
    finally:
        for proxy in proxies:
            await proxy.session.close()
            await proxy.server.stop()
        for fake in fakes:
            await fake.stop()


async def test_a_burst_beyond_the_redis_pool_waits_for_connections_not_503(
    make_replica: ReplicaFactory, fake: FakeOllama
) -> None:
    """150 requests at once behind a held slot: each announce needs a Redis connection, and
    more than the pool holds wait for one instead of failing (redis-py's default pool of
    100 answered "Too many connections": 503 for the rest of the burst)."""
    r1 = await make_replica("r1")
    await leader(r1)
    busy = gen(r1, "gate:one", "scripts")
    await fake.wait_for(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            body = {"model": MODEL, "prompt": f"job {i}", "stream": False}
            async with session.post(r1.url + "/api/generate", json=body) as r:
                return r.status

        tasks = [asyncio.create_task(one(i)) for i in range(150)]
        await r1.watch.until(lambda: r1.scheduler.queue_length == 150, timeout=30)
        fake.gate("one").set()
        assert await asyncio.gather(*tasks) == [200] * 150
    assert (await busy)[0] == 200
