"""Forwarding: method, path, query, headers, body bytes, status, content type, streaming."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp

from .conftest import MODEL, Proxy


async def test_root_and_head_root_answer_like_ollama(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await r.text() == "Ollama is running"
    async with proxy.session.head(proxy.url + "/") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "17"
        assert await r.read() == b""
    assert [(s.method, s.path) for s in proxy.forwarded] == [("GET", "/"), ("HEAD", "/")]


async def test_request_is_forwarded_unchanged_but_for_host_and_hop_by_hop(proxy: Proxy) -> None:
    body = b'{"model": "llama3:70b", "prompt": "caf\\u00e9 \xe2\x80\xa8", "stream": false}'
    headers = {
        "Authorization": "Bearer ollama-key",
        "User-Agent": "ollama-python/0.6.3 (x86_64 linux) Python/3.11.7",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "dropped because Connection names it",
        "Keep-Alive": "timeout=5",
        "Content-Type": "application/x-www-form-urlencoded",  # curl -d: Ollama parses JSON anyway
    }
    async with proxy.session.post(
        proxy.url + "/api/generate?ts=1700000000", data=body, headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        assert (await r.json())["done"] is True
    seen = proxy.forwarded[-1]
    assert seen.body == body  # the same bytes, not re-encoded
    assert seen.query == "ts=1700000000"  # signed requests need the query untouched
    assert seen.headers["Authorization"] == "Bearer ollama-key"
    assert seen.headers["User-Agent"] == headers["User-Agent"]
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert "X-Hop" not in seen.headers and "Keep-Alive" not in seen.headers
    assert seen.headers["Host"] == f"127.0.0.1:{proxy.fake.port}"  # not the proxy's host


async def test_no_headers_are_invented(proxy: Proxy) -> None:
    """Without a User-Agent or Content-Type from the client, none reaches Ollama either."""
    reader, writer = await _raw(proxy)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    seen = proxy.forwarded[-1]
    assert "User-Agent" not in seen.headers and "Content-Type" not in seen.headers


async def _raw(proxy: Proxy):  # type: ignore[no-untyped-def]
    import asyncio

    return await asyncio.open_connection("127.0.0.1", proxy.server.port)


async def test_stream_arrives_chunk_by_chunk_before_it_ends(proxy: Proxy) -> None:
    """The first lines reach the client while Ollama is still holding the rest back."""
    gate = proxy.fake.gate("rest")
    async with proxy.session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": "gate-mid:rest"}
    ) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        first = json.loads(await r.content.readline())
        second = json.loads(await r.content.readline())
        assert (first["response"], second["response"]) == ("The", " sky")
        assert not gate.is_set()
        gate.set()
        rest = [json.loads(line) for line in (await r.read()).splitlines()]
    assert rest[-1]["done"] is True and rest[-1]["eval_count"] == 5


async def test_stream_bytes_are_unchanged(proxy: Proxy) -> None:
    async with proxy.session.post(
        proxy.url + "/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 300},
        },
    ) as r:
        through = await r.read()
    async with proxy.session.post(
        proxy.fake.url + "/api/chat",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 300},
        },
    ) as r:
        direct = await r.read()

    def strip_times(raw: bytes) -> list[dict[str, object]]:
        return [
            {k: v for k, v in json.loads(x).items() if k != "created_at"}
            for x in raw.split(b"\n")
            if x
        ]

    assert through.count(b"\n") == direct.count(b"\n") == 301
    assert strip_times(through) == strip_times(direct)
    assert not any(line == b"" for line in through.split(b"\n")[:-1])  # no blank lines inserted


async def test_alias_prefix_reaches_the_real_route(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/api/ollama/tags") as r:
        assert r.status == 200
        assert {m["name"] for m in (await r.json())["models"]} >= {MODEL}
    async with proxy.session.post(
        proxy.url + "/api/ollama/generate", json={"model": MODEL, "prompt": "x", "stream": False}
    ) as r:
        assert r.status == 200
    assert [s.path for s in proxy.forwarded] == ["/api/tags", "/api/generate"]


async def test_delete_with_a_body_and_empty_answers(proxy: Proxy) -> None:
    async with proxy.session.delete(proxy.url + "/api/delete", json={"model": "llama3.2:1b"}) as r:
        assert r.status == 200
        assert await r.read() == b""
    assert proxy.forwarded[-1].json == {"model": "llama3.2:1b"}
    async with proxy.session.delete(proxy.url + "/api/delete", json={"model": "llama3.2:1b"}) as r:
        assert r.status == 404
        assert await r.json() == {"error": "model 'llama3.2:1b' not found"}


async def test_ollamas_own_404_and_405_pass_through(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/api/nonexistent") as r:
        assert (r.status, await r.text()) == (404, "404 page not found")
        assert r.content_type == "text/plain"
    async with proxy.session.get(proxy.url + "/api/generate") as r:
        assert (r.status, await r.text()) == (405, "405 method not allowed")


async def test_blob_upload_streams_through_and_is_not_bounded_by_max_body(make_proxy) -> None:  # type: ignore[no-untyped-def]
    """A blob bigger than server.max_body streams through in pieces, with its Content-Length."""
    proxy: Proxy = await make_proxy({"server": {"max_body": "1MiB"}})
    piece = bytes(range(256)) * 4096  # 1 MiB
    pieces = 24
    digest = hashlib.sha256(piece * pieces).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(pieces):
            yield piece

    url = f"{proxy.url}/api/blobs/sha256:{digest}"
    async with proxy.session.head(url) as r:
        assert r.status == 404
    headers = {"Content-Length": str(len(piece) * pieces)}
    async with proxy.session.post(url, data=body(), headers=headers) as r:
        assert r.status == 201
    seen = proxy.forwarded[-1]
    assert seen.body == f"<{len(piece) * pieces} bytes>".encode()
    assert seen.headers["Content-Length"] == str(len(piece) * pieces)
    async with proxy.session.head(url) as r:
        assert r.status == 200


async def test_chunked_upload_without_length_streams_too(proxy: Proxy) -> None:
    data = b"x" * 300_000

    async def body() -> AsyncIterator[bytes]:
        yield data[:100_000]
        yield data[100_000:]

    digest = hashlib.sha256(data).hexdigest()
    async with proxy.session.post(f"{proxy.url}/api/blobs/sha256:{digest}", data=body()) as r:
        assert r.status == 201
    async with proxy.session.post(f"{proxy.url}/api/blobs/sha256:{'0' * 64}", data=b"abc") as r:
        assert r.status == 400 and await r.json() == {"error": "digest mismatch"}


async def test_openai_routes(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/v1/models") as r:
        assert r.status == 200 and (await r.json())["object"] == "list"
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    assert json.loads(events[0][len(b"data: ") :])["object"] == "chat.completion.chunk"


async def test_response_headers_carry_a_request_id(proxy: Proxy) -> None:
    async with proxy.session.get(
        proxy.url + "/api/version", headers={"X-Request-Id": "abc-123"}
    ) as r:
        assert r.headers["X-Request-Id"] == "abc-123"
    async with proxy.session.get(
        proxy.url + "/api/version", headers={"X-Request-Id": "bad id; with spaces"}
    ) as r:
        assert (
            r.headers["X-Request-Id"] != "bad id; with spaces"
            and len(r.headers["X-Request-Id"]) == 16
        )


async def test_keep_alive_connection_serves_many_requests(proxy: Proxy) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(5):
            async with session.post(
                proxy.url + "/api/generate", json={"model": MODEL, "prompt": "x"}
            ) as r:
                lines = (await r.read()).splitlines()
                assert json.loads(lines[-1])["done"] is True
    assert len(proxy.fake.inference) == 5
