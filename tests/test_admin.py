"""The queue view, its access rule (token, else loopback only; 403 never 401), health, CORS."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import MODEL, Proxy, ProxyFactory, free_port


async def test_queue_view_lists_entries_in_dispatch_order(proxy: Proxy) -> None:
    gate = proxy.fake.gate("block")
    blocker = asyncio.create_task(proxy.generate("gate:block", "scripts"))
    await proxy.fake.wait_for(1)
    waiting = []
    for index, source in enumerate(["scripts", "chat", "coding"]):
        waiting.append(asyncio.create_task(proxy.generate(f"p{index}", source)))
        await proxy.watch.queued(index + 1)
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert r.status == 200
        view = await r.json()
    assert view["queue_length"] == 3 and view["in_flight"] == 1 and view["slots"] == 1
    assert [e["source"] for e in view["entries"]] == ["coding", "chat", "scripts"]
    entry = view["entries"][0]
    assert set(entry) >= {"id", "source", "priority", "path", "model", "client_ip", "wait_time"}
    assert (entry["priority"], entry["path"], entry["model"], entry["client_ip"]) == (
        0,
        "/api/generate",
        MODEL,
        "127.0.0.1",
    )
    assert entry["wait_time"] >= 0
    assert view["processing"] is True  # a boolean, as the seed's admin panel reads it
    assert [p["source"] for p in view["running"]] == ["scripts"]
    assert view["running"][0]["running_time"] >= 0
    gate.set()
    await asyncio.gather(blocker, *waiting)


async def test_queue_view_shows_effective_priority_when_aging(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"queue": {"aging": 60}})
    gate = proxy.fake.gate("block")
    blocker = asyncio.create_task(proxy.generate("gate:block"))
    await proxy.fake.wait_for(1)
    queued = asyncio.create_task(proxy.generate("aging", "chat"))
    await proxy.watch.queued(1)
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        view = await r.json()
    entry = view["entries"][0]
    assert entry["priority"] == 5 and entry["effective_priority"] <= 5
    assert "effective_priority" not in view["running"][0]  # aging only matters in line
    gate.set()
    await asyncio.gather(blocker, queued)


async def test_admin_is_loopback_only_without_a_token(proxy: Proxy) -> None:
    async with proxy.session.get(
        proxy.url + "/api/admin/queue", headers={"X-Forwarded-For": "198.51.100.4"}
    ) as r:
        assert r.status == 403  # never 401: the Ollama CLI reads that as "sign in"
        assert "loopback clients only" in (await r.json())["error"]


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "correct horse battery staple")
    return "correct horse battery staple"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 403),
        ("Bearer wrong", 403),
        ("correct horse battery staple", 403),  # the scheme is required
        ("Bearer correct horse battery staple", 200),
    ],
)
async def test_admin_token(
    make_proxy: ProxyFactory, token: str, authorization: str | None, status: int
) -> None:
    proxy = await make_proxy({"admin": {"token_env": "TEST_ADMIN_TOKEN"}})
    headers = {"Authorization": authorization} if authorization else {}
    async with proxy.session.get(proxy.url + "/api/admin/queue", headers=headers) as r:
        assert r.status == status  # with a token, loopback alone is not enough


async def test_token_admits_remote_admins(make_proxy: ProxyFactory, token: str) -> None:
    proxy = await make_proxy({"admin": {"token_env": "TEST_ADMIN_TOKEN"}})
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.51.100.4"}
    async with proxy.session.get(proxy.url + "/api/admin/queue", headers=headers) as r:
        assert r.status == 200


async def test_unknown_admin_paths_are_not_forwarded(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/api/admin/nothing") as r:
        assert r.status == 404
    async with proxy.session.get(
        proxy.url + "/api/admin/nothing", headers={"X-Forwarded-For": "198.51.100.4"}
    ) as r:
        assert r.status == 403
    assert proxy.forwarded == []


async def test_health_healthy(proxy: Proxy) -> None:
    for path in ("/health", "/api/ollama/health"):
        async with proxy.session.get(proxy.url + path) as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["status"] == "healthy"
        assert doc["ollama"] == {"reachable": True, "version": "0.12.6"}
        assert doc["queue_length"] == 0


async def test_health_unhealthy_when_ollama_is_down(make_proxy: ProxyFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(upstream=dead)
    async with proxy.session.get(proxy.url + "/health") as r:
        assert r.status == 503
        doc = await r.json()
    assert doc["status"] == "unhealthy" and doc["ollama"]["reachable"] is False


async def test_cors_preflight_and_headers_for_allowed_origin(proxy: Proxy) -> None:
    origin = "https://chat.example.com"
    async with proxy.session.options(
        proxy.url + "/api/chat",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    ) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
        assert "Origin" in r.headers.getall("Vary")
    async with proxy.session.post(
        proxy.url + "/api/chat",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Origin": origin},
    ) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == origin
        await r.read()
    assert "Origin" not in proxy.forwarded[-1].headers  # CORS is decided here, not by Ollama


@pytest.mark.parametrize(
    "origin", ["http://localhost:5173", "vscode-webview://abc", "app://obsidian.md"]
)
async def test_ollamas_default_origins_stay_allowed(proxy: Proxy, origin: str) -> None:
    async with proxy.session.get(proxy.url + "/api/tags", headers={"Origin": origin}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == origin


async def test_disallowed_origin_gets_ollamas_empty_403(proxy: Proxy) -> None:
    for method in ("OPTIONS", "POST"):
        async with proxy.session.request(
            method,
            proxy.url + "/api/chat",
            headers={"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"},
        ) as r:
            assert r.status == 403 and await r.read() == b""
            assert "Access-Control-Allow-Origin" not in r.headers
    assert proxy.forwarded == []


async def test_ollama_defaults_can_be_switched_off(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"cors": {"allow_ollama_defaults": False}})
    async with proxy.session.get(
        proxy.url + "/api/tags", headers={"Origin": "http://localhost:5173"}
    ) as r:
        assert r.status == 403


async def test_an_idle_queue_view_says_not_processing(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        view = await r.json()
    assert view["processing"] is False and view["running"] == [] and view["in_flight"] == 0


async def test_queue_view_and_health_agree_that_ollama_is_down(make_proxy: ProxyFactory) -> None:
    """Before any request found the outage, /health's probe did: the queue view says so too."""
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    async with proxy.session.get(proxy.url + "/health") as r:
        assert r.status == 503 and (await r.json())["status"] == "unhealthy"
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert (await r.json())["upstream"]["health"] == "down"


async def test_queue_view_and_health_agree_that_ollama_is_back(proxy: Proxy) -> None:
    await proxy.fake.stop()
    async with proxy.session.get(proxy.url + "/health") as r:
        assert r.status == 503
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert (await r.json())["upstream"]["health"] == "down"
    await proxy.fake.start(port=proxy.fake.port)
    async with proxy.session.get(proxy.url + "/health") as r:
        assert r.status == 200
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        assert (await r.json())["upstream"]["health"] == "up"
