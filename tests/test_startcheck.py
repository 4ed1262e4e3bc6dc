"""The start-up check of the upstream address: a mistyped port is a warning at start."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from seadragon_proxy.typedefs import START_CHECK

from .conftest import ProxyFactory, free_port


def _warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "upstream_unreachable_at_start"]


async def test_a_mistyped_upstream_port_is_a_warning_naming_the_url(
    make_proxy: ProxyFactory,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with capture_logs() as logs:
        proxy = await make_proxy(upstream=url)
        problems = await proxy.server.app[START_CHECK].result()
    (warning,) = _warnings(logs)
    assert warning["log_level"] == "warning"
    assert warning["upstream"] == url
    assert warning["problem"] == problems[0]
    assert "nothing accepts connections on 127.0.0.1 port" in warning["problem"]
    assert "11434" in warning["problem"] and "ollama serve" in warning["problem"]
    assert "--upstream" in warning["check"]


async def test_a_host_name_that_does_not_resolve_is_said_so(make_proxy: ProxyFactory) -> None:
    with capture_logs() as logs:
        proxy = await make_proxy(upstream="http://no-such-host.invalid:11434")
        await proxy.server.app[START_CHECK].result()
    (warning,) = _warnings(logs)
    assert "no-such-host.invalid does not resolve" in warning["problem"]


async def test_a_reachable_upstream_gets_no_warning_and_no_request(
    make_proxy: ProxyFactory,
) -> None:
    """Only a connection is opened: Ollama sees no request, the history records none."""
    with capture_logs() as logs:
        proxy = await make_proxy()
        assert await proxy.server.app[START_CHECK].result() == []
    assert _warnings(logs) == []
    assert proxy.forwarded == [] and proxy.finished == []
    # The check itself asks nothing; the proxy's only request is its read of the model list.
    assert {r.path for r in proxy.fake.requests} <= {"/api/tags"}
    async with proxy.session.get(proxy.url + "/api/version") as r:
        assert r.status == 200
