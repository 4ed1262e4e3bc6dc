"""API keys: a name per key, only the key's SHA-256 stored, in the whitelist's SQLite file.

A key is ``sdp_`` and 43 URL-safe characters from ``secrets`` (256 bits), shown once when
made. It arrives as ``Authorization: Bearer <key>``; ``KeyRing.identify`` hashes what was
sent and compares it with every stored hash in constant time. No aiohttp here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .whitelist import BUSY_TIMEOUT, WhitelistStore, connect

PREFIX = "sdp_"  # recognisable in a leaked config or a secret scanner's rules

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    name     TEXT PRIMARY KEY,
    sha256   TEXT NOT NULL UNIQUE,
    note     TEXT NOT NULL DEFAULT '',
    added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
)
"""


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header that looks like one of our keys."""
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(PREFIX):
        return None
    return token


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    note: str
    added_at: str


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The known keys as ``(sha256 digest, name)`` pairs: what the running proxy holds."""

    keys: tuple[tuple[bytes, str], ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    def identify(self, token: str | None) -> str | None:
        """The name of the key ``token`` is, or ``None``. Every stored digest is compared,
        each in constant time, so the answer's timing says nothing about which one."""
        if token is None or not self.keys:
            return None
        sent = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for stored, name in self.keys:
            if hmac.compare_digest(stored, sent):
                found = name
        return found

    def names(self) -> frozenset[str]:
        return frozenset(name for _, name in self.keys)


class KeyStore:
    """The ``api_keys`` table; a short-lived connection per call, like the whitelist's."""

    def __init__(self, path: Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    def __repr__(self) -> str:
        return f"KeyStore({str(self.path)!r})"

    async def ensure(self) -> None:
        """Create the table if this database predates it (or is new): the migration. A new
        database gets its whitelist too (seeded with loopback), as the proxy would make it."""
        await WhitelistStore(self.path, busy_timeout=self.busy_timeout).ensure()
        async with connect(
            self.path, create=True, busy_timeout=self.busy_timeout, what="key database"
        ) as db:
            if not await _has_table(db):
                await db.execute(_SCHEMA)
                await db.commit()

    async def entries(self) -> list[KeyEntry]:
        rows = await self._select("SELECT name, note, added_at FROM api_keys ORDER BY rowid")
        return [KeyEntry(str(n), str(note), str(at)) for n, note, at in rows]

    async def load(self) -> KeyRing:
        """The keys the proxy accepts; a row whose digest is not 64 hex digits is skipped."""
        rows = await self._select("SELECT sha256, name FROM api_keys ORDER BY name")
        keys: list[tuple[bytes, str]] = []
        for sha, name in rows:
            try:
                raw = bytes.fromhex(str(sha))
            except ValueError:
                continue
            if len(raw) == 32:
                keys.append((raw, str(name)))
        return KeyRing(tuple(keys))

    async def add(self, name: str, note: str = "") -> str:
        """Make a key called ``name``; returns the key, which is stored nowhere.
        Raises ``ValueError`` if the name is taken (remove it first: keys are not reissued
        silently, since that would lock out whoever holds the old one)."""
        await self.ensure()
        key = new_key()
        async with connect(self.path, busy_timeout=self.busy_timeout, what="key database") as db:
            cursor = await db.execute("SELECT 1 FROM api_keys WHERE name = ?", (name,))
            if await cursor.fetchone() is not None:
                raise ValueError(
                    f"a key named {name!r} exists already; 'seadragon-proxy keys remove "
                    f"{name}' first to replace it"
                )
            await db.execute(
                "INSERT INTO api_keys (name, sha256, note) VALUES (?, ?, ?)",
                (name, digest(key), note),
            )
            await db.commit()
        return key

    async def remove(self, name: str) -> bool:
        """Remove the key called ``name``; whether it was there."""
        async with connect(self.path, busy_timeout=self.busy_timeout, what="key database") as db:
            if not await _has_table(db):
                return False
            cursor = await db.execute("DELETE FROM api_keys WHERE name = ?", (name,))
            await db.commit()
            return cursor.rowcount > 0

    async def _select(self, sql: str) -> list[tuple[object, ...]]:
        """Rows of ``sql`` (a constant query); none when the table does not exist yet, as in
        a database the proxy created before keys existed and no key has been added to."""
        async with connect(self.path, busy_timeout=self.busy_timeout, what="key database") as db:
            if not await _has_table(db):
                return []
            return [tuple(row) for row in await db.execute_fetchall(sql)]


async def _has_table(db: aiosqlite.Connection) -> bool:
    found = await db.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'"
    )
    return bool(list(found))
