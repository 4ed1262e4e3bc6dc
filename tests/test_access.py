"""Who the client is and what it may do: X-Forwarded-For from a trusted proxy, CORS on the
admin API, the Host check, and the model-management permission."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL, Proxy, ProxyFactory


@pytest.mark.parametrize(
    ("forwarded", "status", "named"),
    [
        ("unknown", 403, "unknown"),
        ("1.2.3.4, ", 403, "unknown"),
        ("garbage, 127.0.0.1", 403, "unknown"),
        ("203.0.113.9:4711", 403, "203.0.113.9"),
        ("[2001:db8::9]:443", 403, "2001:db8::9"),
        ("127.0.0.1:4711", 200, None),  # a whitelisted address with a port: still whitelisted
    ],
)
async def test_unreadable_forwarded_for_is_not_the_trusted_proxy(
    proxy: Proxy, forwarded: str, status: int, named: str | None
) -> None:
    """The test proxy trusts 127.0.0.1 and whitelists loopback: an entry it cannot read must
    not make the client loopback (whitelisted, and admin without a token)."""
    headers = {"X-Forwarded-For": forwarded}
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with proxy.session.post(proxy.url + "/api/generate", json=body, headers=headers) as r:
        assert r.status == status
        doc = await r.json()
    if named is not None:
        assert named in doc["error"]
    async with proxy.session.get(proxy.url + "/api/admin/queue", headers=headers) as r:
        assert r.status == (200 if status == 200 else 403)


async def test_unknown_client_may_use_open_sources(proxy: Proxy) -> None:
    """Unknown is only "not whitelisted": a source that does not require it still serves."""
    headers = {"X-Forwarded-For": "unknown", "X-Test-Source": "chat"}
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with proxy.session.post(proxy.url + "/api/generate", json=body, headers=headers) as r:
        assert r.status == 200
    (record,) = await proxy.records(1)
    assert record.client_ip == "unknown" and record.source == "chat"


DEV_SERVER = "http://localhost:5173"  # one of Ollama's default origins


async def test_admin_api_answers_no_cors_to_ollamas_default_origins(proxy: Proxy) -> None:
    """A page on a local dev server may call Ollama's routes, not change the whitelist."""
    preflight = {"Origin": DEV_SERVER, "Access-Control-Request-Method": "POST"}
    for path in ("/api/admin/whitelist", "/metrics"):
        async with proxy.session.options(proxy.url + path, headers=preflight) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    # A "simple" request needs no preflight: it must be refused, not only left unreadable.
    async with proxy.session.post(
        proxy.url + "/api/admin/whitelist",
        data='{"network": "0.0.0.0/0"}',
        headers={"Origin": DEV_SERVER, "Content-Type": "text/plain"},
    ) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert "0.0.0.0/0" not in [str(n) for n in proxy.live.whitelist]
    async with proxy.session.options(proxy.url + "/api/chat", headers=preflight) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == DEV_SERVER
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with proxy.session.post(
        proxy.url + "/api/chat", json=body, headers={"Origin": DEV_SERVER}
    ) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == DEV_SERVER


async def test_admin_allow_origins_opens_the_admin_api(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"admin": {"allow_origins": ["https://ops.example.com"]}})
    for origin, allowed in (("https://ops.example.com", True), (DEV_SERVER, False)):
        async with proxy.session.get(
            proxy.url + "/api/admin/queue", headers={"Origin": origin}
        ) as r:
            assert r.status == (200 if allowed else 403)
            assert (r.headers.get("Access-Control-Allow-Origin") == origin) is allowed


async def test_the_dashboards_own_origin_may_use_the_admin_api(proxy: Proxy) -> None:
    """The dashboard's POST carries its own origin: same host and port as the request."""
    async with proxy.session.post(
        proxy.url + "/api/admin/whitelist",
        json={"network": "10.1.2.3"},
        headers={"Origin": proxy.url},
    ) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/api/admin/queue", "GET"),
        ("/metrics", "GET"),
        ("/admin", "GET"),
        ("/api/pull", "POST"),
        ("/api/ollama/delete", "DELETE"),
        ("/api/blobs/sha256:abc", "HEAD"),
    ],
)
async def test_a_rebound_host_name_gets_403(proxy: Proxy, path: str, method: str) -> None:
    """DNS rebinding: the browser sends the attacker's name as Host, even to loopback."""
    async with proxy.session.request(
        method, proxy.url + path, headers={"Host": "evil.example.net:11435"}
    ) as r:
        assert r.status == 403
        if method != "HEAD":
            assert "server.allowed_hosts" in (await r.json())["error"]
    assert proxy.forwarded == []


