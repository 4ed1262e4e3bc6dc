"""The connections to the Ollama servers: one client session, header filtering, and an
up/down monitor per server, plus the background read of what each server has loaded.

When a server refuses connections its monitor marks it down (its waiters keep their
places, and go to other servers that may serve them) and probes with back-off until it
answers; if it stays down longer than ``upstream.unreachable_wait`` the waiters no other
server may serve get a 502, and later requests for them fail fast until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import secrets
from collections.abc import AsyncIterable, Mapping, Sequence

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .exceptions import UpstreamTimeout, UpstreamUnavailable
from .scheduling import Health, Scheduler, Server
from .settings import UpstreamSettings

log = structlog.get_logger("seadragon.upstream")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Not copied upstream: Host (Ollama 403s foreign hosts), framing (aiohttp sets it),
# Expect (answered here), Origin (CORS is decided here; Ollama would 403 other origins).
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect", "origin"}
# Not copied downstream: framing, and CORS headers (decided here).
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date"}
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

PROBE_FIRST_DELAY = 0.05  # seconds; doubles up to PROBE_MAX_DELAY while Ollama is down
PROBE_MAX_DELAY = 1.0
RESIDENCY_INTERVAL = 10.0  # seconds between reads of every server's /api/ps and /api/tags
UNKNOWN_MODEL_REREAD = 1.0  # seconds: at most one extra read this often for unknown models

__all__ = ["Fleet", "Health", "Upstream"]


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get("Connection", "")
    return {token.strip().lower() for token in value.split(",") if token.strip()}


# This process's name in Via headers (RFC 9110 7.6.3): a request that comes back carrying
# it has gone round in a loop (upstream.url pointing at the proxy itself).
VIA_TOKEN = f"seadragon-proxy-{secrets.token_hex(4)}"


def request_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, Host, framing and Origin, plus our Via."""
    drop = _DROP_REQUEST | _connection_tokens(headers)
    out = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
    out.add("Via", f"1.1 {VIA_TOKEN}")
    return out


def looped(headers: CIMultiDictProxy[str]) -> bool:
    return any(VIA_TOKEN in value for value in headers.getall("Via", ()))


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _DROP_RESPONSE | _connection_tokens(headers)
    return CIMultiDict(
        (k, v)
        for k, v in headers.items()
        if k.lower() not in drop and not k.lower().startswith("access-control-")
    )


