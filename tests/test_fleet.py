"""A fleet of Ollama servers behind one queue, through the running proxy in front of
several fakes on real ports: order, slots, residency, affinity, failures, refusals."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.scheduling import Health, Ticket
from seadragon_proxy.settings import parse_settings
from seadragon_proxy.typedefs import FLEET

from .conftest import BASE_CONFIG, ProxyFactory, merge
from .fleetfakes import LOAD_NS, A, B, FleetFactory, make_fleet
from .test_history import run_cli

__all__ = ["make_fleet"]  # the fixture, imported for pytest

C = "nomic-embed-text:latest"
AFFINITY = {"queue": {"affinity": {"window": 0, "max_defer": 60, "min_residency": 0}}}


def started(fleet: Any) -> list[Ticket]:
    return [t for event, t in fleet.proxy.watch.events if event == "started"]


async def queue_view(fleet: Any) -> dict[str, Any]:
    async with fleet.proxy.session.get(fleet.proxy.url + "/api/admin/queue") as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


# -- one global queue, the server chosen at dispatch ------------------------------------------


async def test_global_priority_order_across_servers(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "slots": 1}, {"name": "b", "slots": 1}])
    busy = [asyncio.create_task(fleet.generate(f"gate:g{i}")) for i in (1, 2)]
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 2)
    waiting = []
    for source in ("scripts", "chat", "coding"):
        waiting.append(asyncio.create_task(fleet.generate("hi", source=source)))
        await fleet.proxy.watch.queued(len(waiting))
    first = started(fleet)[0].server
    freed = started(fleet)[1].server if first == "a" else "a"
    fleet.release("g2" if freed == "b" else "g1")  # the server that frees takes the best
    for task in waiting:
        assert (await task)[0] == 200
    order = started(fleet)[2:]
    assert [t.source for t in order] == ["coding", "chat", "scripts"]
    assert {t.server for t in order} == {freed}  # the other server was busy all along
    fleet.release("g1", "g2")
    await asyncio.gather(*busy)


async def test_slots_per_server_never_exceeded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "slots": 2}, {"name": "b", "slots": 1}])
    tasks = [asyncio.create_task(fleet.generate("gate:all")) for _ in range(9)]
    await fleet.proxy.watch.queued(6)
    a, b = fleet.fakes["a"], fleet.fakes["b"]
    await a.wait_until(lambda: a.in_flight == 2)
    await b.wait_until(lambda: b.in_flight == 1)
    view = await queue_view(fleet)
    assert [(s["name"], s["slots"], s["in_flight"]) for s in view["servers"]] == [
        ("a", 2, 2),
        ("b", 1, 1),
    ]
    assert {p["server"] for p in view["running"]} == {"a", "b"}
    fleet.release("all")
    assert all(status == 200 for status, _ in await asyncio.gather(*tasks))
    assert fleet.fakes["a"].max_in_flight == 2 and fleet.fakes["b"].max_in_flight == 1
    assert len(fleet.fakes["a"].inference) + len(fleet.fakes["b"].inference) == 9


# -- residency ---------------------------------------------------------------------------------


async def test_the_server_with_the_model_loaded_is_preferred(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        [{"name": "a", "max_loaded_models": 1}, {"name": "b", "max_loaded_models": 1}],
        loaded={"a": [A], "b": [B]},
    )
    for model, where in ((B, "b"), (A, "a"), (B, "b")):
        assert (await fleet.generate("hi", model=model))[0] == 200
        assert fleet.proxy.finished[-1].server == where
        assert fleet.proxy.finished[-1].swapped is False
    assert fleet.fakes["a"].loads == 0 and fleet.fakes["b"].loads == 0


async def test_loading_where_no_busy_model_is_evicted(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        [
            {"name": "a", "slots": 2, "max_loaded_models": 1},
            {"name": "b", "slots": 1, "max_loaded_models": 1},
        ],
        loaded={"a": [A], "b": [B]},
    )
    busy = asyncio.create_task(fleet.generate("gate:a", model=A))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    # a has a free slot, but loading C there would evict A mid-request; b's B is idle.
    assert (await fleet.generate("hi", model=C))[0] == 200
    assert fleet.proxy.finished[-1].server == "b" and fleet.proxy.finished[-1].swapped
    assert fleet.server("b").loaded.keys() == {C}
    fleet.release("a")
    await busy


async def test_waits_rather_than_evicting_a_busy_model(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "slots": 2, "max_loaded_models": 1}], loaded={"a": [A]})
    busy = asyncio.create_task(fleet.generate("gate:a", model=A))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    other = asyncio.create_task(fleet.generate("hi", model=B, source="chat"))
    await fleet.proxy.watch.queued(1)
    later = asyncio.create_task(fleet.generate("hi", model=A, source="scripts"))
    await fleet.proxy.watch.queued(2)  # A is loaded and a slot is free, yet it waits behind B
    assert fleet.scheduler.in_flight == 1 and len(fleet.fakes["a"].inference) == 1
    fleet.release("a")
    await asyncio.gather(busy, other, later)
    assert [(t.model, t.source) for t in started(fleet)[1:]] == [(B, "chat"), (A, "scripts")]


async def test_swaps_are_counted_and_their_cost_learned(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 1}], loaded={"a": [A]})
    assert (await fleet.generate("hi", model=B))[0] == 200
    record = (await fleet.proxy.records(1))[-1]
    assert record.server == "a" and record.swapped
    assert record.fields()["server"] == "a" and record.fields()["swapped"] is True  # log line
    view = await queue_view(fleet)
    server = view["servers"][0]
    assert server["loaded"] == [B] and server["swaps"] == 1
    assert server["swap_cost"] == {B: LOAD_NS / 1e9}
    async with fleet.proxy.session.get(fleet.proxy.url + "/metrics") as r:
        text = await r.text()
    assert 'seadragon_model_swaps_total{server="a"} 1.0' in text
    assert f'seadragon_swap_cost_seconds{{model="{B}",server="a"}} 2.5' in text
    async with fleet.proxy.session.get(fleet.proxy.url + "/api/admin/stats") as r:
        stats = await r.json()
    assert stats["servers"] == [{"server": "a", "requests": 1, "swaps": 1}]
    table = await asyncio.to_thread(run_cli, ["stats", "--config", str(fleet.proxy.config_path)])
    assert [line.split() for line in table.splitlines()[-2:]] == [
        ["server", "requests", "swaps"],
        ["a", "1", "1"],
    ]


# -- fewer swaps -------------------------------------------------------------------------------


@pytest.mark.parametrize(("affinity", "expected"), [(False, [B, A]), (True, [A, B])])
async def test_affinity_prefers_loaded_work_within_a_level(
    make_fleet: FleetFactory, affinity: bool, expected: list[str]
) -> None:
    fleet = await make_fleet(
        [{"name": "a", "max_loaded_models": 1}], AFFINITY if affinity else None, loaded={"a": [A]}
    )
    busy = asyncio.create_task(fleet.generate("gate:a", model=A))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    tasks = [asyncio.create_task(fleet.generate("hi", model=B, source="scripts"))]
    await fleet.proxy.watch.queued(1)
    tasks.append(asyncio.create_task(fleet.generate("hi", model=A, source="scripts")))
    await fleet.proxy.watch.queued(2)
    fleet.release("a")
    await asyncio.gather(busy, *tasks)
    assert [t.model for t in started(fleet)[1:]] == expected
    assert fleet.fakes["a"].loads == (2 if not affinity else 1)


@pytest.mark.parametrize(("window", "first"), [(0, "coding"), (5, "chat")])
async def test_strict_priority_beyond_the_window(
    make_fleet: FleetFactory, window: int, first: str
) -> None:
    override = merge(AFFINITY, {"queue": {"affinity": {"window": window}}})
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 1}], override, loaded={"a": [A]})
    busy = asyncio.create_task(fleet.generate("gate:a", model=A))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    tasks = [asyncio.create_task(fleet.generate("hi", model=A, source="chat"))]
    await fleet.proxy.watch.queued(1)
    tasks.append(asyncio.create_task(fleet.generate("hi", model=B, source="coding")))
    await fleet.proxy.watch.queued(2)
    fleet.release("a")
    await asyncio.gather(busy, *tasks)
    assert started(fleet)[1].source == first


async def test_a_passed_over_waiter_is_served_within_max_defer(make_fleet: FleetFactory) -> None:
    max_defer = 0.6
    override = merge(AFFINITY, {"queue": {"affinity": {"max_defer": max_defer}}})
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 1}], override, loaded={"a": [A]})
    busy = asyncio.create_task(fleet.generate("gate:a", model=A))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    tasks = [asyncio.create_task(fleet.generate("hi", model=B, source="scripts"))]
    await fleet.proxy.watch.queued(1)
    slow = {"options": {"num_predict": 0}}  # each A job streams its one line slowly: ~0.25 s
    for i in range(6):
        tasks.append(
            asyncio.create_task(
                fleet.generate("fault:slow:4000", model=A, source="scripts", **slow)
            )
        )
        await fleet.proxy.watch.queued(2 + i)
    fleet.release("a")
    await asyncio.gather(busy, *tasks)
    order = started(fleet)[1:]
    passed = next(t for t in order if t.model == B)
    position = order.index(passed)
    assert 0 < position < len(order) - 1  # passed over, and yet not left for last
    assert passed.passed_at > 0
    job = max(t.started_at - s.started_at for s, t in itertools.pairwise(order))
    assert passed.started_at - passed.passed_at <= max_defer + job + 0.05


# -- failures ----------------------------------------------------------------------------------


async def test_a_failed_servers_work_goes_to_another(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "slots": 1}, {"name": "b", "slots": 1}])
    await fleet.fakes["a"].stop()  # a dies
    busy = asyncio.create_task(fleet.generate("gate:b"))
    await fleet.fakes["b"].wait_for(1)
    task = asyncio.create_task(fleet.generate("moved"))
    # It tried a (free), found it refusing, and waits in its place for b.
    await fleet.proxy.watch.until(
        lambda: fleet.server("a").health is Health.DOWN and fleet.scheduler.queue_length == 1
    )
    async with fleet.proxy.session.get(fleet.proxy.url + "/health") as r:
        assert r.status == 200
        health = await r.json()
    assert [(s["name"], s["reachable"]) for s in health["servers"]] == [("a", False), ("b", True)]
    fleet.release("b")
    assert (await task)[0] == 200
    await busy
    assert [s.prompt for s in fleet.fakes["b"].inference] == ["gate:b", "moved"]
    moved = next(r for r in await fleet.proxy.records(2) if r.server == "b" and r.bytes_out)
    assert moved.status == 200


async def test_health_is_unhealthy_only_when_every_server_is_down(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([{"name": "a"}, {"name": "b"}])
    await fleet.fakes["b"].stop()
    async with fleet.proxy.session.get(fleet.proxy.url + "/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "healthy"
    await fleet.fakes["a"].stop()
    async with fleet.proxy.session.get(fleet.proxy.url + "/health") as r:
        assert r.status == 503
        doc = await r.json()
    assert doc["status"] == "unhealthy"
    assert [s["reachable"] for s in doc["servers"]] == [False, False]
    assert "url" not in str(doc) and "127.0.0.1" not in str(doc)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [C, "mistral:7b"])
async def test_a_model_no_server_may_serve_is_404_at_once(
    make_fleet: FleetFactory, model: str
) -> None:
    fleet = await make_fleet(
        [{"name": "a", "models": ["llama3:*"]}, {"name": "b", "models": ["llama3.2:*"]}]
    )
    status, doc = await fleet.generate("hi", model=model, stream=False)
    assert status == 404
    assert doc == {"error": f"model '{model}' not found"}
    assert fleet.fakes["a"].inference == [] and fleet.fakes["b"].inference == []
    assert fleet.scheduler.queue_length == 0
    status, doc = await fleet.proxy.collect(
        "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}, {}
    )
    assert status == 404 and doc["error"]["message"] == f"model '{model}' not found"
    assert (await fleet.generate("hi", model=B))[0] == 200  # globs: only b may serve it
    assert fleet.proxy.finished[-1].server == "b"


# -- configuration -----------------------------------------------------------------------------


def parse(override: dict[str, Any]) -> Any:
    return parse_settings(merge(BASE_CONFIG, override), file="f.yaml", base=Path("."))


def test_part1_upstream_is_a_fleet_of_one() -> None:
    settings = parse({"upstream": {"url": "http://10.0.0.5:11434", "slots": 3}})
    [only] = settings.fleet
    assert (only.name, str(only.url), only.slots, only.models) == (
        "default",
        "http://10.0.0.5:11434",
        3,
        (),
    )
    assert not settings.queue.affinity.on


async def test_part1_config_asks_ollama_only_its_model_list(make_proxy: ProxyFactory) -> None:
    """One ``upstream:`` reads /api/tags once at start (to answer unknown models at once),
    never /api/ps: residency cannot change a decision there."""
    proxy = await make_proxy()
    await proxy.tags_read()
    assert (await proxy.generate("hi"))[0] == 200  # it loaded a model: still no /api/ps
    assert [r.path for r in proxy.fake.requests] == ["/api/tags", "/api/generate"]
    assert proxy.fleet.refreshes == 1
    assert [s.name for s in proxy.scheduler.servers] == ["default"]


def test_upstreams_are_validated_with_file_and_key() -> None:
    cases = [
        ({"upstreams": []}, "f.yaml: upstreams: must be a list"),
        ({"upstreams": [{"name": "a"}]}, "upstreams[0]: needs a name and a url"),
        ({"upstreams": [{"name": "a b", "url": "http://x"}]}, "upstreams[0].name: must be"),
        (
            {"upstreams": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]},
            "upstreams[1].name:",
        ),
        ({"upstreams": [{"name": "a", "url": "ftp://x"}]}, "upstreams[0].url: must be"),
        ({"upstreams": [{"name": "a", "url": "http://x", "slots": 0}]}, "upstreams[0].slots"),
        ({"upstreams": [{"name": "a", "url": "http://x", "gpu": 1}]}, "upstreams[0].gpu: unknown"),
        (
            {"upstream": {"slots": 2}, "upstreams": [{"name": "a", "url": "http://x"}]},
            "upstream.slots: is set together with upstreams",
        ),
        ({"queue": {"affinity": {"window": -1}}}, "queue.affinity.window"),
        ({"queue": {"affinity": {"defer": 1}}}, "queue.affinity.defer: unknown"),
    ]
    for override, message in cases:
        config = merge(BASE_CONFIG, override)
        if "upstreams" in override and "upstream" not in override:
            config["upstream"].pop("slots")
        with pytest.raises(ConfigError) as e:
            parse_settings(config, file="f.yaml", base=Path("."))
        assert message in str(e.value), (override, str(e.value))


def test_affinity_settings() -> None:
    on = parse({"queue": {"affinity": {"window": 2}}}).queue.affinity
    assert (on.window, on.max_defer, on.min_residency, on.on) == (2, 120.0, 20.0, True)
    off = parse({"queue": {"affinity": {"max_defer": 0}}}).queue.affinity
    assert not off.on


async def test_residency_is_read_again_after_a_load(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 2}], loaded={"a": [A]})
    fake = fleet.fakes["a"]

    def reads() -> int:
        return sum(r.path == "/api/ps" for r in fake.requests)

    before = reads()
    fake.loaded = [A, C]  # someone ran C on the server directly: the proxy has not seen it
    refreshed = asyncio.create_task(fleet.proxy.server.app[FLEET].next_refresh())
    assert (await fleet.generate("hi", model=B))[0] == 200  # loads B (there is room)
    await asyncio.wait_for(refreshed, 5)
    assert reads() > before
    assert fleet.server("a").loaded.keys() == {B, C}  # the fake, full, evicted A for B
    assert fleet.proxy.finished[-1].swapped


async def test_affinity_is_applied_by_a_reload(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet([{"name": "a"}])
    assert not fleet.scheduler.affinity.on
    ok = await fleet.proxy.next_reload(
        "config", lambda: fleet.proxy.write_config({"queue": {"affinity": {"window": 1}}})
    )
    assert ok and fleet.scheduler.affinity.window == 1 and fleet.scheduler.affinity.on


async def test_unknown_models_do_not_make_the_proxy_hammer_the_servers(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([{"name": "a"}, {"name": "b"}])
    fake = fleet.fakes["a"]
    before = sum(r.path == "/api/tags" for r in fake.requests)
    answers = await asyncio.gather(*(fleet.generate("hi", model=f"made-up-{i}") for i in range(20)))
    assert all(status == 404 for status, _ in answers)
    reads = sum(r.path == "/api/tags" for r in fake.requests) - before
    assert reads <= 2  # one shared read (and at most one more if a second has passed)


async def test_a_load_the_proxy_did_not_expect_counts_and_residency_is_read_again(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 2}], loaded={"a": [A, B]})
    fake = fleet.fakes["a"]
    fake.loaded = [A]  # B was unloaded on the server itself; the proxy still thinks it loaded
    refreshed = asyncio.create_task(fleet.proxy.server.app[FLEET].next_refresh())
    assert (await fleet.generate("hi", model=B))[0] == 200
    record = (await fleet.proxy.records(1))[-1]
    assert record.swapped  # seen in load_duration (2.5 s), not predicted
    assert fleet.server("a").swaps == 1 and fleet.server("a").swap_cost == {B: LOAD_NS / 1e9}
    await asyncio.wait_for(refreshed, 5)
    assert fleet.server("a").loaded.keys() == {A, B}


async def test_alternating_batch_and_coding_work_loads_three_times(
    make_fleet: FleetFactory,
) -> None:
    """Issue 8's first bench scenario, in order only: batch work alternating two models,
    then coding work: coding goes first, then the loaded model's batch work, then the rest."""
    fleet = await make_fleet([{"name": "a", "max_loaded_models": 1}], AFFINITY)
    first = asyncio.create_task(fleet.generate("gate:first", model=A, source="scripts"))
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 1)
    tasks = []
    for i in range(1, 12):
        model = B if i % 2 else A
        tasks.append(asyncio.create_task(fleet.generate("hi", model=model, source="scripts")))
        await fleet.proxy.watch.queued(i)
    for i in range(4):
        tasks.append(asyncio.create_task(fleet.generate("hi", model=B, source="coding")))
        await fleet.proxy.watch.queued(12 + i)
    fleet.release("first")
    await asyncio.gather(first, *tasks)
    order = [(t.source, t.model) for t in started(fleet)[1:]]
    assert order == [("coding", B)] * 4 + [("scripts", B)] * 6 + [("scripts", A)] * 5
    assert fleet.fakes["a"].loads == 3  # A, then B for the coding work, then A again


