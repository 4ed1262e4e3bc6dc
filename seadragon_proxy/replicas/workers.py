"""``seadragon-proxy serve --workers N``: N processes on one port, one replica each.

The parent binds the port first with ``SO_REUSEPORT`` (so a port in use is reported before
any worker starts, and ``port: 0`` becomes one real port for all), then starts N copies of
``seadragon-proxy serve`` with the hidden ``--worker I``: each listens on that port with
``SO_REUSEPORT`` (the kernel spreads new connections over them) as the replica
``<server.replica>-<I>``, all sharing one queue through the Redis backend. The parent's own
socket never listens, so it receives no connections.

Supervision: SIGTERM and SIGINT are passed to every worker (each stops gracefully: the queue
refused, streams given ``shutdown_grace``) and the parent exits 0 once all have; SIGHUP is
passed on (each reloads). A worker that exits on its own is reported (``worker_exited``, its
number, pid and status) and the parent then stops the others and exits 1: restarting is left
to the service manager (systemd's ``Restart=on-failure``), which also backs off, rather than
done here, where a worker failing at start-up would be restarted in a loop. Redis gives a dead
worker's slots back within ``queue.redis.lease`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Sequence

import structlog

log = structlog.get_logger("seadragon.workers")

MAX_WORKERS = 64


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with ``SO_REUSEPORT``; raises ``OSError`` if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def worker_name(replica: str, index: int) -> str:
    return f"{replica}-{index}"


def set_parent_death_signal() -> None:
    """In a worker: get SIGTERM if the parent dies (even by ``kill -9``), so no orphan keeps
    the port. Linux only; elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


async def supervise(count: int, argv: Sequence[str], host: str, port: int) -> int:
    """Run ``count`` workers (``argv`` is ``serve``'s own arguments, without ``--workers``);
    returns the exit status."""
    sock = reserve_port(host, port)
    port = sock.getsockname()[1]
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    workers: dict[int, asyncio.subprocess.Process] = {}
    try:
        for index in range(1, count + 1):
            workers[index] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "seadragon_proxy", "serve", *argv,
                "--host", host, "--port", str(port), "--worker", str(index),
            )  # fmt: skip
        loop.add_signal_handler(signal.SIGHUP, lambda: _send(workers, signal.SIGHUP))
        log.info(
            "workers_started",
            workers=count,
            port=port,
            pids={str(i): p.pid for i, p in workers.items()},
        )
        waits = {asyncio.create_task(p.wait(), name=f"worker-{i}"): i for i, p in workers.items()}
        stop = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if stop not in done:
            stop.cancel()
            for task in done:
                index = waits[task]
                log.error(
                    "worker_exited",
                    worker=index,
                    pid=workers[index].pid,
                    status=task.result(),
                    effect="stopping the other workers; the service manager restarts the lot",
                )
            status = 1
        _send(workers, signal.SIGTERM)
        codes = await asyncio.gather(*waits)
        statuses = {str(i): c for i, c in zip(workers, codes, strict=True)}
        log.info("workers_stopped", statuses=statuses)
        if status == 0 and any(code != 0 for code in codes):
            status = 1
        return status
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for process in workers.values():
            if process.returncode is None:
                process.kill()
                await process.wait()
        sock.close()


def _send(workers: dict[int, asyncio.subprocess.Process], sig: int) -> None:
    for process in workers.values():
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
