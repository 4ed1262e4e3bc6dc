"""What replicas and the dispatcher say to each other over Redis pub/sub: pure data.

Every message is one JSON object with a ``t`` (its type). ``decode`` checks every field and
raises ``ValueError`` on anything else, so a stray publish on our channels is logged and
ignored rather than half-applied. Every message may arrive twice (a publish is retried once
on a fresh connection): the receivers make them idempotent, keyed on the ticket id.

To the dispatcher (channel ``<prefix>dispatch``):
    announce   a ticket record: a waiter, or (re-announced after a sync) a running request
    finished   a running request ended (with its real cost in tokens, if known)
    dropped    a waiter left (client hung up, its max_wait ran out)
    heartbeat  this replica is alive
    synced     this replica has re-announced everything after a ``sync``
    resign     the dispatcher stops (shutdown): take the lease now
To one replica (``<prefix>to:<replica>``):
    grant      your ticket has a slot: stream
    refuse     your ticket cannot be served (queue full, Ollama unreachable)
To every replica (``<prefix>control``):
    sync       a new dispatcher: re-announce your waiters and running requests
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

RecordState = Literal["queued", "running"]


@dataclass(frozen=True, slots=True)
class TicketRecord:
    """One request in the shared queue, as stored (a hash per ticket) and announced."""

    id: str  # unique across replicas and across attempts of one request
    replica: str
    request: str  # the request id (X-Request-Id), for the views and logs
    source: str
    priority: int
    path: str
    model: str | None
    client: str
    seq: int  # from INCR <prefix>seq: the global order of arrival
    queued_at: float  # wall-clock seconds: ages and waits survive a change of dispatcher
    state: RecordState = "queued"
    started_at: float = 0.0  # wall-clock seconds, when running
    tenant: str | None = None
    weight: float = 1.0
    estimate: float = 0.0

    def to_hash(self) -> dict[str, str]:
        """The Redis hash (strings only; ``None`` is stored as an empty string)."""
        return {k: "" if v is None else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes] | dict[str, str]) -> TicketRecord:
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        try:
            return cls(
                id=data["id"],
                replica=data["replica"],
                request=data["request"],
                source=data["source"],
                priority=int(data["priority"]),
                path=data["path"],
                model=data["model"] or None,
                client=data["client"],
                seq=int(data["seq"]),
                queued_at=float(data["queued_at"]),
                state=_state(data["state"]),
                started_at=float(data["started_at"]),
                tenant=data.get("tenant") or None,
                weight=float(data.get("weight") or 1.0),
                estimate=float(data.get("estimate") or 0.0),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"not a ticket record: {e}") from None

    @classmethod
    def from_json(cls, doc: object) -> TicketRecord:
        if not isinstance(doc, dict):
            raise ValueError("a ticket must be an object")
        known = {f.name for f in fields(cls)}
        if set(doc) - known:
            raise ValueError(f"unknown ticket fields: {sorted(set(doc) - known)}")
        record = cls(
            id=_text(doc, "id"),
            replica=_text(doc, "replica"),
            request=_text(doc, "request"),
            source=_text(doc, "source"),
            priority=_int(doc, "priority"),
            path=_text(doc, "path"),
            model=_optional_text(doc, "model"),
            client=_text(doc, "client"),
            seq=_int(doc, "seq"),
            queued_at=_number(doc, "queued_at"),
            state=_state(doc.get("state", "queued")),
            started_at=_number(doc, "started_at", 0.0),
            tenant=_optional_text(doc, "tenant"),
            weight=_number(doc, "weight", 1.0),
            estimate=_number(doc, "estimate", 0.0),
        )
        return record


@dataclass(frozen=True, slots=True)
class Announce:
    ticket: TicketRecord


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    server: str = ""  # the Ollama server (its name) the turn is on
    swapped: bool = False  # starting it there loads its model


@dataclass(frozen=True, slots=True)
class Refuse:
    id: str
    kind: str  # the RequestError class name: QueueFull, UpstreamUnavailable, ...
    message: str
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    id: str
    replica: str
    tokens: float | None = None
    load: float | None = None  # Ollama's load_duration in seconds, if the answer had one


@dataclass(frozen=True, slots=True)
class Dropped:
    id: str
    replica: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    replica: str


@dataclass(frozen=True, slots=True)
class Synced:
    replica: str


@dataclass(frozen=True, slots=True)
class Sync:
    dispatcher: str


@dataclass(frozen=True, slots=True)
class Resign:
    replica: str


Message = Announce | Grant | Refuse | Finished | Dropped | Heartbeat | Synced | Sync | Resign

_TYPES: dict[str, type[Message]] = {
    "announce": Announce,
    "grant": Grant,
    "refuse": Refuse,
    "finished": Finished,
    "dropped": Dropped,
    "heartbeat": Heartbeat,
    "synced": Synced,
    "sync": Sync,
    "resign": Resign,
}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    doc: dict[str, Any] = {"t": _NAMES[type(message)]}
    if isinstance(message, Announce):
        doc["ticket"] = asdict(message.ticket)
    else:
        doc.update(asdict(message))
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def decode(data: bytes) -> Message:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("a message must be JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("a message must be a JSON object")
    kind = doc.pop("t", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown message type {kind!r}")
    if cls is Announce:
        if set(doc) != {"ticket"}:
            raise ValueError("announce carries exactly a ticket")
        return Announce(TicketRecord.from_json(doc["ticket"]))
    expected = {f.name for f in fields(cls)}
    if set(doc) - expected:
        raise ValueError(f"unknown fields for {kind}: {sorted(set(doc) - expected)}")
    if cls is Grant:
        swapped = doc.get("swapped", False)
        if not isinstance(swapped, bool):
            raise ValueError("swapped must be true or false")
        server = doc.get("server", "")
        if not isinstance(server, str) or len(server) > 200:
            raise ValueError("server must be a server's name")
        return Grant(_text(doc, "id"), server, swapped)
    if cls is Refuse:
        retry = doc.get("retry_after")
        if retry is not None and (not isinstance(retry, int) or isinstance(retry, bool)):
            raise ValueError("retry_after must be an integer")
        return Refuse(_text(doc, "id"), _text(doc, "kind"), _text(doc, "message"), retry)
    if cls is Finished:
        tokens, load = doc.get("tokens"), doc.get("load")
        return Finished(
            _text(doc, "id"),
            _text(doc, "replica"),
            None if tokens is None else _number(doc, "tokens"),
            None if load is None else _number(doc, "load"),
        )
    if cls is Dropped:
        return Dropped(_text(doc, "id"), _text(doc, "replica"))
    if cls is Sync:
        return Sync(_text(doc, "dispatcher"))
    name = _text(doc, "replica")
    return Heartbeat(name) if cls is Heartbeat else Synced(name) if cls is Synced else Resign(name)


# -- field checks -------------------------------------------------------------------------


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _optional_text(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    return None if value is None or value == "" else _text(doc, name)


def _int(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer")
    return value


def _number(doc: dict[str, Any], name: str, default: float | None = None) -> float:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def _state(value: object) -> RecordState:
    if value == "queued":
        return "queued"
    if value == "running":
        return "running"
    raise ValueError(f"state must be queued or running, got {value!r}")
