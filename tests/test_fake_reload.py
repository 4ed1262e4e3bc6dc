"""The fake reloads a model whose runner options change, as Ollama's ``needsReload`` does,
and the proxy's pinned options (``force:``) are what stop that: issue 12, measured.

Events are ordered with gates and ``fake.wait_until``; nothing here sleeps to order them."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.fake_ollama.residency import BadOption, Residency, RunnerOptions

from .conftest import MODEL, ProxyFactory, free_port

LOAD = 0.05  # seconds the big model takes to load, here
PIN = {"match": {"model": "llama3:70b*"}, "force": {"options": {"num_ctx": 8192}}}


async def started(residency: Residency) -> AsyncIterator[FakeOllama]:
    fake = FakeOllama(residency=residency)
    await fake.start()
    try:
        yield fake
    finally:
        for gate in list(fake._gates.values()):
            gate.set()
        await fake.stop()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    """Overrides conftest's: the proxy (``make_proxy``) stands in front of this one."""
    async for fake in started(Residency(num_parallel=2, load_cost={MODEL: LOAD})):
        yield fake


def res(fake: FakeOllama) -> Residency:
    assert fake.residency is not None
    return fake.residency


async def generate(
    s: aiohttp.ClientSession, fake: FakeOllama, prompt: str = "hi", **options: Any
) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "stream": False, "options": options}
    async with s.post(fake.url + "/api/generate", json=body) as r:
        doc: dict[str, Any] = await r.json()
        assert r.status == 200, doc
        return doc


@pytest.mark.parametrize(
    ("first", "then", "reloads"),
    [
        ({}, {"num_ctx": 4096, "num_batch": 512, "num_gpu": -1, "num_thread": 0}, False),
        ({}, {"main_gpu": 0, "num_ctx": None, "temperature": 0.1, "seed": 7}, False),
        ({"num_ctx": 8192}, {"num_ctx": 8192.9}, False),  # Go truncates a JSON number
        ({"num_ctx": 1}, {"num_ctx": 4}, False),  # GetRunner's floor of 4
        ({"num_gpu": 20}, {}, False),  # unset num_gpu takes whatever was loaded
        ({"num_gpu": 20}, {"num_gpu": -1}, False),
        ({}, {"num_ctx": 32768}, True),
        ({}, {"num_batch": 256}, True),
        ({}, {"num_gpu": 20}, True),
        ({"num_gpu": 20}, {"num_gpu": 10}, True),
        ({}, {"main_gpu": 1}, True),
        ({}, {"use_mmap": False}, True),
        ({}, {"num_thread": 16}, True),
        ({"num_thread": 16}, {}, True),  # unset is the default, 0: not "whatever is loaded"
    ],
)
async def test_what_reloads_a_loaded_model(
    fake: FakeOllama, first: dict[str, Any], then: dict[str, Any], reloads: bool
) -> None:
    async with aiohttp.ClientSession() as s:
        loaded = await generate(s, fake, **first)
        again = await generate(s, fake, **then)
    r = res(fake)
    assert loaded["load_duration"] >= LOAD * 1e9
    if reloads:
        assert r.loads == {MODEL: 2} and r.reloads == {MODEL: 1} and r.unloads == {MODEL: 1}
        assert again["load_duration"] >= LOAD * 1e9  # a reload costs a whole load
    else:
        assert r.loads == {MODEL: 1} and r.reloads == {} and r.unloads == {}
        assert again["load_duration"] == 1_000_000


async def test_a_reload_waits_for_the_busy_runner_and_holds_the_line(fake: FakeOllama) -> None:
    """The request with other options waits until the model's requests end (it is marked
    to expire, as for an eviction); the one behind it waits too, though it matches."""
    r = res(fake)
    async with aiohttp.ClientSession() as s:
        busy = asyncio.create_task(generate(s, fake, "gate:busy", num_ctx=4096))
        await fake.wait_until(lambda: r.running == 1)
        other = asyncio.create_task(generate(s, fake, "hi", num_ctx=32768))
        await fake.wait_until(lambda: r.loaded[MODEL].keep_alive == 0)
        behind = asyncio.create_task(generate(s, fake, "hi", num_ctx=4096))
        await fake.wait_until(lambda: len(fake.inference) == 3)
        assert r.loads == {MODEL: 1} and r.running == 1  # two slots, but nobody took one
        assert not other.done() and not behind.done()
        fake.gate("busy").set()
        first, second, third = await busy, await other, await behind
    assert r.loads == {MODEL: 3} and r.reloads == {MODEL: 2} and r.unloads == {MODEL: 2}
    finished = [seen.finished for seen in fake.inference]
    assert finished == sorted(finished)
    assert all(d["load_duration"] >= LOAD * 1e9 for d in (first, second, third))
    spans = [(began, ended) for _, began, ended in r.load_log]
    assert all(a_end <= b_began for (_, a_end), (b_began, _) in itertools.pairwise(spans))


