"""A redis-server of the bench's own (Debian's package, ``make redis``) on a free port, for
the Redis backend's figures: started in the work directory, no persistence, stopped with
the rest. ``None`` when redis-server is not installed (the figures then say so)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path

from .children import START_TIMEOUT, Child, die_with_parent
from .rpc import ChildError

READY = b"Ready to accept connections"


def redis_binary() -> str | None:
    return os.environ.get("SEADRAGON_REDIS_SERVER") or shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def start_redis(workdir: Path) -> Child | None:
    binary = redis_binary()
    if binary is None:
        return None
    port = free_port()
    log = workdir / "redis.log"
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip
    child = Child("redis", process, log, ready={"port": port})
    assert process.stdout is not None
    stdout = process.stdout
    try:
        with log.open("ab") as out:
            async with asyncio.timeout(START_TIMEOUT):
                while READY not in (line := await stdout.readline()):
                    if not line:
                        raise ChildError(f"redis-server exited:\n{child.log_tail()}")
                    out.write(line)
    except BaseException:
        await child.stop()
        raise
    _drains.add(asyncio.create_task(_drain(stdout, log)))  # its log lines, to the file
    return child


_drains: set[asyncio.Task[None]] = set()


async def _drain(stdout: asyncio.StreamReader, log: Path) -> None:
    with log.open("ab") as out:
        while line := await stdout.readline():
            out.write(line)


def redis_url(child: Child) -> str:
    return f"redis://127.0.0.1:{child.port}/0"
