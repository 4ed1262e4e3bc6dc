"""Clients that give up while queued: counted per source, and a retry of the same request
(same client, source, route, body) within ``queue.retry_window`` takes back its place."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from seadragon_proxy.retryplace import RetryPlaces, identity

from .conftest import Proxy, ProxyFactory
from .test_queueing import block, start


def test_a_place_is_taken_back_once_within_the_window() -> None:
    places: RetryPlaces[str] = RetryPlaces(window=5)
    key = identity("10.0.0.7", "coding", "/api/chat", b'{"model":"m"}')
    places.remember(key, "third in line", now=100.0)
    assert places.take(identity("10.0.0.8", "coding", "/api/chat", b'{"model":"m"}'), 101) is None
    assert places.take(identity("10.0.0.7", "coding", "/api/chat", b'{"model":"n"}'), 101) is None
    assert places.take(key, now=104.9) == "third in line"
    assert places.take(key, now=104.9) is None  # once


def test_places_expire_and_the_table_is_bounded() -> None:
    places: RetryPlaces[int] = RetryPlaces(window=5, capacity=3)
    for i in range(5):
        places.remember(identity("c", "s", "/p", str(i).encode()), i, now=float(i))
    assert len(places) == 3  # the two oldest went
    assert places.take(identity("c", "s", "/p", b"4"), now=9.0) == 4
    assert places.take(identity("c", "s", "/p", b"2"), now=9.0) is None  # 7 s old: expired
    assert len(places) == 0  # pruned as it was used


def test_window_zero_keeps_nothing() -> None:
    places: RetryPlaces[int] = RetryPlaces(window=0)
    places.remember(identity("c", "s", "/p", b""), 1, now=0.0)
    assert len(places) == 0


async def hang_up(proxy: Proxy, task: asyncio.Task[Any], queued_after: int) -> None:
    """The client goes away while queued; wait until the proxy has taken it out of line."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await proxy.watch.queued(queued_after)


async def metric(proxy: Proxy, name: str) -> float:
    async with proxy.session.get(proxy.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_retry_of_the_same_request_keeps_its_place(proxy: Proxy) -> None:
    """openai-js's silent retry after Node's header timeout rejoins where it stood, ahead of
    the request that came after it; a different request does not take that place."""
    blocker, gate = await block(proxy)
    first = await start(proxy, "first", "chat")
    await proxy.watch.queued(1)
    second = await start(proxy, "second", "chat")
    await proxy.watch.queued(2)
    await hang_up(proxy, first, queued_after=1)
    other = await start(proxy, "something else", "chat")  # not the same body: the back
    await proxy.watch.queued(2)
    retry = await start(proxy, "first", "chat")
    await proxy.watch.queued(3)
    assert proxy.scheduler.queued()[0] is proxy.watch.events[-1][1]  # the retry is first
    gate.set()
    results = await asyncio.gather(blocker, second, other, retry)
    assert all(status == 200 for status, _ in results)
    assert [s.prompt for s in proxy.fake.inference[1:]] == ["first", "second", "something else"]
    records = {r.id: r for r in await proxy.records(5)}
    gone = [r for r in records.values() if r.hung_up]
    assert len(gone) == 1 and gone[0].left_queue and gone[0].source == "chat"
    assert [r.rejoined for r in records.values()].count(True) == 1
    assert await metric(proxy, 'seadragon_queue_hangups_total{source="chat"}') == 1
    assert await metric(proxy, 'seadragon_queue_rejoins_total{source="chat"}') == 1


async def test_a_retry_from_another_source_or_after_a_served_turn_goes_to_the_back(
    proxy: Proxy,
) -> None:
    blocker, gate = await block(proxy)
    first = await start(proxy, "first", "chat")
    await proxy.watch.queued(1)
    second = await start(proxy, "second", "chat")
    await proxy.watch.queued(2)
    await hang_up(proxy, first, queued_after=1)
    elsewhere = await start(proxy, "first", "scripts")  # same body, another source
    await proxy.watch.queued(2)
    gate.set()
    results = await asyncio.gather(blocker, second, elsewhere)
    assert all(status == 200 for status, _ in results)
    assert [s.prompt for s in proxy.fake.inference[1:]] == ["second", "first"]
    assert not any(r.rejoined for r in await proxy.records(4))


async def test_retry_window_zero_keeps_no_place(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"queue": {"retry_window": 0}})
    blocker, gate = await block(proxy)
    first = await start(proxy, "first", "chat")
    await proxy.watch.queued(1)
    second = await start(proxy, "second", "chat")
    await proxy.watch.queued(2)
    await hang_up(proxy, first, queued_after=1)
    retry = await start(proxy, "first", "chat")
    await proxy.watch.queued(2)
    gate.set()
    await asyncio.gather(blocker, second, retry)
    assert [s.prompt for s in proxy.fake.inference[1:]] == ["second", "first"]
    assert await metric(proxy, 'seadragon_queue_hangups_total{source="chat"}') == 1