async def test_ps_shows_the_loaded_context_and_embed_and_chat_reload_too(
    fake: FakeOllama,
) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        async with s.post(fake.url + "/api/chat", json=body | {"options": {"num_ctx": 2048}}) as r:
            assert r.status == 200 and (await r.json())["done"] is True
        async with s.get(fake.url + "/api/ps") as r:
            assert [m["context_length"] for m in (await r.json())["models"]] == [2048]
        async with s.post(fake.url + "/api/embed", json={"model": MODEL, "input": "x"}) as r:
            assert (await r.json())["load_duration"] >= LOAD * 1e9
        async with s.get(fake.url + "/api/ps") as r:
            assert [m["context_length"] for m in (await r.json())["models"]] == [4096]
    assert res(fake).reloads == {MODEL: 1}


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [
        ({"num_ctx": "8k"}, 500, 'option "num_ctx" must be of type integer'),
        ({"num_thread": True}, 500, 'option "num_thread" must be of type integer'),
        ({"use_mmap": "no"}, 500, 'option "use_mmap" must be of type boolean'),
        (
            "num_ctx=8192",
            400,
            "json: cannot unmarshal string into Go struct field GenerateRequest.options"
            " of type map[string]interface {}",
        ),
    ],
)
async def test_bad_runner_options_are_refused_as_ollama_does(
    fake: FakeOllama, options: object, status: int, message: str
) -> None:
    body = {"model": MODEL, "prompt": "hi", "options": options}
    async with aiohttp.ClientSession() as s, s.post(fake.url + "/api/generate", json=body) as r:
        assert (r.status, await r.json()) == (status, {"error": message})
    assert res(fake).loads == {}  # refused before anything was loaded


def test_runner_options_and_settings() -> None:
    assert RunnerOptions.from_request(None, 8192) == RunnerOptions(num_ctx=8192)
    assert RunnerOptions.from_request({"num_ctx": 0, "stop": ["x"]}).num_ctx == 4
    with pytest.raises(BadOption):
        RunnerOptions.from_request({"num_batch": [512]})
    with pytest.raises(ValueError, match="context_length"):
        Residency(context_length=0)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "seadragon_proxy.fake_ollama",
            "--residency",
            "--context-length",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "context_length must be at least 1" in run.stderr


async def test_the_default_context_length_is_ollamas_setting() -> None:
    """``OLLAMA_CONTEXT_LENGTH=8192`` (``context_length``): unset and 8192 are the same."""
    residency = Residency(context_length=8192)
    async for fake in started(residency):
        async with aiohttp.ClientSession() as s:
            await generate(s, fake)
            await generate(s, fake, num_ctx=8192)
            assert residency.reloads == {}
            await generate(s, fake, num_ctx=4096)
    assert residency.reloads == {MODEL: 1}


async def alternate(make_proxy: ProxyFactory, override: dict[str, Any]) -> FakeOllama:
    """Two clients, one on 4096 and one on 32768, taking turns through the proxy."""
    proxy = await make_proxy(override)
    for i, num_ctx in enumerate((4096, 32768) * 3):
        path = "/api/chat" if num_ctx == 4096 else "/api/generate"
        body = {"model": MODEL, "prompt": f"p{i}", "options": {"num_ctx": num_ctx}}
        if path == "/api/chat":
            body["messages"] = [{"role": "user", "content": f"p{i}"}]
        status, lines = await proxy.collect(path, body, {"X-Test-Source": "chat"})
        assert status == 200 and lines[-1]["done"] is True
        assert lines[-1]["load_duration"] >= 1_000_000
    return proxy.fake


async def test_without_a_pin_two_clients_reload_the_model_on_every_alternation(
    make_proxy: ProxyFactory,
) -> None:
    fake = await alternate(make_proxy, {})
    assert [r.json["options"]["num_ctx"] for r in fake.inference] == [4096, 32768] * 3
    assert res(fake).loads == {MODEL: 6} and res(fake).reloads == {MODEL: 5}


