"""``GET /metrics``: Prometheus text a real scraper parses, with the figures the requests made."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL, Proxy, ProxyFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(proxy: Proxy, **headers: str) -> Samples:
    async with proxy.session.get(proxy.url + "/metrics", headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counters_histograms_and_tokens(proxy: Proxy) -> None:
    await proxy.tags_read()  # Ollama's model list is in: the made-up model is refused at once
    for _ in range(2):
        assert (await proxy.generate("hi", "chat", options={"num_predict": 4}))[0] == 200
    async with proxy.session.post(
        proxy.url + "/api/generate",
        json={"model": MODEL, "prompt": "fault:500"},
        headers={"X-Test-Source": "coding"},
    ) as r:
        assert r.status == 500
    async with proxy.session.get(
        proxy.url + "/api/tags", headers={"X-Forwarded-For": "203.0.113.5"}
    ) as r:
        assert r.status == 403
    async with proxy.session.get(proxy.url + "/no/such/route") as r:
        assert r.status == 404
    assert (await proxy.generate("x", "chat", model="made-up-model"))[0] == 404
    await proxy.records(6)

    m = await scrape(proxy)
    assert (
        value(
            m,
            "seadragon_requests_total",
            source="chat",
            route="/api/generate",
            model=MODEL,
            status="200",
        )
        == 2
    )
    assert (
        value(
            m,
            "seadragon_requests_total",
            source="coding",
            route="/api/generate",
            model=MODEL,
            status="500",
        )
        == 1
    )
    assert (
        value(
            m,
            "seadragon_requests_total",
            source="direct_api",
            route="/api/tags",
            model="",
            status="403",
        )
        == 1
    )
    assert (
        value(
            m,
            "seadragon_requests_total",
            source="direct_api",
            route="other",
            model="",
            status="404",
        )
        == 1
    )
    # A model Ollama did not know does not become a label of its own.
    assert (
        value(
            m,
            "seadragon_requests_total",
            source="chat",
            route="/api/generate",
            model="other",
            status="404",
        )
        == 1
    )
    assert value(m, "seadragon_whitelist_refusals_total", source="direct_api") == 1
    assert value(m, "seadragon_upstream_errors_total", kind="status_5xx") == 1
    assert value(m, "seadragon_eval_tokens_total", model=MODEL) == 8
    assert value(m, "seadragon_prompt_tokens_total", model=MODEL) == 24
    assert value(m, "seadragon_eval_duration_seconds_total", model=MODEL) == pytest.approx(0.16)
    assert value(m, "seadragon_generation_tokens_per_second_count", model=MODEL) == 2
    assert value(m, "seadragon_generation_tokens_per_second_sum", model=MODEL) == pytest.approx(100)
    # Two chat requests took a turn; the made-up model's 404 came at once, without one.
    assert value(m, "seadragon_queue_wait_seconds_count", source="chat") == 2
    assert value(m, "seadragon_upstream_duration_seconds_count", source="chat") == 2
    assert value(m, "seadragon_slots") == 1


async def test_queue_gauges_follow_the_scheduler(proxy: Proxy) -> None:
    gate = proxy.fake.gate("block")
    blocker = asyncio.create_task(proxy.generate("gate:block", "coding"))
    await proxy.fake.wait_for(1)
    waiting = [asyncio.create_task(proxy.generate(f"w{i}", "scripts")) for i in range(2)]
    await proxy.watch.queued(2)
    m = await scrape(proxy)
    assert value(m, "seadragon_queue_length", source="scripts") == 2
    assert value(m, "seadragon_in_flight", source="coding") == 1
    gate.set()
    await asyncio.gather(blocker, *waiting)
    m = await scrape(proxy)
    assert value(m, "seadragon_queue_length", source="scripts") == 0


async def test_hangups_and_upstream_failures_are_counted(proxy: Proxy) -> None:
    assert (await proxy.generate("fault:hangup"))[0] == 200
    task = asyncio.create_task(proxy.generate("gate:never"))
    await proxy.fake.wait_for(2)
    task.cancel()
    await proxy.records(2)
    m = await scrape(proxy)
    assert value(m, "seadragon_upstream_errors_total", kind="broke_off") == 1
    assert value(m, "seadragon_client_hangups_total", source="direct_api") == 1


async def test_reloads_are_counted(proxy: Proxy) -> None:
    assert await proxy.next_reload("config", lambda: proxy.write_config({"queue": {"max_size": 9}}))
    assert not await proxy.next_reload("config", lambda: proxy.config_path.write_text("sources: ["))
    m = await scrape(proxy)
    assert value(m, "seadragon_reloads_total", what="config", result="ok") == 1
    assert value(m, "seadragon_reloads_total", what="config", result="failed") == 1


async def test_same_access_rule_as_the_admin_routes(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await make_proxy()
    async with proxy.session.get(
        proxy.url + "/metrics", headers={"X-Forwarded-For": "198.51.100.2"}
    ) as r:
        assert r.status == 403
    monkeypatch.setenv("SCRAPE_TOKEN", "prom")
    guarded = await make_proxy({"admin": {"token_env": "SCRAPE_TOKEN"}})
    async with guarded.session.get(guarded.url + "/metrics") as r:
        assert r.status == 403
    assert await scrape(guarded, Authorization="Bearer prom")


async def test_metrics_token_opens_metrics_and_nothing_else(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scraper's read-only token: /metrics yes, the whitelist and queue no."""
    monkeypatch.setenv("SEADRAGON_ADMIN_TOKEN", "admin-token")
    monkeypatch.setenv("SEADRAGON_METRICS_TOKEN", "scrape-only")
    proxy = await make_proxy()
    assert await scrape(proxy, Authorization="Bearer scrape-only")
    assert await scrape(proxy, Authorization="Bearer admin-token")
    for path in ("/api/admin/queue", "/api/admin/whitelist"):
        async with proxy.session.get(
            proxy.url + path, headers={"Authorization": "Bearer scrape-only"}
        ) as r:
            assert r.status == 403
    async with proxy.session.get(
        proxy.url + "/metrics", headers={"Authorization": "Bearer nope"}
    ) as r:
        assert r.status == 403
