"""Request history: every finished request, written to SQLite in batches off the request
path, pruned by age and count, and summarised per source, per model and over time.

Same database file as the whitelist, table ``requests``. The writer holds no connection
between batches, so a replaced or deleted file is picked up at the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import structlog

from . import whitelist
from .exceptions import DatabaseError
from .record import RequestRecord
from .settings import HistorySettings

log = structlog.get_logger("seadragon.history")

BATCH = 500  # a batch this big is written without waiting for flush_interval
BUFFER_LIMIT = 100_000  # records kept in memory while the database cannot be written
PRUNE_EVERY = 60.0  # seconds between pruning passes

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS requests (
        ts                REAL NOT NULL,      -- unix time the request arrived
        request_id        TEXT NOT NULL,
        source            TEXT,
        priority          INTEGER,
        client_ip         TEXT NOT NULL,
        method            TEXT NOT NULL,
        route             TEXT NOT NULL,
        model             TEXT,
        status            INTEGER NOT NULL,   -- 0: the client left before an answer began
        queued            INTEGER NOT NULL,   -- 1 for inference routes (they wait their turn)
        queue_wait        REAL NOT NULL,      -- seconds
        upstream_time     REAL NOT NULL,      -- seconds
        bytes             INTEGER NOT NULL,
        eval_count        INTEGER NOT NULL,   -- tokens generated
        prompt_eval_count INTEGER NOT NULL,
        eval_seconds      REAL NOT NULL,
        hung_up           INTEGER NOT NULL,
        error             TEXT,
        server            TEXT,               -- the Ollama server it ran on (its name)
        swapped           INTEGER NOT NULL DEFAULT 0,  -- 1: starting it loaded its model
        tenant            TEXT                -- who it counted for in fair shares
    )
    """,
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
)
# Columns added since the first schema, each with the ALTER that adds it to an older file.
_ADDED = (
    ("server", "ALTER TABLE requests ADD COLUMN server TEXT"),
    ("swapped", "ALTER TABLE requests ADD COLUMN swapped INTEGER NOT NULL DEFAULT 0"),
    ("tenant", "ALTER TABLE requests ADD COLUMN tenant TEXT"),  # fair shares (issue 9)
)
_COLUMNS = (
    "ts, request_id, source, priority, client_ip, method, route, model, status, queued, "
    "queue_wait, upstream_time, bytes, eval_count, prompt_eval_count, eval_seconds, hung_up, "
    "error, server, swapped, tenant"
)
_INSERT = f"INSERT INTO requests ({_COLUMNS}) VALUES ({', '.join('?' * 21)})"  # noqa: S608

Row = tuple[object, ...]


def storable(text: str | None) -> str | None:
    """Any string a client sent, as text SQLite (UTF-8) can hold: a lone surrogate such as
    ``\ud800`` from a JSON ``"\\ud800"`` becomes the six characters ``\\ud800``."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def as_row(r: RequestRecord) -> Row:
    u = r.usage
    return (
        r.started_at, storable(r.id), storable(r.source), r.priority, storable(r.client_ip),
        storable(r.method), storable(r.route), storable(r.model),
        r.status, int(r.queued), r.queue_wait, r.upstream_time, r.bytes_out,
        u.eval_count if u else 0, u.prompt_eval_count if u else 0,
        u.eval_duration_ns / 1e9 if u else 0.0, int(r.hung_up), storable(r.error),
        storable(r.server), int(r.swapped), storable(r.tenant),
    )  # fmt: skip


@asynccontextmanager
async def connect(path: Path, *, create: bool = False) -> AsyncIterator[aiosqlite.Connection]:
    """The whitelist store's connection, with the requests table made sure of."""
    async with whitelist.connect(path, create=create, what="database") as db:
        for statement in _SCHEMA:
            await db.execute(statement)
        columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(requests)")}
        for column, alter in _ADDED:
            if column not in columns:  # a file from an older version: migrate it in place
                await db.execute(alter)
        yield db