@pytest.mark.parametrize("host", ["localhost:11435", "127.0.0.1", "[::1]:80", "10.0.0.5:11435"])
async def test_loopback_names_and_ip_literals_pass_the_host_check(proxy: Proxy, host: str) -> None:
    async with proxy.session.get(proxy.url + "/api/admin/queue", headers={"Host": host}) as r:
        assert r.status == 200


async def test_allowed_hosts_adds_a_lan_name(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"server": {"allowed_hosts": ["gpu-box.lan"]}})
    for host, status in (("GPU-box.lan:11435", 200), ("gpu-box.lan.evil.net", 403)):
        async with proxy.session.get(proxy.url + "/metrics", headers={"Host": host}) as r:
            assert r.status == status


async def test_inference_and_metadata_answer_any_host(proxy: Proxy) -> None:
    headers = {"Host": "gpu-box.lan:11435"}
    async with proxy.session.get(proxy.url + "/api/tags", headers=headers) as r:
        assert r.status == 200
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with proxy.session.post(proxy.url + "/api/generate", json=body, headers=headers) as r:
        assert r.status == 200


MANAGE = [
    ("POST", "/api/pull", {"model": MODEL}),
    ("POST", "/api/push", {"model": MODEL}),
    ("POST", "/api/create", {"model": "m", "from": MODEL}),
    ("POST", "/api/copy", {"source": MODEL, "destination": "m2"}),
    ("DELETE", "/api/delete", {"model": MODEL}),
    ("POST", "/api/blobs/sha256:" + "a" * 64, None),
]

OPEN_CONFIG = {"sources": [{"name": "open", "priority": 5}], "default_source": "open"}


@pytest.mark.parametrize(("method", "path", "body"), MANAGE)
async def test_model_management_needs_the_whitelist_by_default(
    make_proxy: ProxyFactory, method: str, path: str, body: object
) -> None:
    """Even when the source does not require the whitelist, a stranger cannot delete models."""
    proxy = await make_proxy(OPEN_CONFIG)
    stranger = {"X-Forwarded-For": "203.0.113.9"}
    async with proxy.session.request(method, proxy.url + path, json=body, headers=stranger) as r:
        assert r.status == 403
        assert "admin.manage_models" in (await r.json())["error"]
    assert proxy.forwarded == []
    (record,) = await proxy.records(1)
    assert record.refusal == "manage_models"


async def test_manage_models_anyone_and_admin(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = {"X-Forwarded-For": "203.0.113.9"}
    proxy = await make_proxy({**OPEN_CONFIG, "admin": {"manage_models": "anyone"}})
    async with proxy.session.post(
        proxy.url + "/api/copy", json={"source": MODEL, "destination": "m2"}, headers=stranger
    ) as r:
        assert r.status == 200
    await proxy.server.stop()
    monkeypatch.setenv("SEADRAGON_ADMIN_TOKEN", "s3cret-admin")
    proxy = await make_proxy({**OPEN_CONFIG, "admin": {"manage_models": "admin"}})
    loopback: dict[str, str] = {}  # whitelisted, but not an admin without the token
    copy = {"source": MODEL, "destination": "m3"}
    async with proxy.session.post(proxy.url + "/api/copy", json=copy, headers=loopback) as r:
        assert r.status == 403 and "admin.manage_models: admin" in (await r.json())["error"]
    admin = {**stranger, "Authorization": "Bearer s3cret-admin"}
    async with proxy.session.post(proxy.url + "/api/copy", json=copy, headers=admin) as r:
        assert r.status == 200
    assert "Authorization" not in proxy.forwarded[-1].headers  # the token stays here
