"""Fair shares between the tenants of one priority level: the Virtual Token Counter.

Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024). Each tenant has a
counter of the service it received, in weighted tokens (``cost / weight``). The level
serves the backlogged tenant with the least counter, its oldest waiter first (FIFO within
a tenant). A tenant that becomes backlogged is lifted to the least counter among the
backlogged tenants (or, when none is, to the counter the last dispatch was made at), so
time spent idle banks no credit. A request is charged ``ticket.estimate`` when it starts
and corrected by its real cost (``finished(ticket, tokens)``) when it ends.

Backlogged tenants sit in a heap keyed by (counter, seq of their oldest waiter), with lazy
deletion: a tenant whose counter or head changed pushes a fresh entry and the old one is
skipped when it surfaces. ``head()`` is O(1) amortised whatever the number of tenants.
A filter (``servable``, or a tenant at its ``max_in_flight``) walks the heap in order
without popping it, so a capped tenant never blocks the next one. Each tenant also keeps a
sub-line per model (as ``FifoLevel`` does), so a ``ModelFilter`` (affinity's search for
loaded-model work) looks at those models' waiters only. No aiohttp here.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from .levels import ModelFilter, Servable
from .ticket import Ticket

_Entry = tuple[float, int, int, str]  # (counter, head seq, version, tenant)


@dataclass(slots=True)
class _Tenant:
    name: str
    counter: float = 0.0
    version: int = 0
    in_flight: int = 0
    line: OrderedDict[Ticket, None] = field(default_factory=OrderedDict)
    models: dict[str | None, OrderedDict[Ticket, None]] = field(default_factory=dict)

    def add(self, ticket: Ticket) -> bool:
        """Into its place by ``seq`` (a returning ticket goes back to its old one); returns
        whether it went before others."""
        moved = False
        for line in (self.line, self.models.setdefault(ticket.model, OrderedDict())):
            last = next(reversed(line), None)
            line[ticket] = None
            if last is not None and last.seq > ticket.seq:
                moved = True
                for other in [t for t in line if t.seq > ticket.seq]:
                    line.move_to_end(other)
        return moved

    def remove(self, ticket: Ticket) -> None:
        del self.line[ticket]
        sub = self.models[ticket.model]
        del sub[ticket]
        if not sub:
            del self.models[ticket.model]

    def first(self, servable: Servable) -> Ticket | None:
        """Its oldest waiter ``servable`` accepts."""
        if isinstance(servable, ModelFilter):
            found = (
                next((t for t in sub if servable.accept(t)), None)
                for model in servable.models
                if (sub := self.models.get(model))
            )
            return min((t for t in found if t is not None), key=lambda t: t.seq, default=None)
        return next((t for t in self.line if servable(t)), None)

    def capped(self) -> bool:
        if not self.line:
            return False
        cap = next(iter(self.line)).max_in_flight
        return cap > 0 and self.in_flight >= cap


def tenant_of(ticket: Ticket) -> str:
    """A ticket without a tenant counts as its source (``fair_by: none``)."""
    return ticket.tenant if ticket.tenant is not None else ticket.source


class FairLevel:
    """A ``LevelQueue`` that shares its level between tenants by weighted token counts."""

    __slots__ = ("_charged", "_floor", "_heap", "_queued", "_tenants", "_versions")

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}
        self._heap: list[_Entry] = []
        self._charged: dict[Ticket, float] = {}  # running tickets: counter units charged
        self._queued = 0
        self._floor = 0.0  # the counter the latest dispatch was made at
        # Versions are unique across tenants: a stale entry of a forgotten tenant can never
        # pass for the entry of a new record of the same name.
        self._versions = itertools.count(1)

    # -- views --------------------------------------------------------------------

    def counter(self, tenant: str) -> float:
        """A tenant's weighted service so far (0 for one this level does not remember)."""
        record = self._tenants.get(tenant)
        return record.counter if record is not None else 0.0

    def tenants(self) -> int:
        """How many tenants this level remembers (backlogged, running or recently lifted)."""
        return len(self._tenants)

    def __len__(self) -> int:
        return self._queued

    def __iter__(self) -> Iterator[Ticket]:
        """Queued tickets in the order this level would serve them if every request cost
        its estimate (the real order depends on the real costs)."""
        counters = {name: t.counter for name, t in self._tenants.items() if t.line}
        lines = {name: iter(list(self._tenants[name].line)) for name in counters}
        heads = {name: next(lines[name]) for name in counters}
        heap = [(counters[name], heads[name].seq, name) for name in counters]
        heapq.heapify(heap)
        while heap:
            counter, _, name = heapq.heappop(heap)
            ticket = heads[name]
            yield ticket
            following = next(lines[name], None)
            if following is not None:
                heads[name] = following
                cost = _cost(ticket)
                heapq.heappush(heap, (counter + cost, following.seq, name))

    # -- the LevelQueue protocol ------------------------------------------------------

    def push(self, ticket: Ticket) -> None:
        name = tenant_of(ticket)
        record = self._tenants.get(name)
        if record is None:
            record = self._tenants[name] = _Tenant(name)
        idle = not record.line
        if idle:  # it becomes backlogged: no credit for having been idle
            record.counter = max(record.counter, self._least_backlogged())
        moved = record.add(ticket)  # a returning ticket goes back to its old place
        self._queued += 1
        if idle or moved:  # otherwise neither its counter nor its head changed
            self._enter(record)

    def discard(self, ticket: Ticket) -> None:
        record = self._tenants.get(tenant_of(ticket))
        if record is None or ticket not in record.line:
            return
        first = next(iter(record.line)) is ticket
        record.remove(ticket)
        self._queued -= 1
        if first:
            self._enter(record)
        self._forget_if_idle(record)

    def head(self, servable: Servable | None = None) -> Ticket | None:
        heap = self._heap
        tenants = self._tenants
        while heap:  # drop stale entries at the top: O(1) amortised
            _, _, version, name = heap[0]
            record = tenants.get(name)
            if record is not None and record.version == version and record.line:
                break
            heapq.heappop(heap)
        if not heap:
            return None
        record = tenants[heap[0][3]]
        if servable is None and not record.capped():
            return next(iter(record.line))
        return self._walk(servable)

    def pop(self, ticket: Ticket) -> None:
        record = self._tenants[tenant_of(ticket)]
        record.remove(ticket)
        self._queued -= 1
        self._floor = max(self._floor, record.counter)
        self._charge(record, ticket)
        self._enter(record)  # a new counter, perhaps a new head

    def try_start(self, ticket: Ticket) -> bool:
        """Nobody waits at any level: may ``ticket`` start at once? If so it is charged."""
        name = tenant_of(ticket)
        record = self._tenants.get(name)
        if record is None:
            record = self._tenants[name] = _Tenant(name)
        cap = ticket.max_in_flight
        if cap > 0 and record.in_flight >= cap:
            return False
        record.counter = max(record.counter, self._floor)  # it was idle too
        self._floor = record.counter
        self._charge(record, ticket)
        return True

    def finished(self, ticket: Ticket, tokens: float | None) -> None:
        record = self._tenants.get(tenant_of(ticket))
        charged = self._charged.pop(ticket, None)
        if record is None or charged is None:
            return
        record.in_flight -= 1
        if tokens is not None:  # the real cost replaces the estimate
            record.counter += max(0.0, tokens) / _weight(ticket) - charged
            if record.line:
                self._enter(record)
        self._forget_if_idle(record)

    # -- inside -------------------------------------------------------------------

    def _charge(self, record: _Tenant, ticket: Ticket) -> None:
        units = max(0.0, ticket.estimate) / _weight(ticket)
        record.counter += units
        record.in_flight += 1
        self._charged[ticket] = units

    def _enter(self, record: _Tenant) -> None:
        """(Re)file a tenant in the heap under its current counter and head."""
        record.version = next(self._versions)
        if record.line:
            head = next(iter(record.line))
            heapq.heappush(self._heap, (record.counter, head.seq, record.version, record.name))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._tenants):
            self._compact()
        if len(self._tenants) > 2 * (self._queued + len(self._charged)) + 64:
            self._sweep()  # idle tenants outnumber busy ones: amortised O(1) per tenant

    def _compact(self) -> None:
        """Stale entries outnumber live ones: rebuild (amortised O(1) per change)."""
        live: list[_Entry] = []
        for record in self._tenants.values():
            if record.line:
                head = next(iter(record.line))
                live.append((record.counter, head.seq, record.version, record.name))
        heapq.heapify(live)
        self._heap = live

    def _sweep(self) -> None:
        """Forget every idle tenant (amortised O(1) per tenant). An idle tenant's counter
        is at most one request's cost above the floor (it was the least when last served),
        so forgetting it hands back at most that: within the paper's bound."""
        for record in list(self._tenants.values()):
            if not record.line and not record.in_flight:
                del self._tenants[record.name]

    def _least_backlogged(self) -> float:
        """The least counter among backlogged tenants, or the floor if none is."""
        heap = self._heap
        tenants = self._tenants
        while heap:
            counter, _, version, name = heap[0]
            record = tenants.get(name)
            if record is not None and record.version == version and record.line:
                return counter
            heapq.heappop(heap)
        return self._floor

    def _walk(self, servable: Servable | None) -> Ticket | None:
        """The heap's entries in order, without popping: the first tenant that is not
        capped and has a servable waiter, and that waiter."""
        heap = self._heap
        tenants = self._tenants
        frontier = [(heap[0], 0)]
        while frontier:
            entry, index = heapq.heappop(frontier)
            for child in (2 * index + 1, 2 * index + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
            _, _, version, name = entry
            record = tenants.get(name)
            if record is None or record.version != version or not record.line:
                continue
            if record.capped():
                continue
            if servable is None:
                return next(iter(record.line))
            found = record.first(servable)
            if found is not None:
                return found
        return None

    def _forget_if_idle(self, record: _Tenant) -> None:
        """Nothing queued, nothing running, and no counter above the floor: a later push
        would lift it to the floor anyway, so the record can go (memory stays bounded)."""
        if not record.line and not record.in_flight and record.counter <= self._floor:
            del self._tenants[record.name]


def _weight(ticket: Ticket) -> float:
    return ticket.weight if ticket.weight > 0 else 1.0


def _cost(ticket: Ticket) -> float:
    """For the view's simulated order: what serving ``ticket`` adds to its tenant."""
    return max(0.0, ticket.estimate) / _weight(ticket)
