"""One request's place in line."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from enum import Enum


class State(Enum):
    NEW = "new"
    RETURNING = "returning"  # a new ticket given an earlier one's place (``resume``)
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # finished, timed out, rejected or cancelled


@dataclass(frozen=True, slots=True)
class Place:
    priority: int
    seq: int
    enqueued_at: float
    deadline: float
    wait_limit: float


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place in line. The scheduler fills in everything after ``tenant``."""

    id: str
    source: str
    priority: int
    path: str
    model: str | None
    client_ip: str
    max_wait: float | None = None  # the source's own limit; None = queue.max_wait
    # Fair shares (a level's queue may use them): who the request counts for, that
    # tenant's weight, what it is expected to cost in tokens, and how many of the
    # tenant's requests may run at once (0 = no cap).
    tenant: str | None = None
    weight: float = 1.0
    estimate: float = 0.0
    max_in_flight: int = 0
    state: State = State.NEW
    seq: int = 0
    enqueued_at: float = 0.0
    started_at: float = 0.0
    deadline: float = math.inf
    wait_limit: float = 0.0  # the limit it queued under, for the message if it runs out
    key: float = 0.0  # priority + enqueued_at / aging: lower is served first across levels
    server: str | None = None  # where it runs (set when it starts)
    swapped: bool = False  # starting it there loaded its model
    load_seconds: float | None = None  # Ollama's load_duration for it, once known
    passed_at: float = 0.0  # when it was first passed over for loaded-model work (affinity)
    _waiter: asyncio.Future[None] | None = field(default=None, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _defer_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def place(self) -> Place:
        """Where this ticket stands in line, for a retry of the same request to take up."""
        return Place(self.priority, self.seq, self.enqueued_at, self.deadline, self.wait_limit)

    def resume(self, place: Place) -> bool:
        """Take up ``place`` (before ``acquire``): the scheduler then treats this ticket as
        one coming back, in its old place with its old deadline. Refused (``False``) when
        the priority has changed since (a reload): the old place belongs to another line."""
        if self.state is not State.NEW or place.priority != self.priority:
            return False
        self.seq, self.enqueued_at, self.deadline = place.seq, place.enqueued_at, place.deadline
        self.wait_limit = place.wait_limit
        self.state = State.RETURNING
        return True

    def waited(self, now: float) -> float:
        return (self.started_at if self.state is not State.QUEUED else now) - self.enqueued_at
