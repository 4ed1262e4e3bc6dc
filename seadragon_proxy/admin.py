"""The proxy's own routes: the queue view (admin) and health. Admin needs the bearer token,
or, when none is configured, a loopback client; the answer otherwise is 403, never 401
(the Ollama CLI reads 401 as "sign in to ollama.com")."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from .exceptions import Forbidden
from .httputil import client_ip
from .scheduler import Scheduler, Ticket
from .typedefs import LIVE, SCHEDULER, UPSTREAM


def authorize(request: web.Request) -> None:
    """Raise ``Forbidden`` unless the request may use the admin routes."""
    settings = request.app[LIVE].settings
    token = settings.admin.token
    if token is not None:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token.reveal()}"
        # Hash both so the comparison takes the same time whatever the lengths.
        if not hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
        ):
            raise Forbidden(
                "admin routes need the header 'Authorization: Bearer <token>' with the token "
                f"from ${settings.admin.token_env}"
            )
        return
    ip = client_ip(request, settings)
    if ip is None or not ip.is_loopback:
        raise Forbidden(
            f"admin routes are open to loopback clients only until ${settings.admin.token_env} "
            "is set; set it and send 'Authorization: Bearer <token>'"
        )


def ticket_view(ticket: Ticket, scheduler: Scheduler, now: float) -> dict[str, object]:
    view: dict[str, object] = {
        "id": ticket.id,
        "source": ticket.source,
        "priority": ticket.priority,
        "path": ticket.path,
        "model": ticket.model,
        "client_ip": ticket.client_ip,
        "wait_time": round(ticket.waited(now), 3),
    }
    effective = scheduler.effective_priority(ticket, now)
    if effective != ticket.priority:
        view["effective_priority"] = round(effective, 3)
    return view


async def queue_view(request: web.Request) -> web.Response:
    authorize(request)
    scheduler = request.app[SCHEDULER]
    upstream = request.app[UPSTREAM]
    now = scheduler.now()
    processing = []
    for ticket in scheduler.running():
        view = ticket_view(ticket, scheduler, now)
        view["running_time"] = round(now - ticket.started_at, 3)
        processing.append(view)
    return web.json_response(
        {
            "queue_length": scheduler.queue_length,
            "in_flight": scheduler.in_flight,
            "slots": scheduler.slots,
            "processing": processing,
            "entries": [ticket_view(t, scheduler, now) for t in scheduler.queued()],
            "upstream": {"url": str(upstream.url), "health": upstream.health.value},
        }
    )


async def health_view(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    upstream = request.app[UPSTREAM]
    version = await upstream.probe(timeout=min(2.0, upstream.settings.connect_timeout))
    healthy = version is not None
    return web.json_response(
        {
            "status": "healthy" if healthy else "unhealthy",
            "ollama": {"reachable": healthy, "version": version},
            "queue_length": scheduler.queue_length,
            "in_flight": scheduler.in_flight,
        },
        status=200 if healthy else 503,
    )


async def admin_not_found(request: web.Request) -> web.Response:
    authorize(request)
    return web.json_response({"error": f"no admin route {request.path}"}, status=404)
