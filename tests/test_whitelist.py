"""The whitelist table: seeding, normalising, validation before SQL, and damaged databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from seadragon_proxy.exceptions import DatabaseError
from seadragon_proxy.netaddr import parse_address
from seadragon_proxy.whitelist import WhitelistStore

from .fsutil import read_only


@pytest.fixture
def store(tmp_path: Path) -> WhitelistStore:
    return WhitelistStore(tmp_path / "data" / "seadragon.db", busy_timeout=0.1)


async def test_new_database_is_seeded_with_loopback_once(store: WhitelistStore) -> None:
    assert await store.ensure() is True
    assert [e.network for e in await store.entries()] == ["127.0.0.1", "::1"]
    await store.remove("127.0.0.1")
    assert await store.ensure() is False  # removing loopback sticks: no re-seeding
    assert [e.network for e in await store.entries()] == ["::1"]


async def test_add_normalises_and_updates_notes(store: WhitelistStore) -> None:
    assert await store.add("::ffff:10.0.0.7", "laptop") == ("10.0.0.7", True)
    assert await store.add("10.0.0.7", "Ana's laptop") == ("10.0.0.7", False)
    assert await store.add("2001:DB8::/32") == ("2001:db8::/32", True)
    entries = {e.network: e.note for e in await store.entries()}
    assert entries["10.0.0.7"] == "Ana's laptop"  # quotes are data, never SQL
    whitelist = await store.load()
    assert parse_address("10.0.0.7") in whitelist
    assert parse_address("2001:db8::99") in whitelist
    assert parse_address("10.0.0.8") not in whitelist


async def test_remove_reports_whether_it_was_there(store: WhitelistStore) -> None:
    await store.add("10.0.0.0/8")
    assert await store.remove("10.0.0.0/8") == ("10.0.0.0/8", True)
    assert await store.remove("10.0.0.0/8") == ("10.0.0.0/8", False)


@pytest.mark.parametrize(
    "entry", ["10.0.0.1'; DROP TABLE whitelist;--", "10.0.0.7/8", "", "localhost"]
)
async def test_malformed_entries_are_refused_before_any_sql(
    store: WhitelistStore, entry: str
) -> None:
    with pytest.raises(ValueError):
        await store.add(entry)
    assert not store.path.exists()  # nothing was even created


async def test_rows_that_fail_validation_are_not_trusted(store: WhitelistStore) -> None:
    await store.ensure()
    with sqlite3.connect(store.path) as db:
        db.execute("INSERT INTO whitelist (network) VALUES ('0.0.0.0/0 or anything')")
    assert len(await store.load()) == 2


async def test_missing_database(store: WhitelistStore) -> None:
    with pytest.raises(DatabaseError, match="is missing; it is created by the next"):
        await store.load()


async def test_corrupt_database(store: WhitelistStore) -> None:
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DatabaseError, match=r"corrupt.*move it aside"):
        await store.load()
    with pytest.raises(DatabaseError, match="corrupt"):
        await store.add("10.0.0.1")


async def test_read_only_database(store: WhitelistStore) -> None:
    await store.ensure()
    with read_only(store.path):
        assert len(await store.load()) == 2  # reading still works
        with pytest.raises(DatabaseError, match="is read-only; give this user write access"):
            await store.add("10.0.0.1")


async def test_locked_by_another_writer(store: WhitelistStore) -> None:
    await store.ensure()
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseError, match="locked by another writer; try again"):
            await store.add("10.0.0.1")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await store.add("10.0.0.1"))[1] is True
