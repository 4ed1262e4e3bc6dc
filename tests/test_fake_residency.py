"""The fake's residency: models load, take turns and are evicted as Ollama's sched.go does.

Events are ordered with gates (a ``gate:NAME`` prompt holds its slot until the test opens
it) and ``fake.wait_until``; nothing here sleeps to order events."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.fake_ollama.residency import Residency, parse_keep_alive

from .conftest import free_port

BIG, SMALL = "llama3:70b", "llama3.2:1b"


async def started(residency: Residency) -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(residency=residency)
    await fake.start()
    try:
        yield fake
    finally:
        for gate in fake._gates.values():
            gate.set()
        await fake.stop()


@pytest.fixture
async def one() -> AsyncIterator[FakeOllama]:
    """One model at a time, two slots, a 50 ms load for the big model."""
    async for fake in started(Residency(num_parallel=2, load_cost={BIG: 0.05}, default_load=0.01)):
        yield fake


async def generate(
    s: aiohttp.ClientSession, fake: FakeOllama, model: str, prompt: str = "hi", **extra: Any
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "stream": False} | extra
    async with s.post(fake.url + "/api/generate", json=body) as r:
        doc: dict[str, Any] = await r.json()
        assert r.status == 200, doc
        return doc


async def ps(s: aiohttp.ClientSession, fake: FakeOllama) -> list[dict[str, Any]]:
    async with s.get(fake.url + "/api/ps") as r:
        models: list[dict[str, Any]] = (await r.json())["models"]
        return models


def res(fake: FakeOllama) -> Residency:
    assert fake.residency is not None
    return fake.residency


async def test_slots_per_model_and_fifo_waiters(one: FakeOllama) -> None:
    r = res(one)
    async with aiohttp.ClientSession() as s:
        tasks = [
            asyncio.create_task(generate(s, one, BIG, f"gate:g{i}"), name=str(i)) for i in range(3)
        ]
        await one.wait_until(lambda: r.running == 2 and len(one.inference) == 3)
        assert r.running == 2 and r.loads[BIG] == 1  # the third waits for a slot
        one.gate("g2").set()  # the waiter's gate opens, but it has no slot yet
        one.gate("g0").set()
        one.gate("g1").set()
        docs = await asyncio.gather(*tasks)
    assert r.max_running == 2 and r.loads == {BIG: 1}
    docs.sort(key=lambda d: -d["load_duration"])
    loaded = [d["load_duration"] for d in docs]
    assert loaded[0] >= 50_000_000  # the request that loaded the model reports the load
    assert loaded[1:] == [1_000_000, 1_000_000]  # the others found it loaded
    assert docs[0]["total_duration"] > loaded[0]


async def test_busy_model_is_evicted_only_after_its_requests_and_head_of_line(
    one: FakeOllama,
) -> None:
    r = res(one)
    async with aiohttp.ClientSession() as s:
        running = asyncio.create_task(generate(s, one, BIG, "gate:big"))
        await one.wait_until(lambda: r.running == 1)
        other = asyncio.create_task(generate(s, one, SMALL))
        await one.wait_until(lambda: r.loaded[BIG].keep_alive == 0)  # marked to expire
        behind = asyncio.create_task(generate(s, one, BIG))  # loaded, but behind the head
        await one.wait_until(lambda: len(one.inference) == 3)
        assert r.loads == {BIG: 1} and list(r.loaded) == [BIG]  # no eviction while busy
        assert not other.done() and not behind.done()
        one.gate("big").set()
        first = await running
        second, third = await other, await behind
    assert r.loads == {BIG: 2, SMALL: 1} and r.unloads == {BIG: 1, SMALL: 1}
    finished = [seen.finished for seen in one.inference]
    assert finished == sorted(finished)  # arrival order, though BIG was loaded for the third
    assert first["load_duration"] >= 50_000_000 and second["load_duration"] >= 10_000_000
    assert third["load_duration"] >= 50_000_000  # it had to load BIG again


async def test_idle_model_is_evicted_at_once_and_ps_lists_what_is_loaded(
    one: FakeOllama,
) -> None:
    async with aiohttp.ClientSession() as s:
        assert await ps(s, one) == []
        await generate(s, one, BIG)
        [entry] = await ps(s, one)
        assert entry["name"] == entry["model"] == BIG and entry["size_vram"] == entry["size"]
        expires = datetime.fromisoformat(entry["expires_at"])
        left = (expires - datetime.now(UTC)).total_seconds()
        assert 290 < left <= 300  # the default keep-alive, 5 minutes
        await generate(s, one, SMALL)
        assert [e["name"] for e in await ps(s, one)] == [SMALL]
    assert res(one).unloads == {BIG: 1} and res(one).loads == {BIG: 1, SMALL: 1}


async def test_keep_alive_zero_forever_and_durations(one: FakeOllama) -> None:
    async with aiohttp.ClientSession() as s:
        await generate(s, one, BIG, keep_alive=0)
        assert await ps(s, one) == []  # unloaded as soon as it finished
        for forever in (-1, "-1m"):
            await generate(s, one, BIG, keep_alive=forever)
            [entry] = await ps(s, one)
            assert datetime.fromisoformat(entry["expires_at"]).year > 2200
        await generate(s, one, BIG, keep_alive="10m")
        [entry] = await ps(s, one)
        left = (datetime.fromisoformat(entry["expires_at"]) - datetime.now(UTC)).total_seconds()
        assert 590 < left <= 600
        async with s.post(
            one.url + "/api/generate", json={"model": BIG, "prompt": "x", "keep_alive": "soon"}
        ) as r:
            assert (r.status, await r.json()) == (400, {"error": 'time: invalid duration "soon"'})
        async with s.post(
            one.url + "/api/generate", json={"model": BIG, "prompt": "x", "keep_alive": "5"}
        ) as r:
            wanted = {"error": 'time: missing unit in duration "5"'}
            assert (r.status, await r.json()) == (400, wanted)
    assert res(one).loads == {BIG: 2}


async def test_keep_alive_expiry_unloads_the_idle_model() -> None:
    residency = Residency()
    async for fake in started(residency):
        async with aiohttp.ClientSession() as s:
            await generate(s, fake, BIG, keep_alive=0.01)
            await fake.wait_until(lambda: not residency.loaded)
            assert await ps(s, fake) == [] and res(fake).unloads == {BIG: 1}


async def test_bare_requests_load_and_unload(one: FakeOllama) -> None:
    async with aiohttp.ClientSession() as s:
        loaded = await generate(s, one, BIG, "")
        assert loaded["done_reason"] == "load" and [e["name"] for e in await ps(s, one)] == [BIG]
        unloaded = await generate(s, one, BIG, "", keep_alive=0)
        assert unloaded["done_reason"] == "unload" and await ps(s, one) == []
    assert res(one).loads == {BIG: 1} and res(one).unloads == {BIG: 1}


async def test_one_load_at_a_time_and_room_for_two() -> None:
    residency = Residency(max_loaded_models=2, load_cost={BIG: 0.03, SMALL: 0.03})
    async for fake in started(residency):
        async with aiohttp.ClientSession() as s:
            docs = await asyncio.gather(generate(s, fake, BIG), generate(s, fake, SMALL))
            assert sorted(e["name"] for e in await ps(s, fake)) == [SMALL, BIG]
        (_, _, end), (_, begin, _) = sorted(residency.load_log, key=lambda x: x[1])
        assert end <= begin  # the second load began after the first had ended
        assert all(d["load_duration"] >= 30_000_000 for d in docs)
        assert residency.unloads == {}


async def test_streamed_final_chunk_and_embed_carry_the_load(one: FakeOllama) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"model": BIG, "prompt": "hi", "options": {"num_predict": 2}}
        async with s.post(one.url + "/api/chat", json=body | {"messages": []}) as r:
            lines = [json.loads(x) for x in (await r.read()).splitlines()]
        assert lines[-1]["done"] and lines[-1]["load_duration"] >= 50_000_000
        assert all("load_duration" not in x for x in lines[:-1])
        async with s.post(one.url + "/api/embed", json={"model": SMALL, "input": ["a"]}) as r:
            assert (await r.json())["load_duration"] >= 10_000_000
    assert res(one).loads == {BIG: 1, SMALL: 1}


async def test_job_time_holds_the_slot() -> None:
    async for fake in started(Residency(job=0.02)):
        async with aiohttp.ClientSession() as s:
            await generate(s, fake, SMALL)
        [seen] = fake.inference
        assert seen.finished - seen.started >= 0.02


def test_keep_alive_reads_like_go() -> None:
    assert parse_keep_alive(30) == 30.0 and parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("0") == 0.0 and parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive(-1) is None and parse_keep_alive("-5m") is None
    for bad in ("5", "m", "", "5x", True, [1]):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Residency(num_parallel=0)
    with pytest.raises(ValueError, match="negative"):
        Residency(load_cost={BIG: -1})
    run = subprocess.run(
        [sys.executable, "-m", "seadragon_proxy.fake_ollama", "--residency", "--load-cost", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "expected MODEL=SECONDS" in run.stderr


async def test_cli_flags_turn_the_residency_on() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "seadragon_proxy.fake_ollama",
        "--port",
        str(port),
        "--residency",
        "--max-loaded-models",
        "1",
        "--load-cost",
        f"{BIG}=0.05",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        assert f"listening on http://127.0.0.1:{port}" in line.decode()
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            body = {"model": BIG, "prompt": "hi", "stream": False}
            async with s.post(url + "/api/generate", json=body) as r:
                assert (await r.json())["load_duration"] >= 50_000_000
            async with s.post(url + "/api/generate", json=body | {"model": SMALL}) as r:
                assert (await r.json())["load_duration"] < 50_000_000
            async with s.get(url + "/api/ps") as r:
                assert [m["name"] for m in (await r.json())["models"]] == [SMALL]
    finally:
        process.terminate()
        await process.wait()
