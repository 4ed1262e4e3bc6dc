"""``seadragon-proxy doctor``: one ✓/✗ line per check, against a fake Ollama that is up,
down, missing the model or slow, a proxy that runs or does not, and a port someone took."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from seadragon_proxy import doctor
from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.settings import load_settings
from seadragon_proxy.whitelist import WhitelistStore

from .conftest import MODEL, Proxy, ProxyFactory, free_port, merge


async def run_doctor(config: Path, **kwargs: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await doctor.run(config, out, **kwargs)
    return code, out.getvalue().splitlines()


def config_for(proxy: Proxy, override: dict[str, Any] | None = None) -> Path:
    """The proxy's own config with its real port (the fixture listens on port 0)."""
    port = int(proxy.url.rsplit(":", 1)[1])
    doc = merge(proxy.config, {"server": {"port": port}, **(override or {})})
    path = proxy.config_path.with_name("doctor.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


def marks(lines: list[str]) -> str:
    return "".join(line[0] for line in lines)


Routes = dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]


@pytest.fixture
async def odd_server() -> AsyncIterator[Callable[[Routes, int], Awaitable[str]]]:
    """A real HTTP server with the handlers a test gives it: a slow or strange 'Ollama',
    or something else holding the proxy's port."""
    runners: list[web.AppRunner] = []
    release = asyncio.Event()

    async def start(routes: Routes, port: int = 0) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    start.release = release  # type: ignore[attr-defined]
    yield start
    release.set()
    for runner in runners:
        await runner.cleanup()


async def test_all_well_with_generate(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"defaults": [{"force": {"options": {"num_ctx": 8192}}}]})
    code, lines = await run_doctor(config_for(proxy), generate=MODEL)
    assert code == 0, lines
    assert marks(lines) == "✓" * len(lines)
    text = "\n".join(lines)
    assert "is this proxy, answering" in text
    assert "answers: version 0.12.6" in text
    assert f"has 3 models: {MODEL}, llama3.2:1b, nomic-embed-text:latest; loaded: {MODEL}" in text
    assert f"one token from {MODEL} from default directly in " in text
    assert f"one token from {MODEL} through the proxy in " in text
    assert "/health answers healthy" in text and "admin API answers: 0 waiting" in text
    sent = [r.json for r in proxy.fake.inference]
    assert len(sent) == 2 and all(s["options"]["num_ctx"] == 8192 for s in sent)  # pins too
    assert all(s["options"]["num_predict"] == 1 for s in sent)


async def test_ollama_down(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    started = time.perf_counter()
    code, lines = await run_doctor(config_for(proxy), generate=MODEL)
    assert code == 1
    assert time.perf_counter() - started < 5
    text = "\n".join(lines)
    assert (
        "✗ Ollama default at http://127.0.0.1:" in text
        and "cannot connect: connection refused" in text
    )
    assert "start Ollama there (docs/ollama-setup.md)" in text
    assert "✗ one token from default directly: cannot connect" in text
    assert "✗ one token through the proxy: not tried" in text
    assert "✗ /health answers HTTP 503" in text
    assert lines[0].startswith("✓ config") and "✓ 127.0.0.1:" in text  # the rest still hold


async def test_missing_model(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    code, lines = await run_doctor(config_for(proxy), generate="mistral:7b")
    assert code == 1
    text = "\n".join(lines)
    assert "✗ default does not have mistral:7b (it has llama3:70b" in text
    assert "pull it: OLLAMA_HOST=127.0.0.1:" in text and "ollama pull mistral:7b" in text
    assert "✗ one token from default directly: HTTP 404: model 'mistral:7b' not found" in text


async def test_slow_ollama_costs_the_timeout_and_no_more(
    make_proxy: ProxyFactory, odd_server: Any
) -> None:
    async def never(request: web.Request) -> web.Response:
        await odd_server.release.wait()
        return web.Response()

    url = await odd_server({"/{tail:.*}": never})
    proxy = await make_proxy(upstream=url)
    started = time.perf_counter()
    code, lines = await run_doctor(config_for(proxy), timeout=0.5)
    took = time.perf_counter() - started
    assert code == 1
    assert f"✗ Ollama default at {url}: no answer within 0.5 s" in "\n".join(lines)
    assert took < 2.5, took  # in parallel: about one timeout, not one per check


async def test_what_a_server_sends_is_escaped(make_proxy: ProxyFactory, odd_server: Any) -> None:
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.1\x1b[2J\x07"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "evil\x1b]0;owned\x07:1b"}]})

    url = await odd_server({"/api/version": version, "/api/tags": tags, "/api/ps": tags})
    proxy = await make_proxy(upstream=url)
    _, lines = await run_doctor(config_for(proxy))
    text = "\n".join(lines)
    assert "\x1b" not in text and "\x07" not in text
    assert "version 0.1\\x1b[2J\\x07" in text and "evil\\x1b]0;owned\\x07:1b" in text


async def test_proxy_not_running_and_database_missing(fake: FakeOllama, tmp_path: Path) -> None:
    config = tmp_path / "seadragon.yaml"
    port = free_port()
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": port},
                "upstream": {"url": fake.url},
                "whitelist": {"database": "nowhere/seadragon.db"},
                "sources": [{"name": "all", "priority": 0}],
                "default_source": "all",
            }
        )
    )
    code, lines = await run_doctor(config, generate=MODEL)
    assert code == 1
    text = "\n".join(lines)
    assert f"✗ database {tmp_path}/nowhere/seadragon.db does not exist" in text
    assert f"✓ 127.0.0.1:{port} is free (the proxy is not running)" in text
    assert f"✓ one token from {MODEL} from default directly" in text
    assert "✗ one token through the proxy: cannot connect" in text and "make run" in text
    assert "✗ /health at http://127.0.0.1:" in text


