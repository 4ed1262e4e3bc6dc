"""HAProxy as the C reference column, when ``haproxy`` is on PATH.

It gets the same three priority classes from X-Test-Source as the proxy's sources and one
server with ``maxconn 1`` (the slot); the rest waits in its backend queue.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

from .children import DEFAULT_PRIORITY, SOURCES, START_TIMEOUT, Child, die_with_parent
from .rpc import ChildError


def haproxy_config(fake_port: int, listen_fd: int, stats_fd: int) -> str:
    """HAProxy as the C reference: one server with ``maxconn 1`` (the slot), priority classes
    from X-Test-Source, a long ``timeout queue``, idle server connections shared between
    clients (``http-reuse always``, as the proxy's pool does), one thread, no logging.
    HAProxy wants two descriptors per connection, more than the hard limit allows for 10 000,
    and would refuse to start (``strict-limits``); with one server connection it needs one
    per client, so ``no strict-limits`` lets it run on the hard limit."""
    rules = "\n".join(
        f"    http-request set-priority-class int({priority}) "
        f"if {{ req.hdr(x-test-source) -m str {name} }}"
        for name, priority in SOURCES.items()
    )
    return f"""\
global
    maxconn 10050
    no strict-limits
    nbthread 1
defaults
    mode http
    maxconn 10050
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue 600s
    http-reuse always
frontend bench
    bind fd@{listen_fd}
    http-request set-priority-class int({DEFAULT_PRIORITY})
{rules}
    default_backend ollama
backend ollama
    server fake 127.0.0.1:{fake_port} maxconn 1
listen stats
    bind fd@{stats_fd}
    stats enable
    stats uri /stats
"""


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


async def start_haproxy(haproxy: str, workdir: Path, fake_port: int) -> Child:
    """HAProxy on sockets this process bound and passes down (``bind fd@N``): they listen
    before HAProxy starts, so connections wait in the backlog and no readiness poll is
    needed. Our copies are closed once it runs, so a dead HAProxy refuses connections."""
    front, stats = _listener(), _listener()
    try:
        config = workdir / "haproxy.cfg"
        config.write_text(haproxy_config(fake_port, front.fileno(), stats.fileno()))
        log = workdir / "haproxy.log"
        check = await asyncio.create_subprocess_exec(
            haproxy,
            "-c",
            "-f",
            str(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(front.fileno(), stats.fileno()),
        )
        async with asyncio.timeout(START_TIMEOUT):
            output, _ = await check.communicate()
        if check.returncode != 0:
            raise ChildError(f"haproxy -c rejected {config}:\n{output.decode(errors='replace')}")
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                haproxy,
                "-db",
                "-f",
                str(config),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                pass_fds=(front.fileno(), stats.fileno()),
                preexec_fn=die_with_parent,
            )
        ready = {"port": front.getsockname()[1], "stats_port": stats.getsockname()[1]}
        return Child("haproxy", process, log, ready)
    finally:
        front.close()
        stats.close()


async def haproxy_version(haproxy: str) -> str:
    process = await asyncio.create_subprocess_exec(
        haproxy, "-v", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    async with asyncio.timeout(START_TIMEOUT):
        output, _ = await process.communicate()
    words = output.decode(errors="replace").split()  # HAProxy version 2.6.12-1 2025/10/03 ...
    return f"HAProxy {words[2]}" if len(words) > 2 else "HAProxy (unknown version)"
