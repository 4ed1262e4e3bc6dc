"""One audit line per admin request (``/api/admin/*``, ``/metrics``), allowed or refused:
who asked, the method, route and status, how it was let in or why it was refused."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from .httputil import client_ip, client_label, request_id
from .logs import bind_request
from .textsafe import excerpt
from .typedefs import LIVE

log = structlog.get_logger("seadragon.audit")


@dataclass(slots=True)
class AuditNote:
    granted_by: str | None = None  # token, metrics_token, loopback
    refused: str | None = None  # host, origin, not_admin


AUDIT = web.RequestKey("admin_audit", AuditNote)


def is_admin_api(path: str) -> bool:
    return path in ("/metrics", "/api/admin") or path.startswith("/api/admin/")


def audit_note(
    request: web.Request, *, granted_by: str | None = None, refused: str | None = None
) -> None:
    """Called where the decision is taken (the Host check, CORS, the token check)."""
    if AUDIT not in request:
        request[AUDIT] = AuditNote()
    note = request[AUDIT]
    note.granted_by = granted_by or note.granted_by
    note.refused = refused or note.refused


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside every other check, so refusals by the Host check and CORS are logged too."""
    if not is_admin_api(request.path):
        return await handler(request)
    request[AUDIT] = note = AuditNote()
    status: int | None = None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        ip = client_label(client_ip(request, request.app[LIVE].settings))
        bind_request(request_id=request_id(request), client_ip=ip)
        refused = note.refused if status is None or status >= 400 else None
        fields: dict[str, object] = {
            "method": excerpt(request.method, 20),
            "route": excerpt(request.path, 200),
            "status": status,
            "granted_by": note.granted_by,
        }
        if refused:
            fields["refused"] = refused
        if status is None:
            fields["hung_up"] = True
        origin = request.headers.get("Origin")
        if origin is not None:
            fields["origin"] = excerpt(origin, 200)
        (log.warning if refused else log.info)("admin_request", **fields)