class Upstream:
    """One Ollama server: where it is, what it may serve, and whether it is answering.

    ``name``, ``url``, ``healthy`` and ``allows(model)`` are the read-only view other
    modules use (``Fleet.servers``); ``send`` and ``probe`` go through the fleet's session.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        server: Server,
        url: URL,
        scheduler: Scheduler,
        fleet: Fleet,
    ) -> None:
        self.settings = settings  # timeouts and unreachable_wait, shared by the fleet
        self.server = server
        self.name = server.name
        self.url = url
        self._scheduler = scheduler
        self._fleet = fleet
        self._prober: asyncio.Task[None] | None = None
        self._window: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.url} {self.health.value}>"

    @property
    def health(self) -> Health:
        return self.server.health

    @property
    def healthy(self) -> bool:
        return self.server.health is Health.UP

    def allows(self, model: str | None) -> bool:
        return self.server.allows(model)

    async def close(self) -> None:
        if self._window is not None:
            self._window.cancel()
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._fleet.session

    def target(self, path: str, query_string: str) -> URL:
        """Ollama's URL for ``path``; a path prefix in the server's URL is kept."""
        base = self.url.path.rstrip("/")
        return self.url.with_path(base + path, encoded=False).with_query(query_string or None)

    async def send(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one request and return once Ollama's response headers are in.

        Raises ``UpstreamUnavailable`` (``reached`` tells whether Ollama may have seen
        the request) or ``UpstreamTimeout``.
        """
        url = self.target(path, query_string)
        try:
            response = await self.session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=False,
            )
        except aiohttp.ClientConnectorError as e:
            self.report_unreachable()
            raise UpstreamUnavailable(
                f"Ollama at {self.url} is unreachable: {e.os_error.strerror or e}"
            ) from e
        except aiohttp.ConnectionTimeoutError as e:
            self.report_unreachable()
            raise UpstreamUnavailable(
                f"Ollama at {self.url} is unreachable: no connection within "
                f"{self.settings.connect_timeout:g} s"
            ) from e
        except aiohttp.SocketTimeoutError as e:
            raise UpstreamTimeout(
                f"Ollama at {self.url} accepted the request but did not answer within "
                f"upstream.idle_timeout ({self.settings.idle_timeout:g} s)"
            ) from e
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            raise UpstreamUnavailable(
                f"Ollama at {self.url} closed the connection before answering", reached=True
            ) from e
        self.report_ok()
        return response

    async def probe(self, timeout: float | None = None) -> str | None:
        """Ollama's version if it answers ``GET /api/version``, else ``None``."""
        limit = timeout if timeout is not None else self.settings.connect_timeout
        try:
            async with asyncio.timeout(limit):
                async with self.session.get(self.target("/api/version", "")) as response:
                    if response.status != 200:
                        return None
                    doc = await response.json(content_type=None)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            # What /health finds, the queue view shows: an unanswered probe is an outage.
            self.report_unreachable()
            return None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        self.report_ok()
        version = doc.get("version") if isinstance(doc, dict) else None
        return version if isinstance(version, str) else "unknown"

    async def get_json(self, path: str, timeout: float) -> object | None:
        """A small metadata answer (``/api/ps``, ``/api/tags``), or ``None`` if none came."""
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(self.target(path, "")) as response:
                    if response.status != 200:
                        return None
                    doc: object = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return doc

    # -- up / down ---------------------------------------------------------------------

    def _set(self, health: Health) -> None:
        self._scheduler.set_health(self.name, health)

    def report_unreachable(self) -> None:
        if self.health is not Health.UP:
            return
        wait = self.settings.unreachable_wait
        log.warning(
            "upstream_unreachable", server=self.name, upstream=str(self.url), waiting_seconds=wait
        )
        if wait > 0:
            self._set(Health.DOWN)  # its waiters wait, or go to servers that are up
            # Timer and probe run in a fresh context: their log lines are not the request's.
            self._window = asyncio.get_running_loop().call_later(
                wait, self._give_up, context=contextvars.Context()
            )
        else:
            self._give_up()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(
                self._probe_until_up(),
                name=f"upstream-probe-{self.name}",
                context=contextvars.Context(),
            )

    def _give_up(self) -> None:
        self._window = None
        message = f"Ollama at {self.url} is unreachable"
        failed = self._scheduler.give_up(self.name, lambda: UpstreamUnavailable(message))
        log.error("upstream_down", server=self.name, upstream=str(self.url), rejected=failed)

    def report_ok(self) -> None:
        if self.health is Health.UP:
            return
        was = self.health
        if self._window is not None:
            self._window.cancel()
            self._window = None
        self._set(Health.UP)
        log.info("upstream_back", server=self.name, upstream=str(self.url), was=was.value)

    async def _probe_until_up(self) -> None:
        """Back-off reconnects while Ollama is down: the one place that must retry on a
        timer, since a server that is not running cannot tell anyone it is back."""
        delay = PROBE_FIRST_DELAY
        while self.health is not Health.UP:
            await asyncio.sleep(delay)
            if await self.probe() is not None:
                return
            delay = min(delay * 2, PROBE_MAX_DELAY)


