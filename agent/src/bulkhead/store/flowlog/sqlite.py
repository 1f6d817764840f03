"""Flow records in a SQLite file of their own (the default: `flows.sqlite` beside the
datastore), in WAL mode so queries read while agents write.

One row per record in `flows`: the record's scalar fields as columns, labels and traces as
JSON text (they are read back whole, and label filters are Calico selectors, matched in
Python: SQL could not index them anyway). What the policy and tier filters need is a side
table, `flow_names` (kind `p` or `t`, name, end, flow id): every distinct policy and tier
the enforced and staged traces name, indexed, so `policy=X` is an index range, not a scan
of every trace in the time range. Indexes: the time (`end`) alone and after node,
endpoint names and action; `received` for --follow.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bulkhead.model.flowlog import MAX_COUNT, FlowRecord
from bulkhead.store.flowlog.base import (
    GROUP_BYTES,
    GROUP_KEY,
    GROUP_SUMS,
    QUERY_SECONDS,
    SCAN_CHUNK,
    FlowPage,
    FlowQuery,
    FlowQueryTimeout,
    FlowStoreError,
    GroupPage,
    StoredFlow,
    TopPage,
    TopRow,
    check_insert,
    chunked,
    group_row,
    page_of,
    record_of,
    top_of,
    trace_names,
)
from bulkhead.store.sqlite import immediate

EXPIRE_CHUNK = 20_000   # rows deleted in one transaction: ingest waits at most that long

SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY, received REAL NOT NULL,
    start REAL NOT NULL, "end" REAL NOT NULL, node TEXT NOT NULL, reporter TEXT NOT NULL,
    src_type TEXT NOT NULL, src_name TEXT NOT NULL, src_labels TEXT NOT NULL,
    src_scope TEXT NOT NULL,
    dst_type TEXT NOT NULL, dst_name TEXT NOT NULL, dst_labels TEXT NOT NULL,
    dst_scope TEXT NOT NULL,
    proto INTEGER NOT NULL CHECK (proto BETWEEN 0 AND 255),
    dst_port INTEGER NOT NULL CHECK (dst_port BETWEEN 0 AND 65535),
    action TEXT NOT NULL, enforced_trace TEXT NOT NULL, staged_action TEXT NOT NULL,
    staged_trace TEXT NOT NULL,
    connections INTEGER NOT NULL CHECK (connections >= 0),
    started INTEGER NOT NULL CHECK (started >= 0),
    packets_in INTEGER NOT NULL CHECK (packets_in >= 0),
    packets_out INTEGER NOT NULL CHECK (packets_out >= 0),
    bytes_in INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out INTEGER NOT NULL CHECK (bytes_out >= 0),
    dst_domains TEXT
);
CREATE INDEX IF NOT EXISTS flows_end ON flows ("end");
CREATE INDEX IF NOT EXISTS flows_node ON flows (node, "end");
CREATE INDEX IF NOT EXISTS flows_src ON flows (src_name, "end");
CREATE INDEX IF NOT EXISTS flows_dst ON flows (dst_name, "end");
CREATE INDEX IF NOT EXISTS flows_action ON flows (action, "end");
CREATE INDEX IF NOT EXISTS flows_differs ON flows ("end") WHERE action != staged_action;
CREATE INDEX IF NOT EXISTS flows_received ON flows (received);
CREATE TABLE IF NOT EXISTS flow_names (
    kind TEXT NOT NULL, name TEXT NOT NULL, "end" REAL NOT NULL, flow INTEGER NOT NULL,
    PRIMARY KEY (kind, name, "end", flow)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flow_names_end ON flow_names ("end");
"""

COLUMNS = ("received", "start", "end", "node", "reporter", "src_type", "src_name",
           "src_labels", "src_scope", "dst_type", "dst_name", "dst_labels", "dst_scope",
           "proto", "dst_port", "action", "enforced_trace", "staged_action", "staged_trace",
           "connections", "started", "packets_in", "packets_out", "bytes_in", "bytes_out",
           "dst_domains")