@pytest.mark.parametrize("affinity", [False, True])
async def test_two_servers_spread_two_models_rather_than_both_swapping(
    make_fleet: FleetFactory, affinity: bool
) -> None:
    """Bench scenario 8 in order only: both empty servers load A for the first two jobs
    (nobody else waits yet), then A A B B ... wait. With affinity the first server to free
    takes B (no server has it) rather than more A, which the other server has: 3 loads,
    one model per server from then on. Without affinity: the arrival order exactly."""
    servers = [{"name": "a", "max_loaded_models": 1}, {"name": "b", "max_loaded_models": 1}]
    fleet = await make_fleet(servers, AFFINITY if affinity else None)
    first = [
        asyncio.create_task(fleet.generate(f"gate:{gate}", model=A, source="scripts"))
        for gate in ("one", "two")
    ]
    await fleet.proxy.watch.until(lambda: fleet.scheduler.in_flight == 2)
    assert fleet.server("a").has_loaded(A) and fleet.server("b").has_loaded(A)
    models = [B, B, A, A, B, B, A, A, B, B]
    tasks = []
    for i, model in enumerate(models, start=1):
        tasks.append(asyncio.create_task(fleet.generate("hi", model=model, source="scripts")))
        await fleet.proxy.watch.queued(i)
    fleet.release("one")  # a frees first: it is the one to take B
    await fleet.proxy.watch.until(lambda: len(started(fleet)) == 3)
    fleet.release("two")
    results = await asyncio.gather(*first, *tasks)
    assert all(status == 200 for status, *_ in results)
    later = started(fleet)[2:]
    loads = fleet.fakes["a"].loads + fleet.fakes["b"].loads
    if not affinity:
        assert [t.model for t in later] == models
        return
    assert later[0].model == B and later[0].server == "a" and later[0].passed_at == 0
    assert {t.server for t in later if t.model == B} == {"a"}
    assert {t.server for t in later if t.model == A} == {"b"}
    assert loads == 3  # A twice, then B once: 4 when both servers swap to B


