"""Hostile and broken requests: a clear 4xx, never a 500, never a crash, nothing forwarded."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from .conftest import MODEL, JsonLog, Proxy, ProxyFactory


async def raw_exchange(proxy: Proxy, request: bytes, timeout: float = 5) -> bytes:
    """Send bytes, read until the proxy closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


TAGS = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n"

PROTOCOL_ABUSE = {
    "content-length with transfer-encoding": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /api/admin/queue HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "two content-lengths": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\n{}"
    ),
    "oversized header": TAGS + b"X-Big: " + b"a" * 10_000 + b"\r\n\r\n",
    "oversized request line": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in a header": TAGS + b"X-A: a\x00b\r\n\r\n",
    "CR injection in X-Forwarded-For": TAGS + b"X-Forwarded-For: 1.2.3.4\rX-Admin: 1\r\n\r\n",
    "obsolete line folding": TAGS + b"X-A: a\r\n b\r\n\r\n",
    "bare LF line ends": b"GET /api/tags HTTP/1.1\nHost: x\n\n",
    "space in a header name": TAGS + b"X A: b\r\n\r\n",
    "TLS hello on the plain port": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
    "no Host": b"GET /api/tags HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", PROTOCOL_ABUSE.values(), ids=PROTOCOL_ABUSE.keys())
async def test_protocol_abuse_is_a_400_and_a_closed_connection(
    proxy: Proxy, request_bytes: bytes
) -> None:
    answer = await raw_exchange(proxy, request_bytes)
    assert answer.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), answer[:80]
    status_lines = re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ", answer)
    assert len(status_lines) == 1  # one answer: nothing smuggled behind it
    assert proxy.forwarded == []
    assert (await proxy.generate("still up"))[0] == 200


async def test_bad_requests_are_one_log_line_without_a_traceback(
    proxy: Proxy, json_log: JsonLog
) -> None:
    await raw_exchange(proxy, PROTOCOL_ABUSE["NUL in a header"])
    text = json_log.text()
    (line,) = [json.loads(x) for x in text.splitlines() if "bad_http_request" in x]
    assert line["level"] == "warning" and "Invalid header value char" in line["event"]
    assert "exception" not in line and "Traceback" not in text


async def test_slow_headers_are_cut_off(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"server": {"header_timeout": 1}})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Slow: a")  # and never the rest
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed by the proxy
    writer.close()
    assert proxy.forwarded == []


async def test_slow_body_gets_408(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"server": {"body_timeout": 1}})
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b'POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model":')
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"server.body_timeout (1 s)" in answer
    assert proxy.forwarded == []


async def test_absolute_form_targets_go_to_ollama_only(proxy: Proxy) -> None:
    """``GET http://elsewhere/...`` must not turn the proxy into an open forward proxy."""
    answer = await raw_exchange(
        proxy,
        b"GET http://169.254.169.254/api/tags HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert proxy.forwarded[0].path == "/api/tags"


# -- property: random bodies and headers never break it ------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.one_of(st.just(MODEL), json_values), "prompt": st.text(max_size=30)},
        optional={"stream": json_values, "messages": json_values, "options": json_values},
    ).map(lambda d: json.dumps(d).encode()),
)
header_names = st.text(
    alphabet=st.sampled_from(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
    ),
    min_size=1,
    max_size=20,
).filter(
    lambda n: (
        n.lower() not in {"content-length", "transfer-encoding", "host", "connection", "expect"}
    )
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(str.strip)
headers = st.dictionaries(header_names, header_values, max_size=6) | st.fixed_dictionaries(
    {},
    optional={
        "X-Forwarded-For": header_values,
        "Origin": header_values,
        "X-Test-Source": header_values,
        "Content-Type": header_values,
        "X-Request-Id": header_values,
        "Authorization": header_values,
    },
)
paths = st.sampled_from(
    [
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/show",
        "/api/pull",
        "/api/delete",
        "/api/copy",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/api/tags",
        "/",
        "/api/ollama/chat",
        "/api/admin/queue",
        "/health",
        "/api/blobs/sha256:00",
        "/nowhere",
    ]
)
methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH"])


def steers_the_fake(body: bytes) -> bool:
    """Prompts the fake treats as instructions (gates and faults) are not random input."""
    return b"gate" in body or b"fault:" in body


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(method=methods, path=paths, body=bodies, header_set=headers)
async def test_random_requests_always_get_a_well_formed_non_5xx_answer(
    proxy: Proxy, method: str, path: str, body: bytes, header_set: dict[str, Any]
) -> None:
    assume(not steers_the_fake(body))
    async with proxy.session.request(
        method, proxy.url + path, data=body, headers=header_set, skip_auto_headers=["Content-Type"]
    ) as r:
        raw = await r.read()
        assert 200 <= r.status < 500, (r.status, raw[:200])
        if r.content_type == "application/json" and raw:
            json.loads(raw)
    assert proxy.scheduler.in_flight == 0 and proxy.scheduler.queue_length == 0


async def test_still_healthy_after_the_noise(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/health") as r:
        assert r.status == 200