async def test_empty_whitelist(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    store = WhitelistStore(load_settings(proxy.config_path).whitelist.database)
    for entry in ("127.0.0.1", "::1"):
        await store.remove(entry)
    _, lines = await run_doctor(config_for(proxy))
    assert any(
        line.startswith("✗ database")
        and "the whitelist is empty" in line
        and "whitelist add" in line
        for line in lines
    ), lines


@pytest.mark.parametrize(
    ("answer", "who"), [("Ollama is running", "Ollama itself"), ("hi", "something else")]
)
async def test_port_taken_by_something_else(
    fake: FakeOllama, tmp_path: Path, odd_server: Any, answer: str, who: str
) -> None:
    async def root(request: web.Request) -> web.Response:
        return web.Response(text=answer)

    taken = await odd_server({"/": root})
    port = int(taken.rsplit(":", 1)[1])
    config = tmp_path / "seadragon.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": port},
                "upstream": {"url": fake.url},
                "sources": [{"name": "all", "priority": 0}],
                "default_source": "all",
            }
        )
    )
    code, lines = await run_doctor(config)
    assert code == 1
    text = "\n".join(lines)
    assert f"✗ 127.0.0.1:{port} is taken by {who} (GET /health: HTTP 404" in text
    assert f"ss -ltnp 'sport = :{port}'" in text
    assert "✗ /health not checked: the listen address belongs to something else" in text


async def test_admin_token_missing_here(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEADRAGON_ADMIN_TOKEN", "s3cret")
    proxy = await make_proxy()
    monkeypatch.delenv("SEADRAGON_ADMIN_TOKEN")
    code, lines = await run_doctor(config_for(proxy))
    assert code == 1
    bad = [line for line in lines if line.startswith("✗")]
    assert len(bad) == 1 and bad[0].startswith("✗ admin API refuses: HTTP 403")
    assert "export the same value in this shell" in bad[0] and "s3cret" not in bad[0]
    monkeypatch.setenv("SEADRAGON_ADMIN_TOKEN", "s3cret")
    assert (await run_doctor(config_for(proxy)))[0] == 0


async def test_a_broken_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Through the real command: no traceback, exit 1, the file and key named."""
    config = tmp_path / "seadragon.yaml"
    config.write_text("sources: []\ndefault_source: x\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seadragon_proxy", "doctor", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 1 and err == b""
    assert out.decode().splitlines() == [
        f"✗ config: {config}: sources: must be a non-empty list of sources → fix the file; "
        "seadragon-proxy check says the same"
    ]
