"""The waiters of one priority level, in the order that level serves them.

The scheduler keeps one ``LevelQueue`` per priority and compares only the levels' heads
(by ``ticket.key``, then ``ticket.seq``), so a level decides freely *which* of its waiters
is next — first in, first out (``FifoLevel``) or fair between tenants — and the order across
levels (strict priority, aging) stays the scheduler's. A level holds only queued tickets:
the scheduler pushes a ticket when it starts waiting and discards it when it leaves the
line for any reason other than being served (timed out, cancelled, rejected).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from typing import Protocol

from .ticket import Ticket

Servable = Callable[[Ticket], bool]  # may this ticket go to the slot on offer?


class ModelFilter:
    """A ``Servable`` that accepts only waiters for ``models`` (and then asks ``accept``).

    A level may recognise it and look at those models' waiters only (``FifoLevel`` keeps a
    sub-line per model for this), so finding loaded-model work stays cheap however long the
    line is; any other level just calls it like any ``Servable``.
    """

    __slots__ = ("accept", "models")

    def __init__(self, models: Collection[str | None], accept: Servable) -> None:
        self.models = models
        self.accept = accept

    def __call__(self, ticket: Ticket) -> bool:
        return ticket.model in self.models and self.accept(ticket)


class LevelQueue(Protocol):
    def push(self, ticket: Ticket) -> None:
        """A ticket starts (or, coming back from an unreachable upstream, resumes) waiting."""

    def discard(self, ticket: Ticket) -> None:
        """A queued ticket leaves the line without being served."""

    def head(self, servable: Servable | None = None) -> Ticket | None:
        """The ticket this level would serve next (among those ``servable`` accepts)."""

    def pop(self, ticket: Ticket) -> None:
        """``ticket`` (a ``head()`` just returned) is being served: out of line."""

    def try_start(self, ticket: Ticket) -> bool:
        """Nobody waits at any level and a slot is free: may ``ticket`` start without
        queueing? ``True`` means it has started (and counts as served by this level)."""

    def finished(self, ticket: Ticket, tokens: float | None) -> None:
        """A ticket this level served has ended; ``tokens`` is its real cost, if known."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Ticket]:
        """The queued tickets in the order this level would serve them (for the views)."""


class FifoLevel:
    """First in, first out; every operation O(1) but a returning ticket's, which goes back
    to its old place (by ``seq``) — rare: only when its upstream turned out unreachable.
    A sub-line per model serves ``head(ModelFilter(...))`` without walking the others."""

    __slots__ = ("_line", "_models")

    def __init__(self) -> None:
        self._line: OrderedDict[Ticket, None] = OrderedDict()
        self._models: dict[str | None, OrderedDict[Ticket, None]] = {}

    def push(self, ticket: Ticket) -> None:
        for line in (self._line, self._models.setdefault(ticket.model, OrderedDict())):
            last = next(reversed(line), None)
            line[ticket] = None
            if last is not None and last.seq > ticket.seq:
                for other in [t for t in line if t.seq > ticket.seq]:
                    line.move_to_end(other)

    def discard(self, ticket: Ticket) -> None:
        if ticket in self._line:
            self.pop(ticket)

    def head(self, servable: Servable | None = None) -> Ticket | None:
        if servable is None:
            return next(iter(self._line), None)
        if isinstance(servable, ModelFilter):
            found = (
                next((t for t in line if servable.accept(t)), None)
                for model in servable.models
                if (line := self._models.get(model))
            )
            return min((t for t in found if t is not None), key=lambda t: t.seq, default=None)
        return next((t for t in self._line if servable(t)), None)

    def pop(self, ticket: Ticket) -> None:
        del self._line[ticket]
        self._leave_model(ticket)

    def _leave_model(self, ticket: Ticket) -> None:
        line = self._models[ticket.model]
        del line[ticket]
        if not line:
            del self._models[ticket.model]

    def try_start(self, ticket: Ticket) -> bool:
        return True

    def finished(self, ticket: Ticket, tokens: float | None) -> None:
        pass

    def __len__(self) -> int:
        return len(self._line)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._line)