async def test_with_a_pin_both_clients_send_8192_and_the_model_loads_once(
    make_proxy: ProxyFactory,
) -> None:
    """ollama/ollama#8903, fixed by ``force: {options: {num_ctx: 8192}}``."""
    fake = await alternate(make_proxy, {"defaults": [PIN]})
    assert [r.json["options"] for r in fake.inference] == [{"num_ctx": 8192}] * 6
    assert res(fake).loads == {MODEL: 1} and res(fake).reloads == {}
    [(_, began, ended)] = res(fake).load_log
    assert ended - began >= LOAD


async def test_with_the_fast_path_a_matching_request_jumps_the_waiting_reload() -> None:
    """Ollama 0.11.5+: a request the loaded runner suits takes it at once, though a reload
    of that model is waiting; the reload then waits for that request too."""
    r = Residency(num_parallel=2, load_cost={MODEL: LOAD}, fast_path=True)
    async for fake in started(r):
        async with aiohttp.ClientSession() as s:
            busy = asyncio.create_task(generate(s, fake, "gate:busy", num_ctx=4096))
            await fake.wait_until(lambda: r.running == 1)
            other = asyncio.create_task(generate(s, fake, "hi", num_ctx=32768))
            await fake.wait_until(lambda: r.loaded[MODEL].keep_alive == 0)
            jumper = asyncio.create_task(generate(s, fake, "gate:jump", num_ctx=4096))
            await fake.wait_until(lambda: r.running == 2)  # past the waiting reload
            fake.gate("busy").set()
            await busy
            assert r.loads == {MODEL: 1} and r.loaded[MODEL].refs == 1 and not other.done()
            fake.gate("jump").set()
            jumped, reloaded = await jumper, await other
        assert jumped["load_duration"] == 1_000_000 and reloaded["load_duration"] >= LOAD * 1e9
        assert r.loads == {MODEL: 2} and r.reloads == {MODEL: 1}
        assert fake.inference[1].finished > fake.inference[2].finished  # the reload ended last


async def test_with_the_fast_path_a_keep_alive_cancels_the_eviction_mark() -> None:
    """A request that jumps the line with a ``keep_alive`` resets the marked model's
    keep-alive (``useLoadedRunner``): the model waiting for room waits for it to run out."""
    small = "llama3.2:1b"
    r = Residency(num_parallel=2, fast_path=True)
    async for fake in started(r):
        async with aiohttp.ClientSession() as s:
            busy = asyncio.create_task(generate(s, fake, "gate:busy"))
            await fake.wait_until(lambda: r.running == 1)
            body = {"model": small, "prompt": "hi", "stream": False}
            waiting = asyncio.create_task(s.post(fake.url + "/api/generate", json=body))
            await fake.wait_until(lambda: r.loaded[MODEL].keep_alive == 0)
            jump = {"model": MODEL, "prompt": "jump", "stream": False, "keep_alive": 0.3}
            async with s.post(fake.url + "/api/generate", json=jump) as r_jump:
                assert r_jump.status == 200  # answered at once, past the waiting load
            fake.gate("busy").set()
            await busy
            async with await waiting as response:
                assert response.status == 200
        idle_from = fake.inference[0].finished
        [(_, _, _), (model, began, _)] = r.load_log
        assert model == small and began - idle_from >= 0.25  # 0.3 s, less clock slack
        assert r.unloads == {MODEL: 1}


async def test_the_openai_routes_are_not_pinned_and_reload_a_pinned_model(
    make_proxy: ProxyFactory,
) -> None:
    """As the cookbook warns: ``/v1/*`` carries no Ollama options, so it asks for the
    default context and reloads the model the pin loaded with 8192."""
    proxy = await make_proxy({"defaults": [PIN]})
    status, _ = await proxy.generate("native", "chat")
    assert status == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with await proxy.post("/v1/chat/completions", body, **{"X-Test-Source": "chat"}) as r:
        assert r.status == 200
        await r.read()
    assert res(proxy.fake).loads == {MODEL: 2} and res(proxy.fake).reloads == {MODEL: 1}


async def test_the_cli_sets_the_default_context_length() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "seadragon_proxy.fake_ollama",
        *("--port", str(port), "--residency", "--context-length", "8192", "--fast-path"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            assert b"listening" in await process.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hi", "stream": False}
            async with s.post(url + "/api/generate", json=body) as r:
                assert r.status == 200
            async with s.get(url + "/api/ps") as r:
                assert [m["context_length"] for m in (await r.json())["models"]] == [8192]
    finally:
        process.terminate()
        await process.wait()
