"""The embedded default datastore: one SQLite file in WAL mode.

Every transaction is atomic and durable (BEGIN IMMEDIATE ... COMMIT, synchronous=FULL):
a `kill -9` at any moment leaves either all of it or none of it, and nothing that was
acknowledged is lost. Transactions that arrive while a commit is under way are committed
together, by the next commit (group commit: one fsync for them all): each in a SAVEPOINT
of its own, with a revision of its own, so one that is refused (a conflict, a missing
tier) is undone alone and the others go on; none is answered before the commit is on
disk, and if the commit fails, every one of them fails, with nothing written.
Events of this process's own writes reach watchers from memory, without a read back.
Changes are kept in an `events` table for watchers until compacted; compaction gives
the pages back to the file system (auto_vacuum=INCREMENTAL, then a WAL checkpoint that
truncates). Agents' status reports live in a `status` table of their
own: one row per node, no revision, no event. One server process owns the file; several
servers share an etcd cluster instead.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bulkhead.selector import Selector
from bulkhead.store.base import (
    AUDIT_MAX_CHANGES,
    Audit,
    BeforeUndo,
    CommitTimes,
    Document,
    Event,
    EventType,
    FutureRevision,
    MissingReference,
    NotFound,
    Op,
    StillReferenced,
    StoreChanged,
    Stored,
    TooLarge,
    TooOld,
    TxResult,
    Unavailable,
    audit_matches,
    change_of,
    check_expectation,
    stamp,
    take_entry,
)

MAX_OPS = 10_000      # operations in one transaction: the write lock is held meanwhile
MAX_GROUP_OPS = MAX_OPS   # operations in one group commit (a bigger transaction goes alone)
FEED_REVISIONS = 1_024    # revisions of this process's writes kept in memory for watchers
FEED_EVENTS = 10_000      # and events at most (bulk writes): older revisions are read back
WATCH_BATCH = 1_000   # events read at a time by a watch, rounded up to a whole revision
STATUS_KIND = "AgentStatus"  # kept in `resources` by earlier versions; moved on open

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
CREATE TABLE IF NOT EXISTS status (node TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (revision INTEGER PRIMARY KEY, doc TEXT NOT NULL);
"""

MIGRATE_STATUS = """
BEGIN IMMEDIATE;
INSERT OR REPLACE INTO status SELECT name, doc FROM resources WHERE kind = 'AgentStatus';
DELETE FROM resources WHERE kind = 'AgentStatus';
DELETE FROM events WHERE kind = 'AgentStatus';
COMMIT;
"""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Pending:
    """A transaction for a group commit, and its caller's future."""
    ops: list[Op]
    audit: Audit | None
    done: asyncio.Future[TxResult]
    since: int | None = None    # unchanged_since: the revision the store must still be at


Outcome = tuple[TxResult, list[Event]] | Exception   # a transaction's, in a group commit


def failed(e: sqlite3.Error) -> Unavailable:
    """The datastore's answer to a failure of the file (a full disk, a lock held by
    another process, an I/O error): 503 to a client, a retry to the server's tasks."""
    return Unavailable(f"the SQLite datastore failed: {e}")


