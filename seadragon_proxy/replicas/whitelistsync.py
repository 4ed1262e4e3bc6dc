"""One whitelist for every replica: each change is published on ``<prefix>whitelist`` and
kept in a Redis copy, and each replica applies what it hears to its own SQLite file.

Redis holds the shared list as a hash ``<prefix>whitelist:entries`` (network -> note) and a
counter ``<prefix>whitelist:version`` (which also says "Redis has a copy"). A change is one
transaction: the hash is updated, the counter incremented, and the change published, so a
replica that hears the message and a replica that reads the copy later agree.

No loops, by construction: a replica publishes only what its SQLite file holds that differs
from ``baseline`` — the list it last agreed with Redis on. A change heard from Redis is written
to the file *and* to the baseline under one lock, so the file watcher that then sees the write
finds nothing to publish. Applying a change twice changes nothing (idempotent).

Catching up: when the link comes (back) up, ``reconcile`` compares the file, the baseline and
the Redis copy. What changed in the file since the baseline (edits made while Redis was away,
or by ``seadragon-proxy whitelist`` on this machine) is pushed; what changed in Redis (edits
through other replicas) is written to the file. Both changing one entry: the file's edit wins.
With no copy in Redis yet, the file seeds it. At start the baseline is the file as it is, so a
replica that was stopped takes the shared list.

The same treatment fits any small table of named rows (the API keys, when they exist): a
second ``TableSync`` with its own channel, store and callbacks.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError

from ..exceptions import DatabaseError
from ..netaddr import format_network, parse_network
from ..whitelist import WhitelistStore
from .link import RedisLink

log = structlog.get_logger("seadragon.whitelistsync")

Entries = dict[str, str]  # network (normal form) -> note
Changed = Callable[[], Awaitable[object]]

CHANNEL = "whitelist"


def keys(prefix: str) -> tuple[str, str, str]:
    """The channel, the hash and the version counter, under ``prefix``."""
    return prefix + CHANNEL, prefix + CHANNEL + ":entries", prefix + CHANNEL + ":version"


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str | None]:
    """What turns ``old`` into ``new``: network -> its note, or ``None`` for a removal."""
    changes: dict[str, str | None] = {n: note for n, note in new.items() if old.get(n) != note}
    changes.update({n: None for n in old if n not in new})
    return changes


async def publish(
    client: redis.Redis, prefix: str, origin: str, changes: Mapping[str, str | None]
) -> None:
    """Apply ``changes`` to the Redis copy and announce each, in one transaction."""
    if not changes:
        return
    channel, entries, version = keys(prefix)
    async with client.pipeline(transaction=True) as pipe:
        for network, note in changes.items():
            if note is None:
                pipe.hdel(entries, network)
            else:
                pipe.hset(entries, network, note)
            message = {"origin": origin, "network": network, "note": note}
            pipe.publish(channel, json.dumps(message))
        pipe.incr(version)
        await pipe.execute()


def parse_message(data: bytes) -> tuple[str, str, str | None]:
    """``(origin, network, note or None)``; ``ValueError`` for anything else."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    origin, network, note = doc.get("origin"), doc.get("network"), doc.get("note")
    if not isinstance(origin, str) or not isinstance(network, str):
        raise ValueError("origin and network must be text")
    if note is not None and (not isinstance(note, str) or len(note) > 500):
        raise ValueError("note must be text of at most 500 characters, or null")
    return origin, format_network(parse_network(network)), note


