"""Ollama misbehaving: each fault has a defined answer, frees the slot, and loses nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from .conftest import MODEL, Proxy, ProxyFactory


async def slot_comes_back(proxy: Proxy) -> None:
    await proxy.watch.until(lambda: proxy.scheduler.in_flight == 0, timeout=1)


@pytest.mark.parametrize(
    ("prompt", "status", "check"),
    [
        ("fault:500", 500, lambda body: body == b"Internal Server Error"),
        ("fault:status:503", 503, lambda body: b"fake failure" in body),
        ("fault:error-line", 200, lambda body: b'"error"' in body.splitlines()[-1]),
        (
            "fault:hangup",
            200,
            lambda body: b"before the answer was complete" in body.splitlines()[-1],
        ),
    ],
)
async def test_each_fault_answers_and_frees_the_slot(
    proxy: Proxy, prompt: str, status: int, check: object
) -> None:
    gate = proxy.fake.gate("hold")
    blocker = asyncio.create_task(proxy.generate("gate:hold"))
    await proxy.fake.wait_for(1)
    faulty = asyncio.create_task(
        proxy.session.post(proxy.url + "/api/generate", json={"model": MODEL, "prompt": prompt})
    )
    waiting = asyncio.create_task(proxy.generate("served after the fault"))
    await proxy.watch.queued(2)
    gate.set()
    async with await faulty as r:
        assert r.status == status
        assert check(await r.read())  # type: ignore[operator]
    assert (await waiting)[0] == 200
    await blocker
    await slot_comes_back(proxy)


async def test_slow_stream_is_alive_not_dead(make_proxy: ProxyFactory) -> None:
    """One byte at a time, each well inside idle_timeout: the answer arrives whole, and
    the slot is held the whole time (a queued request waits)."""
    proxy = await make_proxy({"upstream": {"idle_timeout": 0.5}})
    slow = asyncio.create_task(
        proxy.collect(
            "/api/generate",
            {"model": MODEL, "prompt": "fault:slow:400", "options": {"num_predict": 2}},
            {},
        )
    )
    await proxy.fake.wait_for(1)
    queued = asyncio.create_task(proxy.generate("after the slow one"))
    await proxy.watch.queued(1)
    status, lines = await slow
    assert status == 200 and lines[-1]["done"] is True and len(lines) == 3
    assert (await queued)[0] == 200
    assert proxy.fake.inference[1].arrived >= proxy.fake.inference[0].finished


async def test_ollama_that_accepts_and_never_speaks(make_proxy: ProxyFactory) -> None:
    """A TCP server that accepts and says nothing: 504 after idle_timeout, slot freed."""
    held: list[asyncio.StreamWriter] = []

    async def mute(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy(
            {"upstream": {"idle_timeout": 0.3}}, upstream=f"http://127.0.0.1:{port}"
        )
        status, doc = await proxy.generate("anyone there?")
        assert status == 504 and "did not answer" in doc["error"]
        await slot_comes_back(proxy)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_ollama_silent_mid_stream_gets_an_error_line(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"upstream": {"idle_timeout": 0.3}})
    status, lines = await proxy.collect(
        "/api/generate", {"model": MODEL, "prompt": "gate-mid:forever"}, {}
    )
    assert status == 200
    assert [line.get("response") for line in lines[:2]] == ["The", " sky"]
    assert "sent nothing for upstream.idle_timeout (0.3 s)" in lines[-1]["error"]
    await slot_comes_back(proxy)
    await proxy.fake.wait_until(lambda: proxy.fake.inference[0].cancelled)


async def test_restart_mid_stream_errors_the_running_one_and_serves_the_queue(proxy: Proxy) -> None:
    fake = proxy.fake
    port = fake.port
    running = asyncio.create_task(
        proxy.collect(
            "/api/chat",
            {"model": MODEL, "messages": [{"role": "user", "content": "gate-mid:cut"}]},
            {},
        )
    )
    await fake.wait_for(1)
    queued = [asyncio.create_task(proxy.generate(f"queued-{i}")) for i in range(3)]
    await proxy.watch.queued(3)
    await fake.stop()  # Ollama dies with a stream in flight
    status, lines = await running
    assert status == 200 and set(lines[-1]) == {"error"}
    await fake.start(port)
    results = await asyncio.gather(*queued)
    assert [s for s, _ in results] == [200, 200, 200]
    assert [s.prompt for s in fake.inference if s.prompt.startswith("queued")] == [
        "queued-0",
        "queued-1",
        "queued-2",
    ]


async def test_refused_connections_with_a_wait_limit(make_proxy: ProxyFactory) -> None:
    """Ollama down for good: waiters get 503 at queue.max_wait, before unreachable_wait."""
    proxy = await make_proxy({"queue": {"max_wait": 0.3}, "upstream": {"unreachable_wait": 60}})
    await proxy.fake.stop()
    status, doc = await proxy.generate("waits")
    assert status == 503 and "queue.max_wait" in doc["error"]


async def test_hangup_during_a_large_upload_aborts_the_upstream_request(proxy: Proxy) -> None:
    """The client stops half-way through a blob: Ollama's side is closed too."""
    sent = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1_000_000
        sent.set()
        await asyncio.Event().wait()  # never finishes

    upload = asyncio.create_task(
        proxy.session.post(
            f"{proxy.url}/api/blobs/sha256:{'a' * 64}",
            data=body(),
            headers={"Content-Length": "10000000"},
        )
    )
    await sent.wait()
    await proxy.fake.wait_until(lambda: len(proxy.forwarded) == 1)
    upload.cancel()
    await proxy.fake.wait_until(lambda: proxy.forwarded[0].finished > 0)
    assert proxy.fake.blobs == set()
    (record,) = await proxy.records(1)
    assert record.hung_up and record.route == "/api/blobs/sha256:" + "a" * 64


async def test_error_line_after_a_cut_off_line_is_a_line_of_its_own(
    make_proxy: ProxyFactory,
) -> None:
    """Ollama falls silent mid-line: the partial line is ended, then the error line follows."""
    proxy = await make_proxy({"upstream": {"idle_timeout": 0.2}})
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "fault:slow:2"}
    ) as r:
        raw = await r.read()
    lines = raw.split(b"\n")
    assert lines[-1] == b""  # ends with a newline
    assert json.loads(lines[-2])["error"].startswith("Ollama at")  # the error is whole
    assert lines[0] == b"{"  # what arrived of the cut-off line, passed on unchanged


def test_sse_error_event_closes_a_cut_off_event() -> None:
    from seadragon_proxy.proxy import stream_error_line

    assert stream_error_line("text/event-stream", "x", b'{"a').startswith(b"\n\ndata: ")
    assert stream_error_line("text/event-stream", "x", b"}\n").startswith(b"\ndata: ")
    assert stream_error_line("text/event-stream", "x", b"\n\n").startswith(b"data: ")
    assert stream_error_line("application/x-ndjson", "x", b"}\n").startswith(b'{"error"')
    assert stream_error_line("application/json", "x") is None
