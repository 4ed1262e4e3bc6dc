"""Process set-up shared by the harness and its children: the file limit and the event loop."""

from __future__ import annotations

import asyncio
import importlib.metadata
import resource
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LOOPS = ("asyncio", "uvloop")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (10 000 sockets need it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def loop_version(loop: str) -> str | None:
    """The installed version of the loop's package, ``None`` if it is not installed."""
    if loop == "asyncio":
        return "stdlib"
    try:
        return importlib.metadata.version(loop)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` to completion on the named event loop."""
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
