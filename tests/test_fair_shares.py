"""Fair shares inside a priority level, through the running proxy: tenants of one source
(``fair_by: header:X-User``) share its level by weighted tokens; limits answer 429."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from .conftest import MODEL, JsonLog, Proxy, ProxyFactory

TEAM: dict[str, Any] = {
    "name": "team",
    "priority": 5,
    "match": {"header": {"X-Test-Source": "team"}},
    "fair_by": "header:X-User",
}


def config(**team: Any) -> dict[str, Any]:
    source = {**TEAM, **team}
    return {
        "sources": [
            {"name": "coding", "priority": 0, "match": {"header": {"X-Test-Source": "coding"}}},
            source,
            {"name": "direct_api", "priority": 10, "require_whitelist": True},
        ],
        "default_source": "direct_api",
    }


def send(proxy: Proxy, user: str, prompt: str, tokens: int | None = None) -> asyncio.Task[Any]:
    body: dict[str, Any] = {"model": MODEL, "prompt": prompt}
    if tokens is not None:
        body["options"] = {"num_predict": tokens}
    headers = {"X-Test-Source": "team", "X-User": user}
    return asyncio.create_task(proxy.collect("/api/generate", body, headers))


async def hold_the_slot(proxy: Proxy) -> tuple[asyncio.Task[Any], asyncio.Event]:
    """A request of another source holds the only slot until the gate is set."""
    gate = proxy.fake.gate("hold")
    task = asyncio.create_task(
        proxy.collect(
            "/api/generate", {"model": MODEL, "prompt": "gate:hold"}, {"X-Test-Source": "coding"}
        )
    )
    await proxy.fake.wait_for(1)
    return task, gate


async def queue(proxy: Proxy, user: str, count: int, **extra: Any) -> list[asyncio.Task[Any]]:
    """``count`` requests of ``user``, each in line before the next is sent (a fixed order)."""
    tasks = []
    for i in range(count):
        before = proxy.scheduler.queue_length
        tasks.append(send(proxy, user, f"{user}-{i}", **extra))
        await proxy.watch.queued(before + 1)
    return tasks


def dispatched(proxy: Proxy) -> list[tuple[str, str]]:
    """(user, prompt) of the team's requests in the order Ollama received them."""
    return [
        (seen.headers["X-User"], seen.prompt)
        for seen in proxy.fake.inference
        if seen.headers.get("X-User")
    ]


async def test_a_late_tenant_is_served_within_the_first_dispatches_and_each_stays_fifo(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config())
    holder, gate = await hold_the_slot(proxy)
    a = await queue(proxy, "a", 60)
    b = await queue(proxy, "b", 6)
    gate.set()
    results = await asyncio.gather(holder, *a, *b)
    assert all(status == 200 for status, _ in results)
    order = dispatched(proxy)
    assert len(order) == 66
    b_at = [i for i, (user, _) in enumerate(order) if user == "b"]
    assert max(b_at) < 14, order[:14]
    assert [p for u, p in order if u == "a"] == [f"a-{i}" for i in range(60)]
    assert [p for u, p in order if u == "b"] == [f"b-{i}" for i in range(6)]


async def test_weights_two_to_one_give_two_thirds_of_the_dispatches(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config(weights={"a": 2}))
    holder, gate = await hold_the_slot(proxy)
    tasks = []
    for _ in range(40):  # interleaved arrivals: neither tenant is first by much
        tasks += await queue(proxy, "a", 1)
        tasks += await queue(proxy, "b", 1)
    gate.set()
    await asyncio.gather(holder, *tasks)
    first = [user for user, _ in dispatched(proxy)[:45]]  # both still backlogged
    share = first.count("a") / len(first)
    assert abs(share - 2 / 3) <= 0.10, first


async def test_a_tenant_generating_8x_the_tokens_is_dispatched_a_quarter_as_often(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config())
    holder, gate = await hold_the_slot(proxy)
    tasks = []
    for _ in range(30):
        tasks += await queue(proxy, "a", 1, tokens=80)
        tasks += await queue(proxy, "b", 1, tokens=10)
    tasks += await queue(proxy, "b", 30, tokens=10)
    gate.set()
    await asyncio.gather(holder, *tasks)
    first = [user for user, _ in dispatched(proxy)[:40]]  # both still backlogged
    assert first.count("b") >= 4 * first.count("a"), first
    assert first.count("a") >= 3  # served, not starved


async def test_an_idle_tenant_returning_is_not_served_more_than_its_share_in_a_row(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config())
    holder, gate = await hold_the_slot(proxy)
    tasks = []
    for _ in range(5):
        tasks += await queue(proxy, "a", 1)
        tasks += await queue(proxy, "b", 1)
    middle = proxy.fake.gate("middle")  # a's 6th request holds the slot mid-way
    tasks.append(send(proxy, "a", "gate:middle"))
    await proxy.watch.queued(11)
    for _ in range(15):
        tasks += await queue(proxy, "a", 1)
        tasks += await queue(proxy, "b", 1)
    gate.set()
    await proxy.fake.wait_until(
        lambda: any(seen.prompt == "gate:middle" for seen in proxy.fake.inference)
    )
    seen_before = len(dispatched(proxy))
    tasks += await queue(proxy, "c", 10)  # c was idle all along: it banks no credit
    middle.set()
    await asyncio.gather(holder, *tasks)
    after = [user for user, _ in dispatched(proxy)[seen_before:]]
    runs = [len(list(g)) for user, g in itertools.groupby(after) if user == "c"]
    assert max(runs) == 1, after
    assert after[:15].count("c") <= 6, after


