"""SQLite group commit (issue 23): transactions that arrive together share one commit (one
fsync), each keeps its own revision, audit entry and outcome; a refused one is undone
alone; a failed commit fails them all with nothing written; watchers see every event."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.store import Audit, Conflict, Event, MissingReference, Op, Unavailable
from bulkhead.store.sqlite import SQLiteStore


def netset(name: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name}, "spec": {"nets": ["198.18.0.0/24"]}}


def put(name: str, expect: str | None = "absent") -> Op:
    return Op("put", "GlobalNetworkSet", name, netset(name), expect)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.db")
    try:
        yield s
    finally:
        await s.close()


class Commits:
    """Counts the COMMITs the store's connection runs (sqlite3's trace callback)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.count = 0
        store._db.set_trace_callback(self._saw)

    def _saw(self, statement: str) -> None:
        if statement.strip().upper() == "COMMIT":
            self.count += 1


class FailingCommit:
    """The store's connection, with COMMIT failing as a full disk would make it fail."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.fail = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.fail and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def _events(store: SQLiteStore, after: int, count: int) -> list[Event]:
    seen: list[Event] = []

    async def collect() -> None:
        async for event in store.watch(after):
            seen.append(event)
            if len(seen) == count:
                return
    await asyncio.wait_for(collect(), 20)
    return seen


async def test_concurrent_transactions_share_commits_and_all_land(store: SQLiteStore) -> None:
    start = await store.revision()
    watched = asyncio.create_task(_events(store, start, 200))
    await asyncio.sleep(0.05)
    commits = Commits(store)
    results = await asyncio.gather(*(store.transaction([put(f"n{i}")],
                                                       Audit(f"u{i}", "admin"))
                                     for i in range(200)))
    # Every one acknowledged with a revision of its own, in the order they came.
    assert [r.revision for r in results] == list(range(start + 1, start + 201))
    assert commits.count < 100, f"{commits.count} commits for 200 transactions"
    items, revision = await store.list_resources("GlobalNetworkSet")
    assert revision == start + 200 and len(items) == 200
    for r, i in zip(results, range(200), strict=True):
        assert r.stored[0].name == f"n{i}"
        assert (await store.get("GlobalNetworkSet", f"n{i}")).revision == r.revision
    # Each transaction's audit entry names its own writer.
    entries, cut = await store.audit_log(200)
    assert not cut
    assert {(e["revision"], e["who"]) for e in entries} == \
        {(r.revision, f"u{i}") for r, i in zip(results, range(200), strict=True)}
    # A watcher sees every event, in revision order.
    events = await watched
    assert [e.revision for e in events] == list(range(start + 1, start + 201))
    assert [e.name for e in events] == [f"n{i}" for i in range(200)]


async def test_a_refused_transaction_is_undone_alone(store: SQLiteStore) -> None:
    await store.transaction([put("taken")])
    start = await store.revision()
    outcomes = await asyncio.gather(
        store.transaction([put("a1")]),
        store.transaction([put("b1"), put("taken")]),     # conflicts: neither of its puts
        store.transaction([put("c1")]),
        store.transaction([Op("put", "GlobalNetworkPolicy", "p", {
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "p"}, "spec": {"tier": "nope", "order": 1}},
            requires=(("Tier", "nope"),))]),              # a tier that does not exist
        store.transaction([put("d1")]),
        return_exceptions=True)
    assert isinstance(outcomes[1], Conflict)
    assert isinstance(outcomes[3], MissingReference)
    good = [outcomes[i] for i in (0, 2, 4)]
    # No revision is lost to a refused transaction: the others are consecutive.
    assert [r.revision for r in good] == [start + 1, start + 2, start + 3]  # type: ignore[union-attr]
    names = {s.name for s in (await store.list_resources("GlobalNetworkSet"))[0]}
    assert names == {"taken", "a1", "c1", "d1"}
    assert await store.revision() == start + 3
    events = await _events(store, start, 3)
    assert [e.name for e in events] == ["a1", "c1", "d1"]


async def test_a_failed_commit_fails_every_transaction_with_nothing_written(
        store: SQLiteStore) -> None:
    await store.transaction([put("before")])
    start = await store.revision()
    real = store._db
    failing = FailingCommit(real)
    store._db = failing  # type: ignore[assignment]
    outcomes = await asyncio.gather(*(store.transaction([put(f"x{i}")]) for i in range(20)),
                                    return_exceptions=True)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert "nothing was written, try again" in str(outcomes[0])
    assert "disk is full" in str(outcomes[0])
    failing.fail = False
    assert await store.revision() == start
    names = {s.name for s in (await store.list_resources("GlobalNetworkSet"))[0]}
    assert names == {"before"}
    # The store goes on: the next writes commit, with the next revisions.
    after = await asyncio.gather(*(store.transaction([put(f"y{i}")]) for i in range(3)))
    assert [r.revision for r in after] == [start + 1, start + 2, start + 3]
    store._db = real
    events = await _events(store, start, 3)
    assert [e.name for e in events] == ["y0", "y1", "y2"]


async def test_a_cancelled_caller_does_not_stop_the_others(store: SQLiteStore) -> None:
    """Neither the caller whose commit is under way (it commits from where it is) nor
    callers waiting for the next commit stop the others when cancelled."""
    tasks = [asyncio.create_task(store.transaction([put(f"c{i}")])) for i in range(30)]
    await asyncio.sleep(0)
    for i in (0, 5, 20):
        tasks[i].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    landed = [d for d in done if not isinstance(d, BaseException)]
    assert len(landed) == 27
    names = {s.name for s in (await store.list_resources("GlobalNetworkSet"))[0]}
    assert {f"c{i}" for i in range(30) if i not in (0, 5, 20)} <= names
    assert "c5" not in names and "c20" not in names   # cancelled before their commit
    # And the store goes on committing.
    assert (await store.transaction([put("later")])).stored[0].name == "later"


async def test_watch_sees_writes_of_another_process_between_its_own(
        store: SQLiteStore) -> None:
    """Events from memory (this process's writes) and from the file (another's) in one
    watch, in order, with none missing."""
    start = await store.revision()
    watched = asyncio.create_task(_events(store, start, 4))
    await asyncio.sleep(0.05)
    other = SQLiteStore(store.path)
    try:
        await store.transaction([put("mine-1")])
        await other.transaction([put("theirs")])
        await store.transaction([put("mine-2")])
        await store.transaction([put("mine-3")])
    finally:
        await other.close()
    events = await watched
    assert [e.name for e in events] == ["mine-1", "theirs", "mine-2", "mine-3"]
    assert [e.revision for e in events] == list(range(start + 1, start + 5))


async def test_a_lone_commit_whose_caller_left_still_wakes_the_watchers(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client leaves (its handler is cancelled) while its write commits: the write
    lands and watchers hear of it at once, not at their next periodic read."""
    import time
    seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def watcher() -> None:
        async for _ in store.watch(0):
            seen.set_result(time.monotonic())
            return

    real = store._apply_group

    def slow(group: Any) -> Any:       # a slow disk's fsync
        time.sleep(0.3)
        return real(group)

    monkeypatch.setattr(store, "_apply_group", slow)
    watching = asyncio.create_task(watcher())
    await asyncio.sleep(0.2)
    write = asyncio.create_task(store.transaction([put("x")]))
    await asyncio.sleep(0.05)          # its commit is under way
    left = time.monotonic()
    write.cancel()
    at = await asyncio.wait_for(seen, 5)
    await watching
    assert await store.revision() == 1
    assert at - left < 0.6, at - left  # the commit's 0.3 s, not a 1 s periodic read
    assert await store.transaction([put("y")])   # and the next write is not stuck


