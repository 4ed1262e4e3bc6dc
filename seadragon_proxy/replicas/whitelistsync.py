"""One whitelist for every replica: each change is published on ``<prefix>whitelist`` and
kept in a Redis copy, and each replica applies what it hears to its own SQLite file.

Redis holds the shared list as a hash ``<prefix>whitelist:entries`` (network -> note) and a
counter ``<prefix>whitelist:version`` (which also says "Redis has a copy"). A change is one
script, so atomic: the counter incremented, the hash updated, and the change published with
its number, so a replica that hears the message and a replica that reads the copy later
agree. Every replica hears changes in Redis's order; one older than what it already has for
that entry (its own later edit, or the copy it reconciled with) is skipped, so two replicas
editing one entry at once end with the same (Redis's last) value.

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
from dataclasses import dataclass

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


# One change, atomically: count it, apply it to the copy, announce it with its number.
_CHANGE = """
local version = redis.call('INCR', KEYS[2])
local message = {origin = ARGV[1], network = ARGV[2], version = version}
if ARGV[3] == '1' then
    redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
    message['note'] = ARGV[4]
else
    redis.call('HDEL', KEYS[1], ARGV[2])
end
redis.call('PUBLISH', KEYS[3], cjson.encode(message))
return version
"""


# Fill an empty copy from one replica's file; 0 if there is a copy already.
_SEED = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
for i = 1, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('INCR', KEYS[2])
"""


async def publish(
    client: redis.Redis, prefix: str, origin: str, changes: Mapping[str, str | None]
) -> dict[str, int]:
    """Apply each change to the Redis copy and announce it; returns each one's version."""
    channel, entries, version = keys(prefix)
    script = client.register_script(_CHANGE)
    done: dict[str, int] = {}
    for network, note in changes.items():
        args = [origin, network, "0" if note is None else "1", note or ""]
        done[network] = int(await script(keys=[entries, version, channel], args=args))
    return done


@dataclass(frozen=True, slots=True)
class Change:
    origin: str
    network: str
    note: str | None  # None: removed
    version: int


def parse_message(data: bytes) -> Change:
    """One published change; ``ValueError`` for anything else."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    origin, network, note = doc.get("origin"), doc.get("network"), doc.get("note")
    version = doc.get("version")
    if not isinstance(origin, str) or not isinstance(network, str):
        raise ValueError("origin and network must be text")
    if note is not None and (not isinstance(note, str) or len(note) > 500):
        raise ValueError("note must be text of at most 500 characters, or absent")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError("version must be a whole number")
    return Change(origin, format_network(parse_network(network)), note, version)


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
        self.versions: dict[str, int] = {}  # network -> the newest change applied or made
        self.floor = 0  # the Redis version the last reconcile read: older news is stale
        link.subscribe(self.channel, self._heard)
        link.add_state_listener(self._link_state)

    async def start(self) -> None:
        """Take the file as it is as the baseline; catch up if the link is already up
        (otherwise its coming up does)."""
        self.baseline = await self._read_file()
        if self.link.up:
            await self.reconcile()

    async def settled(self) -> None:
        """Return once no change or reconcile is under way (the link's coming up starts its
        reconcile before anyone else runs, so after ``link.up`` this waits for it)."""
        async with self._lock:
            pass

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
            if not self.link.up:  # no waiting on a Redis known to be away: reconcile sends it
                self.pending = True
                log.warning(
                    "whitelist_not_shared_yet",
                    changes=len(changes),
                    reason=self.link.reason,
                    effect="published when Redis is back",
                )
                return False
            try:
                made = await publish(
                    self.link.client, self.link.settings.prefix, self.origin, changes
                )
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
            self.versions.update(made)
            log.info("whitelist_published", changes=len(changes))
            return True

    # -- another replica changed the list ---------------------------------------------

    async def _heard(self, data: bytes) -> None:
        try:
            change = parse_message(data)
        except ValueError as e:
            log.warning("whitelist_message_ignored", error=str(e)[:200])
            return
        async with self._lock:
            if self.baseline is None or change.origin == self.origin:
                return
            # Older than what this replica already has for the entry (its own later edit,
            # or the copy it reconciled with): Redis has the newer one, and so does the file.
            if change.version <= max(self.floor, self.versions.get(change.network, 0)):
                return
            self.versions[change.network] = change.version
            if not await self._apply({change.network: change.note}):
                return
            self.baseline = dict(self.baseline)
            if change.note is None:
                self.baseline.pop(change.network, None)
            else:
                self.baseline[change.network] = change.note
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
                # No copy (a new Redis, or one that restarted empty): this file is it, unless
                # another replica's seed came first. One script, so only one seed wins.
                seeded = await client.register_script(_SEED)(
                    keys=[self.entries_key, self.version_key],
                    args=[x for pair in current.items() for x in pair],
                )
                if seeded:
                    self.versions, self.floor = {}, int(seeded)
                    self.baseline, self.pending = current, False
                    log.info("whitelist_seeded_redis", entries=len(current))
                    return
                async with client.pipeline(transaction=True) as pipe:
                    pipe.get(self.version_key)
                    pipe.hgetall(self.entries_key)
                    counter, raw = await pipe.execute()
                remote = {_text(k): _text(v) for k, v in raw.items()}
                # A new epoch: versions count from what Redis has now (it may have restarted
                # empty and be counting from 1 again).
                self.versions, self.floor = {}, int(counter or 0)
                mine = diff(self.baseline, current)
                theirs = {n: v for n, v in diff(self.baseline, remote).items() if n not in mine}
                self.versions.update(
                    await publish(client, self.link.settings.prefix, self.origin, mine)
                )
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
