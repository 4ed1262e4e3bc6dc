"""What reaches an operator's eyes: no secret in any log line, control characters escaped
in human-readable output, and one audit line per admin request."""

from __future__ import annotations

import io
import logging

import pytest
import structlog

from seadragon_proxy.logs import configure_logging, stop_logging
from seadragon_proxy.settings import LogSettings
from seadragon_proxy.textsafe import SafeText, escape, excerpt

from .conftest import JsonLog, Proxy, ProxyFactory
from .test_bad_input import raw_exchange

TOKEN = "tok-7f3a9c1e5b"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"x" * 9000
        + b"\r\n\r\n",
        b"GET /api/tags?key=" + TOKEN.encode() + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKEN.encode()
        + b"\x00\r\n\r\n",
    ],
    ids=["long header line", "long request line", "NUL after a token"],
)
async def test_a_malformed_request_never_logs_its_bytes(
    proxy: Proxy, json_log: JsonLog, request_bytes: bytes
) -> None:
    answer = await raw_exchange(proxy, request_bytes)
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    text = json_log.text()
    assert "bad_http_request" in text
    assert TOKEN not in text and "xxxxxxxx" not in text


ESC = "\x1b]0;pwned\x07\x1b[2J"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("llama3", "llama3"),
        ("mod\x1b[31mel", "mod\\x1b[31mel"),
        ("a\u202eb", "a\\u202eb"),  # bidi override: reorders what the reader sees
        ("x\ud800", "x\\ud800"),  # a lone surrogate cannot even be printed
        ("naïve 模型 🦙", "naïve 模型 🦙"),
        ("tab\there", "tab\\x09here"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_excerpt_bounds_length() -> None:
    assert excerpt("a" * 1000, 10) == "a" * 10 + "…"


def test_safe_text_keeps_newlines_only() -> None:
    out = io.StringIO()
    SafeText(out).write(f"name {ESC}\nnext\r\n")
    assert out.getvalue() == "name \\x1b]0;pwned\\x07\\x1b[2J\nnext\\x0d\n"


def test_console_log_escapes_control_characters() -> None:
    out = io.StringIO()
    configure_logging(LogSettings(format="console"), stream=out, cache_loggers=False)
    try:
        structlog.get_logger("t").info("request", model=f"m{ESC}")
        logging.getLogger("aiohttp.server").warning("raw %s", ESC)
        stop_logging()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    text = out.getvalue()
    assert "\x1b]" not in text and "\x07" not in text and "\\x1b]0;pwned" in text


async def test_one_audit_line_per_admin_request(
    make_proxy: ProxyFactory, json_log: JsonLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEADRAGON_ADMIN_TOKEN", TOKEN)
    proxy = await make_proxy()
    good = {"Authorization": f"Bearer {TOKEN}"}
    asks = [
        ("/api/admin/queue", good, 200, None),
        ("/api/admin/queue", {"Authorization": "Bearer wrong"}, 403, "not_admin"),
        ("/api/admin/queue", {**good, "Origin": "http://localhost:5173"}, 403, "origin"),
        ("/metrics", {**good, "Host": "evil.example.net"}, 403, "host"),
        ("/api/admin/nothing", good, 404, None),
    ]
    for path, headers, status, _ in asks:
        async with proxy.session.get(proxy.url + path, headers=headers) as r:
            assert r.status == status
    lines = [line for line in json_log.lines() if line["event"] == "admin_request"]
    assert [(x["route"], x["status"], x.get("refused")) for x in lines] == [
        (path, status, why) for path, _, status, why in asks
    ]
    assert lines[0]["granted_by"] == "token" and lines[0]["client_ip"] == "127.0.0.1"
    assert lines[0]["method"] == "GET" and lines[1]["level"] == "warning"
    assert TOKEN not in json_log.text()
