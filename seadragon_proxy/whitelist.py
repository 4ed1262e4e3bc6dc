"""The whitelist: addresses and networks in a SQLite table, read and written through aiosqlite.

Entries are validated and normalised before they reach SQL (always parameterised).
A new database is seeded with loopback so a local user is not locked out.
The database stays in SQLite's default rollback-journal mode: reads then touch no
file at all, so the proxy's file watcher sees writes and only writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiosqlite

from .exceptions import DatabaseError
from .netaddr import LOOPBACK, IPNetwork, NetworkSet, format_network, parse_network

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 2.0  # seconds to wait for another writer before giving up

_SCHEMA = """
CREATE TABLE IF NOT EXISTS whitelist (
    network  TEXT PRIMARY KEY,
    note     TEXT NOT NULL DEFAULT '',
    added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
)
"""


@dataclass(frozen=True, slots=True)
class Entry:
    network: str
    note: str
    added_at: str


def explain_sqlite_error(
    path: Path, error: BaseException, what: str = "whitelist database"
) -> DatabaseError:
    """Turn a sqlite3 error into one sentence that says what is wrong and what to do."""
    text = str(error).lower()
    if "locked" in text or "busy" in text:
        hint = "is locked by another writer; try again in a moment"
    elif "readonly" in text or "read-only" in text:
        hint = "is read-only; give this user write access to the file and its directory"
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        hint = (
            "is not a usable SQLite database (corrupt?); move it aside and "
            "a new one, seeded with loopback, is created on the next start or command"
        )
    elif "unable to open" in text:
        hint = "cannot be opened; check that the path exists and that this user may read it"
    else:
        hint = f"failed: {error}"
    return DatabaseError(f"{what} {path} {hint}")


@asynccontextmanager
async def connect(
    path: Path,
    *,
    create: bool = False,
    busy_timeout: float = BUSY_TIMEOUT,
    what: str = "whitelist database",
) -> AsyncIterator[aiosqlite.Connection]:
    """A short-lived connection; ``sqlite3`` errors become ``DatabaseError`` sentences.

    Without ``create`` a missing file is an error (SQLite's ``mode=rw``), never a new file.
    Nothing here touches the file system from the event loop: aiosqlite works in its own
    thread, and the one ``stat`` (telling "missing" from "unreadable") runs in another.
    """
    try:
        if create:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        uri = f"file:{quote(str(path))}?mode={'rwc' if create else 'rw'}"
        async with aiosqlite.connect(uri, uri=True, timeout=busy_timeout) as db:
            yield db
    except (sqlite3.Error, OSError) as e:
        if not create and not await asyncio.to_thread(path.exists):
            raise DatabaseError(
                f"{what} {path} is missing; it is created by the next "
                "'seadragon-proxy whitelist add' or proxy start"
            ) from e
        raise explain_sqlite_error(path, e, what) from e


class WhitelistStore:
    """The whitelist table. Each call opens its own short-lived connection, so a file
    that is replaced, deleted or recreated behind the proxy's back is always read afresh."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    def __repr__(self) -> str:
        return f"WhitelistStore({str(self.path)!r})"

    @asynccontextmanager
    async def _connect(self, *, create: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        async with connect(self.path, create=create, busy_timeout=self.busy_timeout) as db:
            yield db

    async def ensure(self) -> bool:
        """Create the database and table if needed; seed loopback on creation. True if created."""
        async with self._connect(create=True) as db:
            (version,) = await (await db.execute("PRAGMA user_version")).fetchone() or (0,)
            if version >= SCHEMA_VERSION:
                return False
            await db.execute(_SCHEMA)
            await db.executemany(
                "INSERT OR IGNORE INTO whitelist (network, note) VALUES (?, ?)",
                [(format_network(parse_network(a)), "loopback (seeded)") for a in LOOPBACK],
            )
            await db.execute(f"PRAGMA user_version={SCHEMA_VERSION:d}")
            await db.commit()
            return True

    async def entries(self) -> list[Entry]:
        async with self._connect() as db:
            rows = await db.execute_fetchall(
                "SELECT network, note, added_at FROM whitelist ORDER BY added_at, network"
            )
        return [Entry(str(n), str(note), str(at)) for n, note, at in rows]

    async def load(self) -> NetworkSet:
        """The networks on the list. Rows that fail validation are skipped, not trusted."""
        networks: list[IPNetwork] = []
        for entry in await self.entries():
            try:
                networks.append(parse_network(entry.network))
            except ValueError:
                continue
        return NetworkSet(networks)

    async def add(self, text: str, note: str = "") -> tuple[str, bool]:
        """Add (or re-note) an address or network. Returns its normal form and whether it is new.

        Raises ``ValueError`` for a malformed entry before touching the database.
        """
        network = format_network(parse_network(text))
        await self.ensure()
        async with self._connect() as db:
            cursor = await db.execute("SELECT 1 FROM whitelist WHERE network = ?", (network,))
            existed = await cursor.fetchone() is not None
            await db.execute(
                "INSERT INTO whitelist (network, note) VALUES (?, ?) "
                "ON CONFLICT(network) DO UPDATE SET note = excluded.note",
                (network, note),
            )
            await db.commit()
        return network, not existed

    async def remove(self, text: str) -> tuple[str, bool]:
        """Remove an entry. Returns its normal form and whether it was there."""
        network = format_network(parse_network(text))
        await self.ensure()
        async with self._connect() as db:
            cursor = await db.execute("DELETE FROM whitelist WHERE network = ?", (network,))
            await db.commit()
            return network, cursor.rowcount > 0
