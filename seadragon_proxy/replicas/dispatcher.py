"""The elected dispatcher: one replica runs the real ``Scheduler`` for every replica's waiters.

Election is a lease in Redis: ``SET <prefix>dispatcher <replica> NX PX <lease>``, renewed
every lease/3 by a compare-and-pexpire script (so a holder never renews someone else's).
The others set one timer at the key's PTTL and try again then, or at once when the holder
publishes ``resign``. A new dispatcher publishes ``sync``; every replica re-announces its
waiters and running requests and says ``synced``; then the announces are admitted — running
ones first (they take their slots without being granted again), waiters by their global
``seq`` — and dispatch resumes. The order, slots, aging and fair shares are the
``Scheduler``'s, used only through ``acquire``/``Slot.release``.

Liveness: one timer per replica, reset by each of its heartbeats or announces; when it
fires, that replica's slots are released and its waiters leave the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError

from ..exceptions import RequestError, ShuttingDown
from ..scheduling import Scheduler, Slot, State, Ticket
from .link import RedisLink, cancel_and_wait
from .messages import (
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
from .remote import Names

log = structlog.get_logger("seadragon.dispatcher")

# KEYS[1] the lease, ARGV[1] this replica, ARGV[2] the lease in ms.
RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
RESIGN = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end"
)
REMEMBERED = 10_000  # ids of ended tickets kept to ignore a late duplicate announce


@dataclass(eq=False)
class _Entry:
    record: TicketRecord
    ticket: Ticket
    task: asyncio.Task[None] | None = None
    slot: Slot | None = None


class Dispatcher:
    def __init__(
        self, link: RedisLink, scheduler: Scheduler, *, max_size: Callable[[], int]
    ) -> None:
        self.link = link
        self.scheduler = scheduler
        self.replica = link.replica
        self.names = Names(link)
        self.lease = link.settings.lease
        self._max_size = max_size
        self.leading = False
        self._term = 0
        self._entries: dict[str, _Entry] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._syncing: set[str] | None = None
        self._buffer: dict[str, TicketRecord] = {}
        self._sync_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.terms: list[float] = []  # loop times at which this replica became dispatcher
        # Told "elected", "synced" (dispatching) and "stepped_down", for logs and tests.
        self.listeners: list[Callable[[str], None]] = []
        link.subscribe(self.names.dispatch, self._on_message)
        link.add_state_listener(self._on_link)

    def __repr__(self) -> str:
        return f"<Dispatcher {self.replica} leading={self.leading} tickets={len(self._entries)}>"

    # -- election ---------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._elect(), name="dispatcher-election")

    async def _elect(self) -> None:
        lease_ms = int(self.lease * 1000)
        client = self.link.client
        previous: str | None = None
        while True:
            if not self.link.up:
                await self.link.wait_up(3600)  # woken by the link coming back
                continue
            self._wake.clear()
            try:
                held = await client.eval(RENEW, 1, self.names.dispatcher, self.replica, lease_ms)
                if held or await client.set(
                    self.names.dispatcher, self.replica, nx=True, px=lease_ms
                ):
                    await self._lead(previous)
                    continue
                async with client.pipeline(transaction=False) as pipe:
                    pipe.get(self.names.dispatcher)
                    pipe.pttl(self.names.dispatcher)
                    holder, ttl = await pipe.execute()
                previous = holder.decode(errors="replace") if holder else None
                wait = ttl / 1000 if ttl > 0 else (0.0 if ttl == -2 else self.lease)
            except RedisError:
                wait = self.lease / 3
            if wait:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # the lease's expiry: the one timer
                        await self._wake.wait()

    async def _lead(self, previous: str | None) -> None:
        self._term += 1
        term = self._term
        self.leading = True
        self.terms.append(asyncio.get_running_loop().time())
        log.info("dispatcher_elected", replica=self.replica, previous=previous)
        self._emit("elected")
        lease_ms = int(self.lease * 1000)
        try:
            await self._begin_sync(exclude=previous)
            while self._term == term:
                await asyncio.sleep(self.lease / 3)  # the renewal: the other timer
                if self._term != term:
                    break
                renewed = await self.link.client.eval(
                    RENEW, 1, self.names.dispatcher, self.replica, lease_ms
                )
                if not renewed:
                    log.warning("dispatcher_lease_lost", replica=self.replica)
                    break
        except RedisError as e:
            log.warning("dispatcher_lease_lost", replica=self.replica, error=str(e))
        finally:
            if self._term == term:
                self._step_down()

    def _step_down(self) -> None:
        """Forget this term: every acquire task cancelled, every slot released."""
        if not self.leading:
            return
        self.leading = False
        self._term += 1
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self._syncing = None
        self._buffer.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        entries = list(self._entries.values())
        self._entries.clear()
        self._ended.clear()
        for entry in entries:  # waiters out first, so a release hands nothing to them
            if entry.slot is None and entry.task is not None:
                entry.task.cancel()
        for entry in entries:
            if entry.slot is not None:
                entry.slot.release()
        log.info("dispatcher_stepped_down", replica=self.replica)
        self._emit("stepped_down")

    async def stop(self) -> None:
        """Resign (shutdown): the lease is deleted and the others told, so one takes over
        at once instead of at the lease's expiry."""
        leading = self.leading  # cancelling the election steps down (its lead ends)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if leading:
            self._step_down()
            with contextlib.suppress(RedisError, OSError):
                await self.link.client.eval(RESIGN, 1, self.names.dispatcher, self.replica)
                await self.link.client.publish(self.names.dispatch, encode(Resign(self.replica)))
        for task in set(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)

    def _on_link(self, up: bool) -> None:
        if not up:
            self._step_down()  # it cannot hear or renew: someone else takes over
        self._wake.set()

    # -- sync -------------------------------------------------------------------------

    async def _begin_sync(self, exclude: str | None) -> None:
        pattern = self.names.alive("*")
        stem = len(self.names.alive(""))
        alive = {
            key.decode(errors="replace")[stem:]
            async for key in self.link.client.scan_iter(match=pattern, count=1000)
        }
        alive.discard(exclude or "")
        self._syncing = alive
        self._buffer.clear()
        loop = asyncio.get_running_loop()
        self._sync_timer = loop.call_later(self.lease, self._end_sync)  # a dead one's key
        for name in alive:
            self._touch(name)
        await self.link.client.publish(self.names.control, encode(Sync(self.replica)))

    def _end_sync(self) -> None:
        if self._syncing is None:
            return
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self._syncing = None
        records = sorted(self._buffer.values(), key=lambda r: (r.state != "running", r.seq))
        self._buffer.clear()
        log.info("dispatcher_synced", replica=self.replica, tickets=len(records))
        for record in records:
            self._admit(record)
        self._emit("synced")

    @property
    def dispatching(self) -> bool:
        """Holding the lease and past the sync: admitting tickets as they come."""
        return self.leading and self._syncing is None

    def _emit(self, event: str) -> None:
        for listener in self.listeners:
            listener(event)

    # -- messages ---------------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        message = decode(data)
        if isinstance(message, Resign):
            if message.replica != self.replica:
                self._wake.set()
            return
        if not self.leading:
            return
        if isinstance(message, Announce):
            record = message.ticket
            self._touch(record.replica)
            if self._syncing is not None:
                if record.id not in self._ended:
                    self._buffer[record.id] = record
            else:
                self._admit(record)
        elif isinstance(message, Finished | Dropped):
            finished = isinstance(message, Finished)
            tokens = message.tokens if isinstance(message, Finished) else None
            load = message.load if isinstance(message, Finished) else None
            self._end(message.id, tokens, load if finished else None)
        elif isinstance(message, Heartbeat):
            self._touch(message.replica)
        elif isinstance(message, Synced):
            self._touch(message.replica)
            if self._syncing is not None:
                self._syncing.discard(message.replica)
                if not self._syncing:
                    self._end_sync()
        else:
            raise ValueError(f"unexpected {type(message).__name__} on the dispatch channel")

    def _admit(self, record: TicketRecord) -> None:
        if record.id in self._entries or record.id in self._ended:
            return  # a duplicate, or a late announce of a ticket that has ended
        loop = asyncio.get_running_loop()
        ticket = Ticket(
            id=record.request,
            source=record.source,
            priority=record.priority,
            path=record.path,
            model=record.model,
            client_ip=record.client,
            max_wait=0.0,  # each replica times its own waiters (the ticket's queue.max_wait)
            tenant=record.tenant,
            weight=record.weight,
            estimate=record.estimate,
        )
        # A ticket that "comes back" keeps its seq and queue time: the Scheduler's documented
        # path for a returning ticket, so the global order (seq) and aging hold across
        # replicas and across a change of dispatcher.
        ticket.seq = record.seq
        ticket.enqueued_at = loop.time() - max(0.0, time.time() - record.queued_at)
        ticket.key = self.scheduler.effective_priority(ticket, 0.0)
        ticket.state = State.QUEUED
        if record.state == "queued" and self.scheduler.queue_length >= self._max_size():
            self._remember(record.id)
            retry = self.scheduler.retry_after()
            self._send(record.replica, Refuse(record.id, "QueueFull", "queue full", retry))
            return
        entry = _Entry(record, ticket)
        self._entries[record.id] = entry
        entry.task = loop.create_task(self._serve(entry, self._term))

    async def _serve(self, entry: _Entry, term: int) -> None:
        record = entry.record
        try:
            slot = await self.scheduler.acquire(entry.ticket)
        except RequestError as e:
            if self._entries.get(record.id) is entry:
                del self._entries[record.id]
                self._remember(record.id)
            if self._term == term and not isinstance(e, ShuttingDown):
                await self._publish(
                    self.names.inbox(record.replica),
                    Refuse(record.id, type(e).__name__, e.message, e.retry_after),
                )
            return
        if self._term != term or self._entries.get(record.id) is not entry:
            slot.release()  # this term ended while the turn was being handed over
            return
        entry.slot = slot
        if record.state == "queued":  # a re-announced running request is not granted again
            grant = Grant(record.id, slot.server.name, slot.ticket.swapped)
            await self._publish(self.names.inbox(record.replica), grant)

    def _end(self, rid: str, tokens: float | None, load: float | None = None) -> None:
        self._remember(rid)
        self._buffer.pop(rid, None)
        entry = self._entries.pop(rid, None)
        if entry is None:
            return
        if entry.slot is not None:
            if load is not None:
                entry.slot.report_load(load)  # the swap cost, learned where it is used
            entry.slot.release(tokens)
        elif entry.task is not None:
            entry.task.cancel()  # the Scheduler passes the turn on if it was just granted

    def _remember(self, rid: str) -> None:
        self._ended[rid] = None
        while len(self._ended) > REMEMBERED:
            self._ended.popitem(last=False)

    # -- liveness ---------------------------------------------------------------------

    def _touch(self, replica: str) -> None:
        timer = self._timers.pop(replica, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[replica] = loop.call_later(self.lease, self._lost, replica)

    def _lost(self, replica: str) -> None:
        """No heartbeat for a lease: that replica is gone; its slots and waiters with it."""
        self._timers.pop(replica, None)
        gone = [rid for rid, e in self._entries.items() if e.record.replica == replica]
        gone += [rid for rid, r in self._buffer.items() if r.replica == replica]
        for rid in gone:
            self._end(rid, None)
        if self._syncing is not None and replica in self._syncing:
            self._syncing.discard(replica)
            if not self._syncing:
                self._end_sync()
        log.warning("replica_lost", replica=replica, tickets=len(gone))
        if gone:
            self._spawn(self._forget_records(gone))

    async def _forget_records(self, ids: list[str]) -> None:
        with contextlib.suppress(RedisError, OSError):
            async with self.link.client.pipeline(transaction=False) as pipe:
                pipe.delete(*[self.names.ticket(rid) for rid in ids])
                pipe.srem(self.names.tickets, *ids)
                await pipe.execute()

    # -- sending ----------------------------------------------------------------------

    def _send(self, replica: str, message: Message) -> None:
        self._spawn(self._publish(self.names.inbox(replica), message))

    async def _publish(self, channel: str, message: Message) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.link.client.publish(channel, encode(message))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
