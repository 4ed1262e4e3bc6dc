"""What the scenarios send load to: the fake directly, the proxy, HAProxy.

Every target has a URL, the pid whose memory and CPU the queue-scale scenario reads, and
``wait_waiting(n)``, which returns once n requests wait for the one upstream slot: in the
fake's own turn queue (direct), in the proxy's scheduler, or in HAProxy's backend queue.
``Fake`` steers the fake Ollama, which every target ends at.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import aiohttp

from .children import Child
from .rpc import Channel

HAPROXY_POLL = 0.002  # seconds between stats reads: HAProxy cannot push its queue length


@dataclass(frozen=True)
class Record:
    """One inference request as the fake saw it (perf_counter() stamps, comparable across
    processes: CLOCK_MONOTONIC)."""

    arrived: float
    started: float
    finished: float
    prompt: str


class Fake:
    """The fake Ollama's control channel."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self._channel: Channel = child.control()
        self._gates = itertools.count(1)

    def new_gate(self, label: str) -> str:
        """A gate name never used before (an open gate stays open)."""
        return f"{label}-{next(self._gates)}"

    @property
    def url(self) -> str:
        return self.child.url

    async def mark(self) -> None:
        """Forget the requests so far; only while idle."""
        await self._channel.call("mark", 5)

    async def open_gate(self, name: str) -> None:
        await self._channel.call("gate", 5, name=name)

    async def release_all(self) -> None:
        await self._channel.call("release_all", 5)

    async def wait(self, timeout: float, **counts: int) -> dict[str, Any]:
        """Until each given count (arrived, started, finished, waiting) is reached."""
        result: dict[str, Any] = await self._channel.call("wait", timeout, **counts)
        return result

    async def records(self) -> list[Record]:
        rows = await self._channel.call("records", 30)
        return [Record(r["arrived"], r["started"], r["finished"], r["prompt"]) for r in rows]


class Target(ABC):
    name: str
    url: str
    pid: int  # the process holding the waiting requests

    @abstractmethod
    async def wait_waiting(self, count: int, timeout: float) -> None:
        """Return once ``count`` requests wait for the upstream slot."""


class Direct(Target):
    """Straight at the fake, which serialises inference itself (``parallel=1``)."""

    def __init__(self, fake: Fake) -> None:
        self.name, self.url, self.pid = "direct", fake.url, fake.child.pid  # the fake holds them
        self._fake = fake

    async def wait_waiting(self, count: int, timeout: float) -> None:
        await self._fake.wait(timeout, waiting=count)


class Proxied(Target):
    """Through seadragon-proxy (``proxy-redis``: with the Redis backend)."""

    def __init__(self, child: Child, name: str = "proxy") -> None:
        self.name, self.url, self.pid = name, child.url, child.pid
        self._channel = child.control()

    async def wait_waiting(self, count: int, timeout: float) -> None:
        await self.wait_here(count, timeout)
        await self.wait_dispatched(count, timeout)

    async def wait_here(self, count: int, timeout: float) -> None:
        """Until ``count`` requests wait at this proxy (with Redis: at this replica)."""
        await self._channel.call("wait_queued", timeout, n=count)

    async def wait_dispatched(self, count: int, timeout: float) -> None:
        """With the Redis backend, if this replica dispatches: until ``count`` are in its
        scheduler (the announces have been admitted); otherwise at once."""
        await self._channel.call("wait_dispatched", timeout, n=count)

    async def trace_start(self) -> None:
        """Stamp every slot the scheduler grants and releases, until ``trace_stop``."""
        await self._channel.call("trace_start", 5)

    async def trace_stop(self) -> tuple[list[float], list[float]]:
        """perf_counter() stamps of the slots granted, and of the slots released, in order."""
        stamps = await self._channel.call("trace_stop", 5)
        return stamps["started"], stamps["finished"]


class HAProxy(Target):
    """Through HAProxy; its queue length is read from the stats page (CSV ``qcur``)."""

    def __init__(self, child: Child, session: aiohttp.ClientSession) -> None:
        self.name, self.url, self.pid = "haproxy", child.url, child.pid
        self._stats = f"http://127.0.0.1:{child.ready['stats_port']}/stats;csv"
        self._session = session

    async def queued(self) -> int:
        async with self._session.get(self._stats) as response:
            text = await response.text()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return sum(int(row["qcur"] or 0) for row in rows if row["pxname"] == "ollama")

    async def wait_waiting(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while await self.queued() < count:  # noqa: ASYNC110 (HAProxy has no push)
                await asyncio.sleep(HAPROXY_POLL)
