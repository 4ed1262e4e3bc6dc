"""One replica's part in the shared queue, as the app holds it: the link, this replica's
``RemoteQueue`` (where its requests wait) and its ``Dispatcher`` (which runs the real
Scheduler while it holds the lease), plus the queue view read from Redis."""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from ..exceptions import RedisUnavailable
from ..live import Live
from ..scheduling import Scheduler
from .dispatcher import Dispatcher
from .link import RedisLink
from .messages import TicketRecord
from .remote import Names, RemoteQueue


class Replica:
    def __init__(self, link: RedisLink, scheduler: Scheduler, live: Live) -> None:
        self.link = link
        self.names = Names(link)
        self.queue = RemoteQueue(link, max_wait=lambda: live.settings.queue.max_wait)
        self.dispatcher = Dispatcher(link, scheduler, max_size=lambda: live.settings.queue.max_size)

    async def start(self) -> None:
        await self.queue.start()
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
        await self.queue.stop()

    async def records(self) -> list[TicketRecord]:
        """Every live replica's tickets, in the shared queue's order of arrival. Records of
        a replica whose heartbeat key has expired are left out (and removed)."""
        if not self.link.up:
            raise RedisUnavailable(self.link.reason)
        client = self.link.client
        try:
            members = await client.smembers(self.names.tickets)
            ids = [m.decode(errors="replace") if isinstance(m, bytes) else m for m in members]
            async with client.pipeline(transaction=False) as pipe:
                for rid in ids:
                    pipe.hgetall(self.names.ticket(rid))
                raw = await pipe.execute()
            records: list[TicketRecord] = []
            stale: list[str] = []
            for rid, fields in zip(ids, raw, strict=True):
                try:
                    records.append(TicketRecord.from_hash(fields))
                except ValueError:
                    stale.append(rid)  # gone meanwhile, or not ours
            names = sorted({r.replica for r in records})
            alive = await client.exists(*[self.names.alive(n) for n in names]) if names else 0
            if alive < len(names):
                async with client.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.exists(self.names.alive(name))
                    flags = dict(zip(names, await pipe.execute(), strict=True))
                dead = {n for n, up in flags.items() if not up}
                stale += [r.id for r in records if r.replica in dead]
                records = [r for r in records if r.replica not in dead]
            if stale:  # a replica died while no dispatcher was there to clear its records
                async with client.pipeline(transaction=False) as pipe:
                    pipe.srem(self.names.tickets, *stale)
                    pipe.delete(*[self.names.ticket(rid) for rid in stale])
                    await pipe.execute()
        except (RedisError, OSError):
            raise RedisUnavailable(self.link.reason or "Redis is unreachable") from None
        return sorted(records, key=lambda r: r.seq)


def record_view(record: TicketRecord, now: float) -> dict[str, object]:
    """A ticket record as the queue view shows it (times from the wall clock)."""
    view: dict[str, object] = {
        "id": record.request,
        "replica": record.replica,
        "source": record.source,
        "priority": record.priority,
        "path": record.path,
        "model": record.model,
        "client_ip": record.client,
        "wait_time": round(
            max(0.0, (record.started_at if record.state == "running" else now) - record.queued_at),
            3,
        ),
    }
    if record.state == "running":
        view["running_time"] = round(max(0.0, now - record.started_at), 3)
    if record.tenant is not None:
        view["tenant"] = record.tenant
    return view


def wall_now() -> float:
    return time.time()
