"""The start-up check of the upstream address: one TCP connection to each Ollama server,
so a mistyped ``--upstream`` port is a warning in the log at start, not a first request
that waits ``upstream.unreachable_wait`` and then gets 502.

Only a connection is opened, no HTTP request is sent: nothing reaches Ollama's log or the
proxy's history, and a URL that leads back to the proxy is caught later, by its ``Via``.
``seadragon-proxy doctor`` is the full check.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable

import structlog
from yarl import URL

log = structlog.get_logger("seadragon.upstream")

OLLAMA_PORT = 11434


async def connect_problem(url: URL, timeout: float) -> str | None:
    """What stops a TCP connection to ``url``'s host and port, in words, or ``None``."""
    host, port = url.host or "", url.port
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return (
            f"no connection within {timeout:g} s (upstream.connect_timeout): check the host "
            "address and any firewall in between"
        )
    except socket.gaierror as e:
        return f"the host name {host} does not resolve ({e.strerror}): check the spelling"
    except ConnectionRefusedError:
        hint = f"check the port (Ollama listens on {OLLAMA_PORT} unless OLLAMA_HOST says "
        hint += "otherwise) and that Ollama is running (`ollama serve`)"
        if url.explicit_port is None:
            hint = f"the URL gives no port, so {port} is used; Ollama's is {OLLAMA_PORT}"
        return f"nothing accepts connections on {host} port {port}: {hint}"
    except OSError as e:
        return f"cannot connect: {e.strerror or e}"
    # Nothing to say: end our side and let the server close its own, so it is not left
    # holding a connection it accepted while the check went away (bounded by ``timeout``).
    try:
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(timeout):
                writer.write_eof()
                while await reader.read(4096):
                    pass
    finally:  # also when the app stops while the check is still running (cancelled)
        writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def check_upstreams(urls: Iterable[URL], timeout: float) -> list[str]:
    """Try every server at once; log one ``upstream_unreachable_at_start`` warning per server
    that cannot be reached and return their problems. Never raises: the proxy starts anyway
    (Ollama may simply be starting later) and queues requests as it always does."""
    targets = list(urls)
    problems = await asyncio.gather(*(connect_problem(u, timeout) for u in targets))
    found: list[str] = []
    for url, problem in zip(targets, problems, strict=True):
        if problem is not None:
            log.warning(
                "upstream_unreachable_at_start",
                upstream=str(url),
                problem=problem,
                check="upstream.url in the config or --upstream; `seadragon-proxy doctor`",
            )
            found.append(problem)
    return found


class StartCheck:
    """The check as a resource of the app: started beside start-up (it never delays it),
    cancelled at exit; :meth:`result` awaits it."""

    def __init__(self, urls: Iterable[URL], timeout: float) -> None:
        self.urls = tuple(urls)
        self.timeout = timeout
        self._task: asyncio.Task[list[str]] | None = None

    def __repr__(self) -> str:
        state = "not started" if self._task is None else "done" if self._task.done() else "running"
        return f"<StartCheck {len(self.urls)} server(s) {state}>"

    def start(self) -> None:
        self._task = asyncio.create_task(
            check_upstreams(self.urls, self.timeout), name="upstream-start-check"
        )

    async def result(self) -> list[str]:
        assert self._task is not None, "StartCheck.start() was not called"
        return await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