class WhitelistSync:
    """Keeps this replica's whitelist file and the shared Redis copy in step."""

    def __init__(self, link: RedisLink, store: WhitelistStore, changed: Changed) -> None:
        self.link = link
        self.store = store
        self.changed = changed  # re-read the file into the running policy (Live)
        self.origin = f"{link.replica}/{uuid.uuid4().hex[:8]}"  # this process, not the name
        self.channel, self.entries_key, self.version_key = keys(link.settings.prefix)
        self.baseline: Entries | None = None  # None until start() read the file
        self._lock = asyncio.Lock()
        self.pending = False  # a local change not yet in Redis (it was unreachable)
        link.subscribe(self.channel, self._heard)
        link.add_state_listener(self._link_state)

    async def start(self) -> None:
        """Take the file as it is as the baseline; catch up if the link is already up
        (otherwise its coming up does)."""
        self.baseline = await self._read_file()
        if self.link.up:
            await self.reconcile()

    async def _read_file(self) -> Entries:
        return {e.network: e.note for e in await self.store.entries()}

    # -- this replica changed its file ------------------------------------------------

    async def file_changed(self) -> bool:
        """Publish what the file holds that the baseline does not. True if Redis has it."""
        async with self._lock:
            if self.baseline is None:
                return False
            try:
                current = await self._read_file()
            except DatabaseError as e:
                log.warning("whitelist_sync_read_failed", error=str(e))
                return False
            changes = diff(self.baseline, current)
            if not changes:
                return True
            try:
                await publish(self.link.client, self.link.settings.prefix, self.origin, changes)
            except (RedisError, OSError) as e:
                self.pending = True
                log.warning(
                    "whitelist_not_shared_yet",
                    changes=len(changes),
                    reason=self.link.reason or str(e),
                    effect="published when Redis is back",
                )
                return False
            self.baseline = current
            log.info("whitelist_published", changes=len(changes))
            return True

    # -- another replica changed the list ---------------------------------------------

    async def _heard(self, data: bytes) -> None:
        try:
            origin, network, note = parse_message(data)
        except ValueError as e:
            log.warning("whitelist_message_ignored", error=str(e)[:200])
            return
        if origin == self.origin:
            return
        async with self._lock:
            if self.baseline is None:
                return
            if await self._apply({network: note}):
                self.baseline = {**self.baseline, **({network: note} if note is not None else {})}
                if note is None:
                    self.baseline.pop(network, None)
        await self.changed()

    async def _apply(self, changes: Mapping[str, str | None]) -> bool:
        """Write heard changes to the file; False (logged) if the file refused them."""
        try:
            for network, note in changes.items():
                if note is None:
                    await self.store.remove(network)
                else:
                    await self.store.add(network, note)
        except (DatabaseError, ValueError) as e:
            log.warning("whitelist_apply_failed", error=str(e))
            return False
        if changes:
            log.info("whitelist_received", changes=len(changes))
        return True

    # -- catching up ------------------------------------------------------------------

    async def _link_state(self, up: bool) -> None:
        if up:
            await self.reconcile()

    async def reconcile(self) -> None:
        """Merge the file's changes since the baseline with Redis's copy (see the module)."""
        async with self._lock:
            if self.baseline is None:
                return
            try:
                current = await self._read_file()
                client = self.link.client
                has_copy = await client.exists(self.version_key)
                raw = await client.hgetall(self.entries_key)
                remote = {_text(k): _text(v) for k, v in raw.items()}
                if not has_copy:
                    await publish(client, self.link.settings.prefix, self.origin, current)
                    if not current:  # an empty list still marks the copy as there
                        await client.incr(self.version_key)
                    self.baseline, self.pending = current, False
                    log.info("whitelist_seeded_redis", entries=len(current))
                    return
                mine = diff(self.baseline, current)
                theirs = {n: v for n, v in diff(self.baseline, remote).items() if n not in mine}
                await publish(client, self.link.settings.prefix, self.origin, mine)
                applied = await self._apply(theirs)
            except (RedisError, OSError, DatabaseError) as e:
                log.warning("whitelist_reconcile_failed", error=str(e)[:300])
                return
            merged = {**remote, **{n: v for n, v in mine.items() if v is not None}}
            for network, note in mine.items():
                if note is None:
                    merged.pop(network, None)
            self.baseline = merged if applied else current
            self.pending = False
            log.info("whitelist_reconciled", pushed=len(mine), received=len(theirs))
        if theirs:
            await self.changed()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
