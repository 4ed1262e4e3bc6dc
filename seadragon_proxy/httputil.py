"""Small aiohttp helpers shared by the handlers: who the client is, request ids, error bodies,
upstream failures in words."""

from __future__ import annotations

import errno
import itertools
import json
import re
import secrets

import aiohttp
from aiohttp import web

from .exceptions import RequestError
from .netaddr import IPAddress, client_address
from .policy import Policy
from .settings import Settings

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
REQUEST_ID = web.RequestKey("request_id", str)  # the id this request is logged under
# (source prefix or None, the path without it): split once, so every layer agrees.
UNDER_PREFIX: web.RequestKey[tuple[str | None, str]] = web.RequestKey("under_prefix")


UNKNOWN_CLIENT = "unknown"  # how a client whose address cannot be told is logged and shown


def client_ip(request: web.Request, settings: Settings) -> IPAddress | None:
    """The TCP peer, or the right-most untrusted X-Forwarded-For hop behind a trusted proxy;
    ``None`` (unknown: never whitelisted, never admin) when a trusted proxy's header cannot
    be read."""
    return client_address(
        request.remote,
        request.headers.getall("X-Forwarded-For", ()),
        settings.server.trusted_proxies,
    )


def split_prefix(request: web.Request, policy: Policy) -> tuple[str | None, str]:
    """The ``match.path_prefix`` the request came under (or ``None``) and its path without
    it (``/s/coding/v1/models`` → ``/v1/models``), worked out once per request."""
    if UNDER_PREFIX not in request:
        request[UNDER_PREFIX] = policy.split_path(request.path)
    return request[UNDER_PREFIX]


def client_label(ip: IPAddress | None) -> str:
    return UNKNOWN_CLIENT if ip is None else str(ip)


def not_whitelisted(ip: IPAddress | None, source: str) -> str:
    """The 403 message for a client the whitelist does not admit to ``source``."""
    if ip is None:
        return (
            f"the client's address is unknown (a trusted proxy sent an X-Forwarded-For "
            f"entry that is not an address), and source {source!r} requires the whitelist"
        )
    return (
        f"client {ip} is not on the whitelist and sent no known API key, which source "
        f"{source!r} requires (an administrator can run: seadragon-proxy whitelist add {ip}, "
        "or give it a key with: seadragon-proxy keys add NAME)"
    )


_PROCESS = secrets.token_hex(4)  # unique across restarts; the counter within a process
_COUNTER = itertools.count(1)


def request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else a fresh one. Assigned once
    per request (``request_id_middleware``) and echoed on every answer."""
    if REQUEST_ID not in request:
        given = request.headers.get("X-Request-Id", "")
        fresh = given if _REQUEST_ID.match(given) else f"{_PROCESS}{next(_COUNTER):08x}"
        request[REQUEST_ID] = fresh
    return request[REQUEST_ID]


def wants_openai_errors(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(error: RequestError, *, openai: bool) -> bytes:
    if openai:
        doc: object = {
            "error": {
                "message": error.message,
                "type": error.openai_type,
                "param": None,
                "code": None,
            }
        }
    else:
        doc = {"error": error.message}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(error: RequestError, *, openai: bool) -> web.Response:
    response = web.Response(
        status=error.status,
        body=error_body(error, openai=openai),
        content_type="application/json",
        charset="utf-8",
    )
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def broke_off_words(error: BaseException) -> str:
    """How Ollama ended a stream early, in words: aiohttp's own text
    (``TransferEncodingError: 400, message='Not enough data…'``) means nothing to a user."""
    if isinstance(error, aiohttp.ClientOSError) and error.errno == errno.ECONNRESET:
        how = "reset the connection"
    elif isinstance(
        error, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
    ):
        how = "closed the connection"
    else:
        how = f"broke off ({type(error).__name__})"
    return (
        f"{how} before the answer was complete; it may have crashed, run out of memory "
        "or been restarted (see Ollama's log)"
    )
