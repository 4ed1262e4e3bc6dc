"""Starting and stopping the processes under test: the fake Ollama and the proxy (HAProxy:
``bench.haproxy``).

Each runs in its own process (no shared event loop or GIL with the load generator), gets
SIGKILL from the kernel if the harness dies (``PR_SET_PDEATHSIG``), and is stopped, then
killed if it does not stop in time, when the harness is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .rpc import LINE_LIMIT, Channel, ChildError

ROOT = Path(__file__).resolve().parents[1]  # the children run from here: bench is importable
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork
_PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

SOURCES = {"coding": 0, "chat": 5, "scripts": 8}  # X-Test-Source value -> priority
DEFAULT_PRIORITY = 10  # no header: direct_api


def die_with_parent() -> None:
    """In the forked child before exec: the kernel kills it when the harness exits."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A running child process; ``channel`` is its control channel (not for HAProxy)."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    ready: dict[str, Any] = field(default_factory=dict)
    channel: Channel | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.ready["port"])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def control(self) -> Channel:
        if self.channel is None:
            raise ChildError(f"{self.name} has no control channel")
        return self.channel

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """Ask it to stop (close stdin, or SIGTERM), then SIGKILL after ``STOP_TIMEOUT``."""
        if self.channel is not None:
            await self.channel.close()
        elif self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


async def start_python_child(name: str, args: list[str], workdir: Path) -> Child:
    """``python -m <args>`` speaking ``bench.rpc``; returns once it has said it is ready."""
    log = workdir / f"{name}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            preexec_fn=die_with_parent,
            limit=LINE_LIMIT,
        )
    child = Child(name, process, log)
    assert process.stdout is not None and process.stdin is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            line = await process.stdout.readline()
        if not line:
            raise ChildError(f"{name} exited before it was ready:\n{child.log_tail()}")
        child.ready = json.loads(line)["ready"]
    except BaseException:
        await child.stop()
        raise
    child.channel = Channel(name, process.stdout, process.stdin)
    return child


async def start_fake(workdir: Path, loop: str, parallel: int = 1, name: str = "fake") -> Child:
    args = ["bench.fake_child", "--loop", loop, "--parallel", str(parallel)]
    return await start_python_child(name, args, workdir)


def proxy_config(workdir: Path, upstream: str) -> dict[str, Any]:
    """The proxy's YAML: tests/conftest.py's three header-keyed sources, one slot, a queue
    that holds 10 000, logging at warning so that no line per request is written."""
    sources: list[dict[str, Any]] = [
        {"name": name, "priority": priority, "match": {"header": {"X-Test-Source": name}}}
        for name, priority in SOURCES.items()
    ]
    sources.append(  # scenario 7: one source split into tenants by a header
        {
            "name": "tenants",
            "priority": 7,
            "match": {"header": {"X-Test-Source": "tenants"}},
            "fair_by": "header:X-Tenant",
        }
    )
    sources.append({"name": "direct_api", "priority": DEFAULT_PRIORITY, "require_whitelist": True})
    return {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 2},
        "upstream": {"url": upstream, "slots": 1, "connect_timeout": 5, "idle_timeout": 600},
        "queue": {"max_size": 20000, "max_wait": 0, "aging": 0},
        "whitelist": {"database": str(workdir / "data" / "seadragon.db")},
        "log": {"level": "warning", "format": "json"},
        "sources": sources,
        "default_source": "direct_api",
    }


async def start_proxy(
    workdir: Path,
    upstream: str,
    loop: str,
    redis: str | None = None,
    name: str | None = None,
) -> Child:
    """The proxy; with ``redis`` (a URL), the Redis backend (``proxy-redis``, or ``name``,
    which is also its replica name and its own database)."""
    name = name or ("proxy" if redis is None else "proxy-redis")
    config = proxy_config(workdir, upstream)
    if redis is not None:
        config["queue"] |= {"backend": "redis", "redis": {"url": redis, "prefix": "bench:"}}
        config["whitelist"]["database"] = str(workdir / f"data-{name}" / "seadragon.db")
        config["server"]["replica"] = name
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return await start_python_child(name, ["bench.proxy_child", str(path), "--loop", loop], workdir)
