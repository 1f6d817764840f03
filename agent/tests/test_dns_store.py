"""One contract, two DNS log stores: the same tests against SQLite (`dns.sqlite`) and
ClickHouse (the real engine, embedded by chdb and driven by clickhouse-connect, as in
production): every field kept, each filter (a `*.SUFFIX` compared as text, never as a
pattern), `after` oldest first, the limit, a batch stored whole or not at all, expiry."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.model.dnslog import DnsRecord, parse_dns_record
from bulkhead.store.flowlog import FlowStoreError
from bulkhead.store.flowlog.clickhouse import ClickHouseSettings
from bulkhead.store.flowlog.dnslogs import (
    ClickHouseDnsStore,
    DnsQuery,
    DnsStore,
    SQLiteDnsStore,
)

_databases = itertools.count()
T0 = float(int(time.time()))


def record(end: float, qname: str = "api.example.com", **change: Any) -> DnsRecord:
    doc = {"start": end - 10, "end": end, "node": "web-1", "client_type": "hep",
           "client_name": "web-1", "client_labels": {"app": "web", "a/b.c": ""},
           "client_scope": "", "server_type": "net", "server_name": "198.18.0.53",
           "server_labels": {}, "server_scope": "private", "qname": qname, "qtype": "A",
           "rcode": "NOERROR", "answers": [f"{qname} A 198.18.3.4"], "count": 2,
           "latency_count": 1, "latency_mean_ms": 1.25, "latency_max_ms": 1.5, **change}
    return parse_dns_record(doc, time.time())


def clickhouse(dsn: str, **changes: Any) -> ClickHouseDnsStore:
    return ClickHouseDnsStore(ClickHouseSettings(
        dsn=dsn, database=f"dns_contract_{next(_databases)}", **changes))


@pytest.fixture(params=["sqlite", "clickhouse"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DnsStore]:
    backend: DnsStore
    if request.param == "sqlite":
        backend = SQLiteDnsStore(tmp_path / "dns.sqlite")
    else:
        backend = clickhouse(request.getfixturevalue("chdb_dsn"))
    try:
        yield backend
    finally:
        backend.close()


def names(store: DnsStore, **fields: Any) -> list[str]:
    q = DnsQuery(**{"since": T0 - 86_400, **fields})
    return [r.record.qname for r in store.query(q).records]


def test_round_trip_and_each_filter(store: DnsStore) -> None:
    a = record(T0 - 50)
    b = record(T0 - 40.123456, "a.cdn.example", client_type="net",
               client_name="2001:2::7", client_scope="public", client_labels={},
               answers=["a.cdn.example CNAME b.cdn.example", "b.cdn.example A 198.18.3.5"])
    c = record(T0 - 30, "gone.example", rcode="NXDOMAIN", answers=[], node="db-1",
               client_name="db-1")
    d = record(T0 - 20, "x_y%.example", qtype="AAAA")
    assert store.insert([a, b, c, d], received=T0) == 4
    page = store.query(DnsQuery(since=T0 - 86_400))
    assert [r.record for r in page.records] == [d, c, b, a]    # newest end first
    assert page.records[2].json() == {**b.json(), "received": T0}
    assert not page.truncated and store.count() == 4
    assert names(store, qname="*.cdn.example") == ["a.cdn.example"]
    assert names(store, qname="*.example") == ["x_y%.example", "gone.example",
                                               "a.cdn.example"]
    assert names(store, qname="*.cdn.example.example") == []
    assert names(store, qname="*.%.example") == []              # not a pattern
    assert names(store, qname="*.%") == []
    assert names(store, qname="api.example.com") == ["api.example.com"]
    assert names(store, rcode="NXDOMAIN") == ["gone.example"]
    assert names(store, node="db-1") == ["gone.example"]
    assert names(store, client="2001:2::7") == ["a.cdn.example"]
    assert names(store, since=T0 - 45, until=T0 - 35) == ["a.cdn.example"]
    cut = store.query(DnsQuery(since=T0 - 86_400, limit=2))
    assert cut.truncated and len(cut.records) == 2
    # `after`: what was stored at or after a time, oldest first.
    store.insert([record(T0 - 5, "late.example")], received=T0 + 5)
    assert names(store, after=T0 + 1) == ["late.example"]


def test_a_batch_that_cannot_be_stored_stores_nothing(store: DnsStore) -> None:
    store.insert([record(T0 - 5)])
    bad = dataclasses.replace(record(T0 - 4), count=-1)   # past its column's range
    with pytest.raises(FlowStoreError):
        store.insert([record(T0 - 3), bad])
    assert store.count() == 1
    assert store.insert([]) == 0


def test_expire_removes_what_ended_before(store: DnsStore) -> None:
    store.insert([record(T0 - 300, "old.example"), record(T0 - 10, "new.example")])
    assert store.expire(T0 - 100) == 1
    assert names(store) == ["new.example"]


def test_clickhouse_table_keeps_the_retention_and_checks_a_foreign_table(chdb_dsn: str
                                                                         ) -> None:
    import clickhouse_connect

    store = clickhouse(chdb_dsn, retention_seconds=3600)
    try:
        store.insert([record(T0 - 5)])
        client = clickhouse_connect.get_client(dsn=chdb_dsn)
        try:
            engine = client.query("SELECT engine_full FROM system.tables WHERE database = "
                                  "{d:String} AND name = 'dns_logs'",
                                  parameters={"d": store.settings.database}).result_rows
            assert "toIntervalSecond(3600)" in engine[0][0]
            client.command("CREATE DATABASE IF NOT EXISTS dns_foreign")
            client.command("CREATE TABLE IF NOT EXISTS dns_foreign.dns_logs (received "
                           "DateTime64(6), node String) ENGINE = MergeTree ORDER BY received")
        finally:
            client.close()
    finally:
        store.close()
    foreign = ClickHouseDnsStore(ClickHouseSettings(dsn=chdb_dsn, database="dns_foreign",
                                                    create_schema=False))
    try:
        with pytest.raises(FlowStoreError, match="lacks the columns answers, client_labels"):
            foreign.count()
    finally:
        foreign.close()
