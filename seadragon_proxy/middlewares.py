"""Middlewares: domain errors become HTTP answers here and only here; CORS is decided here
(the admin API, /metrics and the dashboard by ``admin.allow_origins`` only)."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from .audit import audit_note
from .exceptions import RequestError
from .httputil import (
    REQUEST_ID,
    client_ip,
    client_label,
    error_response,
    request_id,
    split_prefix,
    wants_openai_errors,
)
from .logs import bind_request
from .policy import Glob
from .record import RequestRecord
from .routes import canonical_path, is_admin_surface
from .settings import CorsSettings
from .typedefs import LIVE, RECORDER

log = structlog.get_logger("seadragon.http")

# Ollama's default OLLAMA_ORIGINS (envconfig/config.go), as globs.
OLLAMA_DEFAULT_ORIGINS = tuple(
    Glob.compile(pattern)
    for host in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
    for scheme in ("http", "https")
    for pattern in (f"{scheme}://{host}", f"{scheme}://{host}:*")
) + tuple(
    Glob.compile(f"{scheme}://*")
    for scheme in ("app", "file", "tauri", "vscode-webview", "vscode-file")
)

ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH"
DEFAULT_ALLOW_HEADERS = "Authorization, Content-Type, User-Agent, Accept, X-Requested-With"


def origin_allowed(origin: str, cors: CorsSettings) -> bool:
    origin = origin.rstrip("/")
    if any(glob.matches(origin) for glob in cors.allow_origins):
        return True
    return cors.allow_ollama_defaults and any(g.matches(origin) for g in OLLAMA_DEFAULT_ORIGINS)


def request_origin_allowed(request: web.Request, origin: str) -> bool:
    """Ollama routes: ``cors.*``. The admin API, /metrics and the dashboard: only
    ``admin.allow_origins`` and the proxy's own page (Origin's host:port is the request's
    Host, which the Host check has already accepted)."""
    settings = request.app[LIVE].settings
    if not is_admin_surface(request.path):
        return origin_allowed(origin, settings.cors)
    origin = origin.rstrip("/")
    if any(glob.matches(origin) for glob in settings.admin.allow_origins):
        return True
    host = request.headers.get("Host")
    own = origin.partition("://")[2]
    return host is not None and own.lower() == host.strip().lower()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """RequestErrors become Ollama-shaped (or OpenAI-shaped on /v1) answers; anything
    unexpected is logged and becomes a 500 in the same shape, never a crash."""
    try:
        return await handler(request)
    except RequestError as e:
        response = error_response(e, openai=_openai(request))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        error = RequestError("seadragon-proxy hit an internal error; see its log")
        response = error_response(error, openai=_openai(request))
    if not request.content.is_eof():
        # Refused before its body was read (413, 408, a 403 on an upload): close rather
        # than wait for, or read, the rest of whatever the client is still sending.
        response.force_close()
    return response


def _openai(request: web.Request) -> bool:
    """Errors in OpenAI's shape on ``/v1``, under a source prefix too (an app without the
    proxy's settings, such as a test's, has no prefixes)."""
    live = request.app.get(LIVE)
    if live is None:
        return wants_openai_errors(request.path)
    return wants_openai_errors(split_prefix(request, live.settings.policy)[1])


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """First of all: every request gets its id before anything can answer it."""
    request_id(request)
    return await handler(request)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Preflights are answered here; a browser Origin that is not allowed gets Ollama's
    answer to it: 403 with an empty body (logged and counted like any refusal)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    if not request_origin_allowed(request, origin):
        if is_admin_surface(request.path):
            audit_note(request, refused="origin")  # the audit line, not a request record
        else:
            _record_refused_origin(request, origin)
        return web.Response(status=403)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        requested = request.headers.get("Access-Control-Request-Headers")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": requested or DEFAULT_ALLOW_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )
    return await handler(request)


def _record_refused_origin(request: web.Request, origin: str) -> None:
    settings = request.app[LIVE].settings
    record = RequestRecord(
        id=request_id(request),
        method=request.method,
        route=canonical_path(split_prefix(request, settings.policy)[1]),
        client_ip=client_label(client_ip(request, settings)),
        status=403,
        refusal="origin",
        error=f"browser origin {origin[:200]!r} is not allowed (cors.allow_origins)",
        user_agent=request.headers.get("User-Agent"),
    )
    bind_request(request_id=record.id, client_ip=record.client_ip)
    request.app[RECORDER].emit(record)


async def answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``, just before any answer's headers go out (streams included):
    the request id, and the CORS headers for an allowed browser origin."""
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    origin = request.headers.get("Origin")
    if origin is not None and request_origin_allowed(request, origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        response.headers.add("Vary", "Origin")