@pytest.mark.parametrize("window", [-1, "soon"])
async def test_retry_window_is_validated(make_proxy: ProxyFactory, window: object) -> None:
    from seadragon_proxy.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"queue.retry_window"):
        await make_proxy({"queue": {"retry_window": window}})


async def test_openai_python_retry_after_its_timeout_keeps_its_place(proxy: Proxy) -> None:
    """openai-python retries a timed-out request by itself (``max_retries``, 2 by default):
    the retry rejoins where the first attempt stood."""
    import openai

    from .conftest import MODEL

    blocker, gate = await block(proxy)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", timeout=2.0, max_retries=1)
    try:
        chat = asyncio.create_task(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        )
        await proxy.watch.queued(1)
        later = await start(proxy, "later")  # the same source: direct_api
        await proxy.watch.queued(2)

        def retried() -> bool:
            return any(r.left_queue for r in proxy.finished) and proxy.scheduler.queue_length == 2

        await proxy.watch.until(retried, timeout=30)
        gate.set()
        answer = await chat
    finally:
        await client.close()
    assert answer.choices[0].message.content == "The sky is blue because"
    await asyncio.gather(blocker, later)
    assert [s.path for s in proxy.fake.inference[1:]] == ["/v1/chat/completions", "/api/generate"]
    assert await metric(proxy, 'seadragon_queue_rejoins_total{source="direct_api"}') == 1


async def test_the_scheduler_serves_a_resumed_ticket_in_the_old_place() -> None:
    """The pure part: ``Ticket.resume`` puts a new ticket where a cancelled one stood, with
    its deadline, not counted against ``max_size``; a changed priority refuses the place."""
    from seadragon_proxy.exceptions import ShuttingDown
    from seadragon_proxy.scheduling import Scheduler, Ticket

    def ticket(name: str, priority: int = 5) -> Ticket:
        return Ticket(id=name, source="s", priority=priority, path="/api/chat", model=None,
                      client_ip="c")  # fmt: skip

    scheduler = Scheduler(slots=1, max_size=2, max_wait=60, aging=0)
    running = await scheduler.acquire(ticket("running"))
    first, second = ticket("first"), ticket("second")
    waiting_first = asyncio.create_task(scheduler.acquire(first))
    await asyncio.sleep(0)  # let it reach the queue (one step, not a timing wait)
    waiting_second = asyncio.create_task(scheduler.acquire(second))
    await asyncio.sleep(0)
    assert scheduler.queue_length == 2
    waiting_first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting_first
    place = first.place()
    assert not ticket("moved", priority=1).resume(place)
    retry = ticket("retry")
    assert retry.resume(place) and retry.deadline == first.deadline
    waiting_retry = asyncio.create_task(scheduler.acquire(retry))
    await asyncio.sleep(0)
    assert [t.id for t in scheduler.queued()] == ["retry", "second"]
    running.release()
    assert (await waiting_retry).ticket is retry
    scheduler.close(ShuttingDown)
    with pytest.raises(ShuttingDown):
        await waiting_second
