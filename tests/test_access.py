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
