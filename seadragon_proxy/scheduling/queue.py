"""The one interface the proxy waits on: the local ``Scheduler`` (``queue.backend: memory``)
and the Redis backend's ``RemoteQueue`` (``replicas/remote.py``) both provide it, so the
request path is the same code for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..exceptions import RequestError
from .ticket import Ticket


class Held(Protocol):
    """A granted turn at Ollama; ``release`` is idempotent and hands the turn on."""

    @property
    def ticket(self) -> Ticket: ...

    @property
    def server_name(self) -> str | None:
        """The Ollama server (its name) the turn is on; ``None``: the first one."""

    def report_load(self, seconds: float) -> None:
        """Ollama's ``load_duration`` of the answer: teaches the swap cost."""

    def release(self, tokens: float | None = None) -> None: ...


class Queue(Protocol):
    async def acquire(self, ticket: Ticket) -> Held:
        """Wait for a turn; raises a ``RequestError`` when the ticket cannot be served."""
        ...

    def close(self, error: Callable[[], RequestError]) -> int:
        """Refuse new tickets and fail this process's waiters; returns how many there were."""
        ...
