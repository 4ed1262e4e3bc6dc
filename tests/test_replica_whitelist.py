"""One whitelist for every replica (Redis backend): a change through any replica, by the
admin API or the CLI, reaches the others within a second; each keeps its own SQLite file;
a replica that was away (or a Redis that restarted empty) catches up; nothing loops."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
import yaml

from seadragon_proxy.cli import main
from seadragon_proxy.whitelist import WhitelistStore
from tests.conftest import free_port
from tests.redisserver import RedisServer
from tests.replicas import Replica, Replicas, admin

RULES = {"sources": [{"name": "all", "priority": 0}], "default_source": "all"}
NET = "10.20.30.0/24"
ADDR = "10.20.30.7"


async def version(redis_server: RedisServer) -> int:
    client = redis.Redis.from_url(redis_server.url)
    try:
        return int(await client.get("t:whitelist:version") or 0)
    finally:
        await client.aclose()


async def test_an_admin_api_change_reaches_the_other_replica_and_its_file(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas(2)
    assert not b.allows(ADDR)
    async with aiohttp.ClientSession() as session:
        doc = await admin(session, a, "POST", NET)
        assert doc == {"network": NET, "added": True, "shared": True}
        await b.until(lambda: b.allows(ADDR))
        assert NET in [e.network for e in await WhitelistStore(b.database).entries()]

        # What b heard and wrote is not published again: its file now matches what it
        # agreed with Redis on, so there is nothing to share and the counter stays.
        before = await version(redis_server)
        assert await b.sync.file_changed() is True
        assert await version(redis_server) == before

        doc = await admin(session, b, "DELETE", NET)
        assert doc == {"network": NET, "removed": True, "shared": True}
        await a.until(lambda: not a.allows(ADDR))
        assert NET not in [e.network for e in await WhitelistStore(a.database).entries()]


async def test_the_cli_edit_of_one_replicas_file_reaches_the_other(replicas: Replicas) -> None:
    a, b = await replicas(2)
    code = await asyncio.to_thread(
        main, ["whitelist", "add", ADDR, "--note", "ci", "--config", str(a.config_path)]
    )
    assert code == 0
    await b.until(lambda: b.allows(ADDR))
    await a.until(lambda: a.allows(ADDR))  # and the replica on that file, as before
    code = await asyncio.to_thread(
        main, ["whitelist", "remove", ADDR, "--config", str(b.config_path)]
    )
    assert code == 0
    await a.until(lambda: not a.allows(ADDR))


async def test_the_cli_shares_a_change_itself_when_no_replica_runs_on_its_file(
    replicas: Replicas,
) -> None:
    a, b = await replicas(2)
    await a.stop()  # nobody watches a's file: the CLI's own message is what b hears
    code = await asyncio.to_thread(main, ["whitelist", "add", NET, "--config", str(a.config_path)])
    assert code == 0
    await b.until(lambda: b.allows(ADDR))


def test_the_cli_with_redis_away_changes_the_file_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        **RULES,
        "whitelist": {"database": str(tmp_path / "w.db")},
        "queue": {"backend": "redis", "redis": {"url": f"redis://:pw@127.0.0.1:{free_port()}/0"}},
    }
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["whitelist", "add", ADDR, "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"added {ADDR} in" in out and "is unreachable" in out and ":pw@" not in out
    assert "when a replica using this file reaches Redis again" in out


async def test_a_replica_that_was_stopped_catches_up_when_it_starts(replicas: Replicas) -> None:
    a, b = await replicas(2)
    await b.stop()
    async with aiohttp.ClientSession() as session:
        await admin(session, a, "POST", NET)
    await b.start()
    await b.until(lambda: b.allows(ADDR), timeout=5)


async def test_changes_made_while_redis_is_away_are_shared_when_it_is_back(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas(2)
    await redis_server.stop()
    await a.redis_up(False)
    await b.redis_up(False)
    async with aiohttp.ClientSession() as session:
        doc = await admin(session, a, "POST", NET)
        assert doc["shared"] is False and a.allows(ADDR)  # in force here at once
    assert not b.allows(ADDR)
    await redis_server.start()  # empty: no copy of the list survived
    await b.until(lambda: b.allows(ADDR), timeout=10)
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert await client.hget("t:whitelist:entries", NET) == b"t"
    finally:
        await client.aclose()


async def test_bad_and_stale_messages_on_the_channel_are_ignored(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas(2)
    client = redis.Redis.from_url(redis_server.url)

    def change(network: str, version: object) -> str:
        return json.dumps({"origin": "x", "network": network, "note": "n", "version": version})

    try:
        junk = [b"not json", b"[]", change("300.1.1.1", 10**6), change("10.9.9.9", "7")]
        stale = change("10.9.9.9", 1)  # older than the copy both replicas reconciled with
        for message in [*junk, stale, change(ADDR, 10**6)]:
            await client.publish("t:whitelist", message)
    finally:
        await client.aclose()
    await b.until(lambda: b.allows(ADDR))  # the last one, on the same connection: all read
    await a.until(lambda: a.allows(ADDR))
    assert not a.allows("10.9.9.9") and not b.allows("10.9.9.9")


async def test_two_replicas_editing_one_entry_at_once_end_with_the_same_note(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    a, b = await replicas(2)
    heard = asyncio.Event()
    for replica in (a, b):
        changed = replica.sync.changed

        async def wrapped(changed: Any = changed) -> None:
            await changed()
            heard.set()

        replica.sync.changed = wrapped
    client = redis.Redis.from_url(redis_server.url)

    async def notes(network: str) -> tuple[str | None, ...]:
        shared = await client.hget("t:whitelist:entries", network)
        files = []
        for replica in (a, b):
            found = {e.network: e.note for e in await WhitelistStore(replica.database).entries()}
            files.append(found.get(network))
        return (shared.decode() if shared else None, *files)

    try:
        async with aiohttp.ClientSession() as session:
            for i in range(5):
                network = f"10.1.{i}.0/24"

                async def post(replica: Replica, note: str, network: str = network) -> None:
                    body = {"network": network, "note": note}
                    url = replica.url + "/api/admin/whitelist"
                    async with session.post(url, json=body) as r:
                        assert r.status == 200

                await asyncio.gather(post(a, "from a"), post(b, "from b"))
                async with asyncio.timeout(2):
                    while True:
                        heard.clear()  # before reading: a change meanwhile is not missed
                        if len(set(found := await notes(network))) == 1:
                            break
                        await heard.wait()
                assert found[0] in ("from a", "from b")
    finally:
        await client.aclose()
