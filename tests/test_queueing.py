"""Scheduling through HTTP: priority order, slots, what bypasses the queue, limits, hang-ups."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .conftest import MODEL, Proxy, ProxyFactory


async def start(
    proxy: Proxy, prompt: str, source: str | None = None, **extra: Any
) -> asyncio.Task[Any]:
    """A generate request running in the background; its result is (status, lines or doc)."""
    return asyncio.create_task(proxy.generate(prompt, source, **extra))


async def block(proxy: Proxy, name: str = "block") -> tuple[asyncio.Task[Any], asyncio.Event]:
    """Occupy the slot with a request the fake holds until the returned gate is set."""
    gate = proxy.fake.gate(name)
    task = await start(proxy, f"gate:{name}")
    await proxy.fake.wait_for(1)
    return task, gate


async def test_priority_order_across_sources_fifo_within_each(proxy: Proxy) -> None:
    blocker, gate = await block(proxy)
    arrival = [
        "scripts",
        "chat",
        "coding",
        "scripts",
        "coding",
        "chat",
        "chat",
        "scripts",
        "coding",
    ]
    tasks = []
    for index, source in enumerate(arrival):
        tasks.append(await start(proxy, f"{source}-{index}", source))
        await proxy.watch.queued(index + 1)  # arrival order is fixed before the next one
    gate.set()
    results = await asyncio.gather(blocker, *tasks)
    assert all(status == 200 for status, _ in results)
    served = [seen.prompt for seen in proxy.fake.inference[1:]]
    assert served == [
        "coding-2",
        "coding-4",
        "coding-8",
        "chat-1",
        "chat-5",
        "chat-6",
        "scripts-0",
        "scripts-3",
        "scripts-7",
    ]
    assert proxy.fake.max_in_flight == 1


async def test_never_more_than_slots_at_ollama(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"upstream": {"slots": 2}})
    gates = [proxy.fake.gate(f"g{i}") for i in range(6)]
    tasks = [await start(proxy, f"gate:g{i}") for i in range(6)]
    await proxy.fake.wait_for(2)
    await proxy.watch.queued(4)
    assert proxy.fake.in_flight == 2 and proxy.scheduler.in_flight == 2
    for gate in gates:
        gate.set()
    await asyncio.gather(*tasks)
    assert proxy.fake.max_in_flight == 2
    assert len(proxy.fake.inference) == 6


async def test_metadata_routes_are_answered_while_a_generation_runs(proxy: Proxy) -> None:
    blocker, gate = await block(proxy)
    queued = await start(proxy, "waiting")
    await proxy.watch.queued(1)
    for method, path, body in [
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("GET", "/api/version", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": MODEL}),
        ("POST", "/api/pull", {"model": MODEL}),
        ("POST", "/api/copy", {"source": MODEL, "destination": "copy"}),
        ("GET", "/v1/models", None),
    ]:
        async with proxy.session.request(method, proxy.url + path, json=body) as r:
            assert r.status == 200, path
    assert not gate.is_set() and proxy.scheduler.queue_length == 1
    gate.set()
    await asyncio.gather(blocker, queued)


async def test_queue_full_is_ollamas_503_with_retry_after(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"queue": {"max_size": 2}})
    blocker, gate = await block(proxy)
    waiting = [await start(proxy, f"w{i}") for i in range(2)]
    await proxy.watch.queued(2)
    async with proxy.session.post(
        proxy.url + "/api/chat", json={"model": MODEL, "messages": []}
    ) as r:
        assert r.status == 503
        assert await r.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
        assert int(r.headers["Retry-After"]) >= 1
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json={"model": MODEL, "messages": []}
    ) as r:
        assert r.status == 503
        assert (await r.json())["error"]["message"].startswith("server busy")
    gate.set()
    assert [status for status, _ in await asyncio.gather(blocker, *waiting)] == [200] * 3


async def test_max_wait_answers_503_saying_so(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"queue": {"max_wait": 0.2}})
    blocker, gate = await block(proxy)
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "late"}
    ) as r:
        assert r.status == 503
        assert "queue.max_wait (0.2 s)" in (await r.json())["error"]
        assert "Retry-After" in r.headers
    gate.set()
    await blocker
    assert [s.prompt for s in proxy.fake.inference] == ["gate:block"]  # "late" never reached it


async def test_client_that_hangs_up_while_queued_never_reaches_ollama(proxy: Proxy) -> None:
    blocker, gate = await block(proxy)
    impatient = await start(proxy, "impatient")
    await proxy.watch.queued(1)
    impatient.cancel()  # closes the client's connection
    await proxy.watch.queued(0)
    assert proxy.scheduler.in_flight == 1
    gate.set()
    await blocker
    assert (await proxy.generate("next"))[0] == 200
    assert [s.prompt for s in proxy.fake.inference] == ["gate:block", "next"]


async def test_client_that_hangs_up_mid_stream_frees_the_slot_at_once(proxy: Proxy) -> None:
    """Ollama's handler is cancelled (it stops generating) and the next request starts."""
    session = aiohttp.ClientSession()
    response = await session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "gate-mid:never-set"}
    )
    assert json.loads(await response.content.readline())["response"] == "The"
    following = await start(proxy, "following")
    await proxy.watch.queued(1)
    response.close()
    await session.close()
    await proxy.fake.wait_until(lambda: proxy.fake.inference[0].cancelled)
    status, lines = await following
    assert status == 200 and lines[-1]["done"] is True
    assert proxy.fake.gate("never-set").is_set() is False


async def test_hangup_between_headers_and_first_chunk(proxy: Proxy) -> None:
    """A client gone before the first byte arrives still frees the slot."""
    gate = proxy.fake.gate("first-byte")
    session = aiohttp.ClientSession()
    task = asyncio.create_task(
        session.post(
            proxy.url + "/api/generate", json={"model": MODEL, "prompt": "gate:first-byte"}
        )
    )
    await proxy.fake.wait_for(1)
    task.cancel()
    await session.close()
    await proxy.fake.wait_until(lambda: proxy.fake.inference[0].cancelled)
    await proxy.watch.until(lambda: proxy.scheduler.in_flight == 0)
    assert not gate.is_set()
    assert (await proxy.generate("after"))[0] == 200


async def test_a_source_can_have_its_own_wait_limit(make_proxy: ProxyFactory) -> None:
    """Interactive work fails fast (per-source max_wait) while batch work may wait on."""
    sources = [
        {
            "name": "coding",
            "priority": 0,
            "max_wait": 0.2,
            "match": {"header": {"X-Test-Source": "coding"}},
        },
        {
            "name": "scripts",
            "priority": 8,
            "max_wait": 0,
            "match": {"header": {"X-Test-Source": "scripts"}},
        },
        {"name": "direct_api", "priority": 10, "require_whitelist": True},
    ]
    proxy = await make_proxy({"sources": sources, "queue": {"max_wait": 0.1}})
    blocker, gate = await block(proxy)
    batch = await start(proxy, "patient", "scripts")
    status, doc = await proxy.generate("impatient", "coding")
    assert status == 503 and "max_wait of 'coding' (0.2 s)" in doc["error"]
    status, doc = await proxy.generate("default limit")
    assert status == 503 and "queue.max_wait (0.1 s)" in doc["error"]
    assert not batch.done()  # max_wait: 0 on the source lifts the global limit
    gate.set()
    assert (await batch)[0] == 200
    await blocker
    waited = {r.error: r.queue_wait for r in await proxy.records(4) if r.status == 503}
    assert all(wait >= 0.1 for wait in waited.values()), waited  # the time spent waiting is kept
