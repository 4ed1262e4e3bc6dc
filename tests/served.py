"""``seadragon-proxy serve`` in a child process, with its JSON log read as it is written."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from seadragon_proxy.fake_ollama import FakeOllama

from .conftest import BASE_CONFIG, merge


class Served:
    def __init__(self, process: asyncio.subprocess.Process, config: Path) -> None:
        self.process = process
        self.config = config
        self.lines: list[dict[str, Any]] = []
        self.url = ""
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            self.lines.append(json.loads(raw))
            self._new_line.set()
        self._new_line.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Wait (on the log, not a clock) until ``predicate()`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._reader.done():
                    raise AssertionError(f"the proxy exited; last lines: {self.lines[-5:]}")
                self._new_line.clear()
                await self._new_line.wait()

    async def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """Wait until ``event`` has been logged ``count`` times; return the last of them."""
        await self.wait_until(lambda: len(self.events(event)) >= count, timeout)
        return self.events(event)[count - 1]

    def rss_kib(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} for pid {self.process.pid}")

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.terminate()
        code = await self.process.wait()
        await self._reader
        return code


async def spawn_serve(config: Path) -> asyncio.subprocess.Process:
    """``python -m seadragon_proxy serve --config CONFIG``, its log on a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seadragon_proxy", "serve", "--config", str(config),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def spawn_workers(config: Path, count: int) -> asyncio.subprocess.Process:
    """``serve --workers COUNT``: the parent's log and its workers' on one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seadragon_proxy", "serve", "--config", str(config),
        "--workers", str(count),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def start_served(
    tmp_path: Path, fake: FakeOllama, override: dict[str, Any] | None = None
) -> Served:
    config = merge(BASE_CONFIG, override or {})
    config["upstream"]["url"] = fake.url
    config["whitelist"] = {"database": str(tmp_path / "seadragon.db")}
    config.setdefault("log", {})["format"] = "json"
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(config))
    served = Served(await spawn_serve(path), path)
    served.url = (await served.wait_for("listening"))["url"]
    return served