class History:
    """Collects finished requests (``record`` is a Recorder listener) and writes them in
    batches from its own task."""

    def __init__(self, path: Path, settings: HistorySettings) -> None:
        self.path = path
        self.settings = settings
        self._buffer: deque[Row] = deque(maxlen=BUFFER_LIMIT)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_prune = 0.0
        self._failing = False
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<History {self.path} buffered={len(self._buffer)}>"

    async def ensure(self) -> None:
        """Create the table now, so stats work before the first batch is written."""
        async with connect(self.path, create=True):
            pass

    def record(self, record: RequestRecord) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the oldest unwritten record falls out
        self._buffer.append(as_row(record))
        if len(self._buffer) >= BATCH:
            self._wake.set()

    async def run(self) -> None:
        """Write a batch whenever ``flush_interval`` has passed with records waiting, or a
        full batch is ready: the one timer here batches writes, nothing waits on it."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._buffer:
                await self.flush()

    async def flush(self) -> int:
        """Write everything buffered now; on failure keep it for the next attempt."""
        async with self._lock:
            rows = list(self._buffer)
            if not rows:
                return 0
            try:
                async with connect(self.path, create=True) as db:
                    await self._insert(db, rows)
                    await db.commit()
                    if time.monotonic() - self._last_prune >= PRUNE_EVERY:
                        await self._prune(db)
            except DatabaseError as e:
                if not self._failing:
                    log.warning("history_write_failed", error=str(e), buffered=len(rows))
                self._failing = True
                return 0
            for _ in rows:
                self._buffer.popleft()
            if self._failing:
                log.info("history_write_recovered", written=len(rows))
            self._failing = False
            return len(rows)

    async def _insert(self, db: aiosqlite.Connection, rows: list[Row]) -> None:
        """All rows at once; if the batch is refused for something in it rather than for the
        database, row by row, so one bad row is logged and dropped and never blocks the rest."""
        try:
            await db.executemany(_INSERT, rows)
            return
        except (ValueError, TypeError, OverflowError, sqlite3.InterfaceError):
            await db.rollback()
        for row in rows:
            try:
                await db.execute(_INSERT, row)
            except (ValueError, TypeError, OverflowError, sqlite3.InterfaceError) as e:
                self.dropped += 1
                log.error("history_row_dropped", error=repr(e)[:200], request_id=ascii(row[1]))

    async def _prune(self, db: aiosqlite.Connection) -> None:
        self._last_prune = time.monotonic()
        if self.settings.retention_days:
            cutoff = time.time() - self.settings.retention_days * 86400
            await db.execute("DELETE FROM requests WHERE ts < ?", (cutoff,))
        if self.settings.retention_rows:
            await db.execute(
                "DELETE FROM requests WHERE rowid <= "
                "(SELECT rowid FROM requests ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                (self.settings.retention_rows,),
            )
        await db.commit()


# -- reading it back ---------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` ago; an ISO 8601 time; or unix seconds."""
    now = time.time() if now is None else now
    found = _DURATION.match(text)
    if found:
        return now - float(found.group(1)) * _UNIT[found.group(2)]
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give a duration such as 24h or 7d, or an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class GroupStats:
    name: str | None
    requests: int
    errors: int  # answered 4xx/5xx, or broken off mid-stream (not counting client hang-ups)
    hung_up: int
    queued: int  # inference requests, the ones that waited their turn
    wait_p50: float | None  # seconds, over queued requests
    wait_p95: float | None
    tokens: int
    prompt_tokens: int

    def as_dict(self, key: str) -> dict[str, object]:
        return {
            key: self.name,
            "requests": self.requests,
            "errors": self.errors,
            "hung_up": self.hung_up,
            "queued": self.queued,
            "wait_p50": self.wait_p50,
            "wait_p95": self.wait_p95,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
        }


@dataclass(frozen=True, slots=True)
class ServerStats:
    name: str
    requests: int
    swaps: int  # requests whose start loaded their model there

    def as_dict(self) -> dict[str, object]:
        return {"server": self.name, "requests": self.requests, "swaps": self.swaps}


@dataclass(frozen=True, slots=True)
class Summary:
    since: float
    until: float
    sources: Sequence[GroupStats]
    models: Sequence[GroupStats]
    servers: Sequence[ServerStats] = ()
    tenants: Sequence[GroupStats] = ()

    def as_dict(self) -> dict[str, object]:
        def iso(t: float) -> str:
            return (
                datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            )

        return {
            "since": iso(self.since),
            "until": iso(self.until),
            "sources": [g.as_dict("source") for g in self.sources],
            "models": [g.as_dict("model") for g in self.models],
            "servers": [g.as_dict() for g in self.servers],
            "tenants": [g.as_dict("tenant") for g in self.tenants],
        }


