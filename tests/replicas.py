"""Several replicas of the proxy on one real Redis and one fake Ollama: each its own config
file, its own SQLite file and its own port, started as ``seadragon-proxy serve`` starts one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from seadragon_proxy.fake_ollama import FakeOllama
from seadragon_proxy.netaddr import parse_address
from seadragon_proxy.server import RunningServer, start_server
from seadragon_proxy.settings import load_settings
from seadragon_proxy.typedefs import LIVE, REDIS_LINK, WHITELIST_SYNC
from tests.conftest import BASE_CONFIG, merge
from tests.redisserver import RedisServer


@dataclass
class Replica:
    name: str
    config_path: Path
    database: Path
    server: RunningServer | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> RunningServer:
        assert self.server is not None, f"{self.name} is stopped"
        return self.server

    @property
    def url(self) -> str:
        return self.running.url

    def allows(self, address: str) -> bool:
        return parse_address(address) in self.running.app[LIVE].whitelist

    @property
    def sync(self) -> Any:
        sync = self.running.app[WHITELIST_SYNC]
        assert sync is not None
        return sync

    async def start(self) -> None:
        self.server = await start_server(load_settings(self.config_path))
        self.running.app[LIVE].listeners.append(lambda _what, _ok: self._changed.set())

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.stop()

    async def until(self, predicate: Callable[[], bool], timeout: float = 1.0) -> None:
        """Wait (at most ``timeout``, the contract's second) for the whitelist to satisfy it."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def redis_up(self, up: bool, timeout: float = 10) -> None:
        link = self.running.app[REDIS_LINK]
        assert link is not None
        changed = asyncio.Event()
        link.add_state_listener(lambda _up: changed.set())
        async with asyncio.timeout(timeout):
            while link.up != up:
                changed.clear()
                await changed.wait()
            if up:
                await self.sync.settled()  # the reconcile that the link's coming up began


Replicas = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def replicas(
    fake: FakeOllama, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Replicas]:
    made: list[Replica] = []

    async def factory(count: int = 2, override: dict[str, Any] | None = None) -> list[Replica]:
        for i in range(1, count + 1):
            name = f"proxy-{len(made) + 1}"
            config = merge(BASE_CONFIG, override or {})
            config["upstream"]["url"] = fake.url
            database = tmp_path / name / "seadragon.db"
            config["whitelist"] = {"database": str(database)}
            config["server"]["replica"] = name
            config["queue"]["backend"] = "redis"
            config["queue"]["redis"] = {"url": redis_server.url, "lease": 2, "prefix": "t:"}
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            replica = Replica(name, path, database)
            await replica.start()
            made.append(replica)
            del i
        for replica in made:
            await replica.redis_up(True)
        return made[-count:]

    yield factory
    for replica in made:
        await replica.stop()


async def admin(
    session: aiohttp.ClientSession, replica: Replica, method: str, network: str
) -> dict[str, Any]:
    async with session.request(
        method, replica.url + "/api/admin/whitelist", json={"network": network, "note": "t"}
    ) as r:
        doc: dict[str, Any] = await r.json()
        assert r.status == 200, doc
        return doc
