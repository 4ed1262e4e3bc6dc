"""Tenants where people look: the queue view, history and ``stats --by tenant``, metrics."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from seadragon_proxy.history import History
from seadragon_proxy.typedefs import HISTORY

from .conftest import MODEL, Proxy, ProxyFactory
from .test_fair_shares import config, hold_the_slot, queue, send

OLD_SCHEMA = """
    CREATE TABLE requests (
        ts REAL NOT NULL, request_id TEXT NOT NULL, source TEXT, priority INTEGER,
        client_ip TEXT NOT NULL, method TEXT NOT NULL, route TEXT NOT NULL, model TEXT,
        status INTEGER NOT NULL, queued INTEGER NOT NULL, queue_wait REAL NOT NULL,
        upstream_time REAL NOT NULL, bytes INTEGER NOT NULL, eval_count INTEGER NOT NULL,
        prompt_eval_count INTEGER NOT NULL, eval_seconds REAL NOT NULL, hung_up INTEGER NOT NULL,
        error TEXT
    )
"""


def history_of(proxy: Proxy) -> History:
    history = proxy.server.app[HISTORY]
    assert history is not None
    return history


async def test_the_queue_view_shows_each_waiters_tenant_and_the_tenants_shares(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config())
    for user in ("a", "a", "b"):  # a history: a used twice b's tokens
        assert (await send(proxy, user, "x"))[0] == 200
    holder, gate = await hold_the_slot(proxy)
    tasks = await queue(proxy, "a", 2) + await queue(proxy, "b", 1)
    async with proxy.session.get(proxy.url + "/api/admin/queue") as r:
        doc = await r.json()
    # b was idle while a was served: it banks no credit, so the two alternate, a first
    assert [e["tenant"] for e in doc["entries"]] == ["team/a", "team/b", "team/a"]
    assert doc["running"][0]["tenant"] == "coding"
    tenants = {t["tenant"]: t for t in doc["tenants"]}
    assert (tenants["team/a"]["waiting"], tenants["team/b"]["waiting"]) == (2, 1)
    assert tenants["coding"]["running"] == 1
    assert tenants["team/a"]["tokens_last_hour"] == 2 * 17  # 12 prompt + 5 generated, twice
    assert abs(tenants["team/a"]["share"] - 2 / 3) < 0.01
    gate.set()
    await asyncio.gather(holder, *tasks)


async def test_history_records_the_tenant_and_stats_groups_by_it(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    database = tmp_path / "data" / "seadragon.db"
    database.parent.mkdir()
    with sqlite3.connect(database) as db:  # a file from before fair shares: migrated in place
        db.execute(OLD_SCHEMA)
        db.execute(
            "INSERT INTO requests VALUES (?, 'old', 'chat', 5, '127.0.0.1', 'POST', "
            "'/api/chat', 'm', 200, 1, 0, 0, 0, 0, 0, 0, 0, NULL)",
            (time.time() - 60,),
        )
    proxy = await make_proxy({**config(), "history": {"flush_interval": 60}})
    for user, tokens in (("alice", 3), ("alice", 3), ("bob", 7)):
        assert (await send(proxy, user, "x", tokens=tokens))[0] == 200
    assert await history_of(proxy).flush() == 3
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT request_id, tenant FROM requests ORDER BY ts").fetchall()
    assert rows[0] == ("old", None)
    assert [tenant for _, tenant in rows[1:]] == ["team/alice", "team/alice", "team/bob"]
    async with proxy.session.get(proxy.url + "/api/admin/stats?since=1h") as r:
        doc = await r.json()
    tenants = {g["tenant"]: g for g in doc["tenants"]}
    assert (tenants["team/alice"]["requests"], tenants["team/alice"]["tokens"]) == (2, 6)
    assert (tenants["team/bob"]["requests"], tenants["team/bob"]["tokens"]) == (1, 7)

    command = await asyncio.create_subprocess_exec(  # the real command, in its own process
        sys.executable, "-m", "seadragon_proxy", "stats", "--config", str(proxy.config_path),
        "--by", "tenant", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    printed, _ = await command.communicate()
    assert command.returncode == 0
    table = printed.decode()
    lines = table.splitlines()
    assert lines[2].split()[0] == "tenant"
    assert any(line.split()[:2] == ["team/alice", "2"] for line in lines)
    assert "no requests by" not in table and MODEL not in table  # only the tenant table


async def test_metrics_list_the_top_tenants_and_sum_the_rest_as_other(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(config())
    for i in range(13):  # more tenants than the metrics list
        assert (await send(proxy, f"u{i:02}", "x", tokens=i + 1))[0] == 200
    async with proxy.session.get(proxy.url + "/metrics") as r:
        text = await r.text()
    lines = [line for line in text.splitlines() if line.startswith("seadragon_tenant_tokens")]
    assert len(lines) == 11
    tokens: dict[str, Any] = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert tokens["team/u12"] == 12 + 13
    assert tokens["other"] == sum(12 + i + 1 for i in range(3))  # u00, u01, u02
