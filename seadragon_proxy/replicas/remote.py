"""This replica's side of the shared queue: ``RemoteQueue.acquire(ticket)`` asks the
dispatcher for a turn and waits on a local future until it is told.

A request becomes a ticket record in Redis (a hash, for every replica's queue view) with a
global ``seq`` from ``INCR``, announced on the dispatch channel. The grant (or refusal)
arrives on this replica's own channel and resolves the future; nothing polls. When the
stream ends, ``finished`` goes back so the dispatcher hands the slot on. While the link to
Redis is down, new requests and this replica's waiters get ``RedisUnavailable`` (they cannot
be granted); running streams go on, and are re-announced when the link is back, as they are
after every ``sync`` from a new dispatcher. The heartbeat (every lease/3) is the only timer
besides each waiter's own ``max_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import structlog
from redis.exceptions import RedisError

from ..exceptions import (
    QueueFull,
    QueueTimeout,
    RedisUnavailable,
    RequestError,
    ShuttingDown,
    Unavailable,
    UpstreamUnavailable,
)
from ..scheduling import State, Ticket
from .link import RedisLink, cancel_and_wait
from .messages import (
    Announce,
    Dropped,
    Finished,
    Grant,
    Heartbeat,
    Message,
    Refuse,
    Sync,
    Synced,
    TicketRecord,
    decode,
    encode,
)

log = structlog.get_logger("seadragon.replicas")

# KEYS: seq, tickets, the ticket's hash, the dispatch channel. ARGV: the announce (seq 0),
# the ticket id, the hash's field/value pairs. Returns the seq.
ANNOUNCE = """
local seq = redis.call('incr', KEYS[1])
local doc = cjson.decode(ARGV[1])
doc['ticket']['seq'] = seq
redis.call('hset', KEYS[3], unpack(ARGV, 3))
redis.call('hset', KEYS[3], 'seq', seq)
redis.call('sadd', KEYS[2], ARGV[2])
redis.call('publish', KEYS[4], cjson.encode(doc))
return seq
"""


class Names:
    """Every key and channel of the shared queue, under the link's prefix."""

    def __init__(self, link: RedisLink) -> None:
        k = link.key
        self.seq = k("seq")
        self.tickets = k("tickets")  # the set of ticket ids, for the views
        self.dispatcher = k("dispatcher")  # the lease: the holder's replica name
        self.dispatch = k("dispatch")  # channel: to the dispatcher
        self.control = k("control")  # channel: from the dispatcher to everyone
        self._k = k

    def ticket(self, ticket_id: str) -> str:
        return self._k("ticket", ticket_id)

    def alive(self, replica: str) -> str:
        return self._k("replica", replica)

    def inbox(self, replica: str) -> str:
        return self._k("to", replica)


def refusal_error(message: Refuse) -> RequestError:
    """The dispatcher's refusal as the error this replica answers with."""
    if message.kind == "QueueFull":
        return QueueFull(retry_after=message.retry_after or 1)
    if message.kind == "UpstreamUnavailable":
        return UpstreamUnavailable(message.message)
    if message.kind == "QueueTimeout":
        return QueueTimeout(message.message, retry_after=message.retry_after)
    return Unavailable(message.message, retry_after=message.retry_after)


@dataclass(eq=False)
class _Pending:
    ticket: Ticket
    record: TicketRecord
    future: asyncio.Future[None] | None = None
    timer: asyncio.TimerHandle | None = None


