"""Flow records in ClickHouse, through `clickhouse-connect` (the `clickhouse` extra).

The same code drives a ClickHouse server (HTTP or HTTPS) and the embedded engine of
`chdb` (`dsn: chdb:///PATH`, which the tests use), so what runs in tests is what runs in
production. The table (see SCHEMA) is a MergeTree ordered by (`end`, node) for time-range
queries, with a TTL on `end` for retention; labels are `Map(String, String)`, traces
`Array(String)`, and the policies and tiers the traces name are MATERIALIZED columns
(computed by ClickHouse on insert) with bloom-filter indexes for the policy and tier filters.

Atomicity: one insert is one block in one partition (PARTITION BY the day of `received`,
the same for a whole batch), which MergeTree commits whole. On a cluster, insert through a
Distributed table sharded by `node` (every batch comes from one node, so it lands on one
shard, whole).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bulkhead.model.flowlog import MAX_COUNT, FlowRecord
from bulkhead.store.flowlog.base import (
    GROUP_BYTES,
    GROUP_KEY,
    GROUP_SUMS,
    MAX_GROUP_NODES,
    QUERY_SECONDS,
    FlowPage,
    FlowQuery,
    FlowQueryTimeout,
    FlowStoreError,
    FlowStoreUnavailable,
    GroupPage,
    StoredFlow,
    TopPage,
    TopRow,
    check_insert,
    group_row,
    page_of,
    record_of,
    top_of,
)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")   # a database or table name we quote

SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    received DateTime64(6, 'UTC'),
    start DateTime64(6, 'UTC'),
    `end` DateTime64(6, 'UTC'),
    node LowCardinality(String),
    reporter LowCardinality(String),
    src_type LowCardinality(String), src_name String, src_labels Map(String, String),
    src_scope LowCardinality(String),
    dst_type LowCardinality(String), dst_name String, dst_labels Map(String, String),
    dst_scope LowCardinality(String),
    proto UInt8, dst_port UInt16,
    action LowCardinality(String), enforced_trace Array(String),
    staged_action LowCardinality(String), staged_trace Array(String),
    connections UInt64, started UInt64, packets_in UInt64, packets_out UInt64,
    bytes_in UInt64, bytes_out UInt64,
    dst_domains Array(String), dst_domains_known Bool,
    policies Array(String) MATERIALIZED arrayDistinct(arrayMap(s -> splitByChar('|', s)[2],
        arrayConcat(enforced_trace, staged_trace))),
    tiers Array(String) MATERIALIZED arrayDistinct(arrayMap(s -> splitByChar('|', s)[1],
        arrayConcat(enforced_trace, staged_trace))),
    INDEX policies_idx policies TYPE bloom_filter GRANULARITY 4,
    INDEX tiers_idx tiers TYPE bloom_filter GRANULARITY 4,
    INDEX src_idx src_name TYPE bloom_filter GRANULARITY 4,
    INDEX dst_idx dst_name TYPE bloom_filter GRANULARITY 4
) ENGINE = MergeTree
PARTITION BY toYYYYMMDD(received)
ORDER BY (`end`, node)
TTL {ttl}
"""

COLUMNS = ("received", "start", "end", "node", "reporter", "src_type", "src_name",
           "src_labels", "src_scope", "dst_type", "dst_name", "dst_labels", "dst_scope",
           "proto", "dst_port", "action", "enforced_trace", "staged_action", "staged_trace",
           "connections", "started", "packets_in", "packets_out", "bytes_in", "bytes_out",
           "dst_domains", "dst_domains_known")
# Columns added since the first schema: added to a table that lacks them (createSchema),
# whose rows then read as not known.
ADDED = "ADD COLUMN IF NOT EXISTS dst_domains Array(String) AFTER bytes_out, " \
        "ADD COLUMN IF NOT EXISTS dst_domains_known Bool DEFAULT false AFTER dst_domains"
TIMES = ("received", "start", "end")
# The columns the server needs of a table it did not create (createSchema: false).
REQUIRED = frozenset((*COLUMNS, "policies", "tiers"))
SELECT = ", ".join(f"toUnixTimestamp64Micro(`{c}`)" if c in TIMES else f"`{c}`"
                   for c in COLUMNS)
TOP_KEY = "src_type, src_name, dst_type, dst_name, proto, dst_port"


def available() -> bool:
    """Whether clickhouse-connect is installed (the `clickhouse` extra)."""
    return importlib.util.find_spec("clickhouse_connect") is not None


