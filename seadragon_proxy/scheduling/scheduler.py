"""The priority queue in front of Ollama's slots: who goes next, woken exactly on their turn.

One ``LevelQueue`` per priority (levels.py decides the order inside a level) and ``slots``
tokens. Across levels the heads compare by ``(key, seq)``: strict priority, or aged
priority with ``queue.aging``. A finished request hands its slot straight to the best
waiter by resolving that waiter's future: no polling, no worker hop. No aiohttp here.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable

from ..exceptions import QueueFull, QueueTimeout, RequestError
from .levels import FifoLevel, LevelQueue
from .ticket import State, Ticket

Listener = Callable[[str, Ticket], None]  # event is "queued", "started", "finished" or "dropped"


class Slot:
    """A held upstream slot. ``release()`` is idempotent and hands the slot on at once."""

    __slots__ = ("_released", "_scheduler", "ticket")

    def __init__(self, scheduler: Scheduler, ticket: Ticket) -> None:
        self._scheduler = scheduler
        self.ticket = ticket
        self._released = False

    def release(self, tokens: float | None = None) -> None:
        """``tokens``: what the request really cost (prompt + weighted output), if known."""
        if not self._released:
            self._released = True
            self._scheduler._finish(self.ticket, tokens)

    @property
    def released(self) -> bool:
        return self._released


class Scheduler:
    """Grants at most ``slots`` tickets at once, best key first.

    ``aging`` seconds of waiting are worth one priority level. Because every
    waiter ages at the same rate, the effective order is that of the fixed key
    ``priority + enqueued_at / aging``, so the heap never needs re-sorting.
    """

    def __init__(
        self,
        *,
        slots: int,
        max_size: int,
        max_wait: float = 0.0,
        aging: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._slots = slots
        self._max_size = max_size
        self._max_wait = max_wait
        self._aging = aging
        self._clock = clock
        self._levels: dict[int, LevelQueue] = {}
        self._queued = 0
        self._running: dict[Ticket, None] = {}  # insertion-ordered set
        self._seq = itertools.count(1)
        self._paused = False
        self._closed: Callable[[], RequestError] | None = None
        self._listeners: list[Listener] = []
        self._hold_ewma = 0.0

    # -- state --------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def paused(self) -> bool:
        return self._paused

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    def queued(self) -> list[Ticket]:
        """Waiting tickets in dispatch order (within a level, the level's own order)."""
        lines = [list(level) for level in self._levels.values()]
        return list(heapq.merge(*lines, key=lambda t: (t.key, t.seq)))

    def running(self) -> list[Ticket]:
        return list(self._running)

    def effective_priority(self, ticket: Ticket, now: float) -> float:
        if not self._aging:
            return float(ticket.priority)
        return ticket.priority - (now - ticket.enqueued_at) / self._aging

    def retry_after(self) -> int:
        """A guess, in whole seconds, at when a refused client might get in: 1 to 60."""
        estimate = self._hold_ewma * (self._queued + 1) / self._slots
        return max(1, min(60, math.ceil(estimate)))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def __repr__(self) -> str:
        return (
            f"<Scheduler slots={self._slots} in_flight={self.in_flight} "
            f"queued={self._queued} paused={self._paused} closed={self._closed is not None}>"
        )

    # -- configuration ---------------------------------------------------------------

    def reconfigure(self, *, max_size: int, max_wait: float, aging: float) -> None:
        """New limits for new arrivals; queued tickets keep their deadlines and priorities."""
        self._max_size = max_size
        self._max_wait = max_wait
        if aging != self._aging:
            self._aging = aging
            for level in self._levels.values():
                for ticket in level:
                    ticket.key = self._key(ticket)

    def _key(self, ticket: Ticket) -> float:
        if self._aging:
            return ticket.priority + ticket.enqueued_at / self._aging
        return float(ticket.priority)

    # -- the queue ------------------------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Slot:
        """Wait for a slot. Raises ``QueueFull``, ``QueueTimeout`` or the close reason.

        A ticket that comes back (its upstream was unreachable, or ``Ticket.resume`` gave
        it a hung-up request's place) keeps its place, its deadline, and is not counted
        against ``max_size``.
        """
        if self._closed is not None:
            raise self._closed()
        now = self.now()
        if ticket.state is State.NEW:
            ticket.seq = next(self._seq)
            ticket.enqueued_at = now
            ticket.wait_limit = self._max_wait if ticket.max_wait is None else ticket.max_wait
            if ticket.wait_limit:
                ticket.deadline = now + ticket.wait_limit
            ticket.key = self._key(ticket)
            if not self._paused and self._queued == 0 and len(self._running) < self._slots:
                return self._start(ticket, now)
            if self._queued >= self._max_size:
                ticket.state = State.DONE
                raise QueueFull(retry_after=self.retry_after())
        else:
            if ticket.state is State.RETURNING:
                ticket.key = self._key(ticket)  # its old arrival, under today's aging
            if now >= ticket.deadline:
                ticket.state = State.DONE
                raise self._timeout_error(ticket)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        ticket._waiter = waiter
        ticket.state = State.QUEUED
        self._level(ticket.priority).push(ticket)
        self._queued += 1
        if ticket.deadline != math.inf:
            ticket._timer = loop.call_at(ticket.deadline, self._expire, ticket)
        self._emit("queued", ticket)
        self._dispatch()  # a returning ticket may be first in line for a free slot
        try:
            await waiter
        except BaseException:
            if ticket.state is State.RUNNING:
                self._finish(ticket)  # woken and cancelled at once: pass the turn on
            elif ticket.state is State.QUEUED:
                self._drop(ticket)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # consumed; the caller sees the cancellation instead
            raise
        return Slot(self, ticket)

    def _start(self, ticket: Ticket, now: float) -> Slot:
        ticket.state = State.RUNNING
        ticket.started_at = now
        self._running[ticket] = None
        self._emit("started", ticket)
        return Slot(self, ticket)

    def _level(self, priority: int) -> LevelQueue:
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = FifoLevel()
        return level

    def _best(self) -> Ticket | None:
        best: Ticket | None = None
        for level in self._levels.values():
            head = level.head()
            if head is not None and (best is None or (head.key, head.seq) < (best.key, best.seq)):
                best = head
        return best

    def _dispatch(self) -> None:
        while self._queued and not self._paused and len(self._running) < self._slots:
            ticket = self._best()
            assert ticket is not None
            waiter = ticket._waiter
            assert waiter is not None
            if waiter.done():
                # Its task was cancelled in this loop step (the client hung up) and has not
                # run its clean-up yet: take it out of line here and pass over it.
                self._drop(ticket)
                continue
            self._levels[ticket.priority].pop(ticket)
            self._queued -= 1
            self._cancel_timer(ticket)
            self._start(ticket, self.now())
            waiter.set_result(None)
            ticket._waiter = None

    def _finish(self, ticket: Ticket, tokens: float | None = None) -> None:
        if ticket.state is not State.RUNNING:
            return
        ticket.state = State.DONE
        del self._running[ticket]
        level = self._levels.get(ticket.priority)
        if level is not None:
            level.finished(ticket, tokens)
        held = self.now() - ticket.started_at
        self._hold_ewma = held if not self._hold_ewma else 0.8 * self._hold_ewma + 0.2 * held
        self._emit("finished", ticket)
        self._dispatch()

    def _drop(self, ticket: Ticket, error: RequestError | None = None) -> None:
        """Take a queued ticket out of line; fail its waiter with ``error`` if given."""
        ticket.state = State.DONE
        self._levels[ticket.priority].discard(ticket)
        self._queued -= 1
        self._cancel_timer(ticket)
        waiter, ticket._waiter = ticket._waiter, None
        if error is not None and waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._emit("dropped", ticket)

    def _expire(self, ticket: Ticket) -> None:
        ticket._timer = None
        if ticket.state is State.QUEUED:
            self._drop(ticket, self._timeout_error(ticket))

    def _timeout_error(self, ticket: Ticket) -> QueueTimeout:
        limit = "queue.max_wait" if ticket.max_wait is None else f"max_wait of {ticket.source!r}"
        return QueueTimeout(
            f"waited longer than {limit} ({ticket.wait_limit:g} s) for a turn at Ollama; "
            "try again later",
            retry_after=self.retry_after(),
        )

    @staticmethod
    def _cancel_timer(ticket: Ticket) -> None:
        if ticket._timer is not None:
            ticket._timer.cancel()
            ticket._timer = None

    def _emit(self, event: str, ticket: Ticket) -> None:
        for listener in self._listeners:
            listener(event, ticket)

    # -- holding and stopping ------------------------------------------------------------

    def pause(self) -> None:
        """Stop granting slots (Ollama is unreachable); waiters keep their places."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._dispatch()

    def reject_waiting(self, error: Callable[[], RequestError]) -> int:
        """Fail every waiter with a fresh ``error()``; returns how many there were."""
        waiting = self.queued()
        for ticket in waiting:
            self._drop(ticket, error())
        return len(waiting)

    def close(self, error: Callable[[], RequestError]) -> int:
        """Refuse new tickets and fail every waiter; running slots finish normally."""
        self._closed = error
        return self.reject_waiting(error)
