"""Request and response bodies within bounds: size after decoding, silence and total time,
one memory ceiling shared by every request, Content-Encoding decided per route, JSON parsed
where it cannot stall the event loop, and a limit on how long a client may stop reading.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from multidict import CIMultiDictProxy

from .defaults import RequestDefaults, encode, merge
from .exceptions import (
    BadRequest,
    BodiesFull,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    UnsupportedEncoding,
)
from .payload import JsonBody, count_elements, inspect_in_worker, inspect_json, merge_in_worker
from .settings import ServerSettings

log = structlog.get_logger("seadragon.bodies")

# What aiohttp's request parser decodes itself (http_parser.py: `enc in {"gzip", "deflate",
# "br", "zstd"}`, after `enc.isascii()` and `.lower()`): request.content yields those bodies
# decoded, so every count below is of decoded bytes.
DECODED = frozenset(
    {"gzip", "deflate"} | ({"br"} if HAS_BROTLI else set()) | ({"zstd"} if HAS_ZSTD else set())
)
# Bodies up to this size and element count are parsed on the loop (about 2 ms at most);
# bigger ones in the worker process.
INLINE_BYTES = 1024 * 1024
INLINE_ELEMENTS = 10_000

T = TypeVar("T")


class BodyMemory:
    """The bytes of JSON request bodies the proxy holds (read, queued or being sent),
    all requests together, under ``server.max_body_memory``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def __repr__(self) -> str:
        return f"<BodyMemory {self.held}/{self.limit} bytes>"

    def hold(self) -> Hold:
        return Hold(self)


class Hold:
    """One request's share of the ceiling, given back whole when the request ends."""

    __slots__ = ("memory", "size")

    def __init__(self, memory: BodyMemory) -> None:
        self.memory = memory
        self.size = 0

    def take(self, n: int) -> None:
        memory = self.memory
        if memory.held + n > memory.limit:
            raise BodiesFull(
                "request bodies in progress fill server.max_body_memory "
                f"({memory.limit} bytes); try again shortly",
                retry_after=1,
            )
        memory.held += n
        self.size += n

    def give(self, n: int) -> None:
        n = min(n, self.size)
        self.memory.held -= n
        self.size -= n

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *_: object) -> None:
        self.give(self.size)


# -- Content-Encoding ---------------------------------------------------------------------


def decoded_encoding(headers: CIMultiDictProxy[str]) -> None:
    """Refuse (415) a body aiohttp has not decoded: JSON routes take what it decodes
    (gzip, deflate, and br/zstd when their libraries are installed) or ``identity``."""
    values = headers.getall("Content-Encoding", ())
    if not values:
        return
    value = values[0]
    if len(values) == 1 and value.isascii() and value.lower() in DECODED | {"identity"}:
        return
    raise UnsupportedEncoding(
        f"Content-Encoding {', '.join(values)[:100]!r} is not supported on this route; "
        f"send the body plain or as {' or '.join(sorted(DECODED))}"
    )


def raw_encoding(headers: CIMultiDictProxy[str]) -> None:
    """Refuse (415) any Content-Encoding but ``identity`` on a streamed route (blobs, unknown
    paths): Ollama does not decode request bodies, so none could be forwarded as it was meant."""
    values = [v for v in headers.getall("Content-Encoding", ()) if v.strip().lower() != "identity"]
    if values:
        raise UnsupportedEncoding(
            f"Content-Encoding {', '.join(values)[:100]!r} is not supported on this route "
            "(Ollama takes request bodies plain); send the body without it"
        )


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadBody:
    raw: bytes
    elements: int  # count_elements() of the whole body


def too_large(limit: int) -> str:
    return f"request body is larger than server.max_body ({limit} bytes)"


async def read_json_body(request: web.Request, server: ServerSettings, hold: Hold) -> ReadBody:
    """The whole (decoded) body of a JSON route, refused once it passes ``max_body`` bytes or
    ``max_json_elements``, goes quiet for ``body_timeout``, takes longer than
    ``body_deadline`` in all, or would push the bodies in progress past ``max_body_memory``."""
    decoded_encoding(request.headers)
    if (
        "Content-Encoding" not in request.headers
        and request.content_length is not None
        and request.content_length > server.max_body
    ):
        raise PayloadTooLarge(too_large(server.max_body))
    content = request.content
    first = content.read_nowait()  # usually the whole (small) body is here already
    size, elements = len(first), count_elements(first)
    _check(server, size, elements)
    hold.take(size)
    if content.is_eof():
        return ReadBody(first, elements)
    chunks: list[bytes] = [first] if first else []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + server.body_deadline
    while True:
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + server.body_timeout)):
                chunk = await content.readany()
        except TimeoutError:
            raise RequestTimeout(_late(server, loop.time() >= deadline)) from None
        if not chunk:
            break
        size += len(chunk)
        elements += count_elements(chunk)
        _check(server, size, elements)
        hold.take(len(chunk))
        chunks.append(chunk)
    hold.take(size)  # the joined copy, while the pieces still exist
    raw = b"".join(chunks)
    chunks.clear()
    hold.give(size)
    return ReadBody(raw, elements)