@dataclass(frozen=True)
class ClickHouseSettings:
    dsn: str | None = None               # e.g. chdb:///var/lib/bulkhead/flows.chdb
    host: str = "localhost"
    port: int | None = None              # default: 8123, or 8443 with secure
    user: str = "default"
    password: str = ""
    database: str = "bulkhead"
    table: str = "flows"
    dns_table: str = "dns_logs"          # DNS log records, in the same database
    secure: bool = False
    ca_file: str | None = None
    create_schema: bool = True           # create the database and table; keep the TTL
    retention_seconds: int = 86_400


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def labels(given: Mapping[str, str]) -> dict[str, str]:
    """Labels as a Map keeps them: in key order. A Map is its pairs in the order given,
    and GROUP BY tells `{a, b}` from `{b, a}`: the same labels sent in two orders were two
    preview groups (SQLite's JSON text sorts its keys)."""
    return dict(sorted(given.items()))


def _row(record: FlowRecord, received: int) -> list[Any]:
    r = record
    return [received, _micros(r.start), _micros(r.end), r.node, r.reporter,
            r.src.type, r.src.name, labels(r.src.labels), r.src.scope,
            r.dst.type, r.dst.name, labels(r.dst.labels), r.dst.scope,
            r.proto, r.dst_port, r.action, list(r.enforced_trace), r.staged_action,
            list(r.staged_trace), r.connections, r.started, r.packets_in, r.packets_out,
            r.bytes_in, r.bytes_out, list(r.dst_domains or ()), r.dst_domains is not None]


def _domains(doc: dict[str, Any]) -> None:
    """The row's two domain columns as the record's one field (None: not known)."""
    if not doc.pop("dst_domains_known"):
        doc["dst_domains"] = None


def _stored(row: Sequence[Any]) -> StoredFlow:
    doc = dict(zip(COLUMNS, row, strict=True))
    for key in TIMES:
        doc[key] = doc[key] / 1_000_000
    _domains(doc)
    return StoredFlow(record_of(doc), doc["received"])


def window(since: float, until: float | None, after: float | None
           ) -> tuple[list[str], dict[str, Any]]:
    """The terms (and bound parameters) of a query's time window: `end` from `since` to
    `until`, stored at or after `after`."""
    terms = ["`end` >= fromUnixTimestamp64Micro({since:Int64}, 'UTC')"]
    params: dict[str, Any] = {"since": _micros(since)}
    for key, value, term in (
            ("until", until, "`end` <= fromUnixTimestamp64Micro({until:Int64}, 'UTC')"),
            ("after", after, "received >= fromUnixTimestamp64Micro({after:Int64}, 'UTC')")):
        if value is not None:
            terms.append(term)
            params[key] = _micros(value)
    return terms, params


def where(q: FlowQuery) -> tuple[str, dict[str, Any]]:
    """The condition for every filter of `q` but the selector, with bound parameters."""
    terms, params = window(q.since, q.until, q.after)
    for column in ("node", "reporter", "action"):
        value = getattr(q, column)
        if value is not None:
            terms.append(f"{column} = {{{column}:String}}")
            params[column] = value
    if q.staged_differs:
        terms.append("action != staged_action")
    if q.endpoint is not None:
        terms.append("(src_name = {endpoint:String} OR dst_name = {endpoint:String})")
        params["endpoint"] = q.endpoint
    if q.policy is not None:
        terms.append("has(policies, {policy:String})")
        params["policy"] = q.policy
    if q.tier is not None:
        terms.append("has(tiers, {tier:String})")
        params["tier"] = q.tier
    return " AND ".join(terms), params


