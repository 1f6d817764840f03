"""The SQLite datastore when its file fails under it: full (SQLite's own page limit, which
fails as a full disk does), or its write lock held by another process (a backup, a
shell). Every failure is the store's `Unavailable` (503 to a client, a retry to the
server's own tasks), never sqlite3's own error, which answered 500 and ended the
server's compaction task for good; nothing is half-written, and the store goes on once
the file is usable again."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bulkhead.server.hub import Hub
from bulkhead.store import BeforeUndo, Op, TooOld, Unavailable
from bulkhead.store.sqlite import SQLiteStore
from tests.test_store_group_commit import store  # noqa: F401  (the fixture)


def netset(name: str, nets: int = 1) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name},
            "spec": {"nets": [f"198.18.{i // 256}.{i % 256}/32" for i in range(nets)]}}


def put(name: str, nets: int = 1) -> Op:
    return Op("put", "GlobalNetworkSet", name, netset(name, nets), None)


async def test_a_full_file_fails_writes_and_status_as_unavailable(
        store: SQLiteStore) -> None:  # noqa: F811
    for i in range(3):
        await store.transaction([put(f"set-{i}")])
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(Unavailable) as write:
        await store.transaction([put("big", nets=2000)])
    assert "full" in str(write.value) and "nothing was written" in str(write.value)
    with pytest.raises(Unavailable) as status:
        await store.put_status("node-1", {"node": "node-1", "notes": "x" * 100_000})
    assert "full" in str(status.value)
    # Reads go on, and nothing of the refused writes is there.
    items, revision = await store.list_resources()
    assert [s.name for s in items] == ["set-0", "set-1", "set-2"] and revision == 3
    assert (await store.list_status())[0] == {}
    store._db.execute(f"PRAGMA max_page_count = {pages * 1000}")
    assert (await store.transaction([put("big", nets=2000)])).revision == 4
    await store.put_status("node-1", {"node": "node-1"})
    assert list((await store.list_status())[0]) == ["node-1"]


async def test_compaction_the_lock_refuses_fails_as_unavailable_and_compacts_later(
        store: SQLiteStore, tmp_path: Path) -> None:  # noqa: F811
    for i in range(5):
        await store.transaction([put(f"set-{i}")])
    store._db.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable) as locked:
            await store.compact(3)
        assert "locked" in str(locked.value)
        assert len(await store.history(0, 5)) == 5   # nothing compacted
        other.execute("ROLLBACK")
    finally:
        other.close()
    await store.compact(3)
    with pytest.raises(TooOld):
        await store.history(0, 5)
    assert [e.revision for e in await store.history(3, 5)] == [4, 5]


async def test_the_servers_compaction_task_outlives_a_held_lock(
        store: SQLiteStore, tmp_path: Path) -> None:  # noqa: F811
    """The hub's compaction loop logs a failure and tries again: once the lock is gone,
    the history is compacted (before, sqlite3's error ended the task, and the history
    grew for as long as the server ran)."""
    hub = Hub(store)
    follower = asyncio.create_task(hub.run())
    compactor: asyncio.Task[None] | None = None
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        for i in range(6):
            await store.transaction([put(f"set-{i}")])
        async with asyncio.timeout(10):
            await hub.ready.wait()
            while hub.revision < 6:
                await asyncio.sleep(0.01)
        store._db.execute("PRAGMA busy_timeout = 20")
        other.execute("BEGIN IMMEDIATE")
        compactor = asyncio.create_task(hub.compact_forever(0.05, 2, 1_000))
        await asyncio.sleep(0.5)           # several tries, each refused by the lock
        assert not compactor.done()
        assert len(await store.history(0, 6)) == 6
        other.execute("ROLLBACK")
        async with asyncio.timeout(10):
            while True:
                try:
                    await store.history(0, 6)
                except TooOld:
                    break
                await asyncio.sleep(0.05)
        assert not compactor.done()
    finally:
        other.close()
        for task in (compactor, follower):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (compactor, follower) if t is not None),
                             return_exceptions=True)


async def test_a_file_that_cannot_be_opened_is_unavailable_naming_it(tmp_path: Path) -> None:
    """A start on a file another process holds locked (a VACUUM it needs, the schema):
    the store's error naming the file, which the server's start turns into one line,
    not sqlite3's traceback."""
    path = tmp_path / "store.db"
    first = SQLiteStore(path)
    await first.close()
    other = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    try:
        other.execute("PRAGMA auto_vacuum=NONE")   # the next open must VACUUM: a write
        other.execute("VACUUM")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(Unavailable) as err:
            SQLiteStore(path)
        assert f"the SQLite datastore {path} cannot be opened" in str(err.value)
        assert "locked" in str(err.value)
    finally:
        other.close()


async def test_the_state_before_an_older_servers_changes_is_not_called_compacted(
        store: SQLiteStore, tmp_path: Path) -> None:  # noqa: F811
    """Changes an older server wrote kept no `prev`: the state before them cannot be
    rebuilt, and the error says so (not "older than the kept history")."""
    for i in range(3):
        await store.transaction([put("set-0", nets=i + 1)])   # an add, then two updates
    db = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        db.execute("UPDATE events SET prev = NULL WHERE revision = 2")
    finally:
        db.close()
    with pytest.raises(BeforeUndo) as err:
        await store.list_at(1)
    assert "written by an older server" in str(err.value) and "revision 2 or later" in \
        str(err.value)
    assert [s.name for s in await store.list_at(2)] == ["set-0"]
