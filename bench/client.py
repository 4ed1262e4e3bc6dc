"""The load generator's side: request bodies, sessions, and requests in flight as tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

import aiohttp

MODEL = "llama3:70b"


class BenchError(RuntimeError):
    """A request did not get the answer a scenario relies on."""


def body(prompt: str, *, tokens: int = 1, stream: bool = False) -> bytes:
    """A generate request: ``tokens`` words (``options.num_predict``), streamed or not."""
    doc = {"model": MODEL, "prompt": prompt, "stream": stream, "options": {"num_predict": tokens}}
    return json.dumps(doc).encode()


def headers(source: str | None = None) -> dict[str, str]:
    out = {"Content-Type": "application/json"}
    if source is not None:
        out["X-Test-Source"] = source
    return out


def session(connections: int = 0) -> aiohttp.ClientSession:
    """A keep-alive session; ``connections=0`` means no limit (one per request in flight)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=60),
    )


async def generate(
    s: aiohttp.ClientSession, url: str, data: bytes, source: str | None = None
) -> bytes:
    """POST /api/generate and read the whole answer; anything but 200 is a ``BenchError``."""
    async with s.post(url + "/api/generate", data=data, headers=headers(source)) as response:
        answer = await response.read()
        if response.status != 200:
            raise BenchError(f"{url} answered {response.status}: {answer[:200]!r}")
        return answer


class Load:
    """Requests in flight, each a task. ``done()`` waits for all of them; leaving the
    ``async with`` block cancels whatever is still running (a failed scenario)."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, job: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(job)
        self._tasks.append(task)
        return task

    async def done(self, timeout: float) -> list[Any]:
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await asyncio.gather(*pending, return_exceptions=True)
        for task in self._tasks:  # retrieve failures so asyncio does not log them
            if task.done() and not task.cancelled():
                task.exception()
