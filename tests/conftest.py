"""Shared fixtures: a fake Ollama on a real port, and the proxy started the way
``seadragon-proxy serve`` starts it, from a YAML file written for each test."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.fake_ollama.core import Seen
from seadragon_proxy.live import Live
from seadragon_proxy.logs import configure_logging, stop_logging
from seadragon_proxy.record import RequestRecord
from seadragon_proxy.scheduling import Scheduler, Ticket
from seadragon_proxy.server import RunningServer, start_server
from seadragon_proxy.settings import LogSettings, load_settings
from seadragon_proxy.typedefs import FLEET, LIVE, RECORDER, SCHEDULER, START_CHECK
from seadragon_proxy.upstream import Fleet

pytest_plugins = ["tests.redisserver", "tests.replicas"]  # redis_server, replicas

MODEL = "llama3:70b"

# Sources keyed on a header the tests set; loopback is whitelisted by the seed.
BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "trusted_proxies": ["127.0.0.1"]},
    "upstream": {"slots": 1, "connect_timeout": 2, "idle_timeout": 30, "unreachable_wait": 5},
    "queue": {"max_size": 512, "max_wait": 0, "aging": 0},
    "cors": {"allow_origins": ["https://chat.example.com"]},
    "sources": [
        {"name": "coding", "priority": 0, "match": {"header": {"X-Test-Source": "coding"}}},
        {"name": "chat", "priority": 5, "match": {"header": {"X-Test-Source": "chat"}}},
        {"name": "scripts", "priority": 8, "match": {"header": {"X-Test-Source": "scripts"}}},
        {"name": "direct_api", "priority": 10, "require_whitelist": True},
    ],
    "default_source": "direct_api",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak", action="store_true", help="run the heavy tests at full size and print figures"
    )


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own settings never leak into a test; a test sets what it needs."""
    for name in ("SEADRAGON_CONFIG", "SEADRAGON_ADMIN_TOKEN", "SEADRAGON_METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    """A port nothing listens on (bound and released): an Ollama that is not running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Watch:
    """Wakes a test when the scheduler changes, so it can wait for a state without sleeping."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.events: list[tuple[str, Ticket]] = []
        self._changed = asyncio.Event()
        scheduler.add_listener(self._on_event)

    def _on_event(self, event: str, ticket: Ticket) -> None:
        self.events.append((event, ticket))
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def queued(self, count: int, timeout: float = 10) -> None:
        await self.until(lambda: self.scheduler.queue_length == count, timeout)


@dataclass
class Proxy:
    server: RunningServer
    fake: FakeOllama
    config_path: Path
    config: dict[str, Any]
    session: aiohttp.ClientSession
    watch: Watch
    reloads: list[tuple[str, bool]] = field(default_factory=list)
    _reloaded: asyncio.Event = field(default_factory=asyncio.Event)
    finished: list[RequestRecord] = field(default_factory=list)
    _recorded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def scheduler(self) -> Scheduler:
        return self.server.app[SCHEDULER]

    @property
    def live(self) -> Live:
        return self.server.app[LIVE]

    @property
    def fleet(self) -> Fleet:
        return self.server.app[FLEET]

    @property
    def forwarded(self) -> list[Seen]:
        """What the fake received on a client's behalf (carrying the proxy's Via), not the
        proxy's own reads (/api/tags at start, /api/version)."""
        return [s for s in self.fake.requests if "Via" in s.headers]

    async def tags_read(self, count: int = 1, timeout: float = 10) -> None:
        """Wait until the proxy has applied ``count`` reads of Ollama's model list."""
        async with asyncio.timeout(timeout):
            while self.fleet.refreshes < count:
                await self.fleet.next_refresh()

    def on_record(self, record: RequestRecord) -> None:
        self.finished.append(record)
        self._recorded.set()

    async def records(self, count: int, timeout: float = 10) -> list[RequestRecord]:
        """Wait until ``count`` requests have finished (logged); return their records."""
        async with asyncio.timeout(timeout):
            while len(self.finished) < count:
                self._recorded.clear()
                await self._recorded.wait()
        return self.finished

    def on_reload(self, what: str, ok: bool) -> None:
        self.reloads.append((what, ok))
        self._reloaded.set()

    async def next_reload(
        self, what: str, action: Callable[[], object], timeout: float = 5
    ) -> bool:
        """Run ``action`` and wait for the reload of ``what`` it causes; return its outcome."""
        before = len(self.reloads)
        self._reloaded.clear()
        result = action()
        if asyncio.iscoroutine(result):
            await result
        async with asyncio.timeout(timeout):
            while True:
                for kind, ok in self.reloads[before:]:
                    if kind == what:
                        return ok
                self._reloaded.clear()
                await self._reloaded.wait()

    def write_config(self, override: dict[str, Any]) -> None:
        self.config = merge(self.config, override)
        self.config_path.write_text(yaml.safe_dump(self.config))

    async def post(self, path: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
        return await self.session.post(self.url + path, json=body, headers=headers)

    def generate(self, prompt: str, source: str | None = None, **extra: Any) -> Awaitable[Any]:
        """A streamed generate; returns the decoded lines."""
        headers = {"X-Test-Source": source} if source else {}
        return self.collect("/api/generate", {"model": MODEL, "prompt": prompt, **extra}, headers)

    async def collect(self, path: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
        import json

        async with self.session.post(self.url + path, json=body, headers=headers) as r:
            raw = await r.read()
            if r.content_type == "application/x-ndjson":
                return r.status, [json.loads(line) for line in raw.splitlines()]
            return r.status, json.loads(raw) if raw else None


class JsonLog:
    """The real logging set-up writing JSON into a buffer; ``lines()`` flushes and parses."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def text(self) -> str:
        stop_logging()
        return self.buffer.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def json_log() -> Iterator[JsonLog]:
    log = JsonLog()
    configure_logging(
        LogSettings(format="json", level="debug"), stream=log.buffer, cache_loggers=False
    )
    yield log
    stop_logging()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    await fake.start()
    yield fake
    for gate in list(fake._gates.values()):
        gate.set()
    await fake.stop()


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(fake: FakeOllama, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def factory(
        override: dict[str, Any] | None = None, *, upstream: str | None = None
    ) -> Proxy:
        config = merge(BASE_CONFIG, override or {})
        config["upstream"]["url"] = upstream or fake.url
        config.setdefault("whitelist", {})["database"] = str(tmp_path / "data" / "seadragon.db")
        path = tmp_path / "seadragon.yaml"
        path.write_text(yaml.safe_dump(config))
        server = await start_server(load_settings(path))
        # The start-up check's connection is over before a test stops the fake Ollama.
        await server.app[START_CHECK].result()
        session = aiohttp.ClientSession()
        proxy = Proxy(server, fake, path, config, session, Watch(server.app[SCHEDULER]))
        server.app[LIVE].listeners.append(proxy.on_reload)
        server.app[RECORDER].listeners.append(proxy.on_record)
        started.append(proxy)
        return proxy

    yield factory
    for gate in list(fake._gates.values()):
        gate.set()
    for proxy in started:
        await proxy.session.close()
        await proxy.server.stop()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()
