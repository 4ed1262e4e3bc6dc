"""Every row of the contract's error table, and the bad input around it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from seadragon_proxy.typedefs import UPSTREAM
from seadragon_proxy.upstream import Health

from .conftest import MODEL, Proxy, ProxyFactory, free_port


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "invalid JSON: Expecting value"),
        (b'{"model": "x",', "invalid JSON"),
        (b"\xff\xfe\x00garbage", "invalid JSON"),
        (b'{"model": "caf\xe9"}', "not UTF-8"),
        (b"[1, 2]", "expected an object, got an array"),
        (b'"a string"', "expected an object, got a string"),
        (b"null", "expected an object, got null"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"", "missing request body"),
        (b"   ", "missing request body"),
        (b'{"prompt": "no model"}', "model is required"),
        (b'{"model": ""}', "model is required"),
        (b'{"model": 7}', "invalid model: expected a string, got a number"),
        (b'{"model": ["a"]}', "invalid model: expected a string, got an array"),
        (b'{"model": null, "name": false}', "invalid name: expected a string, got a boolean"),
    ],
)
async def test_bad_bodies_get_400_in_ollamas_shape(proxy: Proxy, body: bytes, message: str) -> None:
    async with proxy.session.post(proxy.url + "/api/generate", data=body) as r:
        assert r.status == 400
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        doc = await r.json()
    assert list(doc) == ["error"] and message in doc["error"]
    assert proxy.forwarded == []  # refused here, nothing reached Ollama


async def test_bad_body_on_v1_gets_openai_shape(proxy: Proxy) -> None:
    async with proxy.session.post(proxy.url + "/v1/chat/completions", data=b"{oops") as r:
        assert r.status == 400
        doc = await r.json()
    assert doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["message"].startswith("invalid JSON")
    assert doc["error"]["param"] is None and doc["error"]["code"] is None


async def test_bad_body_on_json_passthrough_route(proxy: Proxy) -> None:
    async with proxy.session.post(proxy.url + "/api/show", data=b"{") as r:
        assert r.status == 400 and "invalid JSON" in (await r.json())["error"]
    async with proxy.session.post(proxy.url + "/api/pull", json={"stream": False}) as r:
        assert r.status == 400  # no model: Ollama's own answer, passed through
    assert [s.path for s in proxy.forwarded] == ["/api/pull"]


async def test_oversized_json_body_is_413(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"server": {"max_body": "4KiB"}})
    big = json.dumps({"model": MODEL, "prompt": "x" * 8192}).encode()
    async with proxy.session.post(proxy.url + "/api/generate", data=big) as r:
        assert r.status == 413
        assert "server.max_body (4096 bytes)" in (await r.json())["error"]

    async def chunked() -> object:  # no Content-Length: refused once the limit is passed
        for _ in range(4):
            yield b"x" * 2048

    async with proxy.session.post(proxy.url + "/api/chat", data=chunked()) as r:
        assert r.status == 413
    assert proxy.forwarded == []


async def test_unlisted_client_gets_403_naming_its_address(proxy: Proxy) -> None:
    """Behind a trusted proxy (127.0.0.1 here) the client is the X-Forwarded-For address."""
    async with proxy.session.post(
        proxy.url + "/api/generate",
        json={"model": MODEL, "prompt": "x"},
        headers={"X-Forwarded-For": "203.0.113.9"},
    ) as r:
        assert r.status == 403
        error = (await r.json())["error"]
    assert "203.0.113.9 is not on the whitelist" in error and "'direct_api'" in error
    # A source that does not require the whitelist serves the same client.
    async with proxy.session.post(
        proxy.url + "/api/generate",
        json={"model": MODEL, "prompt": "x"},
        headers={"X-Forwarded-For": "203.0.113.9", "X-Test-Source": "coding"},
    ) as r:
        assert r.status == 200


async def test_untrusted_peer_cannot_choose_its_address(proxy: Proxy) -> None:
    """A peer that is not a trusted proxy is judged by its socket address, whatever it claims."""
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(proxy.url + "/api/tags", headers={"X-Forwarded-For": "127.0.0.1"}) as r,
    ):
        assert r.status == 403
        assert "client 127.0.0.2 is not on the whitelist" in (await r.json())["error"]


async def test_unreachable_ollama_is_502_naming_the_url(make_proxy: ProxyFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy({"upstream": {"unreachable_wait": 0}}, upstream=dead)
    async with proxy.session.get(proxy.url + "/api/tags") as r:
        assert r.status == 502
        assert (await r.json())["error"].startswith(f"Ollama at {dead} is unreachable")
    async with proxy.session.post(proxy.url + "/api/chat", json={"model": MODEL}) as r:
        assert r.status == 502
    async with proxy.session.post(proxy.url + "/v1/embeddings", json={"model": MODEL}) as r:
        assert r.status == 502 and (await r.json())["error"]["type"] == "api_error"
    assert proxy.scheduler.in_flight == 0 and proxy.scheduler.queue_length == 0


@pytest.mark.parametrize(
    ("prompt", "status", "content_type", "body"),
    [
        ("fault:500", 500, "text/plain", b"Internal Server Error"),
        ("fault:status:429", 429, "application/json", b'{"error":"fake failure with status 429"}'),
        ("fault:status:404", 404, "application/json", b'{"error":"fake failure with status 404"}'),
    ],
)
async def test_ollamas_errors_pass_through_unchanged(
    proxy: Proxy, prompt: str, status: int, content_type: str, body: bytes
) -> None:
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": prompt}
    ) as r:
        assert (r.status, r.content_type, await r.read()) == (status, content_type, body)
    assert proxy.scheduler.in_flight == 0


async def test_upstream_failing_mid_stream_gives_one_error_line_then_the_end(proxy: Proxy) -> None:
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "fault:hangup"}
    ) as r:
        assert r.status == 200
        lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert [line.get("response") for line in lines[:2]] == ["The", " sky"]
    assert len(lines) == 3 and set(lines[2]) == {"error"}
    assert lines[2]["error"] == (
        f"Ollama at {proxy.fake.url} closed the connection before the answer was complete; "
        "it may have crashed, run out of memory or been restarted (see Ollama's log)"
    )
    assert "Not enough data" not in lines[2]["error"]
    assert not any(line.get("done") for line in lines)
    assert (await proxy.generate("next"))[0] == 200  # the slot came back


async def test_sse_stream_failure_is_an_sse_error_event(proxy: Proxy) -> None:
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "fault:hangup"}],
            "stream": True,
        },
    ) as r:
        events = (await r.read()).split(b"\n\n")
    last = json.loads(events[-2].removeprefix(b"data: "))
    assert (
        last["error"]["type"] == "api_error"
        and "before the answer was complete" in last["error"]["message"]
    )
    assert b"data: [DONE]" not in events


async def test_silent_ollama_is_504_after_idle_timeout(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"upstream": {"idle_timeout": 0.3}})
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "fault:never"}
    ) as r:
        assert r.status == 504
        assert "did not answer within upstream.idle_timeout (0.3 s)" in (await r.json())["error"]
    assert proxy.scheduler.in_flight == 0


async def test_ollama_restart_while_requests_queue_loses_none(make_proxy: ProxyFactory) -> None:
    """Ollama goes away: queued work waits in order (no 502s) and is served when it is back."""
    proxy = await make_proxy({"upstream": {"unreachable_wait": 30}})
    fake = proxy.fake
    port = fake.port
    assert (await proxy.generate("warm up"))[0] == 200  # a pooled keep-alive connection now exists
    await fake.stop()
    first = asyncio.create_task(proxy.generate("first", "scripts"))
    await proxy.watch.queued(1)  # refused, and back in line with its place kept
    assert proxy.server.app[UPSTREAM].health is Health.DOWN
    second = asyncio.create_task(proxy.generate("second", "scripts"))
    third = asyncio.create_task(proxy.generate("third", "coding"))
    await proxy.watch.queued(3)
    await fake.start(port)
    results = await asyncio.gather(first, second, third)
    assert [status for status, _ in results] == [200, 200, 200]
    assert [s.prompt for s in fake.inference[1:]] == ["third", "first", "second"]


async def test_ollama_down_longer_than_unreachable_wait_gives_502(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"upstream": {"unreachable_wait": 0.2}})
    await proxy.fake.stop()
    status, doc = await proxy.generate("waits, then gives up")
    assert status == 502 and "is unreachable" in doc["error"]
    status, doc = await proxy.generate("fails fast now")
    assert status == 502


async def test_outage_log_lines_are_not_some_requests_lines(make_proxy: ProxyFactory) -> None:
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    proxy = await make_proxy({"upstream": {"unreachable_wait": 0.2}})
    await proxy.fake.stop()
    with capture_logs(processors=[merge_contextvars]) as logs:
        status, _ = await proxy.generate("noticed the outage")
    assert status == 502
    (down,) = [e for e in logs if e["event"] == "upstream_down"]
    assert "request_id" not in down and "client_ip" not in down


async def test_a_proxy_pointed_at_itself_answers_508_instead_of_looping(
    make_proxy: ProxyFactory,
) -> None:
    port = free_port()
    proxy = await make_proxy({"server": {"port": port}}, upstream=f"http://127.0.0.1:{port}")
    async with proxy.session.get(proxy.url + "/api/tags") as r:
        assert r.status == 508
        assert "leads back to this proxy" in (await r.json())["error"]
    assert len(await proxy.records(2)) == 2  # one hop in, one hop refused: no more
