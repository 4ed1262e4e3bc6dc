"""The connection to Ollama: one client session, header filtering, and an up/down monitor.

When Ollama refuses connections the monitor pauses the queue (waiters keep their
places) and probes with back-off until Ollama answers; if it stays down longer
than ``upstream.unreachable_wait`` the waiters get a 502 and later requests fail
fast until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import secrets
from collections.abc import AsyncIterable, Mapping

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .exceptions import UpstreamTimeout, UpstreamUnavailable
from .scheduling import Scheduler
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


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"  # unreachable, queue paused, waiting up to unreachable_wait
    FAILING = "failing"  # unreachable for longer: requests get 502 until it is back


class Upstream:
    """Sends requests to Ollama and keeps track of whether it is answering."""

    def __init__(self, settings: UpstreamSettings, scheduler: Scheduler) -> None:
        self.settings = settings
        self.url = settings.url
        self._scheduler = scheduler
        self._session: aiohttp.ClientSession | None = None
        self.health = Health.UP
        self._prober: asyncio.Task[None] | None = None
        self._window: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Upstream {self.url} {self.health.value}>"

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

    async def close(self) -> None:
        if self._window is not None:
            self._window.cancel()
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def target(self, path: str, query_string: str) -> URL:
        """Ollama's URL for ``path``; a path prefix in ``upstream.url`` is kept."""
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

    # -- up / down ---------------------------------------------------------------------

    def report_unreachable(self) -> None:
        if self.health is not Health.UP:
            return
        wait = self.settings.unreachable_wait
        log.warning("upstream_unreachable", upstream=str(self.url), waiting_seconds=wait)
        if wait > 0:
            self.health = Health.DOWN
            self._scheduler.pause()
            # Timer and probe run in a fresh context: their log lines are not the request's.
            self._window = asyncio.get_running_loop().call_later(
                wait, self._give_up, context=contextvars.Context()
            )
        else:
            self._give_up()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.create_task(
                self._probe_until_up(), name="upstream-probe", context=contextvars.Context()
            )

    def _give_up(self) -> None:
        self._window = None
        self.health = Health.FAILING
        message = f"Ollama at {self.url} is unreachable"
        failed = self._scheduler.reject_waiting(lambda: UpstreamUnavailable(message))
        self._scheduler.resume()
        log.error("upstream_down", upstream=str(self.url), rejected=failed)

    def report_ok(self) -> None:
        if self.health is Health.UP:
            return
        was = self.health
        self.health = Health.UP
        if self._window is not None:
            self._window.cancel()
            self._window = None
        self._scheduler.resume()
        log.info("upstream_back", upstream=str(self.url), was=was.value)

    async def _probe_until_up(self) -> None:
        """Back-off reconnects while Ollama is down: the one place that must retry on a
        timer, since a server that is not running cannot tell anyone it is back."""
        delay = PROBE_FIRST_DELAY
        while self.health is not Health.UP:
            await asyncio.sleep(delay)
            if await self.probe() is not None:
                return
            delay = min(delay * 2, PROBE_MAX_DELAY)
