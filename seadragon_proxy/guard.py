"""The ``Host`` check (DNS rebinding) in front of the operator routes — admin API,
``/metrics``, the dashboard — and the model-management routes; 403 for any other name."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from .audit import audit_note
from .exceptions import Forbidden
from .hostcheck import host_allowed, refused_message
from .httputil import client_ip, client_label, error_response, request_id, split_prefix
from .logs import bind_request
from .record import RequestRecord
from .routes import canonical_path, is_admin_surface, manages_models
from .typedefs import LIVE, RECORDER


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[LIVE].settings
    path = request.path
    admin = is_admin_surface(path)
    if not admin and not manages_models(canonical_path(split_prefix(request, settings.policy)[1])):
        return await handler(request)  # inference and metadata: any Host (LAN names, IPs)
    host = request.headers.get("Host")
    if host_allowed(host, settings.server.host, settings.server.allowed_hosts):
        return await handler(request)
    assert host is not None
    message = refused_message(host)
    audit_note(request, refused="host")
    if not admin:
        _record_refused_host(request, message)
    response = error_response(Forbidden(message), openai=False)
    if not request.content.is_eof():
        response.force_close()  # never read the upload of a refused request
    return response


def _record_refused_host(request: web.Request, message: str) -> None:
    settings = request.app[LIVE].settings
    record = RequestRecord(
        id=request_id(request),
        method=request.method,
        route=canonical_path(split_prefix(request, settings.policy)[1]),
        client_ip=client_label(client_ip(request, settings)),
        status=403,
        refusal="host",
        error=message,
        user_agent=request.headers.get("User-Agent"),
    )
    bind_request(request_id=record.id, client_ip=record.client_ip)
    request.app[RECORDER].emit(record)
