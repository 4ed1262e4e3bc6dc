"""This replica's connection to Redis.

One ``redis.asyncio.Redis`` client (its own connection pool) for commands, and one pub/sub
connection, read by one task, that pushes each message to the handler registered for its
channel: nothing here polls. When that connection breaks, the link is *down* (with the
reason, for ``/health`` and the 503s), and one task reconnects with back-off from 50 ms to
1 s — the only timer, because a server that is away cannot announce that it is back. Once
the pub/sub connection is back, the link is *up* and its state listeners run (so callers
can re-announce what Redis may have lost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import redis.asyncio as redis
import structlog
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..replicafile import RedisSettings, redacted

log = structlog.get_logger("seadragon.redis")

POOL_SIZE = 64  # connections for commands (pub/sub has its own)
POOL_WAIT = 30.0  # seconds a command may wait for one of them (a burst of 10 000 waits)

Handler = Callable[[bytes], Awaitable[None] | None]  # the message's data
StateListener = Callable[[bool], Awaitable[None] | None]  # True = up


class RedisLink:
    def __init__(self, settings: RedisSettings, replica: str) -> None:
        self.settings = settings
        self.replica = replica
        # A command on a pooled connection that Redis closed (it restarted) is tried once
        # more on a fresh one; make what you send idempotent, as it may arrive twice.
        # A bounded pool that makes a burst wait for a connection (at most POOL_WAIT
        # seconds) rather than fail: redis-py's default pool refuses command 101 of a burst
        # with "Too many connections", which a burst of 200 requests met at once.
        pool = redis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=POOL_SIZE,
            timeout=POOL_WAIT,
            socket_connect_timeout=2,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.client: redis.Redis = redis.Redis.from_pool(pool)  # closed with the client
        self._handlers: dict[str, Handler] = {}
        self._state_listeners: list[StateListener] = []
        self._up = False
        self._reason: str | None = "not connected yet"
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._pubsub: PubSub | None = None

    def __repr__(self) -> str:
        state = "up" if self._up else f"down ({self._reason})"
        return f"<RedisLink {redacted(self.settings.url)} {state}>"

    # -- names ------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """``prefix`` + the parts joined by ``:`` — every key and channel goes through here."""
        return self.settings.prefix + ":".join(parts)

    # -- state ------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def reason(self) -> str | None:
        """Why the link is down, in words for /health and the 503s (``None`` when up)."""
        return None if self._up else self._reason

    def add_state_listener(self, listener: StateListener) -> None:
        self._state_listeners.append(listener)

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Call ``handler(data)`` for each message on ``channel`` (a full name from ``key``).
        Subscribe before ``start()``; the listener resubscribes after each reconnection."""
        self._handlers[channel] = handler

    async def wait_up(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._up

    # -- running ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening; returns at once (the first connection is made in the task)."""
        self._task = asyncio.create_task(self._run(), name="redis-link")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task, self._cut_pubsub)
        await self.client.aclose()

    async def _cut_pubsub(self) -> None:
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            with contextlib.suppress(Exception):
                await pubsub.connection.disconnect()

    async def _run(self) -> None:
        delay = 0.05
        while True:
            pubsub = self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                if self._handlers:
                    await pubsub.subscribe(*self._handlers)
                else:
                    await pubsub.ping()
                await self._set(True, None)
                delay = 0.05
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    channel = message["channel"].decode(errors="replace")
                    handler = self._handlers.get(channel)
                    if handler is not None:
                        await self._call(handler, message["data"])
                raise ConnectionError("the pub/sub connection ended")
            except (RedisError, OSError, ConnectionError) as e:
                await self._set(False, _reason(self.settings.url, e))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)  # back-off for a server that cannot announce its return
            delay = min(1.0, delay * 2)

    async def _call(self, handler: Handler, data: bytes) -> None:
        try:
            result = handler(data)
            if result is not None:
                await result
        except Exception:
            log.exception("redis_message_failed")

    async def _set(self, up: bool, reason: str | None) -> None:
        if up == self._up and reason == self._reason:
            return
        was = self._up
        self._up, self._reason = up, reason
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if up != was:
            if up:
                log.info("redis_up", url=redacted(self.settings.url))
            else:
                log.warning("redis_down", url=redacted(self.settings.url), reason=reason)
            for listener in self._state_listeners:
                with contextlib.suppress(Exception):
                    result = listener(up)
                    if result is not None:
                        await result


async def cancel_and_wait(
    task: asyncio.Task[None], unstick: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Cancel ``task`` and wait for it to end. A cancellation can be lost inside redis-py
    (seen at shutdown: the pub/sub reader went on reading; a cancel racing a timeout in its
    reader, which it then retries, is a likely way), so the task is cancelled again, after
    ``unstick()``, each second it lives on — at shutdown only."""
    task.cancel()
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=1)
        if not done:
            if unstick is not None:
                await unstick()
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _reason(url: str, error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"Redis at {redacted(url)} is unreachable: {text}"[:300]
