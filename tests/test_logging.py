"""One canonical line per request, with what an operator needs, and never a secret."""

from __future__ import annotations

import asyncio
import copy

import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from seadragon_proxy.logs import redact_secrets

from .conftest import BASE_CONFIG, MODEL, JsonLog, Proxy, ProxyFactory


def request_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "request"]


async def test_generation_line_has_the_canonical_fields(proxy: Proxy) -> None:
    with capture_logs(processors=[merge_contextvars]) as logs:
        status, _ = await proxy.generate("hello", "chat", options={"num_predict": 7})
    assert status == 200
    (line,) = request_lines(logs)
    assert line["request_id"] and line["client_ip"] == "127.0.0.1"
    assert (line["source"], line["priority"]) == ("chat", 5)
    assert (line["method"], line["route"], line["model"], line["status"]) == (
        "POST",
        "/api/generate",
        MODEL,
        200,
    )
    assert line["eval_count"] == 7 and line["prompt_eval_count"] == 12
    assert line["tokens_per_second"] == 50.0
    assert isinstance(line["queue_wait"], float) and isinstance(line["upstream_time"], float)
    assert line["bytes"] > 0 and line["log_level"] == "info"


async def test_openai_stream_usage_is_counted(proxy: Proxy) -> None:
    with capture_logs() as logs:
        async with proxy.session.post(
            proxy.url + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 4,
            },
        ) as r:
            await r.read()
    assert request_lines(logs)[0]["eval_count"] == 4


async def test_refusals_and_hangups_are_logged(proxy: Proxy) -> None:
    with capture_logs() as logs:
        async with proxy.session.post(proxy.url + "/api/chat", data=b"{") as r:
            assert r.status == 400
        async with proxy.session.get(
            proxy.url + "/api/tags", headers={"X-Forwarded-For": "203.0.113.1"}
        ) as r:
            assert r.status == 403
        async with proxy.session.get(
            proxy.url + "/api/tags", headers={"Origin": "https://evil.example"}
        ) as r:
            assert r.status == 403
    bad, refused, origin = request_lines(logs)
    assert bad["status"] == 400 and "invalid JSON" in str(bad["error"]) and "refusal" not in bad
    assert refused["status"] == 403 and refused["source"] == "direct_api"
    assert refused["refusal"] == "whitelist"
    assert origin["status"] == 403 and origin["refusal"] == "origin"


async def test_a_request_that_never_got_a_turn_logs_its_real_wait(
    make_proxy: ProxyFactory,
) -> None:
    """Timed out in the queue or gone while queued: queue_wait is how long it waited."""
    sources = copy.deepcopy(BASE_CONFIG["sources"])
    sources[1]["max_wait"] = 0.2  # chat gives up after 0.2 s; scripts waits without limit
    proxy = await make_proxy({"sources": sources})
    gate = proxy.fake.gate("block")
    blocker = asyncio.create_task(proxy.generate("gate:block", "coding"))
    await proxy.fake.wait_for(1)
    with capture_logs() as logs:
        leaving = asyncio.create_task(proxy.generate("leaves", "scripts"))
        await proxy.watch.queued(1)
        status, _ = await proxy.generate("gives up", "chat")
        assert status == 503
        leaving.cancel()
        await proxy.records(2)
    timed_out, left = request_lines(logs)
    assert timed_out["status"] == 503 and timed_out["source"] == "chat"
    assert left["hung_up"] == "while queued" and left["source"] == "scripts"
    for line in (timed_out, left):
        assert isinstance(line["queue_wait"], float) and line["queue_wait"] >= 0.2
    gate.set()
    await blocker


async def test_tokens_never_reach_the_log(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, json_log: JsonLog
) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-secret-value")
    proxy = await make_proxy({"admin": {"token_env": "TEST_ADMIN_TOKEN"}})
    headers = {"Authorization": "Bearer client-secret-value"}
    await proxy.generate("x")
    async with proxy.session.get(proxy.url + "/api/tags", headers=headers) as r:
        await r.read()
    async with proxy.session.get(proxy.url + "/api/admin/queue", headers=headers) as r:
        assert r.status == 403
    structlog.get_logger("t").info("oops", authorization="Bearer leaked", token="leaked")
    text = json_log.text()
    assert text and "secret-value" not in text and "leaked" not in text
    lines = json_log.lines()  # JSON when not a terminal
    assert any(line.get("event") == "request" for line in lines)
    assert lines[-1]["authorization"] == "[redacted]"


def test_redaction_processor_ignores_case() -> None:
    event = {"event": "x", "Authorization": "Bearer a", "token": "t", "model": "m"}
    assert redact_secrets(None, "info", event) == {
        "event": "x",
        "Authorization": "[redacted]",
        "token": "[redacted]",
        "model": "m",
    }


async def test_queue_events_carry_their_own_request_id(proxy: Proxy) -> None:
    """A waiter starts inside the request that freed the slot; its line must still be its own."""
    gate = proxy.fake.gate("block")
    with capture_logs(processors=[merge_contextvars]) as logs:
        blocker = asyncio.create_task(proxy.generate("gate:block"))
        await proxy.fake.wait_for(1)
        waiting = asyncio.create_task(
            proxy.collect(
                "/api/generate",
                {"model": MODEL, "prompt": "next"},
                {
                    "X-Request-Id": "waiter-1",
                    "X-Forwarded-For": "127.0.0.9",
                    "X-Test-Source": "coding",
                },
            )
        )
        await proxy.watch.queued(1)
        gate.set()
        await asyncio.gather(blocker, waiting)
    started = [e for e in logs if e["event"] == "request_started" and e["id"] == "waiter-1"]
    assert started and started[0]["request_id"] == "waiter-1"
    assert started[0]["client_ip"] == "127.0.0.9"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/api/tags", {}, 200),
        ("POST", "/api/chat", {}, 400),
        ("GET", "/health", {}, 200),
        ("GET", "/api/admin/queue", {"X-Forwarded-For": "203.0.113.1"}, 403),
        ("GET", "/metrics", {}, 200),
        ("GET", "/api/tags", {"Origin": "https://evil.example"}, 403),
        (
            "OPTIONS",
            "/api/chat",
            {"Origin": "https://chat.example.com", "Access-Control-Request-Method": "POST"},
            204,
        ),
    ],
)
async def test_every_answer_carries_a_request_id(
    proxy: Proxy, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    async with proxy.session.request(method, proxy.url + path, headers=headers, data=b"{") as r:
        assert r.status == status
        assert len(r.headers["X-Request-Id"]) == 16
    async with proxy.session.request(
        method, proxy.url + path, headers={**headers, "X-Request-Id": "mine-42"}, data=b"{"
    ) as r:
        assert r.headers["X-Request-Id"] == "mine-42"


async def test_refused_origins_and_user_agents_are_in_the_log(proxy: Proxy) -> None:
    with capture_logs(processors=[merge_contextvars]) as logs:
        headers = {"Origin": "https://evil.example", "User-Agent": "curious/1.0"}
        async with proxy.session.get(proxy.url + "/api/tags", headers=headers) as r:
            assert r.status == 403
        async with proxy.session.get(
            proxy.url + "/api/tags", headers={"User-Agent": "Continue/1.2"}
        ) as r:
            assert r.status == 200
    refused, served = request_lines(logs)
    assert refused["status"] == 403 and "browser origin 'https://evil.example'" in refused["error"]
    assert refused["user_agent"] == "curious/1.0" and refused["request_id"]
    assert served["user_agent"] == "Continue/1.2"
