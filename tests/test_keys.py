"""API keys: made by ``keys add`` and shown once, stored as SHA-256 only, matched by
``match.api_key``, counted as whitelisted, removed before forwarding, live within a second."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import openai
import pytest
import yaml

from seadragon_proxy.cli import main
from seadragon_proxy.keys import PREFIX, KeyRing, KeyStore, bearer

from .conftest import MODEL, JsonLog, Proxy, ProxyFactory

KEYED = {
    "sources": [
        {"name": "scripts", "priority": 8, "match": {"api_key": ["team-scripts"]}},
        {"name": "batch", "priority": 9, "match": {"api_key": "batch"}},
        {"name": "direct_api", "priority": 10, "require_whitelist": True},
    ],
    "default_source": "direct_api",
}
STRANGER = {"X-Forwarded-For": "203.0.113.9"}  # behind the trusted 127.0.0.1: not whitelisted


async def cli(config: Path, *argv: str) -> tuple[int, str, str]:
    """The real command in its own process, as an operator runs it beside the proxy."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seadragon_proxy", *argv, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(KEYED)


async def added(proxy: Proxy, name: str) -> str:
    """``keys add NAME`` in a subprocess; returns the key once the running proxy has it."""
    result: list[str] = []

    async def add() -> None:
        code, out, err = await cli(proxy.config_path, "keys", "add", name, "--note", "ci")
        assert code == 0, err
        result.append(out.strip())

    # "Within a second" of the command's end: the watcher's 200 ms debounce and one read.
    # (1.5 s rather than 1.0 leaves room for a loaded CI machine, not for a slower design.)
    assert await proxy.next_reload("keys", add, timeout=1.5)
    return result[0]


def test_keys_look_like_ours_and_only_bearer_ones_are_read() -> None:
    ring = KeyRing(((hashlib.sha256(b"sdp_abc").digest(), "a"),))
    assert ring.identify("sdp_abc") == "a"
    assert ring.identify("sdp_abd") is None and ring.identify(None) is None
    assert bearer({"Authorization": "Bearer sdp_abc"}) == "sdp_abc"
    assert bearer({"Authorization": "bearer  sdp_abc "}) == "sdp_abc"
    assert bearer({"Authorization": "Bearer ollama"}) is None  # someone else's token
    assert bearer({"Authorization": "Basic sdp_abc"}) is None
    assert bearer({}) is None


async def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    key = await store.add("ci", "the CI job")
    assert key.startswith(PREFIX) and len(key) == len(PREFIX) + 43
    raw = (tmp_path / "k.db").read_bytes()
    assert key.encode() not in raw
    with sqlite3.connect(tmp_path / "k.db") as db:
        rows = db.execute("SELECT name, sha256, note FROM api_keys").fetchall()
    assert rows == [("ci", hashlib.sha256(key.encode()).hexdigest(), "the CI job")]
    assert (await store.load()).identify(key) == "ci"
    with pytest.raises(ValueError, match="exists already; 'seadragon-proxy keys remove ci'"):
        await store.add("ci")
    assert await store.remove("ci") and not await store.remove("ci")
    assert len(await store.load()) == 0


