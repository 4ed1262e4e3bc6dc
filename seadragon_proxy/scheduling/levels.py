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
from collections.abc import Callable, Iterator
from typing import Protocol

from .ticket import Ticket

Servable = Callable[[Ticket], bool]  # may this ticket go to the slot on offer?


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
    to its old place (by ``seq``) — rare: only when its upstream turned out unreachable."""

    __slots__ = ("_line",)

    def __init__(self) -> None:
        self._line: OrderedDict[Ticket, None] = OrderedDict()

    def push(self, ticket: Ticket) -> None:
        line = self._line
        last = next(reversed(line), None)
        line[ticket] = None
        if last is not None and last.seq > ticket.seq:
            for other in [t for t in line if t.seq > ticket.seq]:
                line.move_to_end(other)

    def discard(self, ticket: Ticket) -> None:
        self._line.pop(ticket, None)

    def head(self, servable: Servable | None = None) -> Ticket | None:
        if servable is None:
            return next(iter(self._line), None)
        return next((t for t in self._line if servable(t)), None)

    def pop(self, ticket: Ticket) -> None:
        del self._line[ticket]

    def try_start(self, ticket: Ticket) -> bool:
        return True

    def finished(self, ticket: Ticket, tokens: float | None) -> None:
        pass

    def __len__(self) -> int:
        return len(self._line)

    def __iter__(self) -> Iterator[Ticket]:
        return iter(self._line)
