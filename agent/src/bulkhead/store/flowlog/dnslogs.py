"""DNS log records beside the flow records, in the same kind of store (`DnsStore`):

- SQLite: a file of its own (`dns.sqlite` beside the flow store's file), in WAL mode so
  queries read while agents write. One row per record in `dns_logs`: the record's scalar
  fields as columns, labels and answers as JSON text. Indexes: the time alone and after
  node, client and qname.
- ClickHouse: the table `dnsTable` (default `dns_logs`) in the flows' database, made as
  the flows' table is (MergeTree ordered by (`end`, node), partitioned by the day of
  `received` so a batch is one block committed whole, the TTL on `end` for retention);
  labels `Map(String, String)`, answers `Array(String)`, bloom-filter indexes on the
  client's name and qname.

Queries select by the record's `end` and answer newest first; with `after`, what was
stored at or after that time, oldest first (`bulkhead dns --follow`). Filters: node,
client (the client end's name), qname (a name, or `*.SUFFIX` for the names under it),
rcode.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bulkhead.model.dnslog import DnsRecord
from bulkhead.model.flowlog import End
from bulkhead.store.flowlog.base import (
    DEFAULT_LIMIT,
    QUERY_SECONDS,
    FlowStoreError,
    check_insert,
)
from bulkhead.store.flowlog.clickhouse import (
    ClickHouseSettings,
    ClickHouseTable,
    _micros,
    labels,
    window,
)
from bulkhead.store.flowlog.sqlite import open_wal, read_rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS dns_logs (
    id INTEGER PRIMARY KEY, received REAL NOT NULL,
    start REAL NOT NULL, "end" REAL NOT NULL, node TEXT NOT NULL,
    client_type TEXT NOT NULL, client_name TEXT NOT NULL, client_labels TEXT NOT NULL,
    client_scope TEXT NOT NULL,
    server_type TEXT NOT NULL, server_name TEXT NOT NULL, server_labels TEXT NOT NULL,
    server_scope TEXT NOT NULL,
    qname TEXT NOT NULL, qtype TEXT NOT NULL, rcode TEXT NOT NULL, answers TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 1),
    latency_count INTEGER NOT NULL CHECK (latency_count >= 0),
    latency_mean_ms REAL NOT NULL, latency_max_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dns_end ON dns_logs ("end");
CREATE INDEX IF NOT EXISTS dns_node ON dns_logs (node, "end");
CREATE INDEX IF NOT EXISTS dns_client ON dns_logs (client_name, "end");
CREATE INDEX IF NOT EXISTS dns_qname ON dns_logs (qname, "end");
CREATE INDEX IF NOT EXISTS dns_received ON dns_logs (received);
"""
COLUMNS = ("received", "start", "end", "node", "client_type", "client_name",
           "client_labels", "client_scope", "server_type", "server_name", "server_labels",
           "server_scope", "qname", "qtype", "rcode", "answers", "count", "latency_count",
           "latency_mean_ms", "latency_max_ms")
COLUMN_LIST = ", ".join(f'"{c}"' for c in COLUMNS)
EXPIRE_CHUNK = 20_000


@dataclass(frozen=True)
class DnsQuery:
    """Which records: every field given narrows the answer (all must hold)."""

    since: float = 0.0                # end >= since
    until: float | None = None        # end <= until
    node: str | None = None           # the reporting node
    client: str | None = None         # the client end's name (an endpoint or an address)
    qname: str | None = None          # a name, or *.SUFFIX: the names under SUFFIX
    rcode: str | None = None
    after: float | None = None        # stored at or after (received >= after)
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True)
class StoredDns:
    record: DnsRecord
    received: float

    def json(self) -> dict[str, Any]:
        return {**self.record.json(), "received": self.received}


@dataclass
class DnsPage:
    records: list[StoredDns] = field(default_factory=list)
    truncated: bool = False


class DnsStore(Protocol):
    """Where DNS log records are kept and queried (calls block; safe from threads)."""

    def insert(self, records: Sequence[DnsRecord], received: float | None = None) -> int:
        """Store every record, or none (FlowStoreError); how many were stored."""
        ...

    def query(self, q: DnsQuery) -> DnsPage:
        ...

    def expire(self, before: float) -> int:
        ...

    def count(self) -> int:
        ...

    def close(self) -> None:
        ...


