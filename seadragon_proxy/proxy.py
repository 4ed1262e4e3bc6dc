"""The catch-all handler: classify, check the whitelist, wait for a turn, forward, stream back.

Bodies on JSON routes are read (bounded, see bodies.py) only once some source could
accept the request, and forwarded as the same bytes; other bodies, and every response,
stream through chunk by chunk as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .adminauth import check_manage_models
from .bodies import (
    BodyMemory,
    Hold,
    JsonParser,
    SendTimeout,
    raw_encoding,
    read_json_body,
    stream_body,
    write_within,
)
from .defaults import ROUTES as DEFAULT_ROUTES
from .exceptions import Forbidden, LoopDetected, UpstreamTimeout, UpstreamUnavailable
from .httputil import client_ip, client_label, not_whitelisted, request_id
from .live import Live
from .logs import bind_request
from .netaddr import IPAddress
from .payload import JsonBody
from .policy import RequestFacts, Source
from .record import Recorder, RequestRecord
from .routes import Route, classify
from .scheduling import Scheduler, Ticket
from .scheduling.queue import Held, Queue
from .settings import Settings
from .upstream import Health, Upstream, looped, request_headers, response_headers
from .usage import UsageTail

SHUTDOWN_MESSAGE = "seadragon-proxy is shutting down"


def stream_error_line(content_type: str, message: str, after: bytes = b"") -> bytes | None:
    """The one line that tells a streaming client the stream failed, in its own framing.

    ``after`` is the end of what was already sent: if Ollama broke off mid-line (or
    mid-event), that line is ended first, so the error line is always a line of its own.
    """
    if content_type.startswith("application/x-ndjson"):
        end = b"\n" if after and not after.endswith(b"\n") else b""
        return end + json.dumps({"error": message}).encode() + b"\n"
    if content_type.startswith("text/event-stream"):
        if not after or after.endswith(b"\n\n"):
            end = b""
        elif after.endswith(b"\n"):
            end = b"\n"
        else:
            end = b"\n\n"
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        return end + b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    return None


class Proxy:
    """Holds what the handler needs; ``handle`` is the aiohttp handler."""

    def __init__(
        self,
        live: Live,
        scheduler: Scheduler,
        upstream: Upstream,
        recorder: Recorder,
        queue: Queue | None = None,
    ) -> None:
        self.live = live
        self.scheduler = scheduler  # the clock, and the queue with backend memory
        self.queue: Queue = scheduler if queue is None else queue  # where requests wait
        self.upstream = upstream
        self.recorder = recorder
        self.active: set[asyncio.Task[object]] = set()
        self.stopping = False
        self.bodies = BodyMemory(live.settings.server.max_body_memory)
        self.parser = JsonParser()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.live.settings
        route = classify(request.method, request.path)
        ip = client_ip(request, settings)  # once: it walks X-Forwarded-For
        record = RequestRecord(
            id=request_id(request),
            method=request.method,
            route=route.path,
            client_ip=client_label(ip),
            user_agent=request.headers.get("User-Agent"),
        )
        bind_request(request_id=record.id, client_ip=record.client_ip)
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        try:
            with self.bodies.hold() as hold:
                return await self._serve(request, settings, route, record, ip, hold)
        except asyncio.CancelledError:
            record.hung_up = not self.stopping
            record.error = record.error or ("shutdown" if self.stopping else "client hung up")
            raise
        except Exception as e:
            status = getattr(e, "status", 500)
            record.status = status if isinstance(status, int) else 500
            record.error = getattr(e, "message", None) or repr(e)
            if isinstance(e, UpstreamUnavailable):
                record.upstream_error = "unreachable"
            elif isinstance(e, UpstreamTimeout):
                record.upstream_error = "timeout"
            raise
        finally:
            self.active.discard(task)
            self.recorder.emit(record)

    async def _serve(
        self,
        request: web.Request,
        settings: Settings,  # read once per request: one consistent policy throughout
        route: Route,
        record: RequestRecord,
        ip: IPAddress | None,
        hold: Hold,
    ) -> web.StreamResponse:
        if looped(request.headers):
            raise LoopDetected(
                f"request loop: upstream.url ({self.upstream.url}) leads back to this proxy; "
                "point it at Ollama"
            )
        whitelisted = ip is not None and ip in self.live.whitelist
        strip_token = False
        if route.manages_models:  # its own permission, decided before any body is read
            record.refusal = "manage_models"
            grant = check_manage_models(request.headers, ip, whitelisted, settings.admin)
            record.refusal, strip_token = None, grant == "token"
        facts = RequestFacts(ip, route.path, request.headers, None, whitelisted)
        if not settings.policy.could_accept(facts):  # refused before its body is read
            raise self._not_whitelisted(record, settings.policy.classify(facts).source, ip)
        body: bytes | None = None
        parsed: JsonBody | None = None
        if route.reads_json:
            read = await read_json_body(request, settings.server, hold)
            parsed = await self.parser.inspect(read, require_model=route.queued)
            body = read.raw
        elif request.body_exists:
            raw_encoding(request.headers)
        model = parsed.model if parsed else None
        record.model = model
        facts = RequestFacts(ip, route.path, request.headers, model, whitelisted)
        decision = settings.policy.classify(facts)
        source = decision.source
        record.source, record.priority = source.name, source.priority
        if source.require_whitelist and not whitelisted:
            raise self._not_whitelisted(record, source, ip)
        if parsed is not None and settings.defaults and route.path in DEFAULT_ROUTES:
            merged = await self.parser.with_defaults(parsed, settings.defaults, source.name)
            if merged is not None:  # the one case where the body is not forwarded as sent
                body, pinned = merged
                hold.take(len(body))
                record.pinned = pinned or None
        headers = request_headers(request.headers)
        headers.popall("Content-Encoding", None)  # JSON bodies are decoded; others plain
        if strip_token:  # the admin token let it in: it is the proxy's secret, not Ollama's
            headers.popall("Authorization", None)
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            data = stream_body(request.content, settings.server.body_timeout)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        if not route.queued:
            started = self.scheduler.now()
            try:
                response = await self._send(request, route, headers, data, retry=body is not None)
            finally:
                record.upstream_time = self.scheduler.now() - started
            return await self._relay(request, response, None, record, started)
        ticket = Ticket(
            id=record.id,
            source=source.name,
            priority=source.priority,
            path=route.path,
            model=model,
            client_ip=record.client_ip,
            max_wait=source.max_wait,
        )
        record.queued = True
        retried = False
        while True:
            try:
                slot = await self.queue.acquire(ticket)
            finally:  # served, refused, timed out or gone: the wait so far is real either way
                if ticket.enqueued_at:
                    record.queue_wait = self.scheduler.now() - ticket.enqueued_at
            started = ticket.started_at
            try:
                response = await self._send(request, route, headers, data, retry=False)
            except UpstreamUnavailable as e:
                slot.release()
                if not e.reached and self.upstream.health is Health.DOWN:
                    continue  # Ollama is restarting: wait for it, keeping our place
                if e.reached and not retried:
                    retried = True  # a stale keep-alive connection, or a restart: once more
                    continue
                raise
            except BaseException:
                slot.release()
                raise
            finally:
                record.upstream_time = self.scheduler.now() - started
            return await self._relay(request, response, slot, record, started)

    @staticmethod
    def _not_whitelisted(record: RequestRecord, source: Source, ip: IPAddress | None) -> Forbidden:
        record.source, record.priority = source.name, source.priority
        record.refusal = "whitelist"
        return Forbidden(not_whitelisted(ip, source.name))

    async def _send(
        self,
        request: web.Request,
        route: Route,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterator[bytes] | None,
        *,
        retry: bool,
    ) -> aiohttp.ClientResponse:
        """Send upstream; with ``retry``, once more if Ollama hung up before answering."""
        send = self.upstream.send
        try:
            return await send(request.method, route.path, request.query_string, headers, data)
        except UpstreamUnavailable as e:
            if not (retry and e.reached):
                raise
        return await send(request.method, route.path, request.query_string, headers, data)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        slot: Held | None,
        record: RequestRecord,
        started: float,
    ) -> web.StreamResponse:
        """Stream Ollama's answer back unchanged; free the slot at its last byte."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers),
        )
        if upstream.content_length is not None and "chunked" not in upstream.headers.get(
            "Transfer-Encoding", ""
        ):
            response.content_length = upstream.content_length
        record.status = upstream.status
        if upstream.status >= 500:
            record.upstream_error = "status_5xx"
        tail = UsageTail() if slot is not None else None
        finished = False
        sent_end = b""  # the last bytes sent, to end a cut-off line before an error line
        send_timeout = self.live.settings.server.send_timeout
        try:
            await response.prepare(request)
            content = upstream.content
            while True:
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as e:
                    await self._fail_stream(request, response, upstream, record, e, sent_end)
                    return response
                if not chunk:
                    break
                if tail is not None:
                    tail.feed(chunk)
                await write_within(response, chunk, send_timeout, request.transport)
                record.bytes_out += len(chunk)
                sent_end = (sent_end + chunk)[-2:]
            finished = True
            upstream.release()  # the connection goes back to the pool before the slot is handed on
            if slot is not None:
                slot.release()
            record.upstream_time = self.scheduler.now() - started
            if tail is not None:
                record.usage = tail.usage()
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            if self.stopping and response.prepared:
                await self._end_for_shutdown(response, upstream, sent_end)
            raise
        except SendTimeout:
            record.error = f"client stopped reading for server.send_timeout ({send_timeout:g} s)"
            return response
        except ConnectionError:
            record.hung_up = True  # the write failed: the client is gone
            record.error = "client hung up"
            return response
        finally:
            if not finished:
                upstream.close()  # Ollama sees the hang-up and stops generating
            if slot is not None:
                slot.release()
            if not finished:  # cut short: the time until now (a clean end was timed above)
                record.upstream_time = self.scheduler.now() - started

    async def _end_for_shutdown(
        self, response: web.StreamResponse, upstream: aiohttp.ClientResponse, sent_end: bytes
    ) -> None:
        """The grace period is over: end the stream properly, with an error line if it can
        carry one, so the client sees a clean error rather than a broken connection."""
        upstream.close()
        line = stream_error_line(upstream.content_type, SHUTDOWN_MESSAGE, sent_end)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                if line is not None and response.content_length is None:
                    await response.write(line)
                await response.write_eof()

    async def _fail_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        record: RequestRecord,
        error: BaseException,
        sent_end: bytes,
    ) -> None:
        """Ollama broke off mid-stream: one error line in the stream's framing, then the end."""
        if isinstance(error, TimeoutError):
            message = (
                f"Ollama at {self.upstream.url} sent nothing for upstream.idle_timeout "
                f"({self.upstream.settings.idle_timeout:g} s)"
            )
            record.upstream_error = "timeout"
        else:
            message = f"Ollama at {self.upstream.url} broke off the response: {error}"
            record.upstream_error = "broke_off"
        record.error = message
        upstream.close()
        line = stream_error_line(upstream.content_type, message, sent_end)
        if line is None or response.content_length is not None:
            # No framing to carry an error (a JSON body of announced length): cut the
            # connection, so the client sees a truncated response rather than a short one.
            if request.transport is not None:
                request.transport.close()
            return
        with contextlib.suppress(ConnectionError):
            await response.write(line)
            record.bytes_out += len(line)
            await response.write_eof()
