"""Request history: written in batches off the request path, summarised the same way by the
stats endpoint and the stats command, pruned by age and by count."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from seadragon_proxy.cli import main
from seadragon_proxy.history import History, parse_since
from seadragon_proxy.typedefs import HISTORY

from .conftest import MODEL, Proxy, ProxyFactory
from .fsutil import read_only


def history_of(proxy: Proxy) -> History:
    history = proxy.server.app[HISTORY]
    assert history is not None
    return history


def rows(path: Path, where: str = "1") -> list[sqlite3.Row]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return db.execute(f"SELECT * FROM requests WHERE {where} ORDER BY ts").fetchall()


async def stats(proxy: Proxy, since: str = "1h") -> dict[str, object]:
    async with proxy.session.get(proxy.url + f"/api/admin/stats?since={since}") as r:
        assert r.status == 200
        return await r.json()  # type: ignore[no-any-return]


async def traffic(proxy: Proxy) -> None:
    """Three chat and two coding generations, a failure, a refusal and a hang-up."""
    for _ in range(3):
        assert (await proxy.generate("hi", "chat", options={"num_predict": 4}))[0] == 200
    for _ in range(2):
        assert (await proxy.generate("hi", "coding", options={"num_predict": 2}))[0] == 200
    assert (await proxy.generate("fault:hangup", "coding"))[0] == 200
    async with proxy.session.get(
        proxy.url + "/api/tags", headers={"X-Forwarded-For": "203.0.113.5"}
    ) as r:
        assert r.status == 403
    gone = asyncio.create_task(proxy.generate("gate:never", "scripts"))
    await proxy.fake.wait_for(7)
    gone.cancel()
    await proxy.records(8)


async def test_every_request_is_recorded_with_its_figures(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"history": {"flush_interval": 60}})
    await traffic(proxy)
    history = history_of(proxy)
    assert len(history._buffer) == 8  # answered already, written later: not on the request path
    assert await history.flush() == 8
    recorded = rows(history.path)
    assert [r["source"] for r in recorded] == ["chat"] * 3 + ["coding"] * 3 + [
        "direct_api",
        "scripts",
    ]
    first = recorded[0]
    assert (first["route"], first["model"], first["status"], first["queued"]) == (
        "/api/generate",
        MODEL,
        200,
        1,
    )
    assert (first["eval_count"], first["prompt_eval_count"], first["client_ip"]) == (
        4,
        12,
        "127.0.0.1",
    )
    assert first["bytes"] > 0 and first["upstream_time"] > 0 and first["queue_wait"] >= 0
    assert "before the answer was complete" in recorded[5]["error"]
    assert recorded[6]["status"] == 403 and recorded[6]["client_ip"] == "203.0.113.5"
    assert recorded[7]["hung_up"] == 1


async def test_stats_endpoint_and_command_agree_with_the_traffic(proxy: Proxy) -> None:
    await traffic(proxy)
    doc = await stats(proxy)
    sources = {g["source"]: g for g in doc["sources"]}  # type: ignore[attr-defined]
    assert (sources["chat"]["requests"], sources["chat"]["tokens"], sources["chat"]["errors"]) == (
        3,
        12,
        0,
    )
    assert (
        sources["coding"]["requests"],
        sources["coding"]["errors"],
        sources["coding"]["tokens"],
    ) == (3, 1, 4)
    assert sources["direct_api"]["errors"] == 1 and sources["direct_api"]["queued"] == 0
    assert sources["scripts"]["hung_up"] == 1 and sources["scripts"]["errors"] == 0
    chat = sources["chat"]
    assert chat["queued"] == 3 and 0 <= chat["wait_p50"] <= chat["wait_p95"]
    assert sources["direct_api"]["wait_p50"] is None  # never queued
    models = {g["model"]: g for g in doc["models"]}  # type: ignore[attr-defined]
    assert models[MODEL]["requests"] == 7 and models[MODEL]["tokens"] == 16

    printed = await asyncio.to_thread(
        run_cli, ["stats", "--since", "1h", "--json", "--config", str(proxy.config_path)]
    )
    by_cli = json.loads(printed)
    assert by_cli["sources"] == doc["sources"] and by_cli["models"] == doc["models"]
    table = await asyncio.to_thread(run_cli, ["stats", "--config", str(proxy.config_path)])
    assert "chat" in table and "wait p95" in table and MODEL in table


def run_cli(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


async def test_since_filters_and_is_validated(proxy: Proxy) -> None:
    assert (await proxy.generate("hi"))[0] == 200
    later = time.time() + 5
    doc = await stats(proxy, str(later))
    assert doc["sources"] == []
    async with proxy.session.get(proxy.url + "/api/admin/stats?since=yesterday-ish") as r:
        assert r.status == 400 and "not a time" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("text", "seconds_ago"),
    [("90s", 90), ("30m", 1800), ("24h", 86400), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_parse_since_durations(text: str, seconds_ago: float) -> None:
    assert parse_since(text, now=1_000_000_000) == 1_000_000_000 - seconds_ago


def test_parse_since_times() -> None:
    assert parse_since("2026-11-26T00:00:00Z") == parse_since("2026-11-26T00:00:00+00:00")
    assert parse_since("2026-11-26T00:00:00") == parse_since("2026-11-26T00:00:00Z")
    assert parse_since("1700000000") == 1_700_000_000
    with pytest.raises(ValueError, match="not a time"):
        parse_since("last tuesday")


async def test_timeseries_buckets_per_source(proxy: Proxy) -> None:
    await traffic(proxy)
    async with proxy.session.get(proxy.url + "/api/admin/timeseries?minutes=5&step=60") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["step"] == 60 and doc["since"] % 60 == 0  # buckets on whole minutes
    assert sum(b["requests"] for b in doc["series"]["chat"]) == 3
    assert sum(b["tokens"] for b in doc["series"]["chat"]) == 12
    assert all(b["wait_avg"] is None for b in doc["series"]["direct_api"])
    async with proxy.session.get(proxy.url + "/api/admin/timeseries?step=1") as r:
        assert r.status == 400


async def test_retention_prunes_by_count_and_age(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        {"history": {"retention_rows": 5, "retention_days": 30, "flush_interval": 60}}
    )
    history = history_of(proxy)
    with sqlite3.connect(history.path) as db:
        db.execute(
            "INSERT INTO requests VALUES (?, 'old', 'chat', 5, '10.0.0.1', 'POST', '/api/chat', "
            "'m', 200, 1, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, NULL)",  # server, swapped, tenant
            (time.time() - 40 * 86400,),
        )
    for i in range(8):
        assert (await proxy.generate(f"p{i}"))[0] == 200
    await proxy.records(8)
    history._last_prune = 0.0  # prune at this flush rather than a minute from now
    await history.flush()
    kept = rows(history.path)
    assert len(kept) == 5 and "old" not in [r["request_id"] for r in kept]


async def test_unwritable_database_keeps_the_records_until_it_recovers(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy({"history": {"flush_interval": 60}})
    history = history_of(proxy)
    with capture_logs() as logs, read_only(history.path):
        assert (await proxy.generate("while read-only"))[0] == 200
        await proxy.records(1)
        assert await history.flush() == 0
        assert await history.flush() == 0  # warned once, not at every attempt
    assert [e["event"] for e in logs].count("history_write_failed") == 1
    assert "read-only" in next(e for e in logs if e["event"] == "history_write_failed")["error"]
    assert await history.flush() == 1
    assert [r["prompt"] for r in [{"prompt": p.prompt} for p in proxy.fake.inference]] == [
        "while read-only"
    ]
    assert len(rows(history.path)) == 1


async def test_history_can_be_switched_off(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy({"history": {"enabled": False}})
    assert (await proxy.generate("hi"))[0] == 200
    async with proxy.session.get(proxy.url + "/api/admin/stats") as r:
        assert r.status == 404 and "history.enabled: false" in (await r.json())["error"]


def test_stats_command_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("sources: [{name: a, priority: 1}]\ndefault_source: a\n")
    assert main(["stats", "--config", str(config)]) == 1
    assert "does not exist yet" in capsys.readouterr().err
    assert main(["stats", "--since", "soon", "--config", str(config)]) == 2  # bad usage
    assert "not a time" in capsys.readouterr().err
