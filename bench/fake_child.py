"""The fake Ollama in its own process: ``python -m bench.fake_child [--loop uvloop]``.

``FakeOllama(parallel=1)`` serves one inference request at a time, as Ollama with
``OLLAMA_NUM_PARALLEL=1`` does (``--parallel N``: N at a time, for the workers scenario).
Two bench-only middlewares count inference requests as they
arrive (body read) and as they get their turn, so the harness can wait for "n requests
waiting here" without scanning the request list. The control channel (``bench.rpc``) offers:

    mark                       forget the requests so far (call when idle)
    gate name=N                open ``gate:N``; ``release_all`` opens every gate
    wait arrived|started|finished|waiting=n   until each given count is reached
    records                    arrived/started/finished perf_counter() stamps of each
                               inference request since ``mark``, with its prompt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from seadragon_proxy.fake_ollama import INFERENCE, FakeOllama

from . import rpc
from .runtime import LOOPS, raise_nofile_limit, run

BACKLOG = 4096  # Go's net.Listen uses somaxconn, as Ollama does


@dataclass
class Counts:
    arrived: int = 0
    started: int = 0
    finished: int = 0
    current: str = ""  # the prompt of the request that got the latest turn

    @property
    def waiting(self) -> int:
        return self.arrived - self.started


class Tally:
    """Counts inference requests at the door and at their turn; wakes waiters on change."""

    def __init__(self) -> None:
        self.counts = Counts()
        self._changed = asyncio.Event()

    def reset(self) -> None:
        self.counts = Counts()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @web.middleware
    async def at_door(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: the body is in (aiohttp caches it for the fake), so it has arrived."""
        if request.path.startswith(INFERENCE):
            await request.read()
            self.counts.arrived += 1
            self._bump()
        return await handler(request)

    @web.middleware
    async def at_turn(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Innermost: the fake's ``parallel`` semaphore has let this request in."""
        if not request.path.startswith(INFERENCE):
            return await handler(request)
        counts = self.counts
        counts.started += 1
        counts.current = _prompt(await request.read())
        self._bump()
        try:
            return await handler(request)
        finally:
            counts.finished += 1
            self._bump()

    async def wait(self, timeout: float, **wanted: int) -> dict[str, object]:
        async with asyncio.timeout(timeout):
            while not all(getattr(self.counts, key) >= n for key, n in wanted.items()):
                await self._changed.wait()
        return asdict(self.counts) | {"waiting": self.counts.waiting}


def _prompt(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    prompt = doc.get("prompt") if isinstance(doc, dict) else None
    return prompt if isinstance(prompt, str) else ""


def control(fake: FakeOllama, tally: Tally) -> dict[str, rpc.Handler]:
    async def mark(_: dict[str, Any]) -> None:
        fake.requests.clear()
        tally.reset()

    async def gate(message: dict[str, Any]) -> None:
        fake.gate(str(message["name"])).set()

    async def release_all(_: dict[str, Any]) -> None:
        for event in list(fake._gates.values()):
            event.set()

    async def wait(message: dict[str, Any]) -> dict[str, object]:
        keys = ("arrived", "started", "finished", "waiting")
        wanted = {key: int(message[key]) for key in keys if key in message}
        return await tally.wait(float(message["timeout"]), **wanted)

    async def records(_: dict[str, Any]) -> list[dict[str, object]]:
        return [
            {
                "arrived": seen.arrived,
                "started": seen.started,
                "finished": seen.finished,
                "prompt": _prompt(seen.body),
                "cancelled": seen.cancelled,
            }
            for seen in fake.requests
            if seen.path.startswith(INFERENCE)
        ]

    return {
        "mark": mark,
        "gate": gate,
        "release_all": release_all,
        "wait": wait,
        "records": records,
    }


async def main(parallel: int = 1) -> None:
    fake = FakeOllama(parallel=parallel)
    tally = Tally()
    app = fake.app()
    app.middlewares.insert(0, tally.at_door)
    app.middlewares.append(tally.at_turn)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=BACKLOG, reuse_address=True)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        await rpc.serve(control(fake, tally), {"port": fake.port, "pid": os.getpid()})
    finally:
        for event in list(fake._gates.values()):
            event.set()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument("--parallel", type=int, default=1, help="inference at once (slots)")
    args = parser.parse_args()
    raise_nofile_limit()
    run(main(args.parallel), args.loop)
