"""Live changes: YAML edits (good, broken, half-written, deleted) and whitelist edits
reach the running proxy without a restart and without touching queued requests."""

from __future__ import annotations

import asyncio
import copy

from structlog.testing import capture_logs

from seadragon_proxy.cli import main

from .conftest import Proxy

RELOAD_BUDGET = 1.5  # seconds: the contract says "within a second"; the watcher takes ~0.25


def swapped_priorities(proxy: Proxy) -> list[dict[str, object]]:
    sources = copy.deepcopy(proxy.config["sources"])
    sources[0]["priority"], sources[2]["priority"] = 8, 0  # coding <-> scripts
    return sources


async def test_yaml_edit_changes_priorities_without_touching_the_queue(proxy: Proxy) -> None:
    gate = proxy.fake.gate("block")
    blocker = asyncio.create_task(proxy.generate("gate:block"))
    await proxy.fake.wait_for(1)
    queued_before = asyncio.create_task(proxy.generate("scripts-before", "scripts"))
    await proxy.watch.queued(1)

    ok = await proxy.next_reload(
        "config", lambda: proxy.write_config({"sources": swapped_priorities(proxy)}), RELOAD_BUDGET
    )
    assert ok
    assert proxy.scheduler.queued()[0].priority == 8  # untouched
    coding_after = asyncio.create_task(proxy.generate("coding-after", "coding"))
    scripts_after = asyncio.create_task(proxy.generate("scripts-after", "scripts"))
    await proxy.watch.queued(3)
    assert [(t.source, t.priority) for t in proxy.scheduler.queued()] == [
        ("scripts", 0),
        ("scripts", 8),
        ("coding", 8),
    ]
    gate.set()
    await asyncio.gather(blocker, queued_before, coding_after, scripts_after)
    assert [s.prompt for s in proxy.fake.inference[1:]] == [
        "scripts-after",
        "scripts-before",
        "coding-after",
    ]


async def test_broken_edit_is_logged_and_the_old_policy_stays(proxy: Proxy) -> None:
    with capture_logs() as logs:
        ok = await proxy.next_reload(
            "config", lambda: proxy.config_path.write_text("sources: [oops\n"), RELOAD_BUDGET
        )
    assert not ok
    failures = [e for e in logs if e["event"] == "config_reload_failed"]
    assert failures and str(proxy.config_path) in failures[0]["error"]
    assert "not valid YAML" in failures[0]["error"]
    assert [s.name for s in proxy.live.settings.policy.sources] == [
        "coding",
        "chat",
        "scripts",
        "direct_api",
    ]
    status, _ = await proxy.generate("still served", "coding")
    assert status == 200

    ok = await proxy.next_reload(
        "config", lambda: proxy.write_config({"queue": {"max_size": 7}}), RELOAD_BUDGET
    )
    assert ok and proxy.live.settings.queue.max_size == 7


async def test_invalid_values_are_refused_like_bad_syntax(proxy: Proxy) -> None:
    bad = copy.deepcopy(proxy.config)
    bad["default_source"] = "nobody"
    with capture_logs() as logs:
        ok = await proxy.next_reload("config", lambda: proxy.write_config(bad), RELOAD_BUDGET)
    assert not ok
    assert any("'nobody' names no source" in e.get("error", "") for e in logs)
    assert proxy.live.settings.policy.default.name == "direct_api"


async def test_half_written_file_then_the_rest(proxy: Proxy) -> None:
    """An editor that truncates first and writes second: the empty moment changes nothing."""
    full = proxy.config_path.read_text()
    ok = await proxy.next_reload("config", lambda: proxy.config_path.write_text(""), RELOAD_BUDGET)
    assert not ok and proxy.live.settings.policy.sources[0].name == "coding"
    edited = full.replace("coding", "coders")
    ok = await proxy.next_reload(
        "config", lambda: proxy.config_path.write_text(edited), RELOAD_BUDGET
    )
    assert ok and proxy.live.settings.policy.sources[0].name == "coders"


async def test_deleted_file_keeps_the_policy_and_a_recreated_one_applies(proxy: Proxy) -> None:
    text = proxy.config_path.read_text()
    with capture_logs() as logs:
        ok = await proxy.next_reload("config", proxy.config_path.unlink, RELOAD_BUDGET)
    assert not ok and any("no such file" in e.get("error", "") for e in logs)
    assert proxy.live.settings.policy.sources[0].name == "coding"
    ok = await proxy.next_reload(
        "config",
        lambda: proxy.config_path.write_text(text.replace("max_size: 512", "max_size: 9")),
        RELOAD_BUDGET,
    )
    assert ok and proxy.scheduler._max_size == 9


async def test_save_by_rename_is_seen(proxy: Proxy) -> None:
    """Editors that write a temporary file and rename it over the original."""
    temporary = proxy.config_path.with_name(".seadragon.yaml.swp")
    temporary.write_text(proxy.config_path.read_text().replace("coding", "renamed"))
    ok = await proxy.next_reload(
        "config", lambda: temporary.replace(proxy.config_path), RELOAD_BUDGET
    )
    assert ok and proxy.live.settings.policy.sources[0].name == "renamed"


async def test_restart_only_settings_are_reported_not_applied(proxy: Proxy) -> None:
    with capture_logs() as logs:
        ok = await proxy.next_reload(
            "config", lambda: proxy.write_config({"upstream": {"slots": 4}}), RELOAD_BUDGET
        )
    assert ok
    assert proxy.scheduler.slots == 1
    needs = [e for e in logs if e["event"] == "config_needs_restart"]
    assert needs and needs[0]["sections"] == ["upstream"]


async def test_whitelist_add_and_remove_reach_the_running_proxy(proxy: Proxy) -> None:
    stranger = {"X-Forwarded-For": "203.0.113.9"}
    config = str(proxy.config_path)

    async def status() -> int:
        async with proxy.session.get(proxy.url + "/api/tags", headers=stranger) as r:
            return r.status

    assert await status() == 403
    ok = await proxy.next_reload(
        "whitelist",
        lambda: asyncio.to_thread(main, ["whitelist", "add", "203.0.113.0/24", "--config", config]),
        RELOAD_BUDGET,
    )
    assert ok and await status() == 200
    ok = await proxy.next_reload(
        "whitelist",
        lambda: asyncio.to_thread(
            main, ["whitelist", "remove", "203.0.113.0/24", "--config", config]
        ),
        RELOAD_BUDGET,
    )
    assert ok and await status() == 403


async def test_damaged_database_keeps_the_last_whitelist(proxy: Proxy) -> None:
    db = proxy.live.store.path
    with capture_logs() as logs:
        ok = await proxy.next_reload("whitelist", db.unlink, RELOAD_BUDGET)
    assert not ok
    assert any(e["event"] == "whitelist_reload_failed" and "is missing" in e["error"] for e in logs)
    assert (await proxy.generate("loopback still listed"))[0] == 200

    ok = await proxy.next_reload(
        "whitelist", lambda: db.write_bytes(b"garbage" * 200), RELOAD_BUDGET
    )
    assert not ok and (await proxy.generate("still listed"))[0] == 200


async def test_a_write_that_leaves_the_whitelist_as_it_was_is_not_a_reload(proxy: Proxy) -> None:
    """History writes touch the same file; only a changed list counts as a reload."""
    before = len(proxy.reloads)
    assert await proxy.live.reload_whitelist()
    assert len(proxy.reloads) == before