async def test_the_in_memory_feed_is_bounded_by_events(store: SQLiteStore,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """Bulk writes keep at most FEED_EVENTS events in memory (the oldest revisions are
    read back from the file), and a watcher still gets every event."""
    from bulkhead.store import sqlite as module
    monkeypatch.setattr(module, "FEED_EVENTS", 50)
    for batch in range(6):
        await store.transaction([put(f"b{batch}-{i}") for i in range(20)])
    assert store._feed_events <= 50 and len(store._feed) == 2
    assert store._feed_events == sum(len(events) for _, events in store._feed)
    names = []
    async for event in store.watch(0):
        names.append(event.name)
        if len(names) == 120:
            break
    assert names == [f"b{b}-{i}" for b in range(6) for i in range(20)]


async def test_a_read_during_a_commit_waits_off_the_event_loop(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`get` reads on the event loop only when the connection is free: while a commit
    holds it (a slow disk's fsync), the read waits in a worker thread, and the loop goes
    on meanwhile; the read then sees the committed write."""
    import time
    await store.transaction([put("x")])
    real = store._apply_group

    def slow(group: Any) -> Any:
        time.sleep(0.3)
        return real(group)

    monkeypatch.setattr(store, "_apply_group", slow)
    write = asyncio.create_task(store.transaction([put("x", expect=None)]))
    await asyncio.sleep(0.05)          # its commit is under way, holding the connection
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while not write.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    read = await store.get("GlobalNetworkSet", "x")
    await write
    await ticking
    assert read.revision in (1, 2)
    assert max(gaps) < 0.2, max(gaps)  # the loop was never held for the commit's 0.3 s
    assert (await store.get("GlobalNetworkSet", "x")).revision == 2


async def test_a_lone_writer_is_answered_before_the_watchers_are_woken(
        store: SQLiteStore) -> None:
    """The server's own write: its caller (the HTTP handler, which sends the answer)
    runs before the watchers (the hub) do their work for it."""
    order: list[str] = []

    async def watcher() -> None:
        async for event in store.watch(0):
            order.append(f"watcher {event.name}")
            if event.name == "b":
                return

    watching = asyncio.create_task(watcher())
    await asyncio.sleep(0.1)           # waiting for news
    for name in ("a", "b"):
        await store.transaction([put(name)])
        order.append(f"writer {name}")
        await asyncio.sleep(0.05)
    await asyncio.wait_for(watching, 5)
    assert order == ["writer a", "watcher a", "writer b", "watcher b"]
