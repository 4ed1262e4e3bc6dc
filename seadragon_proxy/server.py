"""Running the app: listen, reload on SIGHUP, and stop gracefully on SIGTERM/SIGINT —
refuse the queue with 503, let in-flight streams finish within the grace period, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
from dataclasses import dataclass

import structlog
from aiohttp import web

from .app import create_app
from .exceptions import ShuttingDown
from .settings import Settings
from .typedefs import LIVE, PROXY, REPLICA, SCHEDULER

log = structlog.get_logger("seadragon.server")


@dataclass
class RunningServer:
    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, refuse the queue, give in-flight requests the grace period."""
        proxy = self.app[PROXY]
        scheduler = self.app[SCHEDULER]
        grace = self.app[LIVE].settings.server.shutdown_grace
        for site in list(self.runner.sites):
            await site.stop()
        if self.runner.server is not None:
            self.runner.server.pre_shutdown()  # close idle keep-alive connections
        proxy.stopping = True
        replica = self.app[REPLICA]
        if replica is not None:  # hand the dispatcher's lease on before the grace period
            await replica.dispatcher.stop()
        refused = proxy.queue.close(ShuttingDown)
        scheduler.close(ShuttingDown)
        active = set(proxy.active)  # refused waiters are among them and end at once
        log.info("shutting_down", refused=refused, in_flight=len(active) - refused, grace=grace)
        if active:
            _, pending = await asyncio.wait(active, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.runner.cleanup()


async def start_server(settings: Settings, *, reuse_port: bool = False) -> RunningServer:
    """Start listening; raises ``DatabaseError``/``OSError`` if that is impossible.
    ``reuse_port``: share the port with other processes (``serve --workers``)."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,  # a client that hangs up cancels its handler at once
        access_log=None,  # the canonical request line replaces it
        keepalive_timeout=settings.server.header_timeout,  # also bounds slow headers
        # After an early error answer, read and drop the rest of the body for at most 2 s
        # (closing at once could reset the connection before the client reads the answer).
        lingering_time=2.0,
        shutdown_timeout=1.0,  # in-flight work is waited for in RunningServer.stop
    )
    await runner.setup()
    # A deep accept queue: a burst of clients (thousands queueing at once) is not dropped
    # at the door. The kernel caps it at net.core.somaxconn.
    site = web.TCPSite(
        runner, settings.server.host, settings.server.port, backlog=4096, reuse_port=reuse_port
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]  # the port actually bound (port 0 picks a free one)
    return RunningServer(app=app, runner=runner, host=settings.server.host, port=port)


def raise_open_file_limit() -> int:
    """Every waiting client holds a socket: lift the soft descriptor limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(settings: Settings, *, reuse_port: bool = False, worker: bool = False) -> int:
    """Run until SIGTERM or SIGINT; returns the exit status. ``worker``: one of ``serve
    --workers``, which gets more than one SIGTERM (see below)."""
    open_files = raise_open_file_limit()
    server = await start_server(settings, reuse_port=reuse_port)
    live = server.app[LIVE]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[object]] = set()

    def reload() -> None:
        log.info("sighup", action="reload config and whitelist")
        for job in (live.reload_config(), live.reload_whitelist()):
            task: asyncio.Task[object] = asyncio.create_task(job)
            reloads.add(task)
            task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info(
        "listening",
        url=server.url,
        replica=settings.server.replica,
        upstream=str(settings.upstream.url) if not settings.upstreams else None,
        slots=settings.upstream.slots if not settings.upstreams else None,
        upstreams={e.name: str(e.url) for e in settings.upstreams} or None,
        config=str(settings.file),
        sources=[s.name for s in settings.policy.sources],
        open_file_limit=open_files,
    )
    try:
        await stop.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        if reloads:  # a SIGHUP's reads finish first: their SQLite thread outlives no loop
            await asyncio.gather(*reloads, return_exceptions=True)
        # The handlers for SIGTERM and SIGINT stay while stopping: a second one (systemd
        # signals every process of the unit, and `serve --workers` passes it on as well;
        # Ctrl-C reaches the whole process group) must not kill the graceful stop.
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if worker:
            # A worker can be sent SIGTERM several times (the parent-death signal, the
            # parent, systemd): once stopped, the rest must not kill it before it exits.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("stopped")
    return 0