class ClickHouseTable:
    """One table of records in ClickHouse: connects on first use (and again after a
    failure), so a ClickHouse that is down makes requests fail with FlowStoreUnavailable,
    never the server's start. Subclasses give the table's name, schema and columns."""

    expires_by_itself = True   # the table's TTL does retention
    schema = ""                # CREATE TABLE, with {table} and {ttl}
    required: frozenset[str] = frozenset()   # columns a table it did not create must have
    added = ""                 # ALTER TABLE clauses for columns added since the first schema
    added_columns: frozenset[str] = frozenset()   # what `added` adds: one missing, it runs

    def __init__(self, settings: ClickHouseSettings, table: str) -> None:
        for what in (settings.database, table):
            if not NAME.fullmatch(what):
                raise ValueError(f"{what[:70]!r} is not a ClickHouse name this server uses "
                                 "(letters, digits, _; not starting with a digit)")
        self.settings = settings
        self.table_name = table
        self.table = f"`{settings.database}`.`{table}`"
        self._client: Any = None
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------
    def _connect(self) -> Any:
        import clickhouse_connect

        s = self.settings
        if s.dsn:
            client = clickhouse_connect.get_client(dsn=s.dsn, password=s.password)
        else:
            client = clickhouse_connect.get_client(
                host=s.host, port=s.port or (8443 if s.secure else 8123), username=s.user,
                password=s.password, secure=s.secure, ca_cert=s.ca_file,
                connect_timeout=10, send_receive_timeout=int(QUERY_SECONDS) + 20,
                autogenerate_session_id=False)
        if s.create_schema:
            ttl = f"toDateTime(`end`) + toIntervalSecond({s.retention_seconds})"
            client.command(f"CREATE DATABASE IF NOT EXISTS `{s.database}`")
            client.command(self.schema.format(table=self.table, ttl=ttl))
            if self.added_columns - self._columns(client):
                client.command(f"ALTER TABLE {self.table} {self.added}")
            engine = client.query("SELECT engine_full FROM system.tables WHERE database = "
                                  "{d:String} AND name = {t:String}",
                                  parameters={"d": s.database,
                                              "t": self.table_name}).result_rows
            if engine and f"toIntervalSecond({s.retention_seconds})" not in engine[0][0]:
                client.command(f"ALTER TABLE {self.table} MODIFY TTL {ttl}")
        else:
            missing = sorted(self.required - self._columns(client))
            if missing:
                older = (f"; for a table of an older server: ALTER TABLE {self.table} "
                         f"{self.added}" if self.added else "")
                raise FlowStoreError(f"ClickHouse table {self.table} lacks the columns "
                                     f"{', '.join(missing)} (see docs/observability.md for "
                                     f"the schema{older})")
        return client

    def _columns(self, client: Any) -> set[str]:
        return {r[0] for r in client.query(
            "SELECT name FROM system.columns WHERE database = {d:String} AND "
            "table = {t:String}", parameters={"d": self.settings.database,
                                              "t": self.table_name}).result_rows}

    def _call(self, fn: Any) -> Any:
        """fn(client) under the lock, connecting first if need be; errors as FlowStore
        errors."""
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._connect()
                return fn(self._client)
            except Exception as e:
                raise self._error(e) from None

    def _error(self, e: Exception) -> FlowStoreError:
        """`e` as the FlowStore error a caller acts on; a connection that failed is dropped
        (the next call connects again)."""
        from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

        if isinstance(e, FlowStoreError):
            return e
        text = str(e)
        if isinstance(e, OperationalError):
            self._drop()
            return FlowStoreUnavailable(f"ClickHouse {self._where()}: {text[:500]}")
        if "TIMEOUT_EXCEEDED" in text or "Code: 159" in text:
            return FlowQueryTimeout(f"the query ran longer than {QUERY_SECONDS:g} s; narrow "
                                    "the time range or add filters")
        if isinstance(e, (ClickHouseError, TypeError, ValueError, OverflowError)):
            # Also a row it cannot write (a value out of its column's range): nothing sent.
            return FlowStoreError(f"ClickHouse {self._where()}: {text[:500]}")
        raise e

    def _drop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _where(self) -> str:
        s = self.settings
        return f"{s.dsn or s.host} table {self.table}"

    def _settings(self) -> dict[str, Any]:
        return {"max_execution_time": int(QUERY_SECONDS)}

    def _insert(self, records: Sequence[Any], received: float | None,
                row: Callable[[Any, int], list[Any]], columns: Sequence[str]) -> int:
        """Every record as `row(record, received µs)`, in one block: stored whole or not
        at all."""
        check_insert(records)
        if not records:
            return 0
        stamp = _micros(time.time() if received is None else received)
        rows = [row(r, stamp) for r in records]
        self._call(lambda c: c.insert(self.table, rows, column_names=list(columns)))
        return len(records)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[Any]:
        return list(self._call(lambda c: c.query(sql, parameters=params,
                                                 settings=self._settings()).result_rows))

    def expire(self, before: float) -> int:
        cond = "`end` < fromUnixTimestamp64Micro({before:Int64}, 'UTC')"
        params = {"before": _micros(before)}

        def run(c: Any) -> int:
            count = int(c.query(f"SELECT count() FROM {self.table} WHERE {cond}",
                                parameters=params).result_rows[0][0])
            if count:
                c.command(f"DELETE FROM {self.table} WHERE {cond}", parameters=params)
            return count

        return int(self._call(run))

    def count(self) -> int:
        return int(self._call(lambda c: c.query(f"SELECT count() FROM {self.table}")
                              .result_rows[0][0]))

    def close(self) -> None:
        with self._lock:
            self._drop()


