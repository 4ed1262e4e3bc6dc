"""Clients hanging up at every stage, a thousand times: the slot always comes back within a
second, and no task, file descriptor or upstream connection is left behind."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from seadragon_proxy.typedefs import PROXY

from .conftest import MODEL, Proxy

HANGUPS = 1000


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fake_connections(proxy: Proxy) -> int:
    runner = proxy.fake._runner
    assert runner is not None and runner.server is not None
    return len(runner.server.connections)


async def settle() -> None:
    """Let closing transports run their callbacks: a few loop turns, not a timed wait."""
    for _ in range(20):
        await asyncio.sleep(0)
    gc.collect()


async def slot_back(proxy: Proxy) -> None:
    await proxy.watch.until(
        lambda: proxy.scheduler.in_flight == 0 and proxy.scheduler.queue_length == 0, timeout=1
    )


async def hang_up_while_queued(proxy: Proxy, session: aiohttp.ClientSession, n: int) -> None:
    gate = proxy.fake.gate(f"hold-{n}")
    seen = len(proxy.fake.inference)
    blocker = asyncio.create_task(
        session.post(
            proxy.url + "/api/generate",
            json={"model": MODEL, "prompt": f"gate:hold-{n}", "stream": False},
        )
    )
    await proxy.fake.wait_for(seen + 1)
    waiting = asyncio.create_task(
        session.post(proxy.url + "/api/generate", json={"model": MODEL, "prompt": "never sent"})
    )
    await proxy.watch.queued(1)
    waiting.cancel()
    await proxy.watch.queued(0)
    gate.set()
    async with await blocker as r:
        await r.read()
    await slot_back(proxy)


async def hang_up_mid_stream(proxy: Proxy, session: aiohttp.ClientSession, n: int) -> None:
    seen = len(proxy.fake.inference)
    response = await session.post(
        proxy.url + "/api/generate", json={"model": MODEL, "prompt": f"gate-mid:m-{n}"}
    )
    assert json.loads(await response.content.readline())["response"] == "The"
    response.close()
    await proxy.fake.wait_until(lambda: proxy.fake.inference[seen].cancelled)
    await slot_back(proxy)


async def hang_up_after_headers(proxy: Proxy, session: aiohttp.ClientSession, n: int) -> None:
    seen = len(proxy.fake.inference)
    response = await session.post(
        proxy.url + "/api/chat",
        json={"model": MODEL, "messages": [{"role": "user", "content": f"gate-headers:h-{n}"}]},
    )
    assert response.status == 200  # headers are here, the first chunk is not
    response.close()
    await proxy.fake.wait_until(lambda: proxy.fake.inference[seen].cancelled)
    await slot_back(proxy)


async def hang_up_during_upload(proxy: Proxy, session: aiohttp.ClientSession, n: int) -> None:
    seen = len(proxy.forwarded)
    sent = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        sent.set()
        await asyncio.Event().wait()

    upload = asyncio.create_task(
        session.post(
            f"{proxy.url}/api/blobs/sha256:{n:064x}",
            data=body(),
            headers={"Content-Length": "1000000"},
        )
    )
    await sent.wait()
    await proxy.fake.wait_until(lambda: len(proxy.forwarded) > seen)
    upload.cancel()
    await proxy.fake.wait_until(lambda: proxy.forwarded[seen].finished > 0)


KINDS = [hang_up_while_queued, hang_up_mid_stream, hang_up_after_headers, hang_up_during_upload]


@pytest.mark.heavy
async def test_a_thousand_hangups_leak_nothing(proxy: Proxy) -> None:
    session = aiohttp.ClientSession()
    try:
        for n, kind in enumerate(KINDS):  # warm up: pools and caches reach their size
            await kind(proxy, session, n)
        await settle()
        before = (len(asyncio.all_tasks()), open_fds(), fake_connections(proxy))
        for n in range(len(KINDS), HANGUPS + len(KINDS)):
            await KINDS[n % len(KINDS)](proxy, session, n)
        await settle()
        after = (len(asyncio.all_tasks()), open_fds(), fake_connections(proxy))
    finally:
        await session.close()
    tasks, fds, upstream = after
    assert tasks <= before[0], f"tasks {before[0]} -> {tasks}"
    assert fds <= before[1] + 2, f"file descriptors {before[1]} -> {fds}"
    assert upstream <= before[2] + 1, f"upstream connections {before[2]} -> {upstream}"
    assert not proxy.server.app[PROXY].active
    assert proxy.scheduler.queue_length == 0 and proxy.scheduler.in_flight == 0
    hung_up = [r for r in proxy.finished if r.hung_up]
    assert len(hung_up) == HANGUPS + len(KINDS)
