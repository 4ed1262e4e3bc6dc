"""The application factory: wires settings, scheduler, policy, whitelist and upstream into
aiohttp. Each resource has one ``cleanup_ctx``; background tasks are cancelled and awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from . import admin
from .audit import audit_middleware
from .dashboard import add_dashboard
from .exceptions import DatabaseError, NotFound, ShuttingDown
from .guard import host_middleware
from .history import History
from .httputil import split_prefix
from .live import Live
from .metrics import Metrics
from .middlewares import (
    answer_headers,
    cors_middleware,
    error_middleware,
    request_id_middleware,
)
from .proxy import Proxy
from .record import Recorder
from .routes import is_admin_surface
from .scheduling import FairLevel, Scheduler, Server, Ticket
from .settings import Settings
from .startcheck import StartCheck
from .typedefs import (
    FLEET,
    HISTORY,
    LIVE,
    METRICS,
    PROXY,
    RECORDER,
    REDIS_LINK,
    REPLICA,
    SCHEDULER,
    START_CHECK,
    UPSTREAM,
    WHITELIST_SYNC,
)
from .upstream import Fleet
from .watch import watch_files
from .whitelist import WhitelistStore

log = structlog.get_logger("seadragon.app")

HEALTH_PATHS = ("/health", "/api/ollama/health")


def create_app(settings: Settings) -> web.Application:
    """Build the app from validated settings. Nothing starts until the app is run."""
    q = settings.queue
    servers = [
        Server(e.name, e.slots, max_loaded=e.max_loaded_models, models=e.models)
        for e in settings.fleet
    ]
    scheduler = Scheduler(
        max_size=q.max_size,
        max_wait=q.max_wait,
        aging=q.aging,
        servers=servers,
        affinity=q.affinity,
        level_factory=lambda priority: FairLevel(),  # fair between tenants within a level
    )
    live = Live(settings, scheduler, WhitelistStore(settings.whitelist.database))
    targets = [(s, e.url) for s, e in zip(servers, settings.fleet, strict=True)]
    fleet = Fleet(settings.upstream, targets, scheduler)
    recorder = Recorder()
    proxy = Proxy(live, scheduler, fleet, recorder)
    scheduler.add_listener(_log_queue_event)
    metrics = Metrics(scheduler, proxy.tenancy.book)
    recorder.listeners.append(metrics.observe)
    live.listeners.append(metrics.reloaded)
    history = None
    if settings.history.enabled:
        history = History(settings.whitelist.database, settings.history)
        recorder.listeners.append(history.record)

    # Bodies are read by the proxy itself, bounded by server.max_body.
    app = web.Application(
        middlewares=[
            request_id_middleware,
            audit_middleware,
            host_middleware,
            cors_middleware,
            error_middleware,
        ],
        client_max_size=settings.server.max_body,
    )
    app[LIVE] = live
    app[SCHEDULER] = scheduler
    app[FLEET] = fleet  # fleet.servers: name, url, healthy, allows(model) per server
    app[UPSTREAM] = fleet.servers[0]
    app[RECORDER] = recorder
    app[PROXY] = proxy
    app[METRICS] = metrics
    app[HISTORY] = history
    app[REDIS_LINK] = None
    app[WHITELIST_SYNC] = None
    app[REPLICA] = None
    if q.backend == "redis":
        # The [redis] extra; settings checked it is there.
        from .replicas.link import RedisLink
        from .replicas.replica import Replica
        from .replicas.whitelistsync import WhitelistSync

        link = app[REDIS_LINK] = RedisLink(q.redis, settings.server.replica)
        app[WHITELIST_SYNC] = WhitelistSync(link, live.store, live.reload_whitelist)
        replica = app[REPLICA] = Replica(link, scheduler, live)
        proxy.queue = replica.queue  # requests wait in the shared queue; same code path
        metrics.add_replica(settings.server.replica, q.backend, lambda: link.up)
    else:
        metrics.add_replica(settings.server.replica, q.backend)
    app[START_CHECK] = StartCheck(
        [server.url for server in settings.fleet], settings.upstream.connect_timeout
    )
    app.cleanup_ctx.extend(
        [
            redis_ctx,
            whitelist_ctx,
            history_ctx,
            upstream_ctx,
            start_check_ctx,
            watcher_ctx,
            scheduler_ctx,
            parser_ctx,
            replica_ctx,
        ]
    )
    app.on_response_prepare.append(answer_headers)

    for path in HEALTH_PATHS:
        app.router.add_get(path, admin.health_view, allow_head=True)
    app.router.add_get("/metrics", admin.metrics_view)
    app.router.add_get("/api/admin/queue", admin.queue_view)
    for method in ("GET", "POST", "DELETE"):
        app.router.add_route(method, "/api/admin/whitelist", admin.whitelist_view)
        app.router.add_route(method, "/api/admin/keys", admin.keys_view)
    app.router.add_get("/api/admin/stats", admin.stats_view)
    app.router.add_get("/api/admin/timeseries", admin.timeseries_view)
    app.router.add_route("*", "/api/admin/{tail:.*}", admin.admin_not_found)
    add_dashboard(app)
    app.router.add_route("*", "/{tail:.*}", _catch_all(live, proxy))
    return app


def _catch_all(live: Live, proxy: Proxy) -> Handler:
    """Everything else is Ollama's, under a source prefix or not. Under a prefix, /health
    answers as at the root (a client's set-up check), and the operator routes do not exist:
    they are served at the root only, where the Host check and the admin token guard them."""

    async def handle(request: web.Request) -> web.StreamResponse:
        prefix, path = split_prefix(request, live.settings.policy)
        if prefix is not None:
            if path in HEALTH_PATHS and request.method in ("GET", "HEAD"):
                return await admin.health_view(request)
            if is_admin_surface(path):
                raise NotFound(
                    f"{path} is served at the root only, not under the source prefix {prefix}"
                )
        return await proxy.handle(request)

    return handle


def _log_queue_event(event: str, ticket: Ticket) -> None:
    """At debug level, the queue's story: when each request joined the line and got its turn."""
    if event in ("queued", "started"):
        # A ticket starts inside whichever request released the slot, so its own id and
        # address are given explicitly rather than taken from the bound request context.
        log.debug(
            f"request_{event}",
            id=ticket.id,
            request_id=ticket.id,
            client_ip=ticket.client_ip,
            source=ticket.source,
            priority=ticket.priority,
            server=ticket.server,
            swapped=ticket.swapped or None,
        )


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """With ``queue.backend: redis``: the link starts with the app (it connects in the
    background, so the proxy starts while Redis is away) and closes after everything else."""
    link = app[REDIS_LINK]
    if link is None:
        yield
        return
    await link.start()
    yield
    await link.close()


async def replica_ctx(app: web.Application) -> AsyncIterator[None]:
    """With ``queue.backend: redis``: heartbeats and the dispatcher election start once
    everything else is up, and stop first (resigning the lease, so another replica takes
    over at once) while the link is still there to say so."""
    replica = app[REPLICA]
    if replica is None:
        yield
        return
    await replica.start()
    yield
    await replica.stop()


async def whitelist_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create (and seed) the database if needed and read it before the first request."""
    live = app[LIVE]
    created = await live.store.ensure()
    if created:
        log.info("whitelist_created", database=str(live.store.path), seeded="loopback")
    try:
        await live.keystore.ensure()  # the api_keys table, in a database made before it existed
    except DatabaseError as e:  # a read-only file from before keys: no keys, the rest works
        log.warning("keys_table_not_created", error=str(e), effect="no API key is accepted")
    await live.reload_whitelist()
    sync = app[WHITELIST_SYNC]
    if sync is not None:
        await sync.start()  # the file as it is now is what this replica agreed to
    yield


async def history_ctx(app: web.Application) -> AsyncIterator[None]:
    """The batch writer; what is still buffered at exit is written before the app goes."""
    history = app[HISTORY]
    if history is None:
        yield
        return
    await history.ensure()
    task = asyncio.create_task(history.run(), name="history-writer")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await history.flush()


async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    fleet = app[FLEET]
    await fleet.start()
    yield
    await fleet.close()


async def start_check_ctx(app: web.Application) -> AsyncIterator[None]:
    """A mistyped upstream address is a warning at start (startcheck.py)."""
    check = app[START_CHECK]
    check.start()
    yield
    await check.stop()


async def watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reload the policy when the YAML file changes and the whitelist when the database does."""
    live = app[LIVE]
    sync = app[WHITELIST_SYNC]
    targets: dict[Path, Callable[[], Awaitable[object]]] = {live.store.path: live.reload_whitelist}
    if sync is not None:

        async def whitelist_changed() -> None:
            await live.reload_whitelist()
            await sync.file_changed()  # an edit by the CLI, shared with the other replicas

        targets[live.store.path] = whitelist_changed
    if live.config_file is not None:
        targets[live.config_file] = live.reload_config
    task = asyncio.create_task(watch_files(targets), name="file-watcher")
    task.add_done_callback(_report_watcher_end)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _report_watcher_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "file_watcher_failed",
            error=repr(task.exception()),
            effect="edits to the config and whitelist need SIGHUP until restart",
        )


async def parser_ctx(app: web.Application) -> AsyncIterator[None]:
    """The JSON worker process (started on the first big body) goes with the app."""
    yield
    app[PROXY].parser.close()


async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    # Anyone still queued when the app goes away is answered, not dropped.
    app[SCHEDULER].close(ShuttingDown)
