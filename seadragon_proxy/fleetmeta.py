"""Ollama's metadata and model-management routes across a fleet of servers.

``fleet_metadata(request, servers, session)`` answers ``/api/tags`` and ``/api/ps`` (the
union over the healthy servers), ``/api/show`` (from a server that has the model),
``/api/pull`` (onto every server allowed to serve the model, see fleetpull.py) and sends
push, create, copy, delete and blobs to one server; it returns None for any other route.
Which server answers what is docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .exceptions import BadRequest, NotFound, RequestError, UpstreamTimeout, UpstreamUnavailable
from .routes import BLOBS_PREFIX, canonical_path
from .upstream import request_headers, response_headers

SERVER_HEADER = "X-Seadragon-Server"  # names the server to use; set on the answer too
SERVER_FIELD = "server"  # the extra field of each /api/ps entry
ONE_SERVER = frozenset({"/api/push", "/api/create", "/api/copy", "/api/delete"})


class FleetServer(Protocol):
    """What this module needs to know of one Ollama server of the fleet."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str | URL: ...  # a base path, if any, is kept: ``<url>/api/tags``
    @property
    def healthy(self) -> bool: ...
    def allows(self, model: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what is asked of each server."""

    max_answer: int = 16 * 1024 * 1024  # bytes of one buffered JSON answer (tags, ps, show)
    timeout: float = 30.0  # seconds for one buffered answer, connecting included
    connect: float = 5.0  # seconds to connect, for streamed routes
    idle: float = 300.0  # seconds of silence a streamed route (pull, push, blobs) may have
    max_line: int = 64 * 1024  # bytes of one progress line of a pull


class ServerFailed(Exception):
    """One server could not give an answer; the message names it."""

    def __init__(self, server: str, message: str, *, status: int = 502) -> None:
        super().__init__(f"{server}: {message}")
        self.server = server
        self.status = status


async def fleet_metadata(
    request: web.Request,
    servers: Sequence[FleetServer],
    session: aiohttp.ClientSession,
    *,
    body: bytes | None = None,
    headers: CIMultiDict[str] | None = None,
    limits: Limits = Limits(),
) -> web.StreamResponse | None:
    """The answer for a metadata route, or None when ``request`` is not one.

    ``body``: the request body if the caller has read it already; ``headers``: what to send
    upstream (default: the client's, hop-by-hop and ``X-Seadragon-Server`` removed).
    Errors are raised as ``RequestError`` (the proxy's error middleware renders them).
    """
    path, method = canonical_path(request.path), request.method
    if path.startswith(BLOBS_PREFIX) and method in ("HEAD", "POST"):
        pass
    elif (method, path) not in _ROUTES:
        return None
    if headers is None:
        headers = request_headers(request.headers)
    headers.popall(SERVER_HEADER, None)
    named = _named(request, servers)
    fleet = Fleet(session, headers, limits)
    if method == "GET" and path == "/api/tags":
        return await fleet.tags(servers if named is None else [named])
    if method == "GET" and path == "/api/ps":
        return await fleet.ps(servers if named is None else [named])
    raw = None if path.startswith(BLOBS_PREFIX) else body or await _read(request, limits)
    doc = None if raw is None else _json(raw)
    model = _model_of(path, doc)
    if path == "/api/show":
        return await fleet.show(_candidates(servers, named, model), model, doc)
    if path == "/api/pull":
        from .fleetpull import pull  # the one route that fans out a stream

        return await pull(request, fleet, _candidates(servers, named, model), model, doc)
    server = _candidates(servers, named, model)[0]
    return await fleet.forward(request, server, path, raw)


_ROUTES = frozenset(
    {("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show"), ("POST", "/api/pull")}
    | {("POST", p) for p in ONE_SERVER - {"/api/delete"}}
    | {("DELETE", "/api/delete")}
)


def endpoint(server: FleetServer, path: str) -> str:
    """``path`` on ``server`` (its URL may be a str or a yarl URL, with a base path)."""
    return str(server.url).rstrip("/") + path


def _named(request: web.Request, servers: Sequence[FleetServer]) -> FleetServer | None:
    name = request.headers.get(SERVER_HEADER)
    if name is None:
        return None
    for server in servers:
        if server.name == name.strip():
            return server
    valid = ", ".join(s.name for s in servers)
    raise BadRequest(f"{SERVER_HEADER}: no server is named {name.strip()!r}; the servers: {valid}")


def _candidates(
    servers: Sequence[FleetServer], named: FleetServer | None, model: str | None
) -> list[FleetServer]:
    """The servers to try, in order: the named one, else the healthy ones allowed ``model``."""
    if named is not None:
        if model is not None and not named.allows(model):
            raise NotFound(f"model '{model}' is not one server {named.name!r} may serve")
        return [named]
    allowed = [s for s in servers if model is None or s.allows(model)]
    if not allowed:
        raise NotFound(f"model '{model}' not found")  # Ollama's 404: no server may serve it
    healthy = [s for s in allowed if s.healthy]
    if not healthy:
        names = ", ".join(s.name for s in allowed)
        raise UpstreamUnavailable(f"no healthy Ollama server to ask (tried: {names})")
    return healthy


def _model_of(path: str, doc: dict[str, Any] | None) -> str | None:
    if doc is None:
        return None
    key = ("source",) if path == "/api/copy" else ("model", "name")
    value = next((doc[k] for k in key if doc.get(k)), None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"invalid model: expected a string, got {type(value).__name__}")
    return value


async def _read(request: web.Request, limits: Limits) -> bytes:
    if request.content_length is not None and request.content_length > limits.max_answer:
        raise BadRequest(f"request body over {limits.max_answer} bytes")
    data = await request.content.read(limits.max_answer + 1)
    if len(data) > limits.max_answer:
        raise BadRequest(f"request body over {limits.max_answer} bytes")
    return data


def _json(data: bytes) -> dict[str, Any]:
    if not data:
        raise BadRequest("missing request body")
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("invalid JSON: expected an object")
    return doc


def json_answer(doc: object, status: int = 200, server: str | None = None) -> web.Response:
    response = web.Response(
        status=status,
        body=json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(),
        content_type="application/json",
        charset="utf-8",
    )
    if server is not None:
        response.headers[SERVER_HEADER] = server
    return response


class Fleet:
    """Asks the servers, bounded: one instance per request."""

    def __init__(
        self, session: aiohttp.ClientSession, headers: CIMultiDict[str], limits: Limits
    ) -> None:
        self.session = session
        self.headers = headers
        self.limits = limits

    async def ask(
        self, server: FleetServer, method: str, path: str, doc: object = None
    ) -> tuple[int, Any]:
        """One buffered JSON answer: (status, parsed body); ServerFailed if there is none."""
        timeout = aiohttp.ClientTimeout(total=self.limits.timeout)
        data = None if doc is None else json.dumps(doc).encode()
        headers = self.headers.copy()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method, endpoint(server, path), data=data, headers=headers, timeout=timeout
            ) as r:
                raw = await r.content.read(self.limits.max_answer + 1)
                if len(raw) > self.limits.max_answer:
                    raise ServerFailed(server.name, f"answer over {self.limits.max_answer} bytes")
                try:
                    return r.status, json.loads(raw)
                except ValueError:
                    text = raw[:200].decode(errors="replace")
                    message = f"not JSON (status {r.status}): {text!r}"
                    raise ServerFailed(server.name, message) from None
        except TimeoutError:
            message = f"no answer in {self.limits.timeout:g} s"
            raise ServerFailed(server.name, message, status=504) from None
        except aiohttp.ClientError as e:
            raise ServerFailed(server.name, f"unreachable: {e}") from None

    async def _each(
        self, servers: Sequence[FleetServer], path: str
    ) -> list[tuple[FleetServer, list[dict[str, Any]]]]:
        """``models`` of each healthy server that answers; 502 if none does."""
        healthy = [s for s in servers if s.healthy]
        answers = await asyncio.gather(
            *(self.ask(s, "GET", path) for s in healthy), return_exceptions=True
        )
        out, failures = [], []
        for server, answer in zip(healthy, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, ServerFailed):
                    raise answer
                failures.append(str(answer))
                continue
            status, doc = answer
            models = doc.get("models") if isinstance(doc, dict) else None
            if status != 200 or not isinstance(models, list):
                failures.append(f"{server.name}: status {status} without a model list")
                continue
            out.append((server, [m for m in models if isinstance(m, dict)]))
        if not out:
            why = "; ".join(failures) or "none is healthy"
            raise UpstreamUnavailable(f"no Ollama server answered {path}: {why}")
        return out

    async def tags(self, servers: Sequence[FleetServer]) -> web.Response:
        seen: set[str] = set()
        models = []
        for server, entries in await self._each(servers, "/api/tags"):
            for entry in entries:
                name = str(entry.get("name") or entry.get("model") or "")
                if name and name not in seen and server.allows(name):
                    seen.add(name)
                    models.append(entry)
        return json_answer({"models": models})

    async def ps(self, servers: Sequence[FleetServer]) -> web.Response:
        models = [
            entry | {SERVER_FIELD: server.name}
            for server, entries in await self._each(servers, "/api/ps")
            for entry in entries
        ]
        return json_answer({"models": models})

    async def show(
        self, servers: Sequence[FleetServer], model: str | None, doc: dict[str, Any] | None
    ) -> web.Response:
        """The first server that has the model answers; Ollama's 404 if none has it."""
        failures: list[ServerFailed] = []
        last_404: Any = None
        for server in servers:
            try:
                status, answer = await self.ask(server, "POST", "/api/show", doc)
            except ServerFailed as e:
                failures.append(e)
                continue
            if status == 404:
                last_404 = answer
                continue
            return json_answer(answer, status, server.name)
        if last_404 is not None or not failures:
            return json_answer(last_404 or {"error": f"model '{model}' not found"}, 404)
        raise _as_error(failures)

    async def forward(
        self, request: web.Request, server: FleetServer, path: str, data: bytes | None
    ) -> web.StreamResponse:
        """Send the request to one server and stream its answer back unchanged."""
        headers = self.headers.copy()
        body: bytes | AsyncIterator[bytes] | None = data
        if data is None and request.body_exists:
            body = request.content.iter_any()
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.limits.connect, sock_read=self.limits.idle
        )
        url = endpoint(server, path)
        url += f"?{request.query_string}" if request.query_string else ""
        response: web.StreamResponse | None = None
        try:
            async with self.session.request(
                request.method, url, data=body, headers=headers, timeout=timeout
            ) as upstream:
                response = web.StreamResponse(
                    status=upstream.status, headers=response_headers(upstream.headers)
                )
                response.headers[SERVER_HEADER] = server.name
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientError) as e:
            if response is not None:  # headers are out: cut the answer, as Ollama failing would
                response.force_close()
                return response
            if isinstance(e, TimeoutError):
                message = f"{server.name}: sent nothing for {self.limits.idle:g} s"
                raise UpstreamTimeout(message) from None
            raise UpstreamUnavailable(f"{server.name} ({server.url}) is unreachable: {e}") from None


def _as_error(failures: Sequence[ServerFailed]) -> RequestError:
    message = "; ".join(str(f) for f in failures)
    if all(f.status == 504 for f in failures):
        return UpstreamTimeout(message)
    return UpstreamUnavailable(message)