COLUMN_LIST = ", ".join(f'"{c}"' for c in COLUMNS)
SELECT = f"{COLUMN_LIST}, id"
JSON_COLUMNS = ("src_labels", "dst_labels", "enforced_trace", "staged_trace", "dst_domains")
# Columns added since the first schema, added to a file that lacks them when it is opened
# (their rows then hold NULL: not known).
ADDED = (("flows", "dst_domains", "TEXT"),)
TOP_KEY = "src_type, src_name, dst_type, dst_name, proto, dst_port"


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _row(record: FlowRecord, flow_id: int, received: float) -> tuple[Any, ...]:
    r = record
    return (flow_id, received, r.start, r.end, r.node, r.reporter,
            r.src.type, r.src.name, _dump(dict(r.src.labels)), r.src.scope,
            r.dst.type, r.dst.name, _dump(dict(r.dst.labels)), r.dst.scope,
            r.proto, r.dst_port, r.action, _dump(list(r.enforced_trace)), r.staged_action,
            _dump(list(r.staged_trace)), r.connections, r.started, r.packets_in,
            r.packets_out, r.bytes_in, r.bytes_out,
            None if r.dst_domains is None else _dump(list(r.dst_domains)))


def _names(record: FlowRecord, flow_id: int) -> list[tuple[str, str, float, int]]:
    trace = (*record.enforced_trace, *record.staged_trace)
    return [(kind, name, record.end, flow_id)
            for kind, part in (("p", 1), ("t", 0)) for name in trace_names(trace, part)]


def _stored(row: Sequence[Any]) -> StoredFlow:
    doc = dict(zip(COLUMNS, row, strict=False))
    for key in JSON_COLUMNS:
        if doc[key] is not None:
            doc[key] = json.loads(doc[key])
    return StoredFlow(record_of(doc), float(doc["received"]))


def where(q: FlowQuery) -> tuple[str, list[Any]]:
    """The SQL condition for every filter of `q` but the selector, and its arguments."""
    terms: list[str] = ['"end" >= ?']
    args: list[Any] = [q.since]
    if q.until is not None:
        terms.append('"end" <= ?')
        args.append(q.until)
    for column in ("node", "reporter", "action"):
        value = getattr(q, column)
        if value is not None:
            terms.append(f"{column} = ?")
            args.append(value)
    if q.staged_differs:
        terms.append("action != staged_action")
    if q.endpoint is not None:
        terms.append("(src_name = ? OR dst_name = ?)")
        args += [q.endpoint, q.endpoint]
    for kind, name in (("p", q.policy), ("t", q.tier)):
        if name is not None:
            span = ' AND "end" <= ?' if q.until is not None else ""
            terms.append(f'id IN (SELECT flow FROM flow_names WHERE kind = ? AND name = ? '
                         f'AND "end" >= ?{span})')
            args += [kind, name, q.since, *([q.until] if q.until is not None else [])]
    if q.after is not None:
        terms.append("received >= ?")
        args.append(q.after)
    return " AND ".join(terms), args


def open_wal(path: Path, schema: str, table: str, what: str,
             added: Sequence[tuple[str, str, str]] = ()
             ) -> tuple[sqlite3.Connection, sqlite3.Connection, float]:
    """A SQLite file in WAL mode with `schema`: the writing connection, a reading one
    (a long query never holds up ingest), and the newest `received` of `table`.
    `added`: (table, column, type) that a file written by an older server may lack; they
    are added to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
        for name, column, kind in added:
            have = {row[1] for row in db.execute(f"PRAGMA table_info({name})")}
            if column not in have:
                try:
                    db.execute(f"ALTER TABLE {name} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as e:
                    if "duplicate column" not in str(e):   # another process added it
                        raise
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        last = db.execute(f"SELECT MAX(received) FROM {table}").fetchone()[0]
    except sqlite3.Error as e:
        raise FlowStoreError(f"{what} {path}: {e}") from None
    return db, reader, float(last or 0.0)


def read_rows(reader: sqlite3.Connection, sql: str, args: Sequence[Any], deadline: float,
              what: str) -> list[Any]:
    """Rows of one statement on a reading connection, stopped at `deadline` (monotonic):
    FlowQueryTimeout then. The caller holds the connection's lock."""
    reader.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        return reader.execute(sql, args).fetchall()
    except sqlite3.Error as e:
        if "interrupted" in str(e):
            raise FlowQueryTimeout(f"the query ran longer than {QUERY_SECONDS:g} s; "
                                   "narrow the time range or add filters") from None
        raise FlowStoreError(f"{what}: {e}") from None
    finally:
        reader.set_progress_handler(None, 0)


class SQLiteFlowStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db, self._reader, self._last_received = open_wal(self.path, SCHEMA, "flows",
                                                               "flow log store", ADDED)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    # -- writes -----------------------------------------------------------------------
    def insert(self, records: Sequence[FlowRecord], received: float | None = None) -> int:
        check_insert(records)
        if not records:
            return 0
        db = self._db
        with self._write_lock:
            # `received` never goes back: --follow reads on from the last one it saw.
            stamp = max(time.time() if received is None else received, self._last_received)
            try:
                with immediate(db):
                    base = db.execute("SELECT COALESCE(MAX(id), 0) FROM flows").fetchone()[0]
                    db.executemany(f"INSERT INTO flows (id, {COLUMN_LIST}) VALUES "
                                   f"({', '.join('?' * (len(COLUMNS) + 1))})",
                                   [_row(r, base + i + 1, stamp)
                                    for i, r in enumerate(records)])
                    db.executemany("INSERT OR IGNORE INTO flow_names VALUES (?, ?, ?, ?)",
                                   [n for i, r in enumerate(records)
                                    for n in _names(r, base + i + 1)])
            except sqlite3.Error as e:
                raise FlowStoreError(f"flow log store {self.path}: {e}; nothing was "
                                     "stored") from None
            self._last_received = stamp
        return len(records)

    def expire(self, before: float) -> int:
        """Delete the records that ended before `before`, a chunk a transaction; how many.
        FlowStoreError when the file fails (a full disk: the chunks done stay done)."""
        total = 0
        db = self._db
        while True:
            with self._write_lock:
                try:
                    row = db.execute('SELECT "end" FROM flows WHERE "end" < ? ORDER BY '
                                     '"end" LIMIT 1 OFFSET ?', (before, EXPIRE_CHUNK)
                                     ).fetchone()
                    # A chunk ends at a time: a record and its names go in the same one.
                    cond, cut = ('"end" <= ?', row[0]) if row else ('"end" < ?', before)
                    with immediate(db):
                        gone = db.execute(f"DELETE FROM flows WHERE {cond}", (cut,)).rowcount
                        db.execute(f"DELETE FROM flow_names WHERE {cond}", (cut,))
                    total += gone
                except sqlite3.Error as e:
                    raise FlowStoreError(f"flow log store {self.path}: {e}; {total:,} "
                                         "records expired before it") from None
            if row is None:
                return total

    # -- reads ------------------------------------------------------------------------
    def _read(self, sql: str, args: Sequence[Any], deadline: float) -> list[Any]:
        """Rows of one statement on the reading connection, stopped at `deadline`."""
        with self._read_lock:
            return read_rows(self._reader, sql, args, deadline,
                             f"flow log store {self.path}")

    def _scan(self, q: FlowQuery, deadline: float) -> Iterator[StoredFlow]:
        """Every row the filters but the selector let through, in answer order, read a
        chunk at a time (keyset pagination: no row twice, none skipped)."""
        cond, args = where(q)
        # Row values, so SQLite walks its index (`end` or `received`, then rowid) from
        # where the last chunk ended; an OR of the two conditions sorts the range each time.
        if q.after is not None:
            order, key, step = "received, id", "received", "(received, id) > (?, ?)"
        else:
            order, key, step = '"end" DESC, id DESC', "end", '("end", id) < (?, ?)'
        index = COLUMNS.index(key)

        def fetch(last: Sequence[Any] | None) -> list[Any]:
            more = "" if last is None else f" AND {step}"
            extra = [] if last is None else [last[index], last[-1]]
            return self._read(f"SELECT {SELECT} FROM flows WHERE {cond}{more} ORDER BY "
                              f"{order} LIMIT ?", [*args, *extra, SCAN_CHUNK], deadline)

        for row in chunked(fetch):
            yield _stored(row)

    def query(self, q: FlowQuery) -> FlowPage:
        deadline = time.monotonic() + QUERY_SECONDS
        if q.selector is not None:
            return page_of(self._scan(q, deadline), q)
        cond, args = where(q)
        order = "received, id" if q.after is not None else '"end" DESC, id DESC'
        rows = self._read(f"SELECT {SELECT} FROM flows WHERE {cond} ORDER BY {order} "
                          "LIMIT ?", [*args, q.limit + 1], deadline)
        return FlowPage([_stored(r) for r in rows[:q.limit]], len(rows) > q.limit)

    def top(self, q: FlowQuery, n: int) -> TopPage:
        deadline = time.monotonic() + QUERY_SECONDS
        if q.selector is not None:
            return top_of(self._scan(q, deadline), q, n)
        cond, args = where(q)
        # TOTAL sums as floats: a sum past 2**63 cannot fail (SUM would), exact to 2**53.
        rows = self._read(
            f"SELECT {TOP_KEY}, TOTAL(bytes_in) + TOTAL(bytes_out) AS b, "
            "TOTAL(packets_in) + TOTAL(packets_out), TOTAL(connections), TOTAL(started), "
            f"COUNT(*) FROM flows WHERE {cond} GROUP BY {TOP_KEY} ORDER BY b DESC, {TOP_KEY} "
            "LIMIT ?", [*args, n], deadline)
        return TopPage([TopRow(*r[:6], *(int(x) for x in r[6:])) for r in rows])

    def groups(self, q: FlowQuery, n: int) -> GroupPage:
        deadline = time.monotonic() + QUERY_SECONDS
        cond, args = where(q)
        key = ", ".join(f'"{c}"' for c in GROUP_KEY)
        order = f"TOTAL(connections) DESC, {key}"
        size = ("LENGTH(src_labels) + LENGTH(dst_labels) + LENGTH(enforced_trace) + "
                "COALESCE(LENGTH(dst_domains), 0)")
        # Sums as floats (TOTAL never fails), capped at the record's bound when read; a
        # running total of the groups' text keeps the answer within GROUP_BYTES.
        rows = self._read(
            f"SELECT * FROM (SELECT {key}, MIN(start), MAX(\"end\"), "
            f"json_group_array(DISTINCT node), "
            f"{', '.join(f'TOTAL({c})' for c in GROUP_SUMS)}, COUNT(*), "
            f"SUM({size}) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) AS running, "
            f"COUNT(*) OVER () FROM flows WHERE {cond} GROUP BY {key}) "
            "WHERE running <= ? ORDER BY running LIMIT ?", [*args, GROUP_BYTES, n], deadline)
        names = (*GROUP_KEY, "start", "end", "nodes", *GROUP_SUMS, "records")
        out = []
        for r in rows:
            doc = dict(zip(names, r[:len(names)], strict=True))
            for column in ("src_labels", "dst_labels", "enforced_trace", "nodes",
                           "dst_domains"):
                if doc[column] is not None:
                    doc[column] = json.loads(doc[column])
            for column in GROUP_SUMS:
                doc[column] = min(int(doc[column]), MAX_COUNT)
            out.append(group_row(doc))
        return GroupPage(out, bool(rows) and rows[0][-1] > len(rows))

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM flows", (),
                              time.monotonic() + QUERY_SECONDS)[0][0])

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._db.close()
