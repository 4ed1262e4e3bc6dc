"""Middlewares: domain errors become HTTP answers here and only here; CORS is decided here."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from .exceptions import RequestError
from .httputil import REQUEST_ID, error_response, wants_openai_errors
from .policy import Glob
from .settings import CorsSettings
from .typedefs import LIVE

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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """RequestErrors become Ollama-shaped (or OpenAI-shaped on /v1) answers; anything
    unexpected is logged and becomes a 500 in the same shape, never a crash."""
    try:
        return await handler(request)
    except RequestError as e:
        response = error_response(e, openai=wants_openai_errors(request.path))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        error = RequestError("seadragon-proxy hit an internal error; see its log")
        response = error_response(error, openai=wants_openai_errors(request.path))
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    if not request.content.is_eof():
        # Refused before its body was read (413, 408, a 403 on an upload): close rather
        # than wait for, or read, the rest of whatever the client is still sending.
        response.force_close()
    return response


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Preflights are answered here; a browser Origin that is not allowed gets Ollama's
    answer to it: 403 with an empty body."""
    origin = request.headers.get("Origin")
    if origin is None:
        return await handler(request)
    if not origin_allowed(origin, request.app[LIVE].settings.cors):
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


async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs just before headers go out, streams included."""
    origin = request.headers.get("Origin")
    if origin is not None and origin_allowed(origin, request.app[LIVE].settings.cors):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        response.headers.add("Vary", "Origin")
