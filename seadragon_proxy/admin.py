"""The proxy's own routes: health, and the admin API — queue, whitelist, stats, time series,
metrics. Admin needs the bearer token or, when none is configured, a loopback client; the
answer otherwise is 403, never 401 (the Ollama CLI reads 401 as "sign in to ollama.com")."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

from .adminauth import admin_grant
from .audit import audit_note
from .exceptions import BadRequest, DatabaseError, Forbidden, NotFound, Unavailable
from .history import History, parse_since, summarize, timeseries
from .httputil import client_ip
from .scheduling import Scheduler, Ticket
from .typedefs import HISTORY, LIVE, METRICS, REPLICA, SCHEDULER, UPSTREAM


def authorize(request: web.Request, *, metrics: bool = False) -> None:
    """Raise ``Forbidden`` unless the request may use the admin routes (or, with
    ``metrics``, /metrics, which the read-only metrics token also opens)."""
    settings = request.app[LIVE].settings
    ip = client_ip(request, settings)
    try:
        granted = admin_grant(request.headers, ip, settings.admin, metrics=metrics)
    except Forbidden as e:
        audit_note(request, refused="not_admin")
        raise e from None
    audit_note(request, granted_by=granted)


def ticket_view(
    ticket: Ticket, scheduler: Scheduler, now: float, *, waiting: bool = True
) -> dict[str, object]:
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
    if waiting and effective != ticket.priority:  # aging only matters while in line
        view["effective_priority"] = round(effective, 3)
    return view


async def queue_view(request: web.Request) -> web.Response:
    authorize(request)
    if request.app[REPLICA] is not None:
        return await _shared_queue_view(request)
    scheduler = request.app[SCHEDULER]
    upstream = request.app[UPSTREAM]
    now = scheduler.now()
    processing = []
    for ticket in scheduler.running():
        view = ticket_view(ticket, scheduler, now, waiting=False)
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


async def _shared_queue_view(request: web.Request) -> web.Response:
    """``queue.backend: redis``: every replica's waiters and running requests, read from
    their ticket records in Redis, each with its replica name."""
    from .replicas.replica import record_view, wall_now

    replica = request.app[REPLICA]
    assert replica is not None
    settings = request.app[LIVE].settings
    upstream = request.app[UPSTREAM]
    records = await replica.records()
    now = wall_now()
    aging = settings.queue.aging

    def effective(priority: int, queued_at: float) -> float:
        return priority - (now - queued_at) / aging if aging else float(priority)

    waiting = sorted(
        (r for r in records if r.state == "queued"),
        key=lambda r: (effective(r.priority, r.queued_at), r.seq),
    )
    entries = []
    for record in waiting:
        view = record_view(record, now)
        if aging:
            view["effective_priority"] = round(effective(record.priority, record.queued_at), 3)
        entries.append(view)
    processing = [record_view(r, now) for r in records if r.state == "running"]
    return web.json_response(
        {
            "queue_length": len(entries),
            "in_flight": len(processing),
            "slots": settings.upstream.slots,
            "replica": replica.link.replica,
            "dispatcher": replica.dispatcher.leading,
            "processing": processing,
            "entries": entries,
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


# -- whitelist ---------------------------------------------------------------------------------


async def _json_object(request: web.Request) -> dict[str, object]:
    try:
        doc = await request.json(loads=json.loads)
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


def _network_field(doc: dict[str, object]) -> str:
    network = doc.get("network")
    if not isinstance(network, str) or not network.strip():
        raise BadRequest('give "network": an address (10.0.0.7) or a network (10.0.0.0/8)')
    return network


async def whitelist_view(request: web.Request) -> web.Response:
    """GET the list; POST ``{"network", "note"}`` to add; DELETE ``{"network"}`` to remove.
    Changes apply to the running proxy before the answer is sent."""
    authorize(request)
    live = request.app[LIVE]
    try:
        if request.method == "GET":
            entries = await live.store.entries()
            return web.json_response({"entries": [asdict(e) for e in entries]})
        doc = await _json_object(request)
        network = _network_field(doc)
        try:
            if request.method == "POST":
                note = doc.get("note", "")
                if not isinstance(note, str) or len(note) > 500:
                    raise BadRequest('"note" must be text of at most 500 characters')
                normal, added = await live.store.add(network, note)
                answer: dict[str, object] = {"network": normal, "added": added}
            else:
                normal, removed = await live.store.remove(network)
                if not removed:
                    raise NotFound(f"{normal} is not on the whitelist")
                answer = {"network": normal, "removed": True}
        except ValueError as e:
            raise BadRequest(str(e)) from None
    except DatabaseError as e:
        raise Unavailable(str(e)) from e
    await live.reload_whitelist()
    return web.json_response(answer)


# -- history -----------------------------------------------------------------------------------


def _history(request: web.Request) -> History:
    history = request.app[HISTORY]
    if history is None:
        raise NotFound("request history is off (history.enabled: false)")
    return history


async def stats_view(request: web.Request) -> web.Response:
    """Per source and per model since ``?since=`` (``24h``, ``7d``, an ISO time; default 24h)."""
    authorize(request)
    history = _history(request)
    try:
        since = parse_since(request.query.get("since", "24h"))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    await history.flush()
    try:
        summary = await summarize(history.path, since)
    except DatabaseError as e:
        raise Unavailable(str(e)) from e
    return web.json_response(summary.as_dict())


def _bounded_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}")
    return int(raw)


async def timeseries_view(request: web.Request) -> web.Response:
    """Per source, per ``step`` seconds over the last ``minutes``: requests, waits, tokens."""
    authorize(request)
    history = _history(request)
    minutes = _bounded_int(request, "minutes", 60, 1, 24 * 60)
    step = _bounded_int(request, "step", 60, 5, 3600)
    await history.flush()
    # Buckets start at whole multiples of the step, so they stay put between refreshes.
    since = math.floor((time.time() - minutes * 60) / step) * step
    try:
        series = await timeseries(history.path, since, step)
    except DatabaseError as e:
        raise Unavailable(str(e)) from e
    return web.json_response({"since": since, "step": step, "series": series})


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text format: the admin routes' access rule, or the metrics token."""
    authorize(request, metrics=True)
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})