def test_the_upstream_flag_replaces_the_fleet_with_one_server() -> None:
    config = merge(BASE_CONFIG, {"upstreams": [{"name": "a", "url": "http://10.0.0.5:11434"}]})
    config["upstream"].pop("slots")
    settings = parse_settings(config, file="f.yaml", base=Path("."))
    assert [e.name for e in settings.fleet] == ["a"]
    one = settings.override(upstream="http://10.0.0.9:11434")
    assert [(e.name, str(e.url)) for e in one.fleet] == [("default", "http://10.0.0.9:11434")]


# -- metadata across the fleet, through the running proxy ---------------------------------


async def test_metadata_routes_answer_for_the_whole_fleet(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(
        [{"name": "a", "slots": 1}, {"name": "b", "slots": 1, "models": [B]}],
        loaded={"a": [A], "b": [B]},
    )
    fleet.fakes["a"].models = [A, C]
    fleet.fakes["b"].models = [B]
    session, url = fleet.proxy.session, fleet.proxy.url
    async with session.get(url + "/api/tags") as r:
        assert r.status == 200
        assert sorted(m["name"] for m in (await r.json())["models"]) == sorted([A, B, C])
    async with session.get(url + "/api/ps") as r:
        found = sorted((m["name"], m["server"]) for m in (await r.json())["models"])
        assert found == sorted([(A, "a"), (B, "b")])
    async with session.post(url + "/api/show", json={"model": B}) as r:
        assert r.status == 200 and r.headers["X-Seadragon-Server"] == "b"
    async with session.post(url + "/api/pull", json={"model": B}) as r:  # b alone may serve B
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert lines[-1] == {"status": "success"}
    assert [sum(s.path == "/api/pull" for s in f.requests) for f in fleet.fakes.values()] == [1, 1]
