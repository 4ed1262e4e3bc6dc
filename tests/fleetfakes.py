"""Several fake Ollamas on real ports, each reporting its own residency, and the proxy in
front of them (an ``upstreams:`` config written for the test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.scheduling import Scheduler, Server
from seadragon_proxy.server import start_server
from seadragon_proxy.settings import load_settings
from seadragon_proxy.typedefs import FLEET, LIVE, RECORDER, SCHEDULER

from .conftest import BASE_CONFIG, Proxy, Watch, merge

A = "llama3:70b"
B = "llama3.2:1b"
LOAD_NS = 2_500_000_000  # what a fake reports as load_duration when it had to load


@dataclass
class ResidentFake(FakeOllama):
    """A fake that holds ``max_loaded`` models: ``/api/ps`` lists them, and the final chunk
    of a request whose model was not loaded reports ``LOAD_NS`` as its load_duration."""

    name: str = ""
    loaded: list[str] = field(default_factory=list)
    max_loaded: int = 1
    loads: int = 0

    async def ps(self, request: web.Request) -> web.Response:
        models = [
            {"name": m, "model": m, "size": 1, "digest": self._digest(m)} for m in self.loaded
        ]
        return web.json_response({"models": models})

    def _final(
        self, model: str, count: int, *, chat: bool, load_ns: int = 1_000_000
    ) -> dict[str, Any]:
        out = super()._final(model, count, chat=chat, load_ns=load_ns)
        if model not in self.loaded:
            self.loads += 1
            self.loaded = [*self.loaded, model][-self.max_loaded :]
            out["load_duration"] = LOAD_NS
        return out


@dataclass
class Fleet:
    proxy: Proxy
    fakes: dict[str, ResidentFake]

    @property
    def scheduler(self) -> Scheduler:
        return self.proxy.scheduler

    def server(self, name: str) -> Server:
        return self.scheduler.server(name)

    async def refresh(self) -> None:
        """Read every server's /api/ps and /api/tags now (the proxy does it every 10 s)."""
        await self.proxy.server.app[FLEET].refresh()

    def generate(
        self, prompt: str, model: str = A, source: str | None = None, **extra: Any
    ) -> Awaitable[Any]:
        headers = {"X-Test-Source": source} if source else {}
        body = {"model": model, "prompt": prompt, **extra}
        return self.proxy.collect("/api/generate", body, headers)

    def release(self, *gates: str) -> None:
        for fake in self.fakes.values():
            for gate in gates:
                fake.gate(gate).set()


FleetFactory = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def make_fleet(tmp_path: Path) -> AsyncIterator[FleetFactory]:
    started: list[Fleet] = []

    async def factory(
        servers: list[dict[str, Any]],
        override: dict[str, Any] | None = None,
        *,
        loaded: dict[str, list[str]] | None = None,
    ) -> Fleet:
        fakes: dict[str, ResidentFake] = {}
        entries = []
        for entry in servers:
            name = entry["name"]
            fake = ResidentFake(name=name, max_loaded=entry.get("max_loaded_models") or 3)
            fake.loaded = list((loaded or {}).get(name, []))
            await fake.start()
            fakes[name] = fake
            entries.append({"url": fake.url, **entry})
        config = merge(BASE_CONFIG, override or {})
        config["upstream"].pop("slots", None)
        config["upstreams"] = entries
        config.setdefault("whitelist", {})["database"] = str(tmp_path / "data" / "seadragon.db")
        path = tmp_path / "seadragon.yaml"
        path.write_text(yaml.safe_dump(config))
        server = await start_server(load_settings(path))
        session = aiohttp.ClientSession()
        first = next(iter(fakes.values()))
        proxy = Proxy(server, first, path, config, session, Watch(server.app[SCHEDULER]))
        server.app[LIVE].listeners.append(proxy.on_reload)
        server.app[RECORDER].listeners.append(proxy.on_record)
        fleet = Fleet(proxy, fakes)
        started.append(fleet)
        await fleet.refresh()
        return fleet

    yield factory
    for fleet in started:
        for fake in fleet.fakes.values():
            for gate in list(fake._gates.values()):
                gate.set()
        await fleet.proxy.session.close()
        await fleet.proxy.server.stop()
        for fake in fleet.fakes.values():
            await fake.stop()
