"""A real redis-server (Debian's package, installed by scripts/ensure-redis) on a free port,
started and stopped by the tests: ``redis_server`` is a fixture, ``RedisServer`` can also be
stopped and started again on the same port to test an outage."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port

BINARY = os.environ.get("SEADRAGON_REDIS_SERVER") or shutil.which("redis-server") or ""
READY = b"Ready to accept connections"


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.output: list[bytes] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start and return once the server says it accepts connections (its own line on
        stdout: nothing here polls)."""
        if not BINARY:
            pytest.fail("redis-server is not installed: run make redis (scripts/ensure-redis)")
        self.process = await asyncio.create_subprocess_exec(
            BINARY,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.process.stdout is not None
        async with asyncio.timeout(10):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise RuntimeError(b"redis-server exited: " + b"".join(self.output))
                self.output.append(line)
                if READY in line:
                    break
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        process = self.process
        if process is not None and process.stdout is not None:
            while line := await process.stdout.readline():
                self.output.append(line)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        async with asyncio.timeout(10):
            await process.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(signal.SIGKILL)