class Fleet:
    """Every Ollama server (``servers``, in the configured order) and the one client session.

    Residency: what each server has loaded is read from ``/api/ps`` (and what it has, from
    ``/api/tags``) at start, after a request of ours loaded a model, and every
    ``RESIDENCY_INTERVAL`` seconds for changes made outside the proxy; between reads the
    scheduler keeps track of what it sent where. When residency cannot change a decision
    (``tracks_residency`` false: the Part 1 single server) only ``/api/tags`` is read, at
    start, after a model change through the proxy (``end_change``) and on demand
    (``refresh_recent``).
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        targets: Sequence[tuple[Server, URL]],
        scheduler: Scheduler,
    ) -> None:
        self.settings = settings
        self._scheduler = scheduler
        self.servers: tuple[Upstream, ...] = tuple(
            Upstream(settings, server, url, scheduler, self) for server, url in targets
        )
        self._by_name = {u.name: u for u in self.servers}
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refreshed = asyncio.Event()
        self.refreshes = 0  # residency reads applied so far
        self._reading: asyncio.Future[None] | None = None  # a read for an unknown model
        self._read_at = -math.inf
        self.changing = 0  # pulls, creates, copies and deletes through the proxy in flight
        self._changes = 0  # how many of them Ollama accepted
        self._fresh = 0  # ``_changes`` when the read now applied began

    def __repr__(self) -> str:
        return f"<Fleet {list(self.servers)}>"

    def get(self, name: str | None) -> Upstream:
        """The server of that name (``None``: the first). Replicas of one queue must list
        the same ``upstreams:``: a dispatcher's grant names the server."""
        return self._by_name[name] if name is not None else self.servers[0]

    def first_healthy(self) -> Upstream:
        """Where the routes that are not queued go for now: the first server that is up."""
        return next((u for u in self.servers if u.healthy), self.servers[0])

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Fleet.start() was not awaited"
        return self._session

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout,
                sock_read=self.settings.idle_timeout,
            ),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            # A proxy keeps no cookies: one client's must never be sent on another's behalf.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._refresher = asyncio.create_task(
            self._refresh_forever(), name="residency-refresh", context=contextvars.Context()
        )

    async def close(self) -> None:
        for task in (self._refresher, self._reading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                    await task
        for upstream in self.servers:
            await upstream.close()
        if self._session is not None:
            await self._session.close()

    async def refresh(self) -> None:
        """Read every server's ``/api/tags`` (and ``/api/ps`` if residency is tracked) at
        once; tell the scheduler."""
        changes, residency = self._changes, self.tracks_residency
        await asyncio.gather(*(self._refresh_one(u, residency) for u in self.servers))
        self._fresh = changes
        self.refreshes += 1
        self._refreshed.set()
        self._refreshed = asyncio.Event()
        self._scheduler.refresh()

    async def refresh_recent(self) -> None:
        """A fresh enough read for a request naming a model no server has: at most one read
        per ``UNKNOWN_MODEL_REREAD`` seconds, shared by every request asking meanwhile, so
        made-up model names cannot make the proxy hammer the servers. A model change through
        the proxy (``end_change``) since the last read began: read at once."""
        for _ in range(2):  # once more if the read shared began before a change ended
            if self._reading is None:
                now = self._scheduler.now()
                if self._fresh == self._changes and now - self._read_at < UNKNOWN_MODEL_REREAD:
                    return
                self._read_at = now
                self._reading = asyncio.ensure_future(self.refresh())
                self._reading.add_done_callback(self._read_done)
            await asyncio.shield(self._reading)
            if self._fresh == self._changes:
                return

    def begin_change(self) -> None:
        """A pull, create, copy or delete is sent through the proxy: until it ends the model
        list is in doubt (``changing``), and requests for unlisted models go through."""
        self.changing += 1

    def end_change(self, changed: bool) -> None:
        """It ended; ``changed``: Ollama accepted it, so ``/api/tags`` is read again now
        (a deleted model is refused once it is read), and a request for a model the last
        read did not list, before that read is in, reads it again unthrottled."""
        self.changing -= 1
        if changed:
            self._changes += 1
            self._wake.set()

    def _read_done(self, task: asyncio.Future[None]) -> None:
        self._reading = None
        if not task.cancelled():
            task.exception()  # a failed read is a read that found nothing new

    async def next_refresh(self) -> None:
        """Wait for the next read of every server's residency to be applied."""
        await self._refreshed.wait()

    async def _refresh_one(self, upstream: Upstream, residency: bool) -> None:
        timeout = min(3.0, self.settings.connect_timeout + 1)
        if residency:
            ps, tags = await asyncio.gather(
                upstream.get_json("/api/ps", timeout), upstream.get_json("/api/tags", timeout)
            )
            loaded = _model_names(ps)
            if loaded is not None:
                upstream.server.observe_loaded(loaded, self._scheduler.now())
        else:
            tags = await upstream.get_json("/api/tags", timeout)
        known = _model_names(tags)
        if known is not None or len(self.servers) == 1:
            # One server unread: its models are not known, every request goes through.
            # In a fleet its last list stays, to route by (docs/fleet.md).
            upstream.server.observe_known(known)

    @property
    def tracks_residency(self) -> bool:
        """Whether residency can change a decision: several servers, a server with
        ``max_loaded_models`` or ``models``, or affinity. A plain fleet of one (Part 1)
        reads only ``/api/tags``, at start and on demand (``refresh_recent``)."""
        return (
            len(self.servers) > 1
            or self._scheduler.affinity.on
            or any(u.server.max_loaded or u.server.patterns for u in self.servers)
        )

    def loaded(self) -> None:
        """A request of ours loaded a model: read /api/ps now (what did Ollama evict?)."""
        self._wake.set()

    async def _refresh_forever(self) -> None:
        first = True
        while True:
            self._wake.clear()
            # Part 1: /api/tags at start, after a model change, every RESIDENCY_INTERVAL
            # while it could not be read (Ollama down at start), otherwise on demand.
            unread = any(u.server.known is None for u in self.servers)
            if first or unread or self.tracks_residency or self._fresh != self._changes:
                first = False
                await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RESIDENCY_INTERVAL):
                    await self._wake.wait()


def _model_names(doc: object) -> list[str] | None:
    """The ``name`` (or ``model``) of each entry of an Ollama ``{"models": [...]}`` answer."""
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        return None
    names = []
    for entry in doc["models"]:
        if isinstance(entry, dict):
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str) and name:
                names.append(name)
    return names
