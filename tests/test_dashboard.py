"""The operator dashboard at /admin, driven in a real headless Chromium through Playwright.

The page must work under the strict Content-Security-Policy the proxy sends with it; a
violation shows up as a console error, which the first test turns into a failure."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest
from playwright.async_api import Browser, ConsoleMessage, Error, Page, async_playwright, expect

from .conftest import BASE_CONFIG, MODEL, Proxy, ProxyFactory

CHROMIUM = os.environ.get("SEADRAGON_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 10_000  # the queue refreshes every 2 s, the other panels on load and on change
REMOTE = "203.0.113.9"  # appears as the client via X-Forwarded-For (127.0.0.1 is trusted)

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run 'make browser' (make test does) or set "
            "SEADRAGON_CHROMIUM to a Chromium binary"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@dataclass
class Dashboard:
    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def on_page_error(self, error: Error) -> None:
        self.page_errors.append(str(error))


async def open_dashboard(browser: Browser, proxy: Proxy) -> Dashboard:
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    dashboard = Dashboard(page)
    page.on("console", dashboard.on_console)
    page.on("pageerror", dashboard.on_page_error)
    response = await page.goto(proxy.url + "/admin")
    assert response is not None and response.status == 200
    return dashboard


async def generate_from(proxy: Proxy, address: str) -> int:
    """Status of a generate from ``address`` in the default source (which needs the whitelist)."""
    status, _ = await proxy.collect(
        "/api/generate", {"model": MODEL, "prompt": "hello"}, {"X-Forwarded-For": address}
    )
    return int(status)


async def test_page_loads_without_errors_and_shows_upstream_health(
    proxy: Proxy, browser: Browser
) -> None:
    """The page loads under its CSP with no console or page errors and shows Ollama as up."""
    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    await expect(page.locator("#upstream-health")).to_have_attribute("data-health", "up")
    await expect(page.locator("#upstream-health")).to_have_text("up")
    await expect(page.locator("#ollama-version")).to_have_text("Ollama 0.12.6")
    await expect(page.locator("#upstream-url")).to_have_text(proxy.fake.url)
    # Every panel has loaded: the queue, the seeded whitelist, the stats and the charts.
    await expect(page.get_by_test_id("queue-empty")).to_be_visible()
    await expect(page.get_by_test_id("processing-empty")).to_be_visible()
    await expect(page.get_by_test_id("whitelist-row")).to_have_count(2)
    await expect(page.locator("#stats-sources-body")).to_have_text("No requests in the last hour.")
    await expect(page.locator("#chart-wait svg")).to_have_count(1)
    await expect(page.locator("#chart-throughput svg")).to_have_count(1)
    await expect(page.locator("#status-line")).to_have_attribute("data-state", "ok")
    await expect(page.locator("#auth-message")).to_be_hidden()
    assert dashboard.console_errors == []
    assert dashboard.page_errors == []


async def test_queue_and_processing_follow_the_proxy(proxy: Proxy, browser: Browser) -> None:
    """A held request shows under processing and a waiting one in the queue; both clear after."""
    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    await expect(page.get_by_test_id("queue-empty")).to_be_visible()

    gate = proxy.fake.gate("hold")
    running = asyncio.create_task(proxy.generate("gate:hold", "scripts"))
    await proxy.fake.wait_for(1)
    waiting = asyncio.create_task(proxy.generate("after the held one", "chat"))
    await proxy.watch.queued(1)

    queue_rows = page.get_by_test_id("queue-row")
    await expect(queue_rows).to_have_count(1)
    await expect(queue_rows.locator("[data-col=source]")).to_have_text("chat")
    await expect(queue_rows.locator("[data-col=priority]")).to_have_text("5")
    await expect(queue_rows.locator("[data-col=model]")).to_have_text(MODEL)
    await expect(queue_rows.locator("[data-col=client]")).to_have_text("127.0.0.1")
    wait = queue_rows.locator("[data-col=wait]")
    await expect(wait).not_to_have_text(await wait.text_content() or "")  # ticks between polls
    processing_rows = page.get_by_test_id("processing-row")
    await expect(processing_rows).to_have_count(1)
    await expect(processing_rows.locator("[data-col=source]")).to_have_text("scripts")
    await expect(page.locator("#queue-count")).to_have_text("1")
    await expect(page.locator("#in-flight")).to_have_text("1")

    gate.set()
    assert [status for status, _ in await asyncio.gather(running, waiting)] == [200, 200]
    await expect(page.get_by_test_id("queue-empty")).to_be_visible()
    await expect(queue_rows).to_have_count(0)
    await expect(processing_rows).to_have_count(0)
    await expect(page.locator("#queue-count")).to_have_text("0")


async def test_a_sources_colour_comes_from_its_name_on_every_load(
    proxy: Proxy, browser: Browser
) -> None:
    """The swatch of a source is colours.js's colour for its name, on a first load and after
    other sources were seen first (the colours used to be handed out in order of sighting)."""
    gate = proxy.fake.gate("hold")
    running = asyncio.create_task(proxy.generate("gate:hold", "scripts"))
    await proxy.fake.wait_for(1)
    waiting = asyncio.create_task(proxy.generate("queued behind", "chat"))
    await proxy.watch.queued(1)
    shown = []
    for row_id in ("queue-row", "processing-row"):
        dashboard = await open_dashboard(browser, proxy)
        page = dashboard.page
        swatch = page.get_by_test_id(row_id).locator(".swatch")
        await expect(swatch).to_have_count(1)
        name = "chat" if row_id == "queue-row" else "scripts"
        colour = await swatch.evaluate("s => getComputedStyle(s).backgroundColor")
        wanted = await page.evaluate(
            """(name) => {
                const probe = document.createElement("span");
                probe.style.background = seadragonColour(name);
                document.body.append(probe);
                const colour = getComputedStyle(probe).backgroundColor;
                probe.remove();
                return colour;
            }""",
            name,
        )
        assert colour == wanted
        shown.append(colour)
        assert dashboard.console_errors == [] and dashboard.page_errors == []
        await page.close()
    assert shown[0] != shown[1]
    gate.set()
    assert [status for status, _ in await asyncio.gather(running, waiting)] == [200, 200]


async def test_whitelist_add_and_remove_from_the_page(proxy: Proxy, browser: Browser) -> None:
    """Adding and removing an entry on the page changes who the running proxy serves."""
    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    await expect(page.get_by_test_id("whitelist-row")).to_have_count(2)  # the loopback seed
    assert await generate_from(proxy, REMOTE) == 403

    await page.fill("#wl-network", "203.0.113.0/24")
    await page.fill("#wl-note", "the lab")
    assert await proxy.next_reload("whitelist", lambda: page.click("#wl-add"))
    await expect(page.locator("#wl-message")).to_have_text(
        "Added 203.0.113.0/24. It applies to new requests now."
    )
    row = page.locator("#whitelist-body tr[data-network='203.0.113.0/24']")
    await expect(row.locator("[data-col=note]")).to_have_text("the lab")
    assert ip_address(REMOTE) in proxy.live.whitelist
    assert await generate_from(proxy, REMOTE) == 200

    remove = row.get_by_test_id("whitelist-remove")
    await remove.click()
    await expect(remove).to_have_text("Confirm remove")  # the first click only arms it
    assert ip_address(REMOTE) in proxy.live.whitelist
    assert await proxy.next_reload("whitelist", remove.click)
    await expect(page.locator("#wl-message")).to_contain_text("Removed 203.0.113.0/24.")
    await expect(row).to_have_count(0)
    assert ip_address(REMOTE) not in proxy.live.whitelist
    assert await generate_from(proxy, REMOTE) == 403

    async with proxy.session.post(
        proxy.url + "/api/admin/whitelist", json={"network": "10.0.0.7/8"}
    ) as r:
        assert r.status == 400
        refusal = (await r.json())["error"]
    assert "did you mean 10.0.0.0/8?" in refusal
    await page.fill("#wl-network", "10.0.0.7/8")
    await page.click("#wl-add")
    await expect(page.locator("#wl-message")).to_have_text(refusal)
    await expect(page.locator("#wl-message")).to_have_attribute("data-state", "error")
    await expect(page.get_by_test_id("whitelist-row")).to_have_count(2)
    await expect(page.locator("#wl-network")).to_have_value("10.0.0.7/8")  # kept for fixing


async def test_token_is_asked_for_then_used(
    make_proxy: ProxyFactory, browser: Browser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an admin token configured the page asks for it, then shows the queue once given."""
    token = "dashboard test token 7f3a"
    monkeypatch.setenv("SEADRAGON_DASHBOARD_TEST_TOKEN", token)
    proxy = await make_proxy({"admin": {"token_env": "SEADRAGON_DASHBOARD_TEST_TOKEN"}})
    gate = proxy.fake.gate("hold")
    running = asyncio.create_task(proxy.generate("gate:hold", "scripts"))
    await proxy.fake.wait_for(1)
    waiting = asyncio.create_task(proxy.generate("queued", "coding"))
    await proxy.watch.queued(1)

    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    banner = page.locator("#auth-message")
    await expect(banner).to_contain_text("Admin token needed.")
    await expect(banner).to_contain_text("$SEADRAGON_DASHBOARD_TEST_TOKEN")  # the API's hint
    await expect(page.locator("#status-line")).to_have_attribute("data-state", "auth")
    await expect(page.locator("#queue-body")).to_have_text("Enter the admin token to see this.")
    await expect(page.locator("#upstream-health")).to_have_text("up")  # /health needs no token

    await page.fill("#token-input", "not the token")
    await page.click("#token-save")
    await expect(banner).to_contain_text("Admin token refused.")

    await page.fill("#token-input", token)
    await page.click("#token-save")
    await expect(banner).to_be_hidden()
    queue_rows = page.get_by_test_id("queue-row")
    await expect(queue_rows).to_have_count(1)
    await expect(queue_rows.locator("[data-col=source]")).to_have_text("coding")
    await expect(page.get_by_test_id("processing-row")).to_have_count(1)
    await expect(page.get_by_test_id("whitelist-row")).to_have_count(2)
    await expect(page.locator("#status-line")).to_have_attribute("data-state", "ok")
    assert token not in page.url
    assert await page.evaluate("sessionStorage.getItem('seadragon-admin-token')") == token

    gate.set()
    await asyncio.gather(running, waiting)
    await expect(page.get_by_test_id("queue-empty")).to_be_visible()


