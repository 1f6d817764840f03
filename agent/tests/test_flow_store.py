"""One contract, two flow stores: the same tests against SQLite and ClickHouse (the real
engine, embedded by chdb and driven by clickhouse-connect, as in production)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.model.flowlog import MAX_COUNT
from bulkhead.selector import parse
from bulkhead.store.flowlog import FlowQuery, FlowStore, FlowStoreError
from bulkhead.store.flowlog.clickhouse import ClickHouseFlowStore, ClickHouseSettings
from bulkhead.store.flowlog.sqlite import SCHEMA as SQLITE_SCHEMA
from bulkhead.store.flowlog.sqlite import SQLiteFlowStore
from tests.flowfixture import flow

_databases = itertools.count()
T0 = float(int(time.time()))   # "now" for records (inside the ClickHouse TTL)


def clickhouse_store(dsn: str, **changes: Any) -> ClickHouseFlowStore:
    return ClickHouseFlowStore(ClickHouseSettings(
        dsn=dsn, database=f"contract_{next(_databases)}", **changes))


@pytest.fixture(params=["sqlite", "clickhouse"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FlowStore]:
    backend: FlowStore
    if request.param == "sqlite":
        backend = SQLiteFlowStore(tmp_path / "flows.sqlite")
    else:
        backend = clickhouse_store(request.getfixturevalue("chdb_dsn"))
    try:
        yield backend
    finally:
        backend.close()


def q(**fields: Any) -> FlowQuery:
    return FlowQuery(**{"since": T0 - 86_400, **fields})


def names(store: FlowStore, **fields: Any) -> list[str]:
    """The `dst_name`s the query answers, in its order."""
    return [f.record.dst.name for f in store.query(q(**fields)).flows]


def test_round_trip_keeps_every_field(store: FlowStore) -> None:
    a = flow(end=T0 - 30, dst_name="a", src_labels={"app": "web", "a/b.c": ""})
    b = flow(end=T0 - 20.123456, dst_name="b", staged_action="deny",
             staged_trace=["security|security.db-in|0|pass", "default|lockdown|-|deny"],
             bytes_in=MAX_COUNT, src_type="net", src_name="2001:2::1", src_scope="public",
             src_labels={})
    assert store.insert([a, b], received=T0) == 2
    page = store.query(q())
    assert [f.record for f in page.flows] == [b, a]     # newest end first
    assert [f.received for f in page.flows] == [T0, T0]
    assert page.flows[0].json() == {**b.json(), "received": T0}
    assert not page.truncated and store.count() == 2


def test_destination_domains_keep_not_known_apart_from_none(store: FlowStore) -> None:
    """None (the agent did not say) and () (no name resolved to the address) are both
    kept as such: a preview decides a `domains` rule on the one, never on the other."""
    records = [flow(end=T0 - 30, dst_name="unknown"),
               flow(end=T0 - 20, dst_name="none", dst_domains=[]),
               flow(end=T0 - 10, dst_name="named",
                    dst_domains=["api.example.com", "cdn.example.net"])]
    store.insert(records, received=T0)
    got = {f.record.dst.name: f.record.dst_domains for f in store.query(q()).flows}
    assert got == {"unknown": None, "none": (), "named": ("api.example.com",
                                                          "cdn.example.net")}
    # Records alike but for their names are separate groups for a preview.
    same = [flow(end=T0 - 9, dst_domains=d) for d in (None, [], ["a.example.com"],
                                                     ["a.example.com"])]
    store.insert(same, received=T0)
    groups = {g.record.dst_domains: g.records for g in store.groups(q(since=T0 - 15), 10)
              .groups}
    assert groups == {None: 1, (): 1, ("a.example.com",): 2, ("api.example.com",
                                                              "cdn.example.net"): 1}


def test_sqlite_adds_the_domains_column_to_a_file_of_an_older_server(tmp_path: Path
                                                                     ) -> None:
    import sqlite3

    path = tmp_path / "flows.sqlite"
    old = sqlite3.connect(path)
    schema = SQLITE_SCHEMA.replace(",\n    dst_domains TEXT\n", "\n")
    assert "dst_domains" not in schema
    old.executescript(schema)
    row = flow(end=T0 - 5, dst_name="before")
    values = [T0, row.start, row.end, row.node, row.reporter, "hep", "web-1", "{}", "",
              "hep", "before", "{}", "", 6, 5432, "allow", "[]", "allow", "[]", 1, 1, 0, 0,
              0, 0]
    old.execute(f"INSERT INTO flows VALUES (1, {', '.join('?' * len(values))})", values)
    old.commit()
    old.close()
    store = SQLiteFlowStore(path)
    try:
        store.insert([flow(end=T0 - 1, dst_name="after", dst_domains=["a.example.com"])])
        got = {f.record.dst.name: f.record.dst_domains for f in store.query(q()).flows}
        assert got == {"before": None, "after": ("a.example.com",)}
    finally:
        store.close()


def test_a_batch_that_cannot_be_stored_stores_nothing(store: FlowStore) -> None:
    store.insert([flow(end=T0 - 5)])
    bad = dataclasses.replace(flow(end=T0 - 4), proto=256)   # past its column's range
    with pytest.raises(FlowStoreError):
        store.insert([flow(end=T0 - 3), flow(end=T0 - 2), bad])
    assert store.count() == 1
    assert store.insert([]) == 0


def test_time_range_selects_by_end(store: FlowStore) -> None:
    store.insert([flow(end=T0 - 300, dst_name="old"), flow(end=T0 - 100, dst_name="mid"),
                  flow(end=T0, dst_name="new")])
    assert names(store, since=T0 - 200) == ["new", "mid"]
    assert names(store, since=T0 - 200, until=T0 - 100) == ["mid"]
    assert names(store, since=T0 - 1000, until=T0 - 101) == ["old"]


def test_each_filter(store: FlowStore) -> None:
    store.insert([
        flow(end=T0 - 6, dst_name="plain"),
        flow(end=T0 - 5, dst_name="other-node", node="web-2", src_name="web-2"),
        flow(end=T0 - 4, dst_name="ingress", reporter="dst"),
        flow(end=T0 - 3, dst_name="denied", action="deny",
             enforced_trace=["security|security.block|2|deny"], staged_action="deny",
             staged_trace=["security|security.block|2|deny"]),
        flow(end=T0 - 2, dst_name="would-deny", staged_action="deny",
             staged_trace=["audit|audit.staged-lockdown|-|deny"]),
        flow(end=T0 - 1, dst_name="to-set", dst_type="ns", dst_labels={"kind": "partners"},
             src_labels={"app": "batch"}),
    ], received=T0)
    assert names(store, node="web-2") == ["other-node"]
    assert names(store, reporter="dst") == ["ingress"]
    assert names(store, action="deny") == ["denied"]
    assert names(store, policy="security.block") == ["denied"]
    assert names(store, policy="audit.staged-lockdown") == ["would-deny"]   # staged trace
    assert names(store, tier="audit") == ["would-deny"]
    assert names(store, policy="security") == []          # a tier, not a policy
    assert names(store, tier="security.block") == []      # a policy, not a tier
    assert names(store, staged_differs=True) == ["would-deny"]
    assert names(store, endpoint="web-2") == ["other-node"]            # src end
    assert names(store, endpoint="denied") == ["denied"]               # dst end
    assert names(store, selector=parse("kind == 'partners'")) == ["to-set"]   # dst labels
    assert names(store, selector=parse("app == 'batch'")) == ["to-set"]       # src labels
    assert names(store, selector=parse("zone == 'trusted'"), action="deny") == ["denied"]
    assert names(store, policy="security.db-in", node="web-2") == ["other-node"]


def test_limit_and_truncated(store: FlowStore) -> None:
    store.insert([flow(end=T0 - i, dst_name=f"d{i}") for i in range(5)])
    page = store.query(q(limit=3))
    assert [f.record.dst.name for f in page.flows] == ["d0", "d1", "d2"] and page.truncated
    page = store.query(q(limit=5))
    assert len(page.flows) == 5 and not page.truncated
    page = store.query(q(limit=2, selector=parse("app == 'db'")))
    assert [f.record.dst.name for f in page.flows] == ["d0", "d1"] and page.truncated


def test_a_selector_scan_stops_at_its_bound(store: FlowStore) -> None:
    store.insert([flow(end=T0 - i, dst_name=f"d{i}", dst_labels={"n": str(i)})
                  for i in range(30)])
    bounded = store.query(q(selector=parse("n == '25'"), scan_limit=10))
    assert bounded.flows == [] and bounded.truncated
    whole = store.query(q(selector=parse("n == '25'"), scan_limit=30))
    assert [f.record.dst.name for f in whole.flows] == ["d25"] and not whole.truncated
    top = store.top(q(selector=parse("has(n)"), scan_limit=10), 20)
    assert top.truncated and sum(t.records for t in top.top) == 10


def test_after_answers_what_was_stored_since_oldest_first(store: FlowStore) -> None:
    store.insert([flow(end=T0 - 1, dst_name="first")], received=T0 + 1)
    store.insert([flow(end=T0 - 9, dst_name="late"), flow(end=T0 - 8, dst_name="late2")],
                 received=T0 + 2)
    store.insert([flow(end=T0 - 5, dst_name="last")], received=T0 + 3)
    assert names(store, after=T0 + 2) == ["late", "late2", "last"]
    assert names(store, after=T0 + 2, limit=1) == ["late"]
    assert names(store, after=T0 + 3.5) == []


def test_top_talkers(store: FlowStore) -> None:
    store.insert([
        flow(end=T0 - 3, dst_name="db-1", bytes_in=100, bytes_out=50, packets_in=1,
             packets_out=2, connections=1, started=1),
        flow(end=T0 - 2, dst_name="db-1", bytes_in=100, bytes_out=50, packets_in=3,
             packets_out=4, connections=2, started=0),
        flow(end=T0 - 2, dst_name="db-1", dst_port=5433, bytes_in=10, bytes_out=0),
        flow(end=T0 - 1, dst_name="cache", bytes_in=1000, bytes_out=0, action="deny",
             staged_action="deny"),
    ])
    top = store.top(q(), 10)
    assert [(t.dst_name, t.dst_port, t.bytes) for t in top.top] == [
        ("cache", 5432, 1000), ("db-1", 5432, 300), ("db-1", 5433, 10)]
    db = top.top[1]
    assert (db.src_type, db.src_name, db.dst_type, db.proto, db.packets, db.connections,
            db.started, db.records) == ("hep", "web-1", "hep", 6, 10, 3, 1, 2)
    assert [t.dst_name for t in store.top(q(), 1).top] == ["cache"]
    assert [t.dst_name for t in store.top(q(action="allow"), 10).top] == ["db-1", "db-1"]
    by_selector = store.top(q(selector=parse("app == 'db'")), 10)
    assert [(t.dst_name, t.bytes) for t in by_selector.top] == [
        ("cache", 1000), ("db-1", 300), ("db-1", 10)] and not by_selector.truncated


def test_top_sums_past_int64_do_not_fail(store: FlowStore) -> None:
    store.insert([flow(end=T0 - 1, bytes_in=MAX_COUNT, bytes_out=MAX_COUNT)] * 3)
    (row,) = store.top(q(), 5).top
    assert row.bytes == pytest.approx(6 * MAX_COUNT, rel=1e-9) and row.records == 3


def test_groups_for_a_preview(store: FlowStore) -> None:
    store.insert([
        flow(end=T0 - 30, connections=2, started=1, node="web-2"),
        flow(end=T0 - 20, connections=3, started=3, node="web-1", staged_action="deny"),
        flow(end=T0 - 10, dst_labels={"app": "db", "zone": "lan"}, connections=1),
        flow(end=T0 - 5, action="deny", enforced_trace=["security|end-of-tier|-|deny"],
             connections=9),
        flow(end=T0 - 100, connections=50),   # before `since`
    ])
    page = store.groups(q(since=T0 - 60), 10)
    assert not page.truncated
    got = [(g.record.action, g.record.dst.labels.get("zone"), g.records, g.record.connections)
           for g in page.groups]
    assert got == [("deny", "trusted", 1, 9), ("allow", "trusted", 2, 5),
                   ("allow", "lan", 1, 1)], got
    both = page.groups[1].record
    assert (both.start, both.end, both.node, both.started) == (T0 - 40, T0 - 20, "web-1", 4)
    assert page.groups[1].nodes == ("web-1", "web-2")
    assert both.enforced_trace == ("security|security.db-in|0|allow",)
    assert both.src.labels == {"app": "web", "zone": "dmz"} and both.proto == 6
    cut = store.groups(q(since=T0 - 60), 2)
    assert cut.truncated and len(cut.groups) == 2


def test_groups_stop_at_their_text_budget(store: FlowStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A preview's memory is bounded by the text of the groups, not only their number:
    records with big labels fill the budget sooner."""
    big = {f"k{i}": "v" * 60 for i in range(40)}
    store.insert([flow(end=T0 - i, dst_name=f"db-{i}", dst_labels=big, connections=10 - i)
                  for i in range(5)])
    one = len(json.dumps(big, separators=(",", ":"))) + 200
    for module in ("sqlite", "clickhouse"):
        monkeypatch.setattr(f"bulkhead.store.flowlog.{module}.GROUP_BYTES", 2 * one + 100)
    page = store.groups(q(since=T0 - 60), 100)
    assert page.truncated and [g.record.dst.name for g in page.groups] == ["db-0", "db-1"]


