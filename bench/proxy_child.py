"""The proxy in its own process: ``python -m bench.proxy_child CONFIG [--loop uvloop]``.

Started as ``seadragon-proxy serve`` starts it (``start_server(load_settings(path))`` after
``configure_logging``), plus a control channel (``bench.rpc``):

    wait_queued n=N    until N requests wait in the proxy's queue (a scheduler listener
                       wakes it; the listener is attached only while someone waits); with
                       the Redis backend, until N wait at this replica
    wait_dispatched n=N  on the Redis dispatcher, until its scheduler holds N waiters
    trace_start        stamp (perf_counter) every slot granted and released, until
    trace_stop         which returns the stamps: {"started": [...], "finished": [...]}

Listeners are the scheduler's public interface and cost a call per queue event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seadragon_proxy.logs import configure_logging
from seadragon_proxy.scheduling import Scheduler, Ticket
from seadragon_proxy.server import start_server
from seadragon_proxy.settings import load_settings
from seadragon_proxy.typedefs import REPLICA, SCHEDULER

from . import rpc
from .runtime import LOOPS, raise_nofile_limit, run

Listen = Callable[[Callable[[str, Ticket], None]], None]


async def until(add: Listen, remove: Listen, done: Callable[[], bool], timeout: float) -> None:
    """Until ``done()``, checked at each event of a queue (``add``/``remove`` a listener)."""
    changed = asyncio.Event()

    def on_event(_event: str, _ticket: Ticket) -> None:
        changed.set()

    add(on_event)
    try:
        async with asyncio.timeout(timeout):
            while not done():
                changed.clear()
                await changed.wait()
    finally:
        remove(on_event)


async def wait_queued(scheduler: Scheduler, count: int, timeout: float) -> dict[str, int]:
    add, remove = scheduler.add_listener, scheduler.remove_listener
    await until(add, remove, lambda: scheduler.queue_length >= count, timeout)
    return {"queue_length": scheduler.queue_length, "in_flight": scheduler.in_flight}


class SlotTrace:
    """When each slot was granted ("started") and released ("finished"), in order."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._stamps: dict[str, list[float]] = {"started": [], "finished": []}

    def _on_event(self, event: str, _ticket: Ticket) -> None:
        stamps = self._stamps.get(event)
        if stamps is not None:
            stamps.append(time.perf_counter())

    async def start(self, _message: dict[str, Any]) -> None:
        self._stamps = {"started": [], "finished": []}
        self._scheduler.add_listener(self._on_event)

    async def stop(self, _message: dict[str, Any]) -> dict[str, list[float]]:
        self._scheduler.remove_listener(self._on_event)
        return self._stamps


async def wait_remote(queue: Any, count: int, timeout: float) -> dict[str, int]:
    """With the Redis backend: until ``count`` requests wait at this replica (announced to
    the shared queue, wherever the dispatcher is)."""
    listeners = queue.listeners
    await until(listeners.append, listeners.remove, lambda: queue.waiting >= count, timeout)
    return {"queue_length": queue.waiting, "in_flight": queue.running}


async def main(config: Path) -> None:
    settings = load_settings(config)
    configure_logging(settings.log)
    server = await start_server(settings)
    scheduler = server.app[SCHEDULER]
    replica = server.app[REPLICA]

    async def queued(message: dict[str, Any]) -> dict[str, int]:
        count, timeout = int(message["n"]), float(message["timeout"])
        if replica is None:
            return await wait_queued(scheduler, count, timeout)
        return await wait_remote(replica.queue, count, timeout)

    async def dispatched(message: dict[str, Any]) -> dict[str, int]:
        """Until the dispatcher's scheduler holds ``n`` waiters; at once elsewhere."""
        if replica is None or not replica.dispatcher.dispatching:
            return {"queue_length": scheduler.queue_length, "in_flight": scheduler.in_flight}
        return await wait_queued(scheduler, int(message["n"]), float(message["timeout"]))

    trace = SlotTrace(scheduler)
    commands: dict[str, rpc.Handler] = {
        "wait_queued": queued,
        "wait_dispatched": dispatched,
        "trace_start": trace.start,
        "trace_stop": trace.stop,
    }
    try:
        await rpc.serve(commands, {"port": server.port, "pid": os.getpid()})
    finally:
        await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    args = parser.parse_args()
    raise_nofile_limit()
    run(main(args.config), args.loop)