class RemoteSlot:
    """A turn granted by the dispatcher, on the server it named."""

    __slots__ = ("_load", "_queue", "_released", "id", "ticket")

    def __init__(self, queue: RemoteQueue, ticket_id: str, ticket: Ticket) -> None:
        self._queue = queue
        self.id = ticket_id
        self.ticket = ticket
        self._released = False
        self._load: float | None = None

    @property
    def server_name(self) -> str | None:
        return self.ticket.server

    def report_load(self, seconds: float) -> None:
        """Sent with ``finished``: the dispatcher's scheduler learns the swap cost."""
        self._load = seconds

    def release(self, tokens: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._queue._finish(self.id, tokens, self._load)


class RemoteQueue:
    def __init__(self, link: RedisLink, *, max_wait: Callable[[], float]) -> None:
        self.link = link
        self.replica = link.replica
        self.names = Names(link)
        self._max_wait = max_wait  # queue.max_wait as the live settings have it now
        self._waiting: dict[str, _Pending] = {}
        self._running: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._stem = f"{self.replica}-{os.getpid():x}-{time.time_ns() & 0xFFFFFFFF:x}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._outbox: dict[str, Finished | Dropped] = {}  # not delivered while Redis was away
        self._closed: Callable[[], RequestError] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # Told "queued", "started" and "left" with the ticket (for logs, views and tests).
        self.listeners: list[Callable[[str, Ticket], None]] = []
        link.subscribe(self.names.inbox(self.replica), self._on_inbox)
        link.subscribe(self.names.control, self._on_control)
        link.add_state_listener(self._on_link)

    # -- views ------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # -- the queue --------------------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> RemoteSlot:
        if self._closed is not None:
            raise self._closed()
        if not self.link.up:
            raise RedisUnavailable(self.link.reason)
        loop = asyncio.get_running_loop()
        client = self.link.client
        first = ticket.state is State.NEW
        try:
            if first:
                ticket.enqueued_at = loop.time()
                limit = self._max_wait() if ticket.max_wait is None else ticket.max_wait
                ticket.wait_limit = limit
                ticket.deadline = ticket.enqueued_at + limit if limit else float("inf")
            elif loop.time() >= ticket.deadline:
                ticket.state = State.DONE
                raise _timeout(ticket)
            ticket.state = State.QUEUED
            record = TicketRecord(
                id=f"{self._stem}-{next(self._ids):x}",  # one per attempt: never reused
                replica=self.replica,
                request=ticket.id,
                source=ticket.source,
                priority=ticket.priority,
                path=ticket.path,
                model=ticket.model,
                client=ticket.client_ip,
                seq=ticket.seq,
                queued_at=time.time() - (loop.time() - ticket.enqueued_at),
                tenant=ticket.tenant,
                weight=ticket.weight,
                estimate=ticket.estimate,
            )
            pending = _Pending(ticket, record, loop.create_future())
            self._waiting[record.id] = pending
            if ticket.deadline != float("inf"):
                pending.timer = loop.call_at(ticket.deadline, self._expire, record.id)
            if first:
                # seq is taken and the ticket announced in one script: the dispatcher hears
                # tickets in seq order, so its line is built by appends, never re-sorted.
                fields = [x for kv in _hash(record).items() for x in kv]
                ticket.seq = int(
                    await client.eval(
                        ANNOUNCE,
                        4,
                        self.names.seq,
                        self.names.tickets,
                        self.names.ticket(record.id),
                        self.names.dispatch,
                        encode(Announce(record)),
                        record.id,
                        *fields,
                    )
                )
                pending.record = replace(pending.record, seq=ticket.seq)
            else:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hset(self.names.ticket(record.id), mapping=_hash(record))
                    pipe.sadd(self.names.tickets, record.id)
                    pipe.publish(self.names.dispatch, encode(Announce(record)))
                    await pipe.execute()
        except RedisError:
            ticket.state = State.DONE
            self._forget(ticket)
            raise RedisUnavailable(self.link.reason or "Redis is unreachable") from None
        assert pending.future is not None
        self._emit("queued", ticket)
        try:
            await pending.future
        except BaseException:
            self._emit("left", ticket)
            if self._waiting.pop(record.id, None) is not None or record.id in self._running:
                # Left the line (hung up, timed out, refused, link down): tell the dispatcher,
                # which passes the turn on if it had just been granted.
                self._running.pop(record.id, None)
                self._spawn(self._leave(Dropped(record.id, self.replica), record.id))
            _cancel(pending)
            ticket.state = State.DONE
            raise
        return RemoteSlot(self, record.id, ticket)

    def _forget(self, ticket: Ticket) -> None:
        for rid, pending in list(self._waiting.items()):
            if pending.ticket is ticket:
                _cancel(pending)
                del self._waiting[rid]

    def _expire(self, rid: str) -> None:
        pending = self._waiting.get(rid)
        if pending is not None:
            pending.timer = None
            _fail(pending, _timeout(pending.ticket))

    def _finish(self, rid: str, tokens: float | None, load: float | None = None) -> None:
        pending = self._running.pop(rid, None)
        if pending is not None:
            pending.ticket.state = State.DONE
            self._spawn(self._leave(Finished(rid, self.replica, tokens, load), rid))

    async def _leave(self, message: Finished | Dropped, rid: str) -> None:
        """Tell the dispatcher and take the record out of the views. A lost message is
        sent again when the link is back."""
        try:
            async with self.link.client.pipeline(transaction=True) as pipe:
                pipe.publish(self.names.dispatch, encode(message))
                pipe.delete(self.names.ticket(rid))
                pipe.srem(self.names.tickets, rid)
                await pipe.execute()
        except (RedisError, OSError):
            # Kept until the link is back: a dispatcher that never saw the outage would
            # otherwise hold this slot for ever (the heartbeats say the replica is alive).
            self._outbox[rid] = message

    # -- messages ---------------------------------------------------------------------

    def _on_inbox(self, data: bytes) -> None:
        message = decode(data)
        if isinstance(message, Grant):
            self._granted(message.id, message)
        elif isinstance(message, Refuse):
            pending = self._waiting.get(message.id)
            if pending is not None:
                _fail(pending, refusal_error(message))
        else:
            raise ValueError(f"unexpected {type(message).__name__} on a replica's channel")

    def _granted(self, rid: str, grant: Grant | None = None) -> None:
        pending = self._waiting.pop(rid, None)
        if pending is None:
            if rid not in self._running:  # it left meanwhile: hand the turn straight back
                self._spawn(self._publish(Finished(rid, self.replica)))
            return
        _cancel(pending)
        ticket = pending.ticket
        if grant is not None and grant.server:
            ticket.server, ticket.swapped = grant.server, grant.swapped
        loop = asyncio.get_running_loop()
        ticket.state = State.RUNNING
        ticket.started_at = loop.time()
        pending.record = _running(pending.record)
        self._running[rid] = pending
        assert pending.future is not None
        if not pending.future.done():
            pending.future.set_result(None)
        self._spawn(self._store(pending.record))  # for the views
        self._emit("started", ticket)

    def _emit(self, event: str, ticket: Ticket) -> None:
        for listener in self.listeners:
            listener(event, ticket)

    async def _store(self, record: TicketRecord) -> None:
        """Only the fields that change: the grant may come before the seq is known here."""
        change = {"state": record.state, "started_at": str(record.started_at)}
        with contextlib.suppress(RedisError, OSError):
            await self.link.client.hset(self.names.ticket(record.id), mapping=_fields(change))

    def _on_control(self, data: bytes) -> Coroutine[Any, Any, None] | None:
        message = decode(data)
        if isinstance(message, Sync):
            return self._reannounce(synced=True)
        return None

    async def _reannounce(self, *, synced: bool) -> None:
        """Everything this replica has in the shared queue, again, with the original seq and
        queue time (so the order holds), running requests as running."""
        pendings = [*self._running.values(), *self._waiting.values()]
        messages: list[Message] = [Announce(p.record) for p in pendings]
        if synced:
            messages.append(Synced(self.replica))
        with contextlib.suppress(RedisError, OSError):
            async with self.link.client.pipeline(transaction=False) as pipe:
                for p in pendings:
                    pipe.hset(self.names.ticket(p.record.id), mapping=_hash(p.record))
                    pipe.sadd(self.names.tickets, p.record.id)
                for message in messages:
                    pipe.publish(self.names.dispatch, encode(message))
                await pipe.execute()

    async def _publish(self, message: Message) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.link.client.publish(self.names.dispatch, encode(message))

    async def _on_link(self, up: bool) -> None:
        if up:
            await self._beat()
            outbox, self._outbox = self._outbox, {}
            for rid, message in outbox.items():
                await self._leave(message, rid)
            await self._reannounce(synced=False)
            return
        for pending in list(self._waiting.values()):  # no dispatcher can reach them now
            _fail(pending, RedisUnavailable(self.link.reason))

    # -- liveness ---------------------------------------------------------------------

    async def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="replica-heartbeat")

    async def _beat_forever(self) -> None:
        interval = self.link.settings.lease / 3
        while True:
            await asyncio.sleep(interval)  # the lease renewal: one of the two timers
            await self._beat()

    async def _beat(self) -> None:
        lease_ms = int(self.link.settings.lease * 1000)
        with contextlib.suppress(RedisError, OSError):
            async with self.link.client.pipeline(transaction=False) as pipe:
                pipe.set(self.names.alive(self.replica), str(os.getpid()), px=lease_ms)
                pipe.publish(self.names.dispatch, encode(Heartbeat(self.replica)))
                await pipe.execute()

    def close(self, error: Callable[[], RequestError]) -> int:
        """Refuse new tickets and fail this replica's waiters; running streams go on."""
        self._closed = error
        waiting = list(self._waiting.values())
        for pending in waiting:
            _fail(pending, error())
        return len(waiting)

    async def stop(self) -> None:
        if self._closed is None:
            self.close(ShuttingDown)
        if self._heartbeat is not None:
            await cancel_and_wait(self._heartbeat)
        for rid in list(self._running):
            self._finish(rid, None)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        for task in set(self._tasks):
            task.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.link.client.delete(self.names.alive(self.replica))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _running(record: TicketRecord) -> TicketRecord:
    return replace(record, state="running", started_at=time.time())


def _fields(change: dict[str, str]) -> Any:
    return change


def _hash(record: TicketRecord) -> Any:  # redis-py's Mapping type is invariant in its keys
    return record.to_hash()


def _timeout(ticket: Ticket) -> QueueTimeout:
    limit = "queue.max_wait" if ticket.max_wait is None else f"max_wait of {ticket.source!r}"
    return QueueTimeout(
        f"waited longer than {limit} ({ticket.wait_limit:g} s) for a turn at Ollama; "
        "try again later",
        retry_after=1,
    )


def _cancel(pending: _Pending) -> None:
    if pending.timer is not None:
        pending.timer.cancel()
        pending.timer = None


def _fail(pending: _Pending, error: RequestError) -> None:
    if pending.future is not None and not pending.future.done():
        pending.future.set_exception(error)