# Per grouping column: the totals, and the nearest-rank percentile of the wait computed by
# the database (one row fetched). Errors are answers of 4xx/5xx or streams broken off
# mid-way; client hang-ups are counted apart. Plain literals: nothing is built from input.
_GROUP_SQL = {
    "source": (
        "SELECT source, COUNT(*), SUM(status >= 400 OR (error IS NOT NULL AND hung_up = 0)), "
        "SUM(hung_up), SUM(queued), SUM(eval_count), SUM(prompt_eval_count) FROM requests "
        "WHERE ts >= ? AND ts < ? GROUP BY source ORDER BY COUNT(*) DESC",
        "SELECT queue_wait FROM requests WHERE ts >= ? AND ts < ? AND queued = 1 "
        "AND source IS ? ORDER BY queue_wait LIMIT 1 OFFSET ?",
    ),
    "model": (
        "SELECT model, COUNT(*), SUM(status >= 400 OR (error IS NOT NULL AND hung_up = 0)), "
        "SUM(hung_up), SUM(queued), SUM(eval_count), SUM(prompt_eval_count) FROM requests "
        "WHERE ts >= ? AND ts < ? GROUP BY model ORDER BY COUNT(*) DESC",
        "SELECT queue_wait FROM requests WHERE ts >= ? AND ts < ? AND queued = 1 "
        "AND model IS ? ORDER BY queue_wait LIMIT 1 OFFSET ?",
    ),
    "tenant": (
        "SELECT tenant, COUNT(*), SUM(status >= 400 OR (error IS NOT NULL AND hung_up = 0)), "
        "SUM(hung_up), SUM(queued), SUM(eval_count), SUM(prompt_eval_count) FROM requests "
        "WHERE ts >= ? AND ts < ? AND tenant IS NOT NULL GROUP BY tenant ORDER BY COUNT(*) DESC",
        "SELECT queue_wait FROM requests WHERE ts >= ? AND ts < ? AND queued = 1 "
        "AND tenant IS ? ORDER BY queue_wait LIMIT 1 OFFSET ?",
    ),
}


async def _groups(
    db: aiosqlite.Connection, column: str, since: float, until: float
) -> list[GroupStats]:
    totals_sql, percentile_sql = _GROUP_SQL[column]
    groups = []
    for name, count, errors, hung_up, queued, tokens, prompt_tokens in await db.execute_fetchall(
        totals_sql, (since, until)
    ):
        waits: list[float | None] = [None, None]
        for i, fraction in enumerate((0.50, 0.95)):
            if queued:
                offset = max(0, math.ceil(fraction * queued) - 1)
                found = await db.execute_fetchall(percentile_sql, (since, until, name, offset))
                waits[i] = round(float(next(iter(found))[0]), 6)
        groups.append(
            GroupStats(
                name, count, errors, hung_up, queued, waits[0], waits[1], tokens, prompt_tokens
            )
        )
    return groups


async def summarize(path: Path, since: float, until: float | None = None) -> Summary:
    """Counts, waits, tokens and errors per source, model and tenant since ``since``."""
    end = time.time() if until is None else until
    async with connect(path) as db:
        servers = await db.execute_fetchall(
            "SELECT server, COUNT(*), SUM(swapped) FROM requests WHERE ts >= ? AND ts < ? "
            "AND server IS NOT NULL GROUP BY server ORDER BY server",
            (since, end),
        )
        return Summary(
            since,
            end,
            await _groups(db, "source", since, end),
            await _groups(db, "model", since, end),
            [ServerStats(name, count, swaps or 0) for name, count, swaps in servers],
            await _groups(db, "tenant", since, end),
        )


async def timeseries(path: Path, since: float, step: float) -> dict[str, list[dict[str, object]]]:
    """Per source, for each ``step``-second bucket since ``since`` that saw requests:
    requests, average and worst queue wait, tokens generated."""
    async with connect(path) as db:
        rows = await db.execute_fetchall(
            "SELECT source, CAST((ts - ?) / ? AS INTEGER) AS bucket, COUNT(*), "
            "AVG(CASE WHEN queued THEN queue_wait END), MAX(CASE WHEN queued THEN queue_wait END), "
            "SUM(eval_count) FROM requests WHERE ts >= ? GROUP BY source, bucket ORDER BY bucket",
            (since, step, since),
        )
    series: dict[str, list[dict[str, object]]] = {}
    for source, bucket, count, wait_avg, wait_max, tokens in rows:
        series.setdefault(source or "", []).append(
            {
                "t": round(since + bucket * step, 3),
                "requests": count,
                "wait_avg": wait_avg,
                "wait_max": wait_max,
                "tokens": tokens,
            }
        )
    return series