def _check(server: ServerSettings, size: int, elements: int) -> None:
    if size > server.max_body:
        raise PayloadTooLarge(too_large(server.max_body))
    if elements > server.max_json_elements:
        raise PayloadTooLarge(
            f"request body has more JSON elements than server.max_json_elements "
            f"({server.max_json_elements})"
        )


def _late(server: ServerSettings, deadline: bool) -> str:
    if deadline:
        return (
            f"the request body took longer than server.body_deadline "
            f"({server.body_deadline:g} s) to arrive"
        )
    return f"the request body stopped arriving for server.body_timeout ({server.body_timeout:g} s)"


async def stream_body(content: aiohttp.StreamReader, idle: float) -> AsyncIterator[bytes]:
    """Pass a body through as it arrives (blob uploads can be many GB): bounded by silence
    only, since nothing of it is held."""
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stopped arriving for server.body_timeout ({idle:g} s)"
            ) from None
        if not chunk:
            return
        yield chunk


# -- parsing ------------------------------------------------------------------------------


class JsonParser:
    """Parses small bodies on the loop and big ones in one worker process (CPython's json
    parser holds the GIL, so a thread would stall the loop just the same). The worker sends
    back only the model, or the merged body; it is started on first use."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._starting: asyncio.Task[object] | None = None

    def __repr__(self) -> str:
        return f"<JsonParser worker={'running' if self._pool else 'idle'}>"

    async def inspect(self, body: ReadBody, *, require_model: bool) -> JsonBody:
        if len(body.raw) <= INLINE_BYTES and body.elements <= INLINE_ELEMENTS:
            return inspect_json(body.raw, require_model=require_model)
        model, error = await self._run(inspect_in_worker, body.raw, require_model)
        if error is not None:
            raise BadRequest(error)
        return JsonBody(body.raw, None, model)

    async def with_defaults(
        self, body: JsonBody, rules: Sequence[RequestDefaults], source: str
    ) -> tuple[bytes, str] | None:
        """The body with ``defaults`` merged in and what was pinned, or ``None`` if nothing
        changes; merged in the worker when it was parsed there (its object is not here)."""
        if not any(rule.applies(source, body.model) for rule in rules):
            return None
        if body.doc is not None:
            merged = merge(body.doc, rules, source, body.model)
            return None if merged.doc is None else (encode(merged.doc), merged.describe())
        return await self._run(merge_in_worker, body.raw, tuple(rules), source, body.model)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._pool = pool
            # The first submit starts the process (4-10 ms of spawning in the calling
            # thread): do it from a thread, so the loop goes on serving other streams.
            self._starting = asyncio.create_task(asyncio.to_thread(pool.submit, _ready))
        pool, starting = self._pool, self._starting
        assert starting is not None
        try:
            await asyncio.shield(starting)
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            log.error("json_worker_died", effect="a new worker starts with the next big body")
            if self._pool is pool:
                self._pool = None
            pool.shutdown(wait=False)
            raise RequestError("the JSON worker process died while parsing this body") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ready() -> None:
    """Nothing: the first task of a new worker, submitted to start its process."""


# -- sending ------------------------------------------------------------------------------


class SendTimeout(Exception):
    """The client stopped reading for ``server.send_timeout``."""


async def write_within(
    response: web.StreamResponse, chunk: bytes, limit: float, transport: asyncio.Transport | None
) -> None:
    """Write ``chunk``; if the client has not taken it within ``limit`` seconds (the write
    waits while the socket's buffers are full), abort the connection, raise ``SendTimeout``."""
    try:
        async with asyncio.timeout(limit):
            await response.write(chunk)
    except TimeoutError:
        if transport is not None:
            transport.abort()
        raise SendTimeout from None