async def test_max_queued_answers_429_in_both_shapes_logged_and_counted(
    make_proxy: ProxyFactory, json_log: JsonLog
) -> None:
    proxy = await make_proxy(config(limits={"max_queued": 2}))
    holder, gate = await hold_the_slot(proxy)
    waiting = await queue(proxy, "a", 2)
    other = await queue(proxy, "b", 1)  # another tenant of the source is not limited
    headers = {"X-Test-Source": "team", "X-User": "a"}
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x"}, headers=headers
    ) as r:
        assert r.status == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        doc = await r.json()
    assert "max_queued" in doc["error"] and "'team/a'" in doc["error"]
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    ) as r:
        assert r.status == 429 and "Retry-After" in r.headers
        error = (await r.json())["error"]
    assert error["type"] == "requests" and "max_queued" in error["message"]
    gate.set()
    results = await asyncio.gather(holder, *waiting, *other)
    assert all(status == 200 for status, _ in results)
    async with proxy.session.get(proxy.url + "/metrics") as r:
        metrics = await r.text()
    assert 'seadragon_tenant_limited_total{limit="max_queued",source="team"} 2.0' in metrics
    lines = [line for line in json_log.lines() if line.get("event") == "request"]
    limited = [line for line in lines if line.get("status") == 429]
    assert len(limited) == 2
    assert all(line["limit"] == "max_queued" and line["tenant"] == "team/a" for line in limited)


async def test_tokens_per_hour_counts_ollamas_tokens_and_answers_429(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config(limits={"tokens_per_hour": 50}))
    for i in range(3):  # 12 prompt + 5 generated tokens each, from the fake's counts: 51
        status, _ = await send(proxy, "a", f"a-{i}")
        assert status == 200
    status, doc = await send(proxy, "a", "one more")
    assert status == 429
    assert "tokens_per_hour" in doc["error"] and "51 tokens" in doc["error"]
    status, _ = await send(proxy, "b", "b is another tenant")
    assert status == 200
    async with proxy.session.post(
        proxy.url + "/api/generate",
        json={"model": MODEL, "prompt": "x"},
        headers={"X-Test-Source": "team", "X-User": "a"},
    ) as r:
        assert r.status == 429
        assert 3500 <= int(r.headers["Retry-After"]) <= 3660  # counted by the minute


async def test_a_tenant_at_max_in_flight_never_blocks_another_from_a_free_slot(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy({**config(limits={"max_in_flight": 1}), "upstream": {"slots": 3}})
    first = proxy.fake.gate("a-first")
    a1 = send(proxy, "a", "gate:a-first")
    await proxy.fake.wait_for(1)
    a2 = send(proxy, "a", "a-second")
    await proxy.watch.queued(1)  # a free slot, but a is at its max_in_flight: it waits
    status, _ = await send(proxy, "b", "b-now")  # b goes straight past it
    assert status == 200
    assert proxy.scheduler.queue_length == 1 and not a2.done()
    first.set()
    assert (await a1)[0] == 200 and (await a2)[0] == 200
    assert [p for _, p in dispatched(proxy)] == ["gate:a-first", "b-now", "a-second"]
    assert proxy.fake.max_in_flight == 2


async def test_sources_sharing_a_priority_share_it_fairly(make_proxy: ProxyFactory) -> None:
    night = {"name": "night", "priority": 5, "match": {"header": {"X-Test-Source": "night"}}}
    proxy = await make_proxy({"sources": [*config()["sources"][:2], night, config()["sources"][2]]})
    holder, gate = await hold_the_slot(proxy)
    tasks = await queue(proxy, "a", 20)  # one tenant of "team" (fair_by header:X-User)
    body = {"model": MODEL, "prompt": "night"}
    for _ in range(4):  # "night" is one tenant: fair_by none
        before = proxy.scheduler.queue_length
        tasks.append(
            asyncio.create_task(proxy.collect("/api/generate", body, {"X-Test-Source": "night"}))
        )
        await proxy.watch.queued(before + 1)
    gate.set()
    await asyncio.gather(holder, *tasks)
    order = [s.prompt for s in proxy.fake.inference[1:]]
    assert max(i for i, prompt in enumerate(order) if prompt == "night") < 9, order


async def test_openai_usage_counts_towards_tokens_per_hour(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(limits={"tokens_per_hour": 30}))
    headers = {"X-Test-Source": "team", "X-User": "a"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    status, _ = await proxy.collect("/v1/chat/completions", body, headers)  # 12 + 10 tokens
    assert status == 200
    status, _ = await proxy.collect("/v1/chat/completions", body, headers)  # 44: over 30
    assert status == 200
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status == 429 and int(r.headers["Retry-After"]) > 3000
        error = (await r.json())["error"]
    assert error["type"] == "tokens" and "44 tokens" in error["message"]


async def test_fair_by_and_limits_follow_a_live_reload(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(config(fair_by="none"))
    holder, gate = await hold_the_slot(proxy)
    before = await queue(proxy, "a", 2)  # under fair_by none: both are the tenant "team"
    assert [t.tenant for t in proxy.scheduler.queued()] == ["team", "team"]
    changed = config(limits={"max_queued": 1})
    ok = await proxy.next_reload("config", lambda: proxy.write_config(changed), 10)
    assert ok
    after = await queue(proxy, "a", 1)  # a new arrival counts as team/a, alone in line
    status, doc = await send(proxy, "a", "one too many")
    assert status == 429 and "max_queued" in doc["error"]
    assert [t.tenant for t in proxy.scheduler.queued()] == ["team", "team/a", "team"]
    gate.set()
    assert all(s == 200 for s, _ in await asyncio.gather(holder, *before, *after))