async def test_chart_draws_one_series_per_source(proxy: Proxy, browser: Browser) -> None:
    """After traffic from two sources the charts draw one line per source, with a legend."""
    sent = {"coding": 3, "chat": 1}
    for source, count in sent.items():
        for i in range(count):
            status, _ = await proxy.generate(f"{source} {i}", source)
            assert status == 200
    await proxy.records(sum(sent.values()))

    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    for chart in ("#chart-wait", "#chart-throughput"):
        series = page.locator(f"{chart} svg g[data-series]")
        await expect(series).to_have_count(2)
        names = await series.evaluate_all("gs => gs.map(g => g.dataset.series).sort()")
        assert names == sorted(sent)
        for source, count in sent.items():
            group = page.locator(f"{chart} svg g[data-series='{source}']")
            await expect(group).to_have_attribute("data-total", str(count))
            await expect(group.locator("path")).to_have_count(1)
    legend = page.locator("#chart-legend li")
    await expect(legend).to_have_count(2)
    await expect(legend.first).to_have_attribute("data-source", "coding")  # busiest first
    await expect(page.locator("#chart-wait svg")).to_contain_text("wait (s)")
    await expect(page.locator("#chart-throughput svg")).to_contain_text("requests / min")

    await page.select_option("#throughput-metric", "tokens")
    await expect(page.locator("#chart-throughput svg")).to_contain_text("tokens / min")

    stats = page.locator("#stats-sources-body tr[data-testid=stats-row]")
    await expect(stats).to_have_count(2)
    for source, count in sent.items():
        row = page.locator(f"#stats-sources-body tr[data-source='{source}']")
        await expect(row.locator("[data-col=requests]")).to_have_text(str(count))