async def test_a_database_from_before_keys_reads_as_no_keys(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()
    store = KeyStore(path)
    assert await store.entries() == [] and len(await store.load()) == 0
    await store.ensure()
    await store.ensure()  # idempotent: the migration runs once
    assert await store.entries() == []


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    doc = dict(KEYED, whitelist={"database": "k.db"})
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_add_list_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert main(["keys", "list", "--config", str(config)]) == 1
    assert "does not exist yet" in capsys.readouterr().err
    assert main(["keys", "add", "team-scripts", "--note", "cron", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith(PREFIX) and out == key + "\n"  # stdout is the key alone
    assert "shown only now" in err and "Authorization: Bearer" in err
    assert main(["keys", "add", "spare", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert "no source lists 'spare' under match.api_key" in err
    assert main(["keys", "list", "--config", str(config)]) == 0
    out, _ = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["team-scripts", "spare"]
    assert PREFIX not in out and "cron" in out
    assert main(["keys", "list", "--json", "--config", str(config)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["note"]) for r in rows] == [("team-scripts", "cron"), ("spare", "")]
    assert main(["keys", "add", "spare", "--config", str(config)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["keys", "remove", "spare", "--config", str(config)]) == 0
    assert main(["keys", "remove", "spare", "--config", str(config)]) == 1
    assert "no API key is named 'spare'" in capsys.readouterr().err
    assert main(["keys", "add", "bad name", "--config", str(config)]) == 2
    assert "is not a key name" in capsys.readouterr().err


def test_explain_takes_a_key_or_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    assert main(["keys", "add", "batch", "--config", str(config)]) == 0
    key = capsys.readouterr().out.strip()
    for given in ("batch", key):
        code = main(["explain", "--ip", "203.0.113.9", "--api-key", given, "--config", str(config)])
        out = capsys.readouterr().out
        assert code == 0
        assert out.splitlines()[0] == "source:    batch (priority 9)"
        assert "api_key 'batch'" in out and "counts as whitelisted" in out
        assert key not in out
    assert main(["explain", "--api-key", PREFIX + "x" * 43, "--config", str(config)]) == 1
    assert "that key is not in" in capsys.readouterr().err
    assert main(["explain", "--api-key", "nobody", "--config", str(config)]) == 1
    assert "no API key is named 'nobody'" in capsys.readouterr().err
    code = main(["explain", "--ip", "203.0.113.9", "--config", str(config)])
    assert code == 0 and "refused with 403" in capsys.readouterr().out


async def test_a_new_key_works_on_the_running_proxy_and_never_reaches_ollama(
    proxy: Proxy, json_log: JsonLog
) -> None:
    key = await added(proxy, "team-scripts")
    auth = {"Authorization": f"Bearer {key}", **STRANGER}
    status, _ = await proxy.collect("/api/generate", {"model": MODEL, "prompt": "x"}, auth)
    assert status == 200
    other = {"Authorization": "Bearer ollama-cloud-token"}
    status, _ = await proxy.collect("/api/generate", {"model": MODEL, "prompt": "y"}, other)
    assert status == 200
    records = await proxy.records(2)
    assert [(r.source, r.api_key) for r in records] == [
        ("scripts", "team-scripts"),
        ("direct_api", None),
    ]
    first, second = proxy.fake.inference
    assert "Authorization" not in first.headers  # the proxy's key stays with the proxy
    assert second.headers["Authorization"] == "Bearer ollama-cloud-token"  # others pass
    text = json_log.text()
    assert key not in text
    lines = [line for line in json_log.lines() if line.get("event") == "request"]
    assert [line.get("key_name") for line in lines] == ["team-scripts", None]


async def test_a_known_key_counts_as_whitelisted_and_removal_is_live(proxy: Proxy) -> None:
    """The stranger is refused by direct_api; the same stranger with a key is let in, even
    by a source that only requires the whitelist; after ``keys remove`` it is refused again."""
    body = {"model": MODEL, "prompt": "x"}
    status, doc = await proxy.collect("/api/generate", body, dict(STRANGER))
    assert status == 403 and "sent no known API key" in doc["error"]
    key = await added(proxy, "intern")  # listed by no source: whitelisted, nothing more
    status, _ = await proxy.collect(
        "/api/generate", body, {"Authorization": f"Bearer {key}", **STRANGER}
    )
    assert status == 200
    assert (await proxy.records(2))[1].source == "direct_api"

    async def remove() -> None:
        assert (await cli(proxy.config_path, "keys", "remove", "intern"))[0] == 0

    assert await proxy.next_reload("keys", remove)
    status, _ = await proxy.collect(
        "/api/generate", body, {"Authorization": f"Bearer {key}", **STRANGER}
    )
    assert status == 403


async def test_openai_client_api_key_selects_the_source(proxy: Proxy) -> None:
    key = await added(proxy, "batch")
    oai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    try:
        answer = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content
    finally:
        await oai.close()
    assert (await proxy.records(1))[0].source == "batch"
    assert "Authorization" not in proxy.fake.inference[0].headers


async def test_admin_api_makes_lists_and_removes_keys(proxy: Proxy) -> None:
    url = proxy.url + "/api/admin/keys"
    async with proxy.session.post(url, json={"name": "batch", "note": "nightly"}) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        key = (await r.json())["key"]
    status, _ = await proxy.collect(
        "/api/generate", {"model": MODEL, "prompt": "x"}, {"Authorization": f"Bearer {key}"}
    )
    assert status == 200 and (await proxy.records(1))[0].source == "batch"
    async with proxy.session.post(url, json={"name": "batch"}) as r:
        assert r.status == 409 and "exists already" in (await r.json())["error"]
    async with proxy.session.post(url, json={"name": "no spaces"}) as r:
        assert r.status == 400
    async with proxy.session.get(url) as r:
        listing = await r.json()
    assert [k["name"] for k in listing["keys"]] == ["batch"] and key not in str(listing)
    async with proxy.session.delete(url, json={"name": "batch"}) as r:
        assert (await r.json()) == {"name": "batch", "removed": True}
    async with proxy.session.delete(url, json={"name": "batch"}) as r:
        assert r.status == 404
    assert len(proxy.live.keys) == 0


async def test_admin_keys_route_needs_the_admin_grant(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.url + "/api/admin/keys", headers=STRANGER) as r:
        assert r.status == 403


async def test_a_read_only_database_from_before_keys_still_starts(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Without the table and without write access the proxy runs as before, with no keys
    (the history, which writes, is off: a read-only file suits only such a set-up)."""
    from seadragon_proxy.whitelist import WhitelistStore

    from .fsutil import read_only

    path = tmp_path / "data" / "seadragon.db"
    await WhitelistStore(path).ensure()  # a database as an older version left it
    with read_only(path):
        proxy = await make_proxy({**KEYED, "history": {"enabled": False}})
        status, _ = await proxy.collect("/api/generate", {"model": MODEL, "prompt": "x"}, {})
        assert status == 200
        assert len(proxy.live.keys) == 0
        await proxy.server.stop()
