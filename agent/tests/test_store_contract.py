"""One contract, two backends: the same tests run against SQLite and a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.selector import parse
from bulkhead.store import (
    Audit,
    Conflict,
    Datastore,
    Event,
    MissingReference,
    NotFound,
    Op,
    Referrers,
    StillReferenced,
    StoreChanged,
    TooLarge,
    TooOld,
    TxResult,
    Unavailable,
    create,
    delete,
    open_store,
    update,
)
from bulkhead.store.etcd import EtcdStore
from bulkhead.store.sqlite import SQLiteStore

_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "etcd"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Datastore]:
    backend: Datastore
    if request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "store.db")
    else:
        etcd = request.getfixturevalue("etcd")
        backend = EtcdStore([etcd.url], prefix=f"/contract-{next(_prefixes)}/")
    try:
        yield backend
    finally:
        await backend.close()


def netset(name: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name}, "spec": {"nets": ["198.18.0.0/24"]}}


def gnp(name: str, labels: dict[str, str] | None = None, order: int = 1) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"order": order, "selector": "all()"}}


async def test_create_get_and_metadata(store: Datastore) -> None:
    made = await create(store, gnp("a"))
    got = await store.get("GlobalNetworkPolicy", "a")
    assert got.revision == made.revision > 0
    meta = got.doc["metadata"]
    assert meta["resourceVersion"] == str(made.revision)
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert got.doc["spec"] == {"order": 1, "selector": "all()"}
    with pytest.raises(NotFound):
        await store.get("GlobalNetworkPolicy", "missing")


async def test_create_twice_conflicts(store: Datastore) -> None:
    await create(store, gnp("a"))
    with pytest.raises(Conflict, match="already exists"):
        await create(store, gnp("a"))


async def test_update_with_optimistic_concurrency(store: Datastore) -> None:
    first = await create(store, gnp("a"))
    second = await update(store, gnp("a", order=2), first.doc["metadata"]["resourceVersion"])
    assert second.revision > first.revision
    assert second.doc["metadata"]["uid"] == first.doc["metadata"]["uid"]
    assert second.doc["metadata"]["creationTimestamp"] == \
        first.doc["metadata"]["creationTimestamp"]
    with pytest.raises(Conflict, match="changed since it was read"):
        await update(store, gnp("a", order=3), first.doc["metadata"]["resourceVersion"])
    assert (await store.get("GlobalNetworkPolicy", "a")).doc["spec"]["order"] == 2
    third = await update(store, gnp("a", order=4))  # no version: last writer wins
    assert third.doc["spec"]["order"] == 4
    with pytest.raises(NotFound):
        await update(store, gnp("nope"))


async def test_delete(store: Datastore) -> None:
    made = await create(store, gnp("a"))
    with pytest.raises(Conflict):
        await delete(store, "GlobalNetworkPolicy", "a", "999999")
    gone = await delete(store, "GlobalNetworkPolicy", "a", made.doc["metadata"]["resourceVersion"])
    assert gone.doc["spec"]["order"] == 1
    with pytest.raises(NotFound):
        await store.get("GlobalNetworkPolicy", "a")
    with pytest.raises(NotFound):
        await delete(store, "GlobalNetworkPolicy", "a")


async def test_list_by_kind_and_selector(store: Datastore) -> None:
    await create(store, gnp("a", {"team": "db"}))
    await create(store, gnp("b", {"team": "web"}))
    await create(store, {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                         "metadata": {"name": "security"}, "spec": {}})
    items, revision = await store.list_resources("GlobalNetworkPolicy")
    assert [i.name for i in items] == ["a", "b"]
    assert revision == await store.revision()
    items, _ = await store.list_resources("GlobalNetworkPolicy", parse("team == 'db'"))
    assert [i.name for i in items] == ["a"]
    everything, _ = await store.list_resources()
    assert {(i.kind, i.name) for i in everything} == {
        ("GlobalNetworkPolicy", "a"), ("GlobalNetworkPolicy", "b"), ("Tier", "security")}


async def test_transaction_is_all_or_nothing(store: Datastore) -> None:
    await create(store, gnp("exists"))
    before = await store.revision()
    with pytest.raises(Conflict):
        await store.transaction([Op("put", "GlobalNetworkPolicy", "new", gnp("new")),
                                 Op("put", "GlobalNetworkPolicy", "exists", gnp("exists"),
                                    expect="absent")])
    with pytest.raises(NotFound):
        await store.get("GlobalNetworkPolicy", "new")
    assert await store.revision() == before
    result = await store.transaction([
        Op("put", "GlobalNetworkPolicy", "n1", gnp("n1"), expect="absent"),
        Op("put", "GlobalNetworkPolicy", "n2", gnp("n2"), expect="absent"),
        Op("delete", "GlobalNetworkPolicy", "exists")])
    assert result.revision > before
    assert {s.revision for s in result.stored} == {result.revision}
    names = [i.name for i in (await store.list_resources("GlobalNetworkPolicy"))[0]]
    assert names == ["n1", "n2"]


async def test_revisions_increase(store: Datastore) -> None:
    seen = [await store.revision()]
    for i in range(5):
        seen.append((await create(store, gnp(f"p{i}"))).revision)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def _collect(store: Datastore, after: int, count: int) -> list[Event]:
    out: list[Event] = []
    async for event in store.watch(after):
        out.append(event)
        if len(out) == count:
            break
    return out


async def test_watch_from_revision(store: Datastore) -> None:
    start = await store.revision()
    a = await create(store, gnp("a"))
    await update(store, gnp("a", order=5))
    await delete(store, "GlobalNetworkPolicy", "a")
    events = await asyncio.wait_for(_collect(store, start, 3), 10)
    assert [(e.type, e.name) for e in events] == [("ADDED", "a"), ("MODIFIED", "a"),
                                                  ("DELETED", "a")]
    assert events[0].revision == a.revision
    assert events[1].doc["spec"]["order"] == 5
    assert events[2].doc["metadata"]["name"] == "a"
    # From the middle: only what came after.
    later = await asyncio.wait_for(_collect(store, a.revision, 2), 10)
    assert [e.type for e in later] == ["MODIFIED", "DELETED"]


async def test_watch_sees_new_writes(store: Datastore) -> None:
    start = await store.revision()
    waiter = asyncio.create_task(_collect(store, start, 2))
    await asyncio.sleep(0.2)
    await create(store, gnp("x"))
    await store.transaction([Op("put", "GlobalNetworkPolicy", "y", gnp("y"))])
    events = await asyncio.wait_for(waiter, 10)
    assert [e.name for e in events] == ["x", "y"]


async def test_watch_too_old_after_compaction(store: Datastore) -> None:
    start = await store.revision()
    await create(store, gnp("a"))
    b = await create(store, gnp("b"))
    await store.compact(b.revision)
    with pytest.raises(TooOld):
        await asyncio.wait_for(_collect(store, start, 1), 10)
    c = await create(store, gnp("c"))
    events = await asyncio.wait_for(_collect(store, b.revision, 1), 10)
    assert events[0].revision == c.revision


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(f"sqlite://{tmp_path}/s.db"), SQLiteStore)
    etcd = open_store("etcd://127.0.0.1:2379,127.0.0.2:2379/team-a")
    assert isinstance(etcd, EtcdStore)
    assert etcd.endpoints == ["http://127.0.0.1:2379", "http://127.0.0.2:2379"]
    assert etcd.prefix == "/team-a/"
    with pytest.raises(ValueError, match="expected sqlite"):
        open_store("mysql://x")


def second_store(store: Datastore) -> Datastore:
    """Another instance on the same data, as a second server would open it."""
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path)
    assert isinstance(store, EtcdStore)
    return EtcdStore(store.endpoints, prefix=store.prefix)


async def test_concurrent_writers_with_conflicts(store: Datastore, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    """Read-modify-write from two store instances (two servers): no lost update."""
    other = second_store(store)
    await create(store, gnp("counter", order=0))
    conflicts = 0

    async def bump(backend: Datastore, times: int) -> None:
        nonlocal conflicts
        done = 0
        for _ in range(times * 50):  # bounded: each try either bumps or conflicts
            current = await backend.get("GlobalNetworkPolicy", "counter")
            body = gnp("counter", order=current.doc["spec"]["order"] + 1)
            try:
                await update(backend, body, current.doc["metadata"]["resourceVersion"])
            except Conflict:
                conflicts += 1
                continue
            done += 1
            if done == times:
                return
        raise AssertionError("too many conflicts")

    try:
        await asyncio.wait_for(asyncio.gather(*(bump(b, 10) for b in (store, other, store,
                                                                       other))), 60)
    finally:
        await other.close()
    final = await store.get("GlobalNetworkPolicy", "counter")
    assert final.doc["spec"]["order"] == 40


# ---------------------------------------------------------------- issue 15: under load
@pytest.mark.parametrize("count", [1001, 5000])
async def test_watch_and_history_carry_a_big_transaction_whole(store: Datastore,
                                                               count: int) -> None:
    count = min(count, store.max_ops)  # etcd: its --max-txn-ops (128 unless raised)
    start = await store.revision()
    big = await store.transaction([Op("put", "GlobalNetworkSet", f"s{i:05}", netset(f"s{i:05}"))
                                   for i in range(count)])
    after = await create(store, gnp("after"))
    events = await asyncio.wait_for(_collect(store, start, count + 1), 30)
    assert [e.name for e in events[:count]] == [f"s{i:05}" for i in range(count)]
    assert {e.revision for e in events[:count]} == {big.revision}
    assert (events[-1].name, events[-1].revision) == ("after", after.revision)
    history = await asyncio.wait_for(store.history(start, big.revision), 30)
    assert [e.name for e in history] == [e.name for e in events[:count]]


async def test_a_transaction_over_the_limit_is_refused_whole(store: Datastore) -> None:
    ops = [Op("put", "GlobalNetworkSet", f"s{i}", netset(f"s{i}"))
           for i in range(store.max_ops + 1)]
    before = await store.revision()
    with pytest.raises(TooLarge) as err:
        store.check_size(ops)
    assert err.value.limit == store.max_ops and str(store.max_ops) in str(err.value)
    with pytest.raises(TooLarge):
        await store.transaction(ops)
    assert await store.revision() == before
    assert (await store.list_resources("GlobalNetworkSet"))[0] == []


async def test_status_reports_stay_out_of_resources_and_watch(store: Datastore) -> None:
    start = await store.revision()
    for i in range(50):
        await store.put_status(f"node-{i % 5}", {"kind": "AgentStatus",
                                                 "metadata": {"name": f"node-{i % 5}"},
                                                 "status": {"appliedRevision": i}})
    reports, _ = await store.list_status()
    assert {n: d["status"]["appliedRevision"] for n, d in reports.items()} == \
        {f"node-{n}": 45 + n for n in range(5)}
    assert (await store.list_resources())[0] == []
    if isinstance(store, SQLiteStore):
        assert await store.revision() == start  # no revision at all
    made = await create(store, gnp("a"))
    events = await asyncio.wait_for(_collect(store, start, 1), 10)
    assert [(e.name, e.revision) for e in events] == [("a", made.revision)]
    assert [e.name for e in await store.history(start, made.revision)] == ["a"]


async def test_a_read_of_the_audit_trail_holds_a_bounded_number_of_changes(
        store: Datastore) -> None:
    """The newest entries whose changes fit `max_changes` (the first one whole, however
    large), and a flag when entries were left out for it; filters count only what
    matches."""
    who = Audit("alice", "admin", "apply")
    if hasattr(store, "audit_page"):
        store.audit_page = 2     # etcd reads the trail a page at a time: several here
    for size, prefix in ((5, "a"), (3, "b"), (4, "c")):   # oldest first
        await store.transaction([Op("put", "GlobalNetworkSet", f"{prefix}{i}",
                                    netset(f"{prefix}{i}")) for i in range(size)], who)
    entries, cut = await store.audit_log(10, max_changes=7)
    assert [len(e["changes"]) for e in entries] == [4, 3] and cut
    assert entries[0]["operation"] == "apply"
    entries, cut = await store.audit_log(10, max_changes=2)
    assert [len(e["changes"]) for e in entries] == [4] and cut
    entries, cut = await store.audit_log(2, max_changes=7)
    assert [len(e["changes"]) for e in entries] == [4, 3] and not cut
    entries, cut = await store.audit_log(10)
    assert [len(e["changes"]) for e in entries][:3] == [4, 3, 5] and not cut
    entries, cut = await store.audit_log(10, name="a0", max_changes=1)
    assert [len(e["changes"]) for e in entries] == [5] and not cut


async def test_a_write_on_a_reading_of_the_store_commits_on_it_or_not_at_all(
        store: Datastore) -> None:
    """`unchanged_since`: any resource put, created or deleted (through the API: audited)
    after the reading refuses the transaction whole; status reports do not count."""
    who = Audit("alice", "admin")
    await store.transaction([Op("put", "GlobalNetworkSet", n, netset(n)) for n in "abc"], who)
    _, read_at = await store.list_resources()
    await store.put_status("node-1", {"kind": "AgentStatus", "metadata": {"name": "node-1"},
                                      "status": {"appliedRevision": read_at}})
    made = await store.transaction([Op("put", "GlobalNetworkSet", "x", netset("x"))], who,
                                   unchanged_since=read_at)
    for change in ([Op("put", "GlobalNetworkSet", "a", {**netset("a"), "spec": {
                        "nets": ["198.18.1.0/24"]}})],
                   [Op("put", "GlobalNetworkSet", "late", netset("late"))],
                   [Op("delete", "GlobalNetworkSet", "b")]):
        _, read_at = await store.list_resources()
        await store.transaction(change, who)
        before, _ = await store.list_resources()
        with pytest.raises(StoreChanged, match=f"after revision {read_at}"):
            await store.transaction([Op("delete", "GlobalNetworkSet", "x")], who,
                                    unchanged_since=read_at)
        assert (await store.list_resources())[0] == before   # nothing written
    assert made.revision > 0
    assert {s.name for s in (await store.list_resources())[0]} == {"a", "c", "late", "x"}
    if isinstance(store, EtcdStore):   # its two compares count against etcd's limit
        ops = [Op("put", "GlobalNetworkSet", f"n{i}", netset(f"n{i}"))
               for i in range(store.max_ops - 1)]
        store.check_size(ops)
        with pytest.raises(TooLarge, match="2 to compare the store unchanged"):
            store.check_size(ops, unchanged=True)


async def test_a_nodes_status_report_can_be_forgotten(store: Datastore) -> None:
    """A host gone (or down for a while) leaves the nodes waited for; its agent's next
    report brings it back."""
    for node in ("node-1", "node-2"):
        await store.put_status(node, {"kind": "AgentStatus", "metadata": {"name": node},
                                      "status": {"appliedRevision": 1}})
    assert await store.delete_status("node-1") is True
    assert sorted((await store.list_status())[0]) == ["node-2"]
    assert await store.delete_status("node-1") is False
    assert await store.delete_status("nobody") is False
    await store.put_status("node-1", {"kind": "AgentStatus", "metadata": {"name": "node-1"},
                                      "status": {"appliedRevision": 2}})
    assert sorted((await store.list_status())[0]) == ["node-1", "node-2"]


async def test_history_between_revisions(store: Datastore) -> None:
    start = await store.revision()
    a = await create(store, gnp("a"))
    b = await update(store, gnp("a", order=2))
    c = await delete(store, "GlobalNetworkPolicy", "a")
    got = await store.history(start, b.revision)
    assert [(e.type, e.revision) for e in got] == [("ADDED", a.revision),
                                                   ("MODIFIED", b.revision)]
    assert await store.history(c.revision, c.revision) == []
    await store.compact(a.revision)
    with pytest.raises(TooOld):
        await store.history(start, c.revision)
    got = await store.history(a.revision, c.revision)
    assert [(e.type, e.revision) for e in got] == [("MODIFIED", b.revision),
                                                   ("DELETED", c.revision)]


async def test_the_state_at_revision_zero_is_the_empty_store(store: Datastore) -> None:
    """Revision 0 is before every write: nothing, or TooOld once compacted past it;
    never the store as it is now (etcd reads a range at revision 0 as the current one)."""
    await create(store, gnp("a"))
    b = await create(store, netset("b"))
    # (TooOld: a shared etcd another test compacted; no state that old is kept)
    with contextlib.suppress(TooOld):
        assert await store.list_at(0) == []
    assert [s.name for s in await store.list_at(b.revision)] == ["a", "b"]
    await store.compact(b.revision - 1)
    with pytest.raises(TooOld):
        await store.list_at(0)


TIER_USERS = Referrers(("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"), ("spec", "tier"))


def in_tier(name: str, tier: str, kind: str = "GlobalNetworkPolicy") -> Op:
    doc = {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name},
           "spec": {"tier": tier}}
    return Op("put", kind, name, doc, requires=(("Tier", tier),))


def tier_op(name: str) -> Op:
    return Op("put", "Tier", name, {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                                    "metadata": {"name": name}, "spec": {}})


async def test_references_are_checked_as_the_transaction_commits(store: Datastore) -> None:
    before = await store.revision()
    with pytest.raises(MissingReference) as missing:
        await store.transaction([in_tier("p", "t")])
    assert (missing.value.name, missing.value.ref_kind, missing.value.ref_name) == \
        ("p", "Tier", "t")
    assert await store.revision() == before
    await store.transaction([in_tier("p", "t"), tier_op("t")])  # the same transaction: fine
    await store.transaction([in_tier("q", "t", "StagedGlobalNetworkPolicy")])
    drop = Op("delete", "Tier", "t", unreferenced=TIER_USERS)
    with pytest.raises(StillReferenced) as held:
        await store.transaction([drop])
    assert held.value.referrers == [("GlobalNetworkPolicy", "p"),
                                    ("StagedGlobalNetworkPolicy", "q")]
    moved = in_tier("p", "other")
    await store.transaction([tier_op("other"), moved])
    with pytest.raises(StillReferenced, match="StagedGlobalNetworkPolicy q"):
        await store.transaction([drop])
    await delete(store, "StagedGlobalNetworkPolicy", "q")
    await store.transaction([drop])
    with pytest.raises(NotFound):
        await store.get("Tier", "t")
    with pytest.raises(MissingReference):  # a tier deleted in the same transaction
        await store.transaction([Op("delete", "Tier", "other"), in_tier("r", "other")])


async def test_a_write_is_refused_for_its_own_key_before_its_references(
        store: Datastore) -> None:
    """A write that is wrong about its own key (a create of what exists, an update or a
    delete of what is absent) gets that answer even when what it refers to is missing
    or still referenced too: both stores check expectations first, so the API answers
    alike on either (409 or 404, not 422)."""
    await store.transaction([tier_op("u"), in_tier("p", "u")])
    before = await store.revision()
    exists = in_tier("p", "gone")
    with pytest.raises(Conflict, match="already exists"):
        await store.transaction([Op("put", exists.kind, "p", exists.doc, "absent",
                                    requires=exists.requires)])
    with pytest.raises(NotFound):
        await store.transaction([Op("put", exists.kind, "absent-one", exists.doc, "present",
                                    requires=exists.requires)])
    with pytest.raises(NotFound):
        await store.transaction([Op("delete", "Tier", "never", expect="present",
                                    unreferenced=TIER_USERS)])
    with pytest.raises(MissingReference):
        await store.transaction([Op("put", exists.kind, "new", exists.doc, "absent",
                                    requires=exists.requires)])
    with pytest.raises(StillReferenced):
        await store.transaction([Op("delete", "Tier", "u", unreferenced=TIER_USERS)])
    assert await store.revision() == before


async def test_tier_delete_and_policy_create_race_from_two_servers(store: Datastore) -> None:
    other = second_store(store)
    wins = {"delete": 0, "create": 0}
    try:
        for i in range(40):
            await store.transaction([tier_op(f"t{i}")])
            drop = Op("delete", "Tier", f"t{i}", unreferenced=TIER_USERS)
            first, second = (store, other) if i % 2 else (other, store)
            outcome = await asyncio.wait_for(asyncio.gather(
                first.transaction([drop]), second.transaction([in_tier(f"p{i}", f"t{i}")]),
                return_exceptions=True), 30)
            assert [type(o) for o in outcome] in ([StillReferenced, TxResult],
                                                  [TxResult, MissingReference]), outcome
            wins["create" if isinstance(outcome[0], StillReferenced) else "delete"] += 1
    finally:
        await other.close()
    print(f"store-level tier race: {wins}")


async def test_sqlite_compaction_gives_the_space_back(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.db")
    try:
        big = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
               "metadata": {"name": "big"}, "spec": {"nets": [f"198.18.{i // 256}.{i % 256}/32"
                                                              for i in range(2000)]}}
        for _ in range(60):
            last = (await store.transaction([Op("put", "GlobalNetworkSet", "big", big)]))
        grown = (tmp_path / "store.db").stat().st_size + \
            (tmp_path / "store.db-wal").stat().st_size
        await store.compact(last.revision - 1)
        shrunk = (tmp_path / "store.db").stat().st_size + \
            (tmp_path / "store.db-wal").stat().st_size
        assert shrunk < grown / 5, (grown, shrunk)
        assert [e.revision for e in await store.history(last.revision - 1, last.revision)] \
            == [last.revision]
    finally:
        await store.close()


async def test_sqlite_moves_status_reports_of_earlier_versions_out(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.db")
    await store.transaction([Op("put", "AgentStatus", "web-1", {
        "kind": "AgentStatus", "metadata": {"name": "web-1"}, "status": {"appliedRevision": 4}})])
    await create(store, gnp("a"))
    await store.close()
    store = SQLiteStore(tmp_path / "store.db")
    try:
        reports, _ = await store.list_status()
        assert reports["web-1"]["status"]["appliedRevision"] == 4
        assert [s.kind for s in (await store.list_resources())[0]] == ["GlobalNetworkPolicy"]
        assert [e.kind for e in await store.history(0, await store.revision())] == \
            ["GlobalNetworkPolicy"]
    finally:
        await store.close()


async def test_each_commit_is_timed_and_a_refused_write_is_not(store: Datastore) -> None:
    """`commits` counts the transactions that reached the commit, with their time; a
    write its own expectation refuses never gets there, on either backend."""
    assert (store.commits.count, store.commits.seconds) == (0, 0.0)
    await create(store, gnp("a"))
    await store.transaction([Op("put", "GlobalNetworkSet", "n", netset("n"))])
    assert store.commits.count == 2
    first = store.commits.seconds
    assert first > 0
    with pytest.raises(Conflict):
        await create(store, gnp("a"))
    assert store.commits.count == 2 and store.commits.seconds == first


async def test_the_sqlite_store_uses_one_thread_of_its_own_and_closes_twice(
        tmp_path: Path) -> None:
    """Every read and commit that leaves the event loop runs in the store's own thread
    (one, whatever other work the loop's pool has); closing again is harmless."""
    store = SQLiteStore(tmp_path / "one.db")
    seen: set[str] = set()
    real = store._apply_group

    def spy(group: Any) -> Any:
        seen.add(threading.current_thread().name)
        return real(group)

    store._apply_group = spy  # type: ignore[method-assign]
    try:
        # The loop's shared pool kept busy meanwhile (6 workers on 2 CPUs; 8 jobs).
        hogs = [asyncio.create_task(asyncio.to_thread(time.sleep, 0.2)) for _ in range(8)]
        for i in range(20):
            await store.transaction([Op("put", "GlobalNetworkSet", f"n{i}",
                                        netset(f"n{i}"))])
        await asyncio.gather(*hogs)
        assert len(seen) == 1 and next(iter(seen)).startswith("bulkhead-sqlite")
    finally:
        await store.close()
    await store.close()
    # Closed: a write is answered as the datastore being unavailable, not a crash.
    with pytest.raises(Unavailable, match="closed"):
        await store.transaction([Op("put", "GlobalNetworkSet", "late", netset("late"))])


async def test_a_commit_sqlite_fails_counts_as_a_failure(tmp_path: Path) -> None:
    """A commit the database refuses (here: read-only) is Unavailable, nothing written,
    counted in `failures` and not as a commit."""
    store = SQLiteStore(tmp_path / "ro.db")
    try:
        await store.transaction([Op("put", "GlobalNetworkSet", "a", netset("a"))])
        store._db.execute("PRAGMA query_only = ON")
        with pytest.raises(Unavailable, match="could not commit"):
            await store.transaction([Op("put", "GlobalNetworkSet", "b", netset("b"))])
        assert (store.commits.count, store.commits.failures) == (1, 1)
        store._db.execute("PRAGMA query_only = OFF")
        with pytest.raises(NotFound):
            await store.get("GlobalNetworkSet", "b")
    finally:
        await store.close()


def test_etcd_for_the_tests_starts_again_when_its_port_was_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port found free can be taken before etcd binds it (tests run two at a time):
    etcd exits with "address already in use" and the fixture starts it on other ports."""
    import shutil
    import socket

    import tests.conftest as conftest
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = conftest.free_port
    monkeypatch.setattr(conftest, "free_port", lambda: next(ports, None) or real())
    try:
        etcd = conftest.EtcdProcess(tmp_path)
        try:
            assert etcd.log_path.name == "etcd-1.log" and etcd.client_port != \
                taken.getsockname()[1]
            assert "address already in use" in (tmp_path / "etcd.log").read_text()
        finally:
            etcd.stop()
    finally:
        taken.close()
