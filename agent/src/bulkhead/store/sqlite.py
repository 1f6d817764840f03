"""The embedded default datastore: one SQLite file in WAL mode.

Every transaction is one SQLite transaction (BEGIN IMMEDIATE ... COMMIT, synchronous=FULL),
so a `kill -9` at any moment leaves either all of it or none of it, and nothing that was
acknowledged is lost. Changes are kept in an `events` table for watchers until compacted.
One server process owns the file; several servers share an etcd cluster instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bulkhead.selector import Selector
from bulkhead.store.base import (
    Event,
    EventType,
    NotFound,
    Op,
    Stored,
    TooOld,
    TxResult,
    check_expectation,
    stamp,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
    kind TEXT NOT NULL, name TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (revision, seq)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
"""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SQLiteStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._changed: asyncio.Condition | None = None

    # -- plumbing ---------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(*args)
        return await asyncio.to_thread(locked)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    # -- reads ------------------------------------------------------------------------
    async def get(self, kind: str, name: str) -> Stored:
        row = await self._run(lambda: self._db.execute(
            "SELECT revision, doc FROM resources WHERE kind = ? AND name = ?",
            (kind, name)).fetchone())
        if row is None:
            raise NotFound(kind, name)
        return Stored(kind, name, row[0], json.loads(row[1]))

    async def list_resources(self, kind: str | None = None, selector: Selector | None = None
                   ) -> tuple[list[Stored], int]:
        def read() -> tuple[list[Any], int]:
            self._db.execute("BEGIN")
            try:
                if kind is None:
                    rows = self._db.execute("SELECT kind, name, revision, doc FROM resources "
                                            "ORDER BY kind, name").fetchall()
                else:
                    rows = self._db.execute("SELECT kind, name, revision, doc FROM resources "
                                            "WHERE kind = ? ORDER BY name", (kind,)).fetchall()
                return rows, self._meta("revision")
            finally:
                self._db.execute("COMMIT")

        rows, revision = await self._run(read)
        items = [Stored(k, n, r, json.loads(d)) for k, n, r, d in rows]
        if selector is not None:
            items = [s for s in items if selector.matches(s.labels)]
        return items, revision

    async def revision(self) -> int:
        return int(await self._run(self._meta, "revision"))

    # -- writes -----------------------------------------------------------------------
    def _apply(self, ops: Sequence[Op]) -> TxResult:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            revision = self._meta("revision") + 1
            result = TxResult(revision)
            for seq, op in enumerate(ops):
                row = db.execute("SELECT revision, doc FROM resources WHERE kind = ? AND "
                                 "name = ?", (op.kind, op.name)).fetchone()
                check_expectation(op, None if row is None else row[0])
                old = json.loads(row[1]) if row else None
                kind_of_event: EventType
                if op.action == "delete":
                    assert old is not None
                    db.execute("DELETE FROM resources WHERE kind = ? AND name = ?",
                               (op.kind, op.name))
                    doc, kind_of_event = old, "DELETED"
                else:
                    assert op.doc is not None
                    meta = (old or {}).get("metadata", {})
                    doc = stamp(op.doc, revision, meta.get("uid") or str(uuid.uuid4()),
                                meta.get("creationTimestamp") or _now())
                    db.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?)",
                               (op.kind, op.name, revision, json.dumps(doc)))
                    kind_of_event = "MODIFIED" if old else "ADDED"
                db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                           (revision, seq, kind_of_event, op.kind, op.name, json.dumps(doc)))
                result.stored.append(Stored(op.kind, op.name, revision, doc))
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            db.execute("COMMIT")
            return result
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def transaction(self, ops: Sequence[Op]) -> TxResult:
        if not ops:
            return TxResult(await self.revision())
        result: TxResult = await self._run(self._apply, list(ops))
        cond = self._condition()
        async with cond:
            cond.notify_all()
        return result

    async def compact(self, keep_after: int) -> None:
        def run() -> None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._meta("compacted")
                if keep_after > current:
                    self._db.execute("DELETE FROM events WHERE revision <= ?", (keep_after,))
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'",
                                     (keep_after,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        await self._run(run)

    # -- watch ------------------------------------------------------------------------
    def _events_after(self, after: int) -> list[Event]:
        compacted = self._meta("compacted")
        if after < compacted:
            raise TooOld(after, compacted)
        rows = self._db.execute("SELECT revision, type, kind, name, doc FROM events WHERE "
                                "revision > ? ORDER BY revision, seq LIMIT 1000",
                                (after,)).fetchall()
        return [Event(t, k, n, r, json.loads(d)) for r, t, k, n, d in rows]

    async def watch(self, after: int) -> AsyncIterator[Event]:
        cond = self._condition()
        while True:
            async with cond:
                events: list[Event] = await self._run(self._events_after, after)
                if not events:
                    # Woken by every local write; the timeout also picks up writes made
                    # by another process on the same file (tests, `bulkhead` offline).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(cond.wait(), timeout=1.0)
                    continue
            for event in events:
                yield event
                after = event.revision

    async def close(self) -> None:
        await self._run(self._db.close)
