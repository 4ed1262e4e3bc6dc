"""The fake Ollama itself: its fidelity is what the other tests stand on."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from seadragon_proxy.fake_ollama import FakeOllama, go_json

from .conftest import MODEL


def test_go_json_escapes_like_encoding_json() -> None:
    assert go_json({"a": "<b>&\u2028"}) == b'{"a":"\\u003cb\\u003e\\u0026\\u2028"}'


async def test_stream_framing_and_final_object(fake: FakeOllama) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            fake.url + "/api/generate",
            json={"model": MODEL, "prompt": "x", "options": {"num_predict": 3}},
        ) as r,
    ):
        assert r.headers["Content-Type"] == "application/x-ndjson"
        raw = await r.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])
    final = json.loads(lines[-2])
    assert final["done"] is True and final["done_reason"] == "stop"
    assert {"total_duration", "load_duration", "eval_count", "eval_duration", "context"} <= set(
        final
    )


async def test_errors_are_ollamas(fake: FakeOllama) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(fake.url + "/api/generate", data=b"{") as r:
            assert r.status == 400 and "error" in await r.json()
        async with s.post(fake.url + "/api/chat", json={"messages": []}) as r:
            assert (r.status, await r.json()) == (400, {"error": "model is required"})
        async with s.post(fake.url + "/api/chat", json={"model": "nope"}) as r:
            assert (r.status, await r.json()) == (404, {"error": "model 'nope' not found"})
        async with s.get(fake.url + "/nope") as r:
            assert (r.status, await r.text()) == (404, "404 page not found")


async def test_parallel_makes_requests_take_turns() -> None:
    fake = FakeOllama(parallel=1)
    await fake.start()
    try:
        gate = fake.gate("first")
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(
                s.post(fake.url + "/api/generate", json={"model": MODEL, "prompt": "gate:first"})
            )
            await fake.wait_until(lambda: fake.in_flight == 1)
            second = asyncio.create_task(
                s.post(fake.url + "/api/generate", json={"model": MODEL, "prompt": "second"})
            )
            await fake.wait_until(lambda: len(fake.requests) == 2)
            assert fake.in_flight == 1 and fake.requests[1].started == 0.0  # waiting its turn
            gate.set()
            for task in (first, second):
                (await task).release()
        assert fake.max_in_flight == 1
        assert fake.requests[1].started >= fake.requests[0].finished
    finally:
        await fake.stop()