class ClickHouseFlowStore(ClickHouseTable):
    schema = SCHEMA
    required = REQUIRED
    added = ADDED
    added_columns = frozenset({"dst_domains", "dst_domains_known"})

    def __init__(self, settings: ClickHouseSettings) -> None:
        super().__init__(settings, settings.table)

    # -- the store --------------------------------------------------------------------
    def insert(self, records: Sequence[FlowRecord], received: float | None = None) -> int:
        return self._insert(records, received, _row, COLUMNS)

    def _order(self, q: FlowQuery) -> str:
        return "received" if q.after is not None else "`end` DESC"

    def _scan(self, q: FlowQuery) -> Generator[StoredFlow, None, None]:
        """The rows the filters but the selector let through, in answer order, streamed
        (at most `scan_limit` + 1 of them)."""
        cond, params = where(q)
        sql = (f"SELECT {SELECT} FROM {self.table} WHERE {cond} ORDER BY {self._order(q)} "
               f"LIMIT {q.scan_limit + 1:d}")
        deadline = time.monotonic() + QUERY_SECONDS
        self._call(lambda c: None)   # connected, or FlowStoreUnavailable
        with self._lock:   # the stream holds the connection until it is closed
            try:
                stream = self._client.query_rows_stream(sql, parameters=params,
                                                        settings=self._settings())
                with stream:
                    for row in stream:
                        if time.monotonic() > deadline:
                            raise FlowQueryTimeout(f"the query ran longer than "
                                                   f"{QUERY_SECONDS:g} s; narrow the time "
                                                   "range or add filters")
                        yield _stored(row)
            except Exception as e:
                raise self._error(e) from None

    def query(self, q: FlowQuery) -> FlowPage:
        if q.selector is not None:
            with contextlib.closing(self._scan(q)) as rows:
                return page_of(rows, q)
        cond, params = where(q)
        sql = (f"SELECT {SELECT} FROM {self.table} WHERE {cond} ORDER BY {self._order(q)} "
               f"LIMIT {q.limit + 1:d}")
        found = self._rows(sql, params)
        return FlowPage([_stored(r) for r in found[:q.limit]], len(found) > q.limit)

    def top(self, q: FlowQuery, n: int) -> TopPage:
        if q.selector is not None:
            with contextlib.closing(self._scan(q)) as rows:
                return top_of(rows, q, n)
        cond, params = where(q)
        sql = (f"SELECT {TOP_KEY}, sum(toFloat64(bytes_in)) + sum(toFloat64(bytes_out)) AS b, "
               "sum(toFloat64(packets_in)) + sum(toFloat64(packets_out)), "
               "sum(toFloat64(connections)), sum(toFloat64(started)), count() "
               f"FROM {self.table} WHERE {cond} GROUP BY {TOP_KEY} "
               f"ORDER BY b DESC, {TOP_KEY} LIMIT {n:d}")
        found = self._rows(sql, params)
        return TopPage([TopRow(*r[:6], *(int(x) for x in r[6:])) for r in found])

    def groups(self, q: FlowQuery, n: int) -> GroupPage:
        cond, params = where(q)
        # The record's dst_domains are two columns here.
        columns = [*GROUP_KEY, "dst_domains_known"]
        key = ", ".join(f"`{c}`" for c in columns)
        sums = ", ".join(f"sum(toFloat64({c}))" for c in GROUP_SUMS)
        size = ("length(toString(src_labels)) + length(toString(dst_labels)) + "
                "length(toString(enforced_trace)) + length(toString(dst_domains))")
        order = f"sum(toFloat64(connections)) DESC, {key}"
        # A running total of the groups' text keeps the answer within GROUP_BYTES.
        sql = (f"SELECT * FROM (SELECT {key}, toUnixTimestamp64Micro(min(start)), "
               f"toUnixTimestamp64Micro(max(`end`)), groupUniqArray({MAX_GROUP_NODES:d})(node), "
               f"{sums}, count(), sum({size}) OVER (ORDER BY {order} ROWS BETWEEN "
               "UNBOUNDED PRECEDING AND CURRENT ROW) AS running, count() OVER () "
               f"FROM {self.table} WHERE {cond} GROUP BY {key}) "
               f"WHERE running <= {GROUP_BYTES:d} ORDER BY running LIMIT {n:d}")
        rows = self._rows(sql, params)
        names = (*columns, "start", "end", "nodes", *GROUP_SUMS, "records")
        out = []
        for r in rows:
            doc = dict(zip(names, r[:len(names)], strict=True))
            _domains(doc)
            doc["start"] /= 1_000_000
            doc["end"] /= 1_000_000
            for column in GROUP_SUMS:
                doc[column] = min(int(doc[column]), MAX_COUNT)
            out.append(group_row(doc))
        return GroupPage(out, bool(rows) and rows[0][-1] > len(rows))