def _record(d: dict[str, Any]) -> DnsRecord:
    """A DnsRecord from a row of columns named as its fields (labels mappings, answers a
    sequence): rows the store wrote itself, trusted."""
    return DnsRecord(
        start=float(d["start"]), end=float(d["end"]), node=d["node"],
        client=End(d["client_type"], d["client_name"], dict(d["client_labels"]),
                   d["client_scope"]),
        server=End(d["server_type"], d["server_name"], dict(d["server_labels"]),
                   d["server_scope"]),
        qname=d["qname"], qtype=d["qtype"], rcode=d["rcode"], answers=tuple(d["answers"]),
        count=int(d["count"]), latency_count=int(d["latency_count"]),
        latency_mean_ms=float(d["latency_mean_ms"]),
        latency_max_ms=float(d["latency_max_ms"]))


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _row(r: DnsRecord, received: float) -> tuple[Any, ...]:
    return (received, r.start, r.end, r.node, r.client.type, r.client.name,
            _dump(dict(r.client.labels)), r.client.scope, r.server.type, r.server.name,
            _dump(dict(r.server.labels)), r.server.scope, r.qname, r.qtype, r.rcode,
            _dump(list(r.answers)), r.count, r.latency_count, r.latency_mean_ms,
            r.latency_max_ms)


def _stored(row: Sequence[Any]) -> StoredDns:
    d = dict(zip(COLUMNS, row, strict=True))
    for key in ("client_labels", "server_labels", "answers"):
        d[key] = json.loads(d[key])
    return StoredDns(_record(d), float(d["received"]))


def where(q: DnsQuery) -> tuple[str, list[Any]]:
    terms: list[str] = ['"end" >= ?']
    args: list[Any] = [q.since]
    if q.until is not None:
        terms.append('"end" <= ?')
        args.append(q.until)
    for column, value in (("node", q.node), ("client_name", q.client), ("rcode", q.rcode)):
        if value is not None:
            terms.append(f"{column} = ?")
            args.append(value)
    if q.qname is not None:
        if q.qname.startswith("*."):
            # Names under the suffix, compared as they are (GLOB and LIKE would read `*`,
            # `?`, `%` and `_` in it): a scan within the time range, not an index range.
            suffix = q.qname[1:]
            terms.append("substr(qname, -?) = ? AND length(qname) > ?")
            args += [len(suffix), suffix, len(suffix)]
        else:
            terms.append("qname = ?")
            args.append(q.qname)
    if q.after is not None:
        terms.append("received >= ?")
        args.append(q.after)
    return " AND ".join(terms), args


class SQLiteDnsStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db, self._reader, self._last_received = open_wal(self.path, SCHEMA, "dns_logs",
                                                               "DNS log store")
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def insert(self, records: Sequence[DnsRecord], received: float | None = None) -> int:
        """Store every record, or none (FlowStoreError); how many were stored."""
        check_insert(records)
        if not records:
            return 0
        with self._write_lock:
            stamp = max(time.time() if received is None else received, self._last_received)
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(
                        f"INSERT INTO dns_logs ({COLUMN_LIST}) VALUES "
                        f"({', '.join('?' * len(COLUMNS))})", [_row(r, stamp) for r in records])
            except sqlite3.Error as e:
                raise FlowStoreError(f"DNS log store {self.path}: {e}; nothing was "
                                     "stored") from None
            self._last_received = stamp
        return len(records)

    def expire(self, before: float) -> int:
        total = 0
        while True:
            with self._write_lock:
                try:
                    gone = self._db.execute(
                        'DELETE FROM dns_logs WHERE id IN (SELECT id FROM dns_logs WHERE '
                        '"end" < ? LIMIT ?)', (before, EXPIRE_CHUNK)).rowcount
                except sqlite3.Error as e:
                    raise FlowStoreError(f"DNS log store {self.path}: {e}") from None
            total += gone
            if gone < EXPIRE_CHUNK:
                return total

    def query(self, q: DnsQuery) -> DnsPage:
        deadline = time.monotonic() + QUERY_SECONDS
        cond, args = where(q)
        order = "received, id" if q.after is not None else '"end" DESC, id DESC'
        with self._read_lock:
            rows = read_rows(self._reader, f"SELECT {COLUMN_LIST} FROM dns_logs WHERE {cond} "
                             f"ORDER BY {order} LIMIT ?", [*args, q.limit + 1], deadline,
                             f"DNS log store {self.path}")
        return DnsPage([_stored(r) for r in rows[:q.limit]], len(rows) > q.limit)

    def count(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM dns_logs").fetchone()[0])

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._db.close()


# ------------------------------------------------------------------------ ClickHouse
CLICKHOUSE_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    received DateTime64(6, 'UTC'),
    start DateTime64(6, 'UTC'),
    `end` DateTime64(6, 'UTC'),
    node LowCardinality(String),
    client_type LowCardinality(String), client_name String,
    client_labels Map(String, String), client_scope LowCardinality(String),
    server_type LowCardinality(String), server_name String,
    server_labels Map(String, String), server_scope LowCardinality(String),
    qname String, qtype LowCardinality(String), rcode LowCardinality(String),
    answers Array(String),
    count UInt64, latency_count UInt64, latency_mean_ms Float64, latency_max_ms Float64,
    INDEX client_idx client_name TYPE bloom_filter GRANULARITY 4,
    INDEX qname_idx qname TYPE bloom_filter GRANULARITY 4
) ENGINE = MergeTree
PARTITION BY toYYYYMMDD(received)
ORDER BY (`end`, node)
TTL {ttl}
"""
TIMES = ("received", "start", "end")
SELECT = ", ".join(f"toUnixTimestamp64Micro(`{c}`)" if c in TIMES else f"`{c}`"
                   for c in COLUMNS)


def clickhouse_where(q: DnsQuery) -> tuple[str, dict[str, Any]]:
    """The condition for every filter of `q`, with bound parameters."""
    terms, params = window(q.since, q.until, q.after)
    for column, key, value in (("node", "node", q.node), ("client_name", "client", q.client),
                               ("rcode", "rcode", q.rcode)):
        if value is not None:
            terms.append(f"{column} = {{{key}:String}}")
            params[key] = value
    if q.qname is not None:
        if q.qname.startswith("*."):
            # The names under the suffix (endsWith compares bytes: no pattern characters).
            terms.append("endsWith(qname, {suffix:String}) AND "
                         "length(qname) > length({suffix:String})")
            params["suffix"] = q.qname[1:]
        else:
            terms.append("qname = {qname:String}")
            params["qname"] = q.qname
    return " AND ".join(terms), params


class ClickHouseDnsStore(ClickHouseTable):
    schema = CLICKHOUSE_SCHEMA
    required = frozenset(COLUMNS)

    def __init__(self, settings: ClickHouseSettings) -> None:
        super().__init__(settings, settings.dns_table)

    def insert(self, records: Sequence[DnsRecord], received: float | None = None) -> int:
        def row(r: DnsRecord, stamp: int) -> list[Any]:
            return [stamp, _micros(r.start), _micros(r.end), r.node, r.client.type,
                    r.client.name, labels(r.client.labels), r.client.scope, r.server.type,
                    r.server.name, labels(r.server.labels), r.server.scope, r.qname, r.qtype,
                    r.rcode, list(r.answers), r.count, r.latency_count, r.latency_mean_ms,
                    r.latency_max_ms]

        return self._insert(records, received, row, COLUMNS)

    def query(self, q: DnsQuery) -> DnsPage:
        cond, params = clickhouse_where(q)
        order = "received" if q.after is not None else "`end` DESC"
        rows = self._rows(f"SELECT {SELECT} FROM {self.table} WHERE {cond} ORDER BY {order} "
                          f"LIMIT {q.limit + 1:d}", params)
        out = []
        for row in rows[:q.limit]:
            d = dict(zip(COLUMNS, row, strict=True))
            for key in TIMES:
                d[key] = d[key] / 1_000_000
            out.append(StoredDns(_record(d), d["received"]))
        return DnsPage(out, len(rows) > q.limit)
