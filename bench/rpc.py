"""A line-delimited JSON control channel over a child process's stdin and stdout.

The harness writes ``{"id": 7, "cmd": "wait", "timeout": 5, ...}`` to the child's stdin and
the child answers ``{"id": 7, "ok": true, "result": ...}`` on its stdout. The first line a
child writes is ``{"ready": {...}}`` (its port, pid, ...). A child stops serving when its
stdin closes, which also happens when the harness dies, so no child outlives the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[object]]
LINE_LIMIT = 1 << 26  # a list of 10 000 request records is well under this


class ChildError(RuntimeError):
    """A child process failed a command, or went away."""


async def serve(handlers: Mapping[str, Handler], ready: Mapping[str, object]) -> None:
    """The child's end: answer commands until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def send(doc: Mapping[str, object]) -> None:
        out.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        out.flush()

    async def answer(message: dict[str, Any]) -> None:
        try:
            result = await handlers[message["cmd"]](message)
        except Exception as e:
            send({"id": message["id"], "ok": False, "error": f"{type(e).__name__}: {e}"})
        else:
            send({"id": message["id"], "ok": True, "result": result})

    send({"ready": ready})
    running: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(answer(json.loads(line)))
        running.add(task)
        task.add_done_callback(running.discard)
    for task in list(running):
        task.cancel()


class Channel:
    """The harness's end: ``await channel.call("wait", 5.0, started=1)``."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.name = name
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listener = asyncio.create_task(self._listen(), name=f"{name}-channel")

    async def call(self, cmd: str, timeout: float, **args: object) -> Any:
        """Send one command; its answer, or ``ChildError``. ``timeout`` also goes to the
        child, which gives up on its own waits at that time; this end waits a little longer."""
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        doc = {"id": ident, "cmd": cmd, "timeout": timeout, **args}
        self._writer.write(json.dumps(doc).encode() + b"\n")
        try:
            async with asyncio.timeout(timeout + 5):
                return await future
        except TimeoutError:
            raise ChildError(f"{self.name}: no answer to {cmd!r} within {timeout:g} s") from None
        finally:
            self._pending.pop(ident, None)

    async def _listen(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                future = self._pending.get(message.get("id"))
                if future is None or future.done():
                    continue
                if message.get("ok"):
                    future.set_result(message.get("result"))
                else:
                    future.set_exception(ChildError(f"{self.name}: {message.get('error')}"))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ChildError(f"{self.name} exited"))

    async def close(self) -> None:
        """Close the child's stdin: it stops serving and exits."""
        with contextlib.suppress(ConnectionError):
            self._writer.close()
            await self._writer.wait_closed()
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._listener
