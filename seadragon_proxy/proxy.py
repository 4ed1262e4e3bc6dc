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
from dataclasses import replace

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
from .exceptions import (
    Forbidden,
    LoopDetected,
    NotFound,
    TenantLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .fleetmeta import SERVER_HEADER, fleet_metadata
from .httputil import (
    broke_off_words,
    client_ip,
    client_label,
    not_whitelisted,
    request_id,
    split_prefix,
)
from .keys import bearer
from .live import Live
from .logs import bind_request
from .netaddr import IPAddress
from .payload import JsonBody
from .policy import RequestFacts, Source
from .record import Recorder, RequestRecord
from .retryplace import Identity, RetryPlaces, identity
from .routes import Route, classify
from .scheduling import Place, Scheduler, Ticket
from .scheduling.queue import Held, Queue
from .settings import Settings
from .tenancy import Tenancy
from .upstream import Fleet, Health, Upstream, looped, request_headers, response_headers
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
        fleet: Fleet,
        recorder: Recorder,
        queue: Queue | None = None,
    ) -> None:
        self.live = live
        self.scheduler = scheduler  # the clock, and the queue with backend memory
        self.queue: Queue = scheduler if queue is None else queue  # where requests wait
        self.fleet = fleet
        self.recorder = recorder
        self.tenancy = Tenancy(scheduler)
        self.active: set[asyncio.Task[object]] = set()
        self.stopping = False
        self.bodies = BodyMemory(live.settings.server.max_body_memory)
        self.places: RetryPlaces[Place] = RetryPlaces(window=live.settings.queue.retry_window)
        self.parser = JsonParser()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        settings = self.live.settings
        prefix, path = split_prefix(request, settings.policy)
        route = classify(request.method, path)
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
                return await self._serve(request, settings, route, prefix, record, ip, hold)
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
            elif isinstance(e, TenantLimited):
                record.refusal = e.limit
            raise
        finally:
            self.active.discard(task)
            self.recorder.emit(record)

    async def _serve(
        self,
        request: web.Request,
        settings: Settings,  # read once per request: one consistent policy throughout
        route: Route,
        prefix: str | None,
        record: RequestRecord,
        ip: IPAddress | None,
        hold: Hold,
    ) -> web.StreamResponse:
        if looped(request.headers):
            raise LoopDetected(
                f"request loop: the upstream ({self.fleet.first_healthy().url}) leads back to "
                "this proxy; "
                "point it at Ollama"
            )
        on_list = ip is not None and ip in self.live.whitelist
        key = self.live.keys.identify(bearer(request.headers))
        record.api_key = key
        whitelisted = on_list or key is not None  # a known key proves who it is, as the list
        strip_token = key is not None  # the proxy's key, not Ollama's: never forwarded
        if route.manages_models:  # its own permission, decided before any body is read
            record.refusal = "manage_models"
            grant = check_manage_models(request.headers, ip, whitelisted, settings.admin)
            record.refusal = None
            strip_token = strip_token or grant == "token"
        facts = RequestFacts(
            ip, route.path, request.headers, None, whitelisted, prefix, key, on_list
        )
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
        facts = replace(facts, model=model)
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
        if strip_token:  # an API key or the admin token: the proxy's secrets, not Ollama's
            headers.popall("Authorization", None)
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            data = stream_body(request.content, settings.server.body_timeout)
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        if not route.queued:
            if not route.changes_models:
                return await self._forward(request, route, record, headers, body, data)
            self.fleet.begin_change()  # the model list is in doubt until it is over
            try:
                return await self._forward(request, route, record, headers, body, data)
            finally:
                self.fleet.end_change(record.status is not None and record.status < 400)
        if not self.scheduler.serves(model) and not self.fleet.changing:
            await self.fleet.refresh_recent()  # it may have been pulled since the last read
            if not self.scheduler.serves(model):
                record.refusal = "unknown_model"
                raise NotFound(f"model '{model}' not found")
        ticket = Ticket(
            id=record.id,
            source=source.name,
            priority=source.priority,
            path=route.path,
            model=model,
            client_ip=record.client_ip,
            max_wait=source.max_wait,
        )
        try:
            self.tenancy.admit(ticket, source, request.headers, len(body or b""))
        finally:
            record.tenant = ticket.tenant
        record.queued = True
        places = self.places
        places.window = settings.queue.retry_window
        # The same request again (client, source, route, body): known only for a known client
        # with a body, and hashed only when needed — a place is kept, or one is to be.
        same: Identity | None = None
        recognisable = body is not None and ip is not None
        if places and recognisable:
            same = identity(record.client_ip, source.name, route.path, body or b"")
            place = places.take(same, self.scheduler.now())
            if place is not None and ticket.resume(place):
                record.rejoined = True  # a retry of a request that hung up: its old place
        retried = False
        while True:
            try:
                slot = await self.queue.acquire(ticket)
            except asyncio.CancelledError:
                record.left_queue = True  # hung up (or shutdown) while waiting for its turn
                if places.window and recognisable and not self.stopping:
                    if same is None:
                        same = identity(record.client_ip, source.name, route.path, body or b"")
                    places.remember(same, ticket.place(), self.scheduler.now())
                raise
            finally:  # served, refused, timed out or gone: the wait so far is real either way
                if ticket.enqueued_at:
                    record.queue_wait = self.scheduler.now() - ticket.enqueued_at
            started = ticket.started_at
            upstream = self.fleet.get(slot.server_name)
            record.server, record.swapped = upstream.name, ticket.swapped
            try:
                response = await self._send(upstream, request, route, headers, data, retry=False)
            except UpstreamUnavailable as e:
                slot.release(0.0 if not e.reached else None)  # unreached: it cost nothing
                if not e.reached and upstream.health is Health.DOWN:
                    continue  # that server is restarting: keep our place, maybe go elsewhere
                if e.reached and not retried:
                    retried = True  # a stale keep-alive connection, or a restart: once more
                    continue
                raise
            except BaseException:
                slot.release()
                raise
            finally:
                record.upstream_time = self.scheduler.now() - started
            try:
                return await self._relay(request, upstream, response, slot, record, started)
            finally:
                record.swapped = ticket.swapped  # a load seen in load_duration counts too
                if ticket.swapped:
                    self.fleet.loaded()

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        record: RequestRecord,
        headers: CIMultiDict[str],
        body: bytes | None,
        data: bytes | AsyncIterator[bytes] | None,
    ) -> web.StreamResponse:
        """A route that is not queued: sent at once, to the first healthy server (or, with
        several, as fleetmeta.py says)."""
        if len(self.fleet.servers) > 1:  # tags/ps as unions, show, pull onto each, one for the rest
            answer = await fleet_metadata(
                request, self.fleet.servers, self.fleet.session, body=body, headers=headers
            )
            if answer is not None:
                record.server = answer.headers.get(SERVER_HEADER)
                record.status = answer.status
                return answer
        upstream = self.fleet.first_healthy()
        record.server = upstream.name
        started = self.scheduler.now()
        try:
            response = await self._send(
                upstream, request, route, headers, data, retry=body is not None
            )
        finally:
            record.upstream_time = self.scheduler.now() - started
        return await self._relay(request, upstream, response, None, record, started)

    @staticmethod
    def _not_whitelisted(record: RequestRecord, source: Source, ip: IPAddress | None) -> Forbidden:
        record.source, record.priority = source.name, source.priority
        record.refusal = "whitelist"
        return Forbidden(not_whitelisted(ip, source.name))

    async def _send(
        self,
        upstream: Upstream,
        request: web.Request,
        route: Route,
        headers: CIMultiDict[str],
        data: bytes | AsyncIterator[bytes] | None,
        *,
        retry: bool,
    ) -> aiohttp.ClientResponse:
        """Send upstream; with ``retry``, once more if Ollama hung up before answering."""
        send = upstream.send
        try:
            return await send(request.method, route.path, request.query_string, headers, data)
        except UpstreamUnavailable as e:
            if not (retry and e.reached):
                raise
        return await send(request.method, route.path, request.query_string, headers, data)

    async def _relay(
        self,
        request: web.Request,
        server: Upstream,
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
                    await self._fail_stream(
                        request, server, response, upstream, record, e, sent_end
                    )
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
            if tail is not None:
                record.usage = tail.usage()
                usage = record.usage
                if slot is not None and usage is not None and usage.load_duration_ns:
                    slot.report_load(usage.load_duration_ns / 1e9)  # teaches the swap cost
            if slot is not None:  # the real cost corrects the estimate it was charged
                output_weight = self.live.settings.queue.output_weight
                charge = self.tenancy.cost(record.usage, output_weight)
                slot.release(charge)
                self.tenancy.used(slot.ticket, record.usage, charge)
            record.upstream_time = self.scheduler.now() - started
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
        server: Upstream,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        record: RequestRecord,
        error: BaseException,
        sent_end: bytes,
    ) -> None:
        """Ollama broke off mid-stream: one error line in the stream's framing, then the end."""
        if isinstance(error, TimeoutError):
            message = (
                f"Ollama at {server.url} sent nothing for upstream.idle_timeout "
                f"({server.settings.idle_timeout:g} s)"
            )
            record.upstream_error = "timeout"
        else:
            message = f"Ollama at {server.url} {broke_off_words(error)}"
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
