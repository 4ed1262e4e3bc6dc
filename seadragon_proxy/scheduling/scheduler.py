"""Who goes next, and where: the priority queue in front of the Ollama servers' slots.

One ``LevelQueue`` per priority (levels.py decides the order inside a level) and a list of
``Server`` (servers.py: slots, residency, swap costs, health). Across levels the heads
compare by ``(key, seq)``: strict priority, or aged priority with ``queue.aging``. When a
slot frees anywhere, or a request arrives, ``_dispatch`` gives each free slot the best
waiter that server may serve, preferring a server that has the model loaded, then one that
can load it without evicting busy work; with ``queue.affinity`` a server may pass over the
best waiter for loaded-model work within ``window`` levels, for a bounded time. A waiter is
woken by resolving its future: no polling, no worker hop. No aiohttp here.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from ..exceptions import QueueFull, QueueTimeout, RequestError
from .levels import FifoLevel, LevelQueue, ModelFilter
from .servers import Fit, Health, Server, canonical
from .ticket import State, Ticket

Listener = Callable[[str, Ticket], None]  # event is "queued", "started", "finished" or "dropped"
LevelFactory = Callable[[int], LevelQueue]  # priority -> that level's queue

# A waiter is passed over to avoid a swap for at most this many times what the swap costs
# (loading its model, plus reloading the model it would evict), and never beyond max_defer.
DEFER_PER_SWAP_SECOND = 10.0
# A load_duration this long on a model the proxy thought loaded means Ollama loaded it anyway
# (a loaded model answers with a load_duration of a few milliseconds).
UNEXPECTED_LOAD = 0.5


@dataclass(frozen=True, slots=True)
class Affinity:
    """``queue.affinity``: reorder within ``window`` levels to avoid model swaps."""

    window: int = 0
    max_defer: float = 0.0  # 0 = off: the strict (or aged) priority order exactly
    min_residency: float = 0.0

    @property
    def on(self) -> bool:
        return self.max_defer > 0


def _fifo(priority: int) -> LevelQueue:
    return FifoLevel()


def _waits_for(
    blocked: set[Ticket],
    free: set[Server],
    servers_for: Callable[[Ticket], tuple[Server, ...]],
    ticket: Ticket,
) -> bool:
    """May ``ticket`` go to one of the ``free`` servers (and is it not held back)?"""
    return ticket not in blocked and any(s in free for s in servers_for(ticket))


class Slot:
    """A held upstream slot. ``release()`` is idempotent and hands the slot on at once."""

    __slots__ = ("_released", "_scheduler", "ticket")

    def __init__(self, scheduler: Scheduler, ticket: Ticket) -> None:
        self._scheduler = scheduler
        self.ticket = ticket
        self._released = False

    @property
    def server(self) -> Server:
        """The server this slot is on: send the request there."""
        return self._scheduler.server(self.ticket.server)

    @property
    def server_name(self) -> str | None:
        return self.ticket.server

    def report_load(self, seconds: float) -> None:
        """Ollama's ``load_duration`` for this request: if starting it loaded its model,
        that is what the swap cost (learned per server and model). Before or after release."""
        ticket = self.ticket
        ticket.load_seconds = seconds
        if ticket.model is None:
            return
        if not ticket.swapped and seconds >= UNEXPECTED_LOAD:
            # Ollama loaded it although the proxy thought it loaded (evicted behind our back,
            # or by its own limits): a swap all the same, and the residency view was wrong.
            ticket.swapped = True
            self.server.swaps += 1
        if ticket.swapped:
            self.server.learn_load(ticket.model, seconds)

    def release(self, tokens: float | None = None) -> None:
        """``tokens``: what the request really cost (prompt + weighted output), if known."""
        if not self._released:
            self._released = True
            self._scheduler._finish(self.ticket, tokens)

    @property
    def released(self) -> bool:
        return self._released


class Scheduler:
    """Grants at most ``slots`` tickets at once per server, best key first.

    ``aging`` seconds of waiting are worth one priority level. Because every
    waiter ages at the same rate, the effective order is that of the fixed key
    ``priority + enqueued_at / aging``, so the heap never needs re-sorting.
    """

    def __init__(
        self,
        *,
        slots: int = 1,
        max_size: int,
        max_wait: float = 0.0,
        aging: float = 0.0,
        clock: Callable[[], float] | None = None,
        servers: Sequence[Server] | None = None,
        affinity: Affinity | None = None,
        level_factory: LevelFactory = _fifo,
    ) -> None:
        """``servers``: the fleet; without it one server called ``default`` with ``slots``."""
        self.servers: tuple[Server, ...] = tuple(servers or (Server("default", slots),))
        self._capacity = sum(s.slots for s in self.servers)
        self._eligible_cache: dict[str | None, tuple[Server, ...]] = {}
        self._by_name = {s.name: s for s in self.servers}
        self._affinity = affinity or Affinity()
        self._level_factory = level_factory
        self._max_size = max_size
        self._max_wait = max_wait
        self._aging = aging
        self._clock = clock
        self._levels: dict[int, LevelQueue] = {}
        self._queued = 0
        self._waiting: dict[str | None, int] = {}  # model -> how many wait for it
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
        return sum(s.slots for s in self.servers)

    @property
    def affinity(self) -> Affinity:
        return self._affinity

    def server(self, name: str | None) -> Server:
        return self._by_name[name] if name is not None else self.servers[0]

    def serves(self, model: str | None) -> bool:
        """May any server serve ``model`` (healthy or not)? If not, it is unknown here."""
        return any(s.allows(model) for s in self.servers)

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
        estimate = self._hold_ewma * (self._queued + 1) / self.slots
        return max(1, min(60, math.ceil(estimate)))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def __repr__(self) -> str:
        return (
            f"<Scheduler slots={self.slots} in_flight={self.in_flight} "
            f"queued={self._queued} paused={self._paused} closed={self._closed is not None}>"
        )

    # -- configuration ---------------------------------------------------------------

    def reconfigure(
        self, *, max_size: int, max_wait: float, aging: float, affinity: Affinity | None = None
    ) -> None:
        """New limits for new arrivals; queued tickets keep their deadlines and priorities."""
        self._max_size = max_size
        self._max_wait = max_wait
        if aging != self._aging:
            self._aging = aging
            for level in self._levels.values():
                for ticket in level:
                    ticket.key = self._key(ticket)
        if affinity is not None and affinity != self._affinity:
            self._affinity = affinity
            self._dispatch()  # turned off: a waiter held back for loaded work may go now

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
            if not self._paused and self._queued == 0:
                server = self._place_alone(ticket)
                if server is not None and self._level(ticket.priority).try_start(ticket):
                    return self._start(ticket, server, now)
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
        self._waiting[ticket.model] = self._waiting.get(ticket.model, 0) + 1
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

    def _start(self, ticket: Ticket, server: Server, now: float) -> Slot:
        ticket.state = State.RUNNING
        ticket.started_at = now
        ticket.server = server.name
        ticket.swapped = server.start(ticket, now)
        self._running[ticket] = None
        self._emit("started", ticket)
        return Slot(self, ticket)

    def _level(self, priority: int) -> LevelQueue:
        """The one place a priority level's queue is created."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = self._level_factory(priority)
        return level

    def _best(
        self, servable: Callable[[Ticket], bool] | None, below: float = math.inf
    ) -> Ticket | None:
        """The best waiter ``servable`` accepts, in levels whose first waiter's key is at most
        ``below`` (a level's first waiter has its lowest key: further ones are not looked at)."""
        best: Ticket | None = None
        for level in self._levels.values():
            if below != math.inf:
                first = level.head()
                if first is None or first.key > below:
                    continue
            head = level.head(servable)
            if head is not None and (best is None or (head.key, head.seq) < (best.key, best.seq)):
                best = head
        return best

    # -- where: which servers a waiter may use ------------------------------------------------

    def _eligible(self, model: str | None) -> tuple[Server, ...]:
        """The servers ``model`` may go to now: the allowed ones that are up; if none is up
        and none is only briefly down, the failing ones (so the request fails fast). A waiter
        no /api/tags lists any more (deleted, or let in while a pull was under way) goes
        where the ``models`` globs permit, for Ollama to answer: it never waits for nothing.
        Cached per model until a server's health or models change."""
        found = self._eligible_cache.get(model)
        if found is None:
            allowed = [s for s in self.servers if s.allows(model)]
            allowed = allowed or [s for s in self.servers if s.permits(model)]
            found = tuple(s for s in allowed if s.health is Health.UP)
            if not found and not any(s.health is Health.DOWN for s in allowed):
                found = tuple(allowed)
            if len(self._eligible_cache) >= 10_000:  # model names come from clients
                self._eligible_cache.clear()
            self._eligible_cache[model] = found
        return found

    def _choose(self, ticket: Ticket, servers: Sequence[Server]) -> Server:
        """Among servers with a free slot: the model loaded, then room to load it, then an
        idle model to evict; equal fits by the cheaper load (a learned one before an unknown
        one), then the most free slots, then the order of the config."""
        model = ticket.model

        def rank(s: Server) -> tuple[Fit, float, int]:
            cost = s.cost(model) if model is not None else None
            return s.fit(model), math.inf if cost is None else cost, -s.free

        return min(servers, key=rank)

    def _place_alone(self, ticket: Ticket) -> Server | None:
        """Nobody waits: the server ``ticket`` may start on at once, if any."""
        open_ = [s for s in self._eligible(ticket.model) if s.free > 0]
        if not open_:
            return None
        server = self._choose(ticket, open_)
        return None if server.fit(ticket.model) is Fit.EVICT_BUSY else server

    # -- who: the dispatch loop -------------------------------------------------------------

    def _dispatch(self) -> None:
        """Fill free slots: each time, the best waiter that some free server may serve."""
        if self._paused or not self._queued or len(self._running) >= self._capacity:
            return
        now = self.now()
        blocked: set[Ticket] = set()  # waiting for a better fit, for this pass
        held: set[Server] = set()  # draining busy work for such a waiter
        servers_for = self._servers_for

        while self._queued and len(self._running) < self._capacity:
            # Usually the best waiter of all can go somewhere: no filter, no set.
            ticket = None if blocked else self._best(None)
            candidates = [s for s in servers_for(ticket) if s.free > 0] if ticket else []
            if not candidates:
                open_ = {s for s in self.servers if s.free > 0 and s not in held}
                if not open_:
                    return
                ticket = self._best(partial(_waits_for, blocked, open_, servers_for))
                if ticket is None:
                    return
                candidates = [s for s in servers_for(ticket) if s in open_]
            assert ticket is not None
            if self._gone(ticket):
                continue
            server = candidates[0] if len(candidates) == 1 else self._choose(ticket, candidates)
            fit = server.fit(ticket.model)
            if fit is not Fit.LOADED and self._affinity.on:
                other = self._affine(server, ticket, fit, now, blocked)
                if other is not None:
                    self._grant(other, server, now)
                    continue
                if fit is not Fit.EVICT_BUSY and self._drains_elsewhere(server, ticket, now):
                    blocked.add(ticket)  # a server with its model loaded takes it in time
                    other = self._loaded_anywhere(server, blocked)
                    if other is not None:  # no load, and ticket is not going here anyway
                        self._grant(other, server, now)
                    else:
                        held.add(server)
                    continue
            if fit is Fit.EVICT_BUSY:
                # Wait for a better fit rather than evict work in flight. Unless its model is
                # loaded on a busy server it may use (it goes there next), hold this server:
                # no more work for the busy model, so the model can go once it is idle.
                blocked.add(ticket)
                if not any(s.has_loaded(ticket.model) for s in servers_for(ticket)):
                    held.add(server)
                continue
            self._grant(ticket, server, now)

    def _servers_for(self, ticket: Ticket) -> tuple[Server, ...]:
        return self._eligible(ticket.model)

    def _gone(self, ticket: Ticket) -> bool:
        waiter = ticket._waiter
        assert waiter is not None
        if waiter.done():
            # Its task was cancelled in this loop step (the client hung up) and has not run
            # its clean-up yet: take it out of line here and pass over it.
            self._drop(ticket)
            return True
        return False

    def _affine(
        self, server: Server, best: Ticket, fit: Fit, now: float, blocked: set[Ticket]
    ) -> Ticket | None:
        """Affinity's choice for ``server`` instead of ``best`` (whose model it has not
        loaded), if any. First loaded-model work (no load at all). Then the spread: if what
        ``server`` would serve — ``best`` to load, or that loaded-model work — is for a model
        another server that may serve it has loaded (or is loading), and a waiter within the
        window wants a model no server has, that waiter (perhaps ``best`` itself), so that
        two servers do not hold the same model while another one waits for any."""
        passed_at = best.passed_at
        other = self._loaded_work(server, best, now, blocked) if fit >= Fit.EVICT_IDLE else None
        goes = best if other is None else other
        if fit is Fit.EVICT_BUSY or not self._elsewhere(goes.model, server):
            return other
        spread = self._spread(server, best, now, blocked)
        if spread is best:
            best.passed_at = passed_at  # it goes now: it was not passed over after all
        return other if spread is None else spread

    def _elsewhere(self, model: str | None, server: Server) -> bool:
        """Has a server other than ``server`` that may serve ``model`` it loaded (or loading)?"""
        return model is not None and any(
            s is not server and s.has_loaded(model) for s in self._eligible(model)
        )

    def _spread(
        self, server: Server, best: Ticket, now: float, blocked: set[Ticket]
    ) -> Ticket | None:
        """The best waiter within ``window`` levels of ``best`` that ``server`` may serve and
        whose model no server has loaded; ``best`` is then passed over, for at most
        ``max_defer``. Looks only at the sub-lines of models nobody has loaded."""
        loaded: set[str] = set()
        for s in self.servers:
            loaded.update(s.loaded)
        models = [
            m
            for m in self._waiting
            if m is not None and canonical(m) not in loaded and server in self._eligible(m)
        ]
        if not models:
            return None
        window = self._affinity.window

        def accept(t: Ticket) -> bool:
            return t.key - best.key <= window and t not in blocked

        fits = ModelFilter(models, accept)
        while True:
            found = self._best(fits, below=best.key + window)
            if found is None or not self._gone(found):
                break
        if found is None or found is best:
            return found
        deadline = (best.passed_at or now) + self._affinity.max_defer
        return found if self._pass_over(best, deadline, now) else None

    def _drains_elsewhere(self, server: Server, best: Ticket, now: float) -> bool:
        """Should ``server`` stay free rather than load ``best``'s model, which other servers
        that may serve it have loaded? Yes if they will have served every waiter for it (at
        the mean hold time) before ``best``'s deadline: ``DEFER_PER_SWAP_SECOND`` times the
        load avoided (unknown: ``max_defer``), at most ``max_defer`` from when it was first
        passed over. ``best`` is then passed over until that deadline."""
        model = best.model
        if model is None:
            return False
        others = [s for s in self._eligible(model) if s is not server and s.has_loaded(model)]
        if not others:
            return False
        cost = server.cost(model)
        if cost is None:
            cost = next((c for s in others if (c := s.cost(model)) is not None), None)
        a = self._affinity
        limit = a.max_defer if cost is None else min(a.max_defer, DEFER_PER_SWAP_SECOND * cost)
        deadline = (best.passed_at or now) + limit
        drain = self._waiting.get(model, 0) * self._hold_ewma / sum(s.slots for s in others)
        return now + drain < deadline and self._pass_over(best, deadline, now)

    def _loaded_anywhere(self, server: Server, blocked: set[Ticket]) -> Ticket | None:
        """The best waiter, at any level, for a model ``server`` has loaded (sub-lines only)."""
        eligible: dict[str | None, bool] = {}

        def accept(t: Ticket) -> bool:
            if t in blocked:
                return False
            ok = eligible.get(t.model)
            if ok is None:
                ok = eligible[t.model] = server in self._eligible(t.model)
            return ok

        fits = ModelFilter(server.loaded_names(), accept)
        while True:
            other = self._best(fits)
            if other is None or not self._gone(other):
                return other

    def _pass_over(self, best: Ticket, deadline: float, now: float) -> bool:
        """Pass ``best`` over until ``deadline`` if that is still ahead (a dispatch then)."""
        if now >= deadline:
            return False
        best.passed_at = best.passed_at or now
        timer = best._defer_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            loop = asyncio.get_running_loop()
            best._defer_timer = loop.call_later(max(0.0, deadline - now), self._dispatch)
        return True

    def _loaded_work(
        self, server: Server, best: Ticket, now: float, blocked: set[Ticket]
    ) -> Ticket | None:
        """Affinity: the best waiter for a model loaded on ``server`` within ``window`` levels
        of ``best``, if ``best`` may still be passed over; ``best`` is then marked passed."""
        window = self._affinity.window
        eligible: dict[str | None, bool] = {}

        def accept(t: Ticket) -> bool:
            if t.key - best.key > window or t in blocked:
                return False
            ok = eligible.get(t.model)
            if ok is None:
                ok = eligible[t.model] = server in self._eligible(t.model)
            return ok

        fits = ModelFilter(server.loaded_names(), accept)
        while True:
            other = self._best(fits, below=best.key + window)
            if other is None or not self._gone(other):
                break
        if other is None:
            return None
        passed_at = best.passed_at or now
        deadline = passed_at + self._defer_limit(server, best, other, passed_at)
        return other if self._pass_over(best, deadline, now) else None

    def _defer_limit(self, server: Server, best: Ticket, other: Ticket, passed_at: float) -> float:
        """How long ``best`` may be passed over on ``server``: ``DEFER_PER_SWAP_SECOND`` times
        the swap it avoids (its load plus the evicted model's reload; unknown = max_defer),
        at least what is left of the loaded model's ``min_residency``, at most ``max_defer``."""
        a = self._affinity
        assert best.model is not None and other.model is not None
        evicted = server.victim() or other.model  # no idle one: the busy model it waits for
        costs = [server.cost(best.model), server.cost(evicted)]
        if any(c is None for c in costs):
            by_cost = a.max_defer
        else:
            by_cost = DEFER_PER_SWAP_SECOND * sum(c or 0.0 for c in costs)
        loaded_at = server.loaded_at.get(canonical(other.model), -math.inf)
        residency = loaded_at + a.min_residency - passed_at
        return min(a.max_defer, max(by_cost, residency))

    def _grant(self, ticket: Ticket, server: Server, now: float) -> None:
        self._levels[ticket.priority].pop(ticket)
        self._leave(ticket)
        self._cancel_timer(ticket)
        self._start(ticket, server, now)
        waiter = ticket._waiter
        assert waiter is not None
        waiter.set_result(None)
        ticket._waiter = None

    def _leave(self, ticket: Ticket) -> None:
        self._queued -= 1
        count = self._waiting[ticket.model] - 1
        if count:
            self._waiting[ticket.model] = count
        else:
            del self._waiting[ticket.model]

    def _finish(self, ticket: Ticket, tokens: float | None = None) -> None:
        if ticket.state is not State.RUNNING:
            return
        ticket.state = State.DONE
        del self._running[ticket]
        now = self.now()
        self.server(ticket.server).finish(ticket, now)
        level = self._levels.get(ticket.priority)
        if level is not None:
            level.finished(ticket, tokens)
        held = now - ticket.started_at
        self._hold_ewma = held if not self._hold_ewma else 0.8 * self._hold_ewma + 0.2 * held
        self._emit("finished", ticket)
        self._dispatch()

    def _drop(self, ticket: Ticket, error: RequestError | None = None) -> None:
        """Take a queued ticket out of line; fail its waiter with ``error`` if given."""
        ticket.state = State.DONE
        self._levels[ticket.priority].discard(ticket)
        self._leave(ticket)
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
        if ticket._defer_timer is not None:
            ticket._defer_timer.cancel()
            ticket._defer_timer = None

    def _emit(self, event: str, ticket: Ticket) -> None:
        for listener in self._listeners:
            listener(event, ticket)

    # -- holding and stopping ------------------------------------------------------------

    def pause(self) -> None:
        """Stop granting slots anywhere; waiters keep their places."""
        self._paused = True

    def set_health(self, name: str, health: Health) -> None:
        """A server is up, briefly down (its waiters wait or go elsewhere), or failing."""
        server = self._by_name[name]
        if server.health is not health:
            server.health = health
            self._eligible_cache.clear()
            self._dispatch()

    def refresh(self) -> None:
        """The glue told the servers what they have and have loaded (``observe_known``,
        ``observe_loaded``): where each model may go is worked out afresh."""
        self._eligible_cache.clear()
        self._dispatch()

    def give_up(self, name: str, error: Callable[[], RequestError]) -> int:
        """A server has been down too long: it is failing, and the waiters that no server up
        (or only briefly down) may serve get ``error()``; returns how many."""
        self._by_name[name].health = Health.FAILING
        self._eligible_cache.clear()
        failed = self.reject_stranded(error)
        self._dispatch()
        return failed

    def reject_stranded(self, error: Callable[[], RequestError]) -> int:
        """Fail the waiters no server that is up (or only briefly down) may serve."""
        stranded = [
            t
            for t in self.queued()
            if not any(s.allows(t.model) and s.health is not Health.FAILING for s in self.servers)
        ]
        for ticket in stranded:
            self._drop(ticket, error())
        return len(stranded)

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