async def test_servers_panel_shows_slots_loaded_models_and_swaps(
    proxy: Proxy, browser: Browser
) -> None:
    """Each server's health, running / slots, loaded models and swap count, from the queue view."""
    assert (await proxy.generate("hello"))[0] == 200  # the proxy now knows MODEL is loaded
    dashboard = await open_dashboard(browser, proxy)
    row = dashboard.page.get_by_test_id("server-row")
    await expect(row).to_have_count(1)
    await expect(row.locator("[data-col=name]")).to_have_text("default")
    await expect(row.locator("[data-col=health]")).to_have_text("up")
    await expect(row.locator("[data-col=running]")).to_have_text("0 / 1")
    await expect(row.locator("[data-col=loaded]")).to_have_text(MODEL)
    await expect(row.locator("[data-col=swaps]")).to_have_text("1")
    assert dashboard.console_errors == [] and dashboard.page_errors == []


async def test_tenants_panel_shows_who_waits_and_the_shares(
    make_proxy: ProxyFactory, browser: Browser
) -> None:
    """Fair shares: each tenant waiting, and its share of the last hour's tokens."""
    team = {
        "name": "team",
        "priority": 5,
        "match": {"header": {"X-Test-Source": "team"}},
        "fair_by": "header:X-User",
    }
    proxy = await make_proxy({"sources": [team, *BASE_CONFIG["sources"]]})
    headers = {"X-Test-Source": "team", "X-User": "ann"}
    body = {"model": MODEL, "prompt": "x"}
    for _ in range(3):
        assert (await proxy.collect("/api/generate", body, headers))[0] == 200
    assert (await proxy.collect("/api/generate", body, {**headers, "X-User": "bo"}))[0] == 200
    dashboard = await open_dashboard(browser, proxy)
    page = dashboard.page
    gate = proxy.fake.gate("hold")
    held = asyncio.create_task(
        proxy.collect("/api/generate", {**body, "prompt": "gate:hold"}, headers)
    )
    await proxy.fake.wait_for(5)
    waiting = asyncio.create_task(proxy.collect("/api/generate", body, {**headers, "X-User": "bo"}))
    await proxy.watch.queued(1)
    ann = page.locator("[data-testid=tenant-row][data-tenant='team/ann']")
    bo = page.locator("[data-testid=tenant-row][data-tenant='team/bo']")
    await expect(ann.locator("[data-col=running]")).to_have_text("1")
    await expect(ann.locator("[data-col=share]")).to_have_text("75%")
    await expect(bo.locator("[data-col=waiting]")).to_have_text("1")
    await expect(bo.locator("[data-col=share]")).to_have_text("25%")
    gate.set()
    assert [s for s, _ in await asyncio.gather(held, waiting)] == [200, 200]
    await expect(bo.locator("[data-col=waiting]")).to_have_text("0")
    assert not dashboard.console_errors and not dashboard.page_errors