def rollback(db: sqlite3.Connection) -> None:
    """Undo the transaction under way, if any: a COMMIT that failed (a full disk) has
    undone it already, and a second ROLLBACK's error would hide the first one."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):   # the caller raises the first error
            db.execute("ROLLBACK")


def newest_old_format(db: sqlite3.Connection) -> int:
    """The newest revision with a change written before events kept what they replaced
    (an older server's)."""
    row = db.execute("SELECT MAX(revision) FROM events WHERE type = 'MODIFIED' AND "
                     "prev IS NULL").fetchone()
    return int(row[0] or 0)


@contextlib.contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction (BEGIN IMMEDIATE to COMMIT), undone on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise


class SQLiteStore:
    max_ops = MAX_OPS

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except (sqlite3.Error, OSError) as e:   # a full disk, a lock held, a permission
            raise Unavailable(f"the SQLite datastore {self.path} cannot be opened: {e}"
                              ) from None
        self._lock = threading.Lock()
        self._changed: asyncio.Condition | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._committing = False   # a commit under way: transactions wait for the next
        # This process's committed events by revision, contiguous (see _feed_after).
        self._feed: collections.deque[tuple[int, list[Event]]] = collections.deque(
            maxlen=FEED_REVISIONS)
        self._feed_lock = threading.Lock()
        self._feed_events = 0
        self._compacted_here = 0
        self._lone: set[asyncio.Task[None]] = set()
        self.commits = CommitTimes()
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="bulkhead-sqlite")
        self._thread_closed = False

    def _open(self) -> sqlite3.Connection:
        """The file's connection: WAL, every commit durable, the schema made or brought
        up to date (an older server's file)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            if db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                # INCREMENTAL, so compaction can give pages back. A new file takes it as
                # it is; a file from an earlier version needs one VACUUM to switch.
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                if db.execute("PRAGMA page_count").fetchone()[0] > 0:
                    db.execute("VACUUM")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
            if "prev" not in columns:  # the document an event replaced: to undo it
                db.execute("ALTER TABLE events ADD COLUMN prev TEXT")
            if db.execute("SELECT 1 FROM resources WHERE kind = ? LIMIT 1",
                          (STATUS_KIND,)).fetchone():
                db.executescript(MIGRATE_STATUS)
        except BaseException:
            db.close()
            raise
        return db

    # -- plumbing ---------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` with the connection, in the store's own thread. One thread for all
        of them (they take the connection in turn anyway): a commit never waits for a
        worker of the loop's shared pool busy with other work, and runs where the last
        one did, its memory still in the CPU's caches."""
        def locked() -> Any:
            with self._lock:
                return fn(*args)
        if self._thread_closed:   # after close(): an answer, not a crash
            raise Unavailable("the SQLite datastore is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, locked)
        except sqlite3.Error as e:
            raise failed(e) from e

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    # -- reads ------------------------------------------------------------------------
    async def get(self, kind: str, name: str) -> Stored:
        def read() -> Any:
            return self._db.execute("SELECT revision, doc FROM resources WHERE kind = ? "
                                    "AND name = ?", (kind, name)).fetchone()
        # One row by its key: read here, on the event loop, when the connection is free
        # (tens of microseconds; a reader in WAL mode does not wait for writers), which
        # spares two thread switches; in a worker thread while a commit holds it.
        if self._lock.acquire(blocking=False):
            try:
                row = read()
            except sqlite3.Error as e:
                raise failed(e) from e
            finally:
                self._lock.release()
        else:
            row = await self._run(read)
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
    def check_size(self, ops: Sequence[Op], audited: bool = False,
                   unchanged: bool = False) -> None:
        if len(ops) > self.max_ops:
            raise TooLarge(f"{len(ops)} writes in one transaction; the SQLite datastore "
                           f"takes at most {self.max_ops}: split it into smaller ones",
                           len(ops), self.max_ops)

    def _check_references(self, ops: Sequence[Op]) -> None:
        """At commit time, inside the transaction: what puts require exists, and nothing
        refers to what deletes want unreferenced."""
        db = self._db
        for op in ops:
            if op.action == "put":
                for kind, name in op.requires:
                    if db.execute("SELECT 1 FROM resources WHERE kind = ? AND name = ?",
                                  (kind, name)).fetchone() is None:
                        raise MissingReference(op.kind, op.name, kind, name)
            elif op.unreferenced is not None:
                kinds = op.unreferenced.kinds
                rows = db.execute(f"SELECT kind, name, doc FROM resources WHERE kind IN "
                                  f"({', '.join('?' * len(kinds))}) ORDER BY kind, name",
                                  kinds).fetchall()
                referrers = [(k, n) for k, n, d in rows
                             if op.unreferenced.refers(k, json.loads(d), op.name)]
                if referrers:
                    raise StillReferenced(op.kind, op.name, referrers)

    def _apply_one(self, ops: Sequence[Op], audit: Audit | None, revision: int
                   ) -> tuple[TxResult, list[Event]]:
        """`ops` at `revision`, inside the open SQLite transaction (the caller commits or
        rolls back); what it stored and the events it makes."""
        db = self._db
        result = TxResult(revision)
        events: list[Event] = []
        for seq, op in enumerate(ops):
            row = db.execute("SELECT revision, doc FROM resources WHERE kind = ? AND "
                             "name = ?", (op.kind, op.name)).fetchone()
            check_expectation(op, None if row is None else row[0])
            old = json.loads(row[1]) if row else None
            prev = row[1] if row else None
            kind_of_event: EventType
            if op.action == "delete":
                assert old is not None and prev is not None
                db.execute("DELETE FROM resources WHERE kind = ? AND name = ?",
                           (op.kind, op.name))
                doc, text, kind_of_event = old, prev, "DELETED"
            else:
                assert op.doc is not None
                meta = (old or {}).get("metadata", {})
                doc = stamp(op.doc, revision, meta.get("uid") or str(uuid.uuid4()),
                            meta.get("creationTimestamp") or _now())
                text = json.dumps(doc)
                db.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?)",
                           (op.kind, op.name, revision, text))
                kind_of_event = "MODIFIED" if old else "ADDED"
            db.execute("INSERT INTO events (revision, seq, type, kind, name, doc, prev) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (revision, seq, kind_of_event, op.kind, op.name, text, prev))
            result.stored.append(Stored(op.kind, op.name, revision, doc, text))
            result.changes.append(change_of(kind_of_event, op))
            # The watchers' copy, apart from the caller's.
            events.append(Event(kind_of_event, op.kind, op.name, revision, json.loads(text),
                                text))
        self._check_references(ops)
        if audit is not None:
            db.execute("INSERT INTO audit VALUES (?, ?)", (revision, json.dumps(
                audit.entry(revision, result.changes))))
        return result, events

    def _apply_group(self, group: list[_Pending]) -> list[Outcome]:
        """Every transaction of `group`, in order, in one SQLite transaction, a revision
        for each that applies; one that raises is undone alone (a savepoint each, when
        there are several) and its outcome is the exception. Returns once the commit is
        durable; raises (nothing written) if the SQLite transaction itself fails."""
        db = self._db
        several = len(group) > 1
        started = time.perf_counter()
        try:
            db.execute("BEGIN IMMEDIATE")
            revision = self._meta("revision")
            outcomes: list[Outcome] = []
            for pending in group:
                if several:
                    db.execute("SAVEPOINT tx")
                try:
                    if pending.since is not None and revision > pending.since:
                        raise StoreChanged(pending.since)
                    outcome = self._apply_one(pending.ops, pending.audit, revision + 1)
                except sqlite3.Error:
                    raise                      # the database's failure: the whole group's
                except Exception as e:         # this transaction's own: undo it alone
                    if not several:
                        db.execute("ROLLBACK")
                        return [e]
                    db.execute("ROLLBACK TO tx")
                    db.execute("RELEASE tx")
                    outcomes.append(e)
                    continue
                if several:
                    db.execute("RELEASE tx")
                revision += 1
                outcomes.append(outcome)
            db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
            db.execute("COMMIT")
        except BaseException as e:
            if isinstance(e, sqlite3.Error):
                self.commits.failures += 1
            rollback(db)
            raise
        self.commits.add(time.perf_counter() - started)
        self._to_feed([o[1] for o in outcomes if not isinstance(o, Exception)])
        return outcomes

    async def transaction(self, ops: Sequence[Op], audit: Audit | None = None, *,
                          unchanged_since: int | None = None) -> TxResult:
        if not ops:
            return TxResult(await self.revision())
        self.check_size(ops)
        loop = asyncio.get_running_loop()
        if self._committing:   # a commit is under way: this one goes in the next
            done: asyncio.Future[TxResult] = loop.create_future()
            self._pending.append(_Pending(list(ops), audit, done, unchanged_since))
            return await done
        # None under way: commit it at once (what comes meanwhile waits), in a task of its
        # own: a caller cancelled (its client gone) while the commit runs cancels only its
        # future, never the commit, the watchers' wake-up or the hand-over to the next
        # group. The caller is answered before the watchers are woken, so its answer
        # leaves before they do their work.
        self._committing = True
        done = loop.create_future()
        commit = loop.create_task(self._commit_lone(loop, _Pending(list(ops), audit, done,
                                                                   unchanged_since)))
        self._lone.add(commit)                   # held until done (the loop holds tasks
        commit.add_done_callback(self._lone.discard)   # weakly)
        return await done

    async def _commit_lone(self, loop: asyncio.AbstractEventLoop, pending: _Pending
                           ) -> None:
        try:
            await self._commit_group([pending])
        finally:
            self._commit_next(loop)

    def _commit_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a commit: the next group, if any, in a task of its own (so a caller that
        is cancelled, its client gone, does not stop the commits of the others)."""
        if self._pending:
            loop.create_task(self._commit_pending())
        else:
            self._committing = False

    async def _commit_group(self, group: list[_Pending]) -> list[Outcome]:
        """Commit `group`, answer its callers' futures, wake the watchers."""
        try:
            outcomes: list[Outcome] = await self._run(self._apply_group, group)
        except Exception as e:   # the commit failed: nothing of the group is written
            cause = e.__cause__ if isinstance(e, Unavailable) else e
            outcomes = [Unavailable(f"the SQLite datastore could not commit ({cause}); "
                                    "nothing was written, try again")
                        if isinstance(cause, sqlite3.Error) else e for _ in group]
        except BaseException:    # cancelled
            for pending in group:
                pending.done.cancel()
            raise
        for pending, outcome in zip(group, outcomes, strict=True):
            if pending.done.done():
                continue
            if isinstance(outcome, Exception):
                pending.done.set_exception(outcome)
            else:
                pending.done.set_result(outcome[0])
        if any(not isinstance(o, Exception) for o in outcomes):
            cond = self._condition()
            async with cond:
                cond.notify_all()
        return outcomes

    async def _commit_pending(self) -> None:
        """Commit what is pending, a group at a time: what arrives during a commit goes
        in the next one."""
        loop = asyncio.get_running_loop()
        try:
            group: list[_Pending] = []
            size = 0
            while self._pending and (not group or size + len(self._pending[0].ops)
                                     <= MAX_GROUP_OPS):
                pending = self._pending.popleft()
                if pending.done.cancelled():
                    continue   # its caller left before it began
                group.append(pending)
                size += len(pending.ops)
            if group:
                await self._commit_group(group)
        except BaseException:
            for pending in self._pending:   # cancelled: the loop is stopping
                if not pending.done.done():
                    pending.done.set_exception(Unavailable("the datastore is closing"))
            self._pending.clear()
            self._committing = False
            raise
        self._commit_next(loop)

    # -- this process's events, from memory --------------------------------------------
    def _to_feed(self, revisions: list[list[Event]]) -> None:
        """Called with the write lock held, right after the commit: revisions in order."""
        with self._feed_lock:
            for events in revisions:
                revision = events[0].revision
                if self._feed and self._feed[-1][0] != revision - 1:
                    self._feed.clear()   # another process wrote in between: start again
                    self._feed_events = 0
                if len(self._feed) == FEED_REVISIONS:
                    self._feed_events -= len(self._feed[0][1])   # the append drops it
                self._feed.append((revision, events))
                self._feed_events += len(events)
                # Bounded by events too: a few bulk writes of 10,000 objects would
                # otherwise keep gigabytes of parsed documents alive.
                while self._feed_events > FEED_EVENTS and len(self._feed) > 1:
                    self._feed_events -= len(self._feed.popleft()[1])

    def _feed_after(self, after: int) -> list[Event] | None:
        """This process's events after `after`, when memory has every one of them up to
        its last own write (another process's later writes are found by the watch's
        periodic read); None when it does not reach back to `after`."""
        with self._feed_lock:
            if not self._feed or after < self._compacted_here:
                return None
            first, last = self._feed[0][0], self._feed[-1][0]
            if not first <= after + 1 <= last + 1:
                return None
            newer: list[list[Event]] = []
            for revision, events in reversed(self._feed):   # the newest few, not them all
                if revision <= after:
                    break
                newer.append(events)
        return [e for events in reversed(newer) for e in events]

    async def bump_revision(self, by: int) -> int:
        """Raise the revision by `by` and mark the whole history compacted up to it (a
        file restored from a backup, the server stopped): every agent then holds a
        revision at or below the compaction point and takes a snapshot, instead of
        resuming at a revision number the restored file hands out again for other
        changes. The audit entries stay. The new revision."""
        if by < 1:
            raise ValueError(f"bump the revision by at least 1, not {by}")

        def run() -> int:
            with immediate(self._db):
                revision = self._meta("revision") + by
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'revision'",
                                 (revision,))
                self._db.execute("DELETE FROM events")
                self._db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'",
                                 (revision,))
            self._compacted_here = revision
            return revision
        bumped: int = await self._run(run)
        return bumped

    async def compact(self, keep_after: int) -> None:
        def run() -> None:
            with immediate(self._db):
                current = self._meta("compacted")
                if keep_after > current:
                    self._db.execute("DELETE FROM events WHERE revision <= ?", (keep_after,))
                    self._db.execute("DELETE FROM audit WHERE revision <= ?", (keep_after,))
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'",
                                     (keep_after,))
            if keep_after > current:   # only once it is durable (the feed reads it)
                self._compacted_here = keep_after
            # Give the freed pages back: to the file, then the WAL's to the file system.
            # (executescript steps the pragma to the end; execute frees one page a call)
            self._db.executescript("PRAGMA incremental_vacuum;")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        await self._run(run)

    # -- the past ---------------------------------------------------------------------
    def _at(self, revision: int) -> list[Stored]:
        db = self._db
        db.execute("BEGIN")
        try:
            compacted, current = self._meta("compacted"), self._meta("revision")
            if revision < compacted:
                raise TooOld(revision, compacted)
            if revision > current:
                raise FutureRevision(revision, current)
            rows = db.execute("SELECT kind, name, revision, doc FROM resources").fetchall()
            undo = db.execute("SELECT type, kind, name, doc, prev FROM events WHERE "
                              "revision > ? ORDER BY revision DESC, seq DESC",
                              (revision,)).fetchall()
        finally:
            db.execute("COMMIT")
        state = {(k, n): json.loads(d) for k, n, _, d in rows}
        for etype, kind, name, doc, prev in undo:   # newest first, back to `revision`
            if etype == "ADDED":
                state.pop((kind, name), None)
            elif etype == "DELETED":
                state[(kind, name)] = json.loads(doc)
            elif prev is None:   # written before events kept what they replaced
                raise BeforeUndo(revision, newest_old_format(db))
            else:
                state[(kind, name)] = json.loads(prev)
        return [Stored(k, n, int(d.get("metadata", {}).get("resourceVersion") or 0), d)
                for (k, n), d in sorted(state.items())]

    async def list_at(self, revision: int) -> list[Stored]:
        items: list[Stored] = await self._run(self._at, revision)
        return items

    async def audit_log(self, limit: int, kind: str | None = None, name: str | None = None,
                        max_changes: int = AUDIT_MAX_CHANGES) -> tuple[list[Document], bool]:
        def read() -> tuple[list[Document], bool]:
            out: list[Document] = []
            changes = 0
            for (text,) in self._db.execute("SELECT doc FROM audit ORDER BY revision DESC"):
                entry = json.loads(text)
                if audit_matches(entry, kind, name):
                    changes = take_entry(out, entry, changes, max_changes)
                    if changes < 0:
                        return out, True
                    if len(out) >= limit:
                        break
            return out, False
        found: tuple[list[Document], bool] = await self._run(read)
        return found

    # -- agents' status ---------------------------------------------------------------
    async def put_status(self, node: str, doc: Document) -> None:
        def run() -> None:
            self._db.execute("INSERT OR REPLACE INTO status VALUES (?, ?)",
                             (node, json.dumps(doc)))
        await self._run(run)

    async def delete_status(self, node: str) -> bool:
        def run() -> bool:
            return self._db.execute("DELETE FROM status WHERE node = ?", (node,)).rowcount > 0
        deleted: bool = await self._run(run)
        return deleted

    async def list_status(self) -> tuple[dict[str, Document], int]:
        def read() -> tuple[list[Any], int]:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute("SELECT node, doc FROM status ORDER BY node").fetchall()
                return rows, self._meta("revision")
            finally:
                self._db.execute("COMMIT")

        rows, revision = await self._run(read)
        return {node: json.loads(doc) for node, doc in rows}, revision

    # -- watch ------------------------------------------------------------------------
    def _events_after(self, after: int, until: int | None = None) -> list[Event]:
        """Events after `after`: about WATCH_BATCH of them (all up to `until` if given),
        and always whole revisions: a watcher moves past a revision only once it has
        every event of it."""
        db = self._db
        db.execute("BEGIN")
        try:
            compacted = self._meta("compacted")
            if after < compacted:
                raise TooOld(after, compacted)
            if until is None:
                row = db.execute("SELECT revision FROM events WHERE revision > ? ORDER BY "
                                 "revision, seq LIMIT 1 OFFSET ?",
                                 (after, WATCH_BATCH - 1)).fetchone()
                until = self._meta("revision") if row is None else int(row[0])
            rows = db.execute("SELECT revision, type, kind, name, doc FROM events WHERE "
                              "revision > ? AND revision <= ? ORDER BY revision, seq",
                              (after, until)).fetchall()
        finally:
            db.execute("COMMIT")
        return [Event(t, k, n, r, json.loads(d), d) for r, t, k, n, d in rows]

    async def history(self, after: int, until: int) -> list[Event]:
        if until <= after:
            return []
        events: list[Event] = await self._run(self._events_after, after, until)
        return events

    async def watch(self, after: int) -> AsyncIterator[Event]:
        cond = self._condition()
        read = True   # from the file: at first, and when memory cannot tell
        while True:
            async with cond:
                events = None if read else self._feed_after(after)
                if events is None:
                    events = await self._run(self._events_after, after)
                read = False
                if not events:
                    # Woken by every local write (its events are in memory); the timeout
                    # reads the file, for writes made by another process on it (tests,
                    # `bulkhead` offline).
                    try:
                        async with asyncio.timeout(1.0):   # no task of its own, as
                            await cond.wait()              # wait_for would make
                    except TimeoutError:
                        read = True
                    continue
            for event in events:
                yield event
                after = event.revision

    async def close(self) -> None:
        if self._thread_closed:
            return
        for _ in range(1000):   # let commits under way finish (at most about 10 s)
            if not self._committing:
                break
            await asyncio.sleep(0.01)
        try:
            await self._run(self._db.close)
        finally:
            self._thread_closed = True
            self._thread.shutdown(wait=False)
