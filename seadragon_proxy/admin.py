"""The proxy's own routes: health, and the admin API — queue, whitelist, API keys, stats,
time series, metrics. Admin needs the bearer token or, when none is configured, a loopback
client; the answer otherwise is 403, never 401 (the Ollama CLI reads 401 as "sign in to
ollama.com")."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

from .adminauth import admin_grant
from .audit import audit_note
from .exceptions import (
    BadRequest,
    Conflict,
    DatabaseError,
    Forbidden,
    NotFound,
    Unavailable,
)
from .history import History, parse_since, summarize, timeseries
from .httputil import client_ip
from .rulesfile import KEY_NAME
from .scheduling import Scheduler, Ticket, servers_view
from .tenancy import Tenancy
from .typedefs import (
    FLEET,
    HISTORY,
    LIVE,
    METRICS,
    PROXY,
    REDIS_LINK,
    REPLICA,
    SCHEDULER,
    UPSTREAM,
    WHITELIST_SYNC,
)


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
        "tenant": ticket.tenant,
        "wait_time": round(ticket.waited(now), 3),
    }
    if ticket.server is not None and not waiting:
        view["server"] = ticket.server
        if ticket.swapped:
            view["swapped"] = True
    effective = scheduler.effective_priority(ticket, now)
    if waiting and effective != ticket.priority:  # aging only matters while in line
        view["effective_priority"] = round(effective, 3)
    return view


def tenants_view(
    tenancy: Tenancy, queued: list[Ticket], running: list[Ticket], top: int = 10
) -> list[dict[str, object]]:
    """Who waits and runs now, and each tenant's share of the tokens of the last hour: the
    ``top`` tenants by tokens (those waiting or running always listed), the rest "other"."""
    waiting = Counter(t.tenant or t.source for t in queued)
    busy = Counter(t.tenant or t.source for t in running)
    hour = tenancy.book.hour(tenancy.scheduler.now())
    total = sum(hour.values())
    names = set(waiting) | set(busy)
    ranked = sorted(hour, key=lambda n: -hour[n])
    names.update(ranked[:top])
    rows: list[dict[str, object]] = []
    for name in sorted(names, key=lambda n: (-hour.get(n, 0), -waiting[n], n)):
        tokens = hour.get(name, 0)
        rows.append(
            {
                "tenant": name,
                "waiting": waiting[name],
                "running": busy[name],
                "tokens_last_hour": tokens,
                "share": round(tokens / total, 4) if total else 0.0,
            }
        )
    rest = [n for n in hour if n not in names]
    if rest:
        tokens = sum(hour[n] for n in rest)
        rows.append(
            {
                "tenant": "other",
                "waiting": 0,
                "running": 0,
                "tokens_last_hour": tokens,
                "share": round(tokens / total, 4) if total else 0.0,
            }
        )
    return rows


async def queue_view(request: web.Request) -> web.Response:
    authorize(request)
    if request.app[REPLICA] is not None:
        return await _shared_queue_view(request)
    scheduler = request.app[SCHEDULER]
    upstream = request.app[UPSTREAM]  # the first server (Part 1's one)
    now = scheduler.now()
    queued = scheduler.queued()
    running_tickets = scheduler.running()
    running = []
    for ticket in running_tickets:
        view = ticket_view(ticket, scheduler, now, waiting=False)
        view["running_time"] = round(now - ticket.started_at, 3)
        running.append(view)
    return web.json_response(
        {
            "queue_length": scheduler.queue_length,
            "in_flight": scheduler.in_flight,
            "slots": scheduler.slots,
            "processing": bool(running),  # a boolean, as the seed's admin panel reads it
            "running": running,
            "entries": [ticket_view(t, scheduler, now) for t in queued],
            "tenants": tenants_view(request.app[PROXY].tenancy, queued, running_tickets),
            "upstream": {"url": str(upstream.url), "health": upstream.health.value},
            "servers": list(servers_view(scheduler.servers)),
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
    """200 "healthy" while at least one Ollama server answers (and, with the Redis backend,
    Redis does); 503 "unhealthy" when none does; 503 "degraded" when only Redis is away:
    inference is refused then, so a balancer should prefer a replica that reaches Redis,
    while the metadata routes still answer on this one. Every server is asked at once;
    ``ollama`` is the first that answered (Part 1's field), ``servers`` names each, without
    its URL."""
    scheduler = request.app[SCHEDULER]
    fleet = request.app[FLEET]
    link = request.app[REDIS_LINK]
    timeout = min(2.0, fleet.settings.connect_timeout)
    versions = await asyncio.gather(*(u.probe(timeout=timeout) for u in fleet.servers))
    answered = [v for v in versions if v is not None]
    healthy = bool(answered)
    doc: dict[str, object] = {
        "status": "healthy" if healthy else "unhealthy",
        "ollama": {"reachable": healthy, "version": answered[0] if answered else None},
        "servers": [
            {"name": u.name, "reachable": v is not None, "version": v}
            for u, v in zip(fleet.servers, versions, strict=True)
        ],
        "queue_length": scheduler.queue_length,
        "in_flight": scheduler.in_flight,
    }
    if link is not None:
        doc["replica"] = link.replica
        redis: dict[str, object] = {"up": link.up, "reason": link.reason}
        sync = request.app[WHITELIST_SYNC]
        if sync is not None:  # "pending": a change here waits for Redis to be shared
            redis["whitelist"] = "pending" if sync.pending else "shared"
        doc["redis"] = redis
        if healthy and not link.up:
            doc["status"] = "degraded"
    return web.json_response(doc, status=200 if doc["status"] == "healthy" else 503)


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
    sync = request.app[WHITELIST_SYNC]
    if sync is not None:  # every replica hears of it; false: when Redis is back
        answer["shared"] = await sync.file_changed()
    return web.json_response(answer)


# -- API keys ----------------------------------------------------------------------------------


def _key_name(doc: dict[str, object]) -> str:
    name = doc.get("name")
    if not isinstance(name, str) or not KEY_NAME.match(name):
        raise BadRequest(
            'give "name": letters, digits and . _ - (at most 64), as match.api_key lists it'
        )
    return name


async def keys_view(request: web.Request) -> web.Response:
    """GET the key names; POST ``{"name", "note"}`` makes a key and answers it, once;
    DELETE ``{"name"}`` removes one. Applied to the running proxy before the answer."""
    authorize(request)
    live = request.app[LIVE]
    try:
        if request.method == "GET":
            entries = await live.keystore.entries()
            return web.json_response({"keys": [asdict(e) for e in entries]})
        doc = await _json_object(request)
        name = _key_name(doc)
        if request.method == "POST":
            note = doc.get("note", "")
            if not isinstance(note, str) or len(note) > 500:
                raise BadRequest('"note" must be text of at most 500 characters')
            try:
                key = await live.keystore.add(name, note)
            except ValueError as e:
                raise Conflict(str(e)) from None
            answer: dict[str, object] = {"name": name, "key": key}
        else:
            if not await live.keystore.remove(name):
                raise NotFound(f"no API key is named {name!r}")
            answer = {"name": name, "removed": True}
    except DatabaseError as e:
        raise Unavailable(str(e)) from e
    await live.reload_keys()
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


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