def test_expire_removes_what_ended_before(store: FlowStore) -> None:
    store.insert([flow(end=T0 - 100, dst_name="old", enforced_trace=["t|old-policy|0|allow"],
                       staged_trace=[]),
                  flow(end=T0 - 50, dst_name="edge"), flow(end=T0, dst_name="new")])
    assert store.expire(T0 - 50) == 1
    assert names(store) == ["new", "edge"] and store.count() == 2
    assert names(store, policy="old-policy") == []
    assert store.expire(T0 - 50) == 0
    assert store.expire(T0 + 1) == 2 and store.count() == 0


def test_sqlite_expires_in_chunks_without_losing_count(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.store.flowlog import sqlite

    monkeypatch.setattr(sqlite, "EXPIRE_CHUNK", 3)
    store = SQLiteFlowStore(tmp_path / "flows.sqlite")
    try:
        # Ten records share one end time: a chunk boundary inside them must not stall.
        store.insert([flow(end=T0 - 100, dst_name=f"same{i}") for i in range(10)] +
                     [flow(end=T0 - 90 + i, dst_name=f"d{i}") for i in range(10)] +
                     [flow(end=T0, dst_name="kept")])
        assert store.expire(T0 - 1) == 20
        assert names(store) == ["kept"]
    finally:
        store.close()


def test_sqlite_on_a_full_file_refuses_naming_the_cause_and_expires_after(tmp_path: Path
                                                                           ) -> None:
    """A file that cannot grow (a full disk; here SQLite's own page limit, which fails the
    same way) refuses a batch whole, naming the cause, and leaves no transaction open:
    expiry, which frees the space, still runs, and so does the next insert once there is
    room."""
    store = SQLiteFlowStore(tmp_path / "flows.sqlite")
    try:
        store.insert([flow(end=T0 - 100, dst_name=f"old{i}") for i in range(50)])
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
        batch = [flow(end=T0 - i, dst_name=f"new{i}" + "x" * 200) for i in range(500)]
        with pytest.raises(FlowStoreError) as full:
            store.insert(batch)
        assert "full" in str(full.value) and "nothing was stored" in str(full.value)
        assert "no transaction" not in str(full.value)
        assert store.count() == 50
        assert store.expire(T0 - 50) == 50 and store.count() == 0
        store._db.execute(f"PRAGMA max_page_count = {pages * 1000}")
        assert store.insert(batch) == 500
    finally:
        store.close()


def test_sqlite_expiry_that_cannot_take_the_file_says_so_and_expires_later(
        tmp_path: Path) -> None:
    """Expiry when another process holds the file's write lock (a backup, a shell):
    FlowStoreError, not sqlite3's own error (which ended the server's expiry task for
    good), and the next try expires."""
    path = tmp_path / "flows.sqlite"
    store = SQLiteFlowStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        store.insert([flow(end=T0 - 100, dst_name="old"), flow(end=T0, dst_name="new")])
        store._db.execute("PRAGMA busy_timeout = 50")
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(FlowStoreError) as locked:
            store.expire(T0 - 50)
        assert "locked" in str(locked.value)
        other.execute("ROLLBACK")
        assert store.expire(T0 - 50) == 1 and names(store) == ["new"]
    finally:
        other.close()
        store.close()


def test_clickhouse_table_has_ttl_and_drops_expired_rows_on_merge(chdb_dsn: str) -> None:
    store = clickhouse_store(chdb_dsn, retention_seconds=3600)
    try:
        now = time.time()
        store.insert([flow(end=now - 7200, dst_name="past-ttl"), flow(end=now - 60)])
        # A background merge may apply the TTL at any moment after the insert (a CI run
        # once saw it before the first count), so only the fresh row is certain here.
        assert store.count() in (1, 2)
        client = store._client
        ddl = client.command(f"SHOW CREATE TABLE {store.table}")
        assert "TTL toDateTime(end) + toIntervalSecond(3600)" in ddl
        client.command(f"OPTIMIZE TABLE {store.table} FINAL")   # merges apply the TTL
        assert names(store, since=0) == ["db-1"] and store.count() == 1
    finally:
        store.close()
    # Opened again with another retention, the table's TTL follows the configuration.
    again = ClickHouseFlowStore(dataclasses.replace(store.settings, retention_seconds=7000))
    try:
        assert again.count() == 1
        assert "toIntervalSecond(7000)" in again._client.command(
            f"SHOW CREATE TABLE {again.table}")
    finally:
        again.close()


def test_clickhouse_checks_a_table_it_did_not_create(chdb_dsn: str) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        client.command("CREATE DATABASE IF NOT EXISTS contract_foreign")
        client.command("CREATE TABLE contract_foreign.flows (received DateTime64(6), "
                       "node String) ENGINE = MergeTree ORDER BY received")
    finally:
        client.close()
    store = ClickHouseFlowStore(ClickHouseSettings(
        dsn=chdb_dsn, database="contract_foreign", table="flows", create_schema=False))
    try:
        with pytest.raises(FlowStoreError, match="lacks the columns action, bytes_in"):
            store.count()
    finally:
        store.close()


def test_clickhouse_adds_the_domains_columns_to_a_table_of_an_older_server(chdb_dsn: str
                                                                           ) -> None:
    """A table the server created before `dst_domains` gets the columns (its rows read as
    not known); one it did not create and that lacks them is refused with the ALTER to
    run."""
    import clickhouse_connect

    from bulkhead.store.flowlog.clickhouse import SCHEMA

    old = SCHEMA.replace("    dst_domains Array(String), dst_domains_known Bool,\n", "")
    assert "dst_domains" not in old
    # One of the two columns already there (an ALTER cut short): the other is added.
    half = SCHEMA.replace("dst_domains Array(String), dst_domains_known Bool,",
                          "dst_domains Array(String),")
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        for database, schema in (("contract_older", old), ("contract_older_foreign", old),
                                 ("contract_half", half)):
            client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            client.command(schema.format(table=f"{database}.flows",
                                         ttl="toDateTime(`end`) + toIntervalSecond(86400)"))
        client.command("INSERT INTO contract_older.flows (received, start, `end`, node, "
                       "dst_name, proto) VALUES (now64(6), now64(6), now64(6), 'web-1', "
                       "'before', 6)")
    finally:
        client.close()
    store = ClickHouseFlowStore(ClickHouseSettings(dsn=chdb_dsn, database="contract_older"))
    foreign = ClickHouseFlowStore(ClickHouseSettings(
        dsn=chdb_dsn, database="contract_older_foreign", create_schema=False))
    try:
        store.insert([flow(end=T0 - 1, dst_name="after", dst_domains=["a.example.com"])])
        got = {f.record.dst.name: f.record.dst_domains for f in store.query(q()).flows}
        assert got == {"before": None, "after": ("a.example.com",)}
        with pytest.raises(FlowStoreError, match=r"lacks the columns dst_domains, "
                           r"dst_domains_known .*ALTER TABLE .*ADD COLUMN IF NOT EXISTS"):
            foreign.count()
        half_store = ClickHouseFlowStore(ClickHouseSettings(dsn=chdb_dsn,
                                                            database="contract_half"))
        try:
            half_store.insert([flow(end=T0 - 1, dst_domains=[])])
            assert half_store.query(q()).flows[0].record.dst_domains == ()
        finally:
            half_store.close()
    finally:
        store.close()
        foreign.close()


def test_the_same_labels_in_another_order_are_one_group(store: FlowStore) -> None:
    """Agents send labels in whatever order; ClickHouse kept a Map in the order given,
    so two records alike but for the order of their labels were two preview groups."""
    store.insert([flow(end=T0 - 20, src_labels={"zone": "dmz", "app": "web"}),
                  flow(end=T0 - 10, src_labels={"app": "web", "zone": "dmz"})])
    page = store.groups(q(since=T0 - 60), 10)
    assert [(g.records, g.record.connections) for g in page.groups] == [(2, 4)]
