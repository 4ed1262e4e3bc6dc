"""The replicas' message formats: pure data, every type round-trips, anything else is refused."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from seadragon_proxy.exceptions import QueueFull, Unavailable, UpstreamUnavailable
from seadragon_proxy.replicas.messages import (
    Announce,
    Dropped,
    Finished,
    Grant,
    Heartbeat,
    Message,
    Refuse,
    Resign,
    Sync,
    Synced,
    TicketRecord,
    decode,
    encode,
)
from seadragon_proxy.replicas.remote import refusal_error

RECORD = TicketRecord(
    id="proxy-1-a-1",
    replica="proxy-1",
    request="req-1",
    source="coding",
    priority=0,
    path="/api/generate",
    model="llama3:70b",
    client="10.0.0.7",
    seq=42,
    queued_at=1764689000.25,
)


@pytest.mark.parametrize(
    "message",
    [
        Announce(RECORD),
        Announce(replace(RECORD, model=None, state="running", started_at=1764689001.5)),
        Grant("t1"),
        Grant("t1", "gpu-b", True),
        Refuse("t1", "QueueFull", "queue full", 3),
        Refuse("t1", "UpstreamUnavailable", "Ollama at x is unreachable"),
        Finished("t1", "proxy-1", 812.5),
        Finished("t1", "proxy-1", 812.5, 2.5),
        Finished("t1", "proxy-1"),
        Dropped("t1", "proxy-2"),
        Heartbeat("proxy-1"),
        Synced("proxy-1"),
        Sync("proxy-2"),
        Resign("proxy-2"),
    ],
)
def test_every_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


def test_a_ticket_record_round_trips_through_a_redis_hash() -> None:
    stored = {k.encode(): v.encode() for k, v in RECORD.to_hash().items()}
    assert TicketRecord.from_hash(stored) == RECORD
    assert TicketRecord.from_hash({**RECORD.to_hash(), "model": ""}).model is None


def test_numbers_as_the_announce_script_re_encodes_them_are_read() -> None:
    doc = json.loads(encode(Announce(RECORD)))
    doc["ticket"].update(weight=1, started_at=0, seq=43)  # Lua's cjson drops the ".0"
    assert decode(json.dumps(doc).encode()) == Announce(replace(RECORD, seq=43))


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"\xff", "JSON"),
        (b"[]", "object"),
        (b'{"t":"launch"}', "unknown message type"),
        (b'{"t":"grant"}', "id must be"),
        (b'{"t":"grant","id":""}', "id must be"),
        (b'{"t":"grant","id":"a","x":1}', "unknown fields"),
        (b'{"t":"refuse","id":"a","kind":"K","message":"m","retry_after":true}', "retry_after"),
        (b'{"t":"finished","id":"a","replica":"r","tokens":"many"}', "tokens"),
        (b'{"t":"announce"}', "exactly a ticket"),
        (b'{"t":"announce","ticket":[]}', "object"),
        (b'{"t":"announce","ticket":{"id":"a"}}', "must be"),
    ],
)
def test_anything_else_is_refused_with_a_reason(data: bytes, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        decode(data)


def test_bad_ticket_fields_are_refused() -> None:
    doc = json.loads(encode(Announce(RECORD)))
    for field, value in [("priority", "0"), ("seq", 1.5), ("state", "done"), ("queued_at", None)]:
        bad = {**doc, "ticket": {**doc["ticket"], field: value}}
        with pytest.raises(ValueError, match=field):
            decode(json.dumps(bad).encode())
    with pytest.raises(ValueError, match="unknown ticket fields"):
        decode(json.dumps({**doc, "ticket": {**doc["ticket"], "evil": 1}}).encode())
    with pytest.raises(ValueError, match="not a ticket record"):
        TicketRecord.from_hash({b"id": b"x"})


def test_a_refusal_becomes_the_error_a_local_queue_would_give() -> None:
    full = refusal_error(Refuse("t", "QueueFull", "queue full", 7))
    assert isinstance(full, QueueFull) and full.retry_after == 7
    assert full.message == QueueFull.MESSAGE
    down = refusal_error(Refuse("t", "UpstreamUnavailable", "Ollama at x is unreachable"))
    assert isinstance(down, UpstreamUnavailable) and down.status == 502
    other = refusal_error(Refuse("t", "Whatever", "no"))
    assert isinstance(other, Unavailable) and other.status == 503
