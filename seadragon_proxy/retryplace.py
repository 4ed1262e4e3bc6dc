"""Places kept for retries: a client that hangs up while queued and sends the same request
again within ``queue.retry_window`` seconds gets its place back, not the end of the line.

"The same request" is the same client address, source, route and body (its SHA-256): what
a client's own retry sends (openai-js retries silently after Node's 300 s header timeout).
The table is bounded; what it holds expires by time, pruned as it is used: no timers, no I/O.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")
Identity = tuple[str, str, str, str]  # client, source, route, body digest

CAPACITY = 1024  # places kept at most; the oldest goes first


def identity(client: str, source: str, route: str, body: bytes) -> Identity:
    return client, source, route, hashlib.sha256(body).hexdigest()


class RetryPlaces(Generic[T]):
    """``remember`` a place when a queued request is given up, ``take`` it back (once) when
    the same request arrives within ``window`` seconds. ``window`` 0: nothing is kept."""

    __slots__ = ("_capacity", "_places", "window")

    def __init__(self, *, window: float, capacity: int = CAPACITY) -> None:
        self.window = window
        self._capacity = capacity
        self._places: OrderedDict[Identity, tuple[float, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._places)

    def __repr__(self) -> str:
        return f"RetryPlaces(window={self.window:g}, held={len(self._places)})"

    def remember(self, key: Identity, place: T, now: float) -> None:
        if not self.window:
            return
        self._places.pop(key, None)
        self._places[key] = (now, place)
        self._prune(now)
        while len(self._places) > self._capacity:
            self._places.popitem(last=False)

    def take(self, key: Identity, now: float) -> T | None:
        self._prune(now)
        found = self._places.pop(key, None)
        return None if found is None else found[1]

    def _prune(self, now: float) -> None:
        """Drop what is older than the window: the oldest are first (kept in time order)."""
        places = self._places
        while places:
            first = next(iter(places))
            if now - places[first][0] <= self.window:
                break
            del places[first]
