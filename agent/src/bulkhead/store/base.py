"""The datastore interface every backend implements, and the errors callers act on.

A store holds resources as JSON documents keyed by (kind, name). Every write gets a new
revision from one monotonically increasing counter; a resource's `resourceVersion` is the
revision that last wrote it. `watch(R)` yields the changes after revision R, or raises
`TooOld` when the store no longer holds them (the caller then re-lists: a snapshot).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from bulkhead.selector import Selector

Document = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED"]


class StoreError(Exception):
    """Base of the errors a store raises."""


class NotFound(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name} not found")


class Conflict(StoreError):
    """The write lost a race: the resource exists already, or changed since it was read."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind, self.name, self.reason = kind, name, reason
        super().__init__(f"{kind} {name}: {reason}")


class StoreChanged(Conflict):
    """A transaction made on a reading of the whole store (`unchanged_since`) found a
    resource written after that reading: nothing is written."""

    def __init__(self, since: int) -> None:
        self.kind, self.name, self.since = "", "", since
        self.reason = f"a resource was written after revision {since}, which this was read at"
        StoreError.__init__(self, f"the store changed: {self.reason}")


class TooOld(StoreError):
    """The requested revision is older than the history the store keeps: resync."""

    def __init__(self, revision: int, oldest: int, message: str | None = None) -> None:
        self.revision, self.oldest = revision, oldest
        super().__init__(message or f"revision {revision} is too old (history starts "
                         f"after {oldest}); list again")


class BeforeUndo(TooOld):
    """The state at `revision` cannot be rebuilt: the history back to it holds changes an
    older server wrote without keeping what they replaced (up to revision `oldest`)."""

    def __init__(self, revision: int, oldest: int) -> None:
        super().__init__(revision, oldest, f"revision {revision}: the changes up to revision "
                         f"{oldest} were written by an older server, which did not keep what "
                         f"they replaced; the state at revision {oldest} or later can be "
                         "rebuilt")


class FutureRevision(StoreError):
    """The requested revision is newer than the store's current one."""

    def __init__(self, revision: int, current: int) -> None:
        self.revision, self.current = revision, current
        super().__init__(f"revision {revision} is in the future (the store is at {current})")


class Unavailable(StoreError):
    """The backend cannot be reached or failed; nothing was written."""


class TooLarge(StoreError):
    """The transaction is bigger than the backend takes in one atomic commit; nothing was
    written. `limit` is the most operations one transaction may hold there."""

    def __init__(self, message: str, operations: int = 0, limit: int = 0) -> None:
        self.operations, self.limit = operations, limit
        super().__init__(message)


class MissingReference(StoreError):
    """`kind`/`name` requires `ref_kind`/`ref_name`, which does not exist at commit time."""

    def __init__(self, kind: str, name: str, ref_kind: str, ref_name: str) -> None:
        self.kind, self.name, self.ref_kind, self.ref_name = kind, name, ref_kind, ref_name
        super().__init__(f"{kind} {name} requires {ref_kind} {ref_name}, which does not exist")


class StillReferenced(StoreError):
    """A delete refused because resources still refer to what it deletes."""

    def __init__(self, kind: str, name: str, referrers: list[tuple[str, str]]) -> None:
        self.kind, self.name, self.referrers = kind, name, referrers
        super().__init__(f"{kind} {name} is still referred to by "
                         + ", ".join(f"{k} {n}" for k, n in referrers[:10]))


@dataclass(frozen=True)
class Stored:
    """A resource as the store holds it; `doc` carries metadata.resourceVersion etc."""

    kind: str
    name: str
    revision: int           # the revision that last wrote it (its resourceVersion)
    doc: Document
    # `doc` as the store wrote it (`json.dumps` with its defaults), when the store has it
    # at hand: an answer can send it as it is. Not part of the value.
    text: str | None = field(default=None, compare=False, repr=False)

    @property
    def labels(self) -> Mapping[str, str]:
        labels = self.doc.get("metadata", {}).get("labels") or {}
        return labels if isinstance(labels, dict) else {}


@dataclass(frozen=True)
class Event:
    type: EventType
    kind: str
    name: str
    revision: int
    doc: Document           # the new document, or the last one for DELETED
    text: str | None = field(default=None, compare=False, repr=False)   # as in Stored


@dataclass(frozen=True)
class Referrers:
    """Who may refer to a resource: documents of `kinds` whose field at `path` holds the
    resource's name (policies refer to their tier by `spec.tier`)."""

    kinds: tuple[str, ...]
    path: tuple[str, ...]

    def refers(self, kind: str, doc: Mapping[str, Any], name: str) -> bool:
        if kind not in self.kinds:
            return False
        value: Any = doc
        for part in self.path:
            value = value.get(part) if isinstance(value, Mapping) else None
        return bool(value == name)


@dataclass(frozen=True)
class Op:
    """One write in a transaction.

    `put` with `expect=None` writes unconditionally; `expect="absent"` only creates;
    `expect="present"` only replaces; `expect="<resourceVersion>"` only replaces that
    version. `delete` needs the resource to exist, and may carry a version to expect.

    References are checked when the transaction commits, inside it, so no concurrent
    writer slips between the check and the write: a `put` with `requires` fails with
    MissingReference unless every (kind, name) there exists then (or is put by the same
    transaction); a `delete` with `unreferenced` fails with StillReferenced while any
    resource those Referrers describe names the deleted one.
    """

    action: Literal["put", "delete"]
    kind: str
    name: str
    doc: Document | None = None
    expect: str | None = None
    requires: tuple[tuple[str, str], ...] = ()
    unreferenced: Referrers | None = None


@dataclass
class TxResult:
    revision: int
    stored: list[Stored] = field(default_factory=list)   # one per op; DELETED: the old one
    changes: list[dict[str, str]] = field(default_factory=list)  # kind, name, action


def change_of(event_type: EventType, op: Op) -> dict[str, str]:
    """What a write did, as the audit trail says it: created, configured or deleted."""
    action = {"ADDED": "created", "MODIFIED": "configured", "DELETED": "deleted"}[event_type]
    return {"kind": op.kind, "name": op.name, "action": action}


@dataclass
class CommitTimes:
    """How long the datastore's commits took (a SQLite transaction from BEGIN to its
    durable COMMIT, an etcd txn that succeeded): for the server's metrics and the
    benchmarks. A group of transactions committed together counts once; a write refused
    before the commit (its expectation, a reference) does not count, and one the
    datastore failed to commit counts in `failures`."""

    count: int = 0
    seconds: float = 0.0
    failures: int = 0     # commits the datastore did not take (an error, not a refusal)

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.count += 1


@dataclass(frozen=True)
class Audit:
    """Who writes, and by which request (`operation`: apply, create, replace, delete,
    sync, rollback, promote): kept with the revision the write makes, in the same
    transaction."""

    who: str
    role: str
    operation: str = ""

    def entry(self, revision: int, changes: list[dict[str, str]]) -> Document:
        entry: Document = {"revision": revision,
                           "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "who": self.who, "role": self.role}
        if self.operation:
            entry["operation"] = self.operation
        entry["changes"] = changes
        return entry


# Changes one read of the audit trail gives at most (a transaction holds up to 10,000, so
# a thousand entries could hold ten million): about 10 MB of JSON.
AUDIT_MAX_CHANGES = 100_000


def take_entry(out: list[Document], entry: Document, changes: int, max_changes: int) -> int:
    """Add `entry` to `out` unless its changes would pass `max_changes` (counted in
    `changes`, the total so far; the first entry always goes): the new total, or -1 for
    an entry left out."""
    size = len(entry.get("changes") or [])
    if out and changes + size > max_changes:
        return -1
    out.append(entry)
    return changes + size


def audit_matches(entry: Mapping[str, Any], kind: str | None, name: str | None) -> bool:
    """Whether an audit entry changed a resource of `kind` (named `name`)."""
    if kind is None and name is None:
        return True
    return any((kind is None or c.get("kind") == kind) and (name is None or c.get("name") == name)
               for c in entry.get("changes") or [])


def doc_key(doc: Mapping[str, Any]) -> tuple[str, str]:
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or not isinstance(name, str) or not kind or not name:
        raise ValueError("a stored document needs kind and metadata.name")
    return kind, name


def stamp(doc: Mapping[str, Any], revision: int, uid: str, created: str) -> Document:
    """A copy of the document with the metadata the store owns filled in."""
    out = copy.deepcopy(dict(doc))
    meta = dict(out.get("metadata") or {})
    meta["resourceVersion"] = str(revision)
    meta["uid"] = uid
    meta["creationTimestamp"] = created
    out["metadata"] = meta
    return out


class Datastore(Protocol):
    """What the server needs of a backend. All methods but `check_size` are coroutines."""

    max_ops: int
    """The most operations one transaction may hold (see `check_size`)."""

    commits: CommitTimes
    """The commits this process made, and how long they took."""

    def check_size(self, ops: Sequence[Op], audited: bool = False,
                   unchanged: bool = False) -> None:
        """Raise TooLarge when `ops` cannot commit as one transaction here (with an audit
        entry when `audited`, on an unchanged store when `unchanged`)."""

    async def get(self, kind: str, name: str) -> Stored:
        """The resource, or NotFound."""

    async def list_resources(self, kind: str | None = None, selector: Selector | None = None
                   ) -> tuple[list[Stored], int]:
        """Resources (of a kind, matching a label selector) and the revision they are at."""

    async def transaction(self, ops: Sequence[Op], audit: Audit | None = None, *,
                          unchanged_since: int | None = None) -> TxResult:
        """Every op or none, under one new revision. Conflict/NotFound leave no trace.
        With `audit`, who wrote what is kept with the revision (see `audit_log`). With
        `unchanged_since` (a revision `list_resources` answered), StoreChanged unless no
        resource was written (put or deleted) after it: a write planned from a reading of
        the whole store (a rollback) commits on that reading or not at all."""

    async def revision(self) -> int:
        """The current revision."""

    def watch(self, after: int) -> AsyncIterator[Event]:
        """Events with revision > `after`, in order, then new ones as they come; TooOld
        if `after` is older than the kept history."""

    async def history(self, after: int, until: int) -> list[Event]:
        """The kept events with `after` < revision <= `until`, in order; TooOld if `after`
        is older than the kept history. (For a server that starts: its watchers resume.)"""

    async def compact(self, keep_after: int) -> None:
        """Forget the history at and before `keep_after` (watches from there get TooOld),
        and give the space back."""

    async def list_at(self, revision: int) -> list[Stored]:
        """Every resource as it was at `revision`; TooOld if the kept history does not
        reach back there, FutureRevision past the current one."""

    async def audit_log(self, limit: int, kind: str | None = None, name: str | None = None,
                        max_changes: int = AUDIT_MAX_CHANGES) -> tuple[list[Document], bool]:
        """The newest `limit` audit entries (of writes to `kind`/`name`), newest first:
        revision, time, who, role, operation, changes. Kept as long as the history. The
        entries hold at most `max_changes` changes in all (but the first entry, whole),
        and the flag says entries were left out for it."""

    async def put_status(self, node: str, doc: Document) -> None:
        """Keep an agent's status report, outside the resources: no revision, no event,
        no history kept beyond the last report of each node."""

    async def list_status(self) -> tuple[dict[str, Document], int]:
        """Every node's last status report, and the current revision."""

    async def delete_status(self, node: str) -> bool:
        """Forget a node's last status report (a host gone, or down for a while: it no
        longer counts among the agents waited for; its next report brings it back).
        Whether there was one."""

    async def close(self) -> None: ...


async def create(store: Datastore, doc: Document) -> Stored:
    kind, name = doc_key(doc)
    return (await store.transaction([Op("put", kind, name, doc, expect="absent")])).stored[0]


async def update(store: Datastore, doc: Document, resource_version: str | None = None
                 ) -> Stored:
    """Replace; with `resource_version`, only if it is still that version."""
    kind, name = doc_key(doc)
    op = Op("put", kind, name, doc, expect=resource_version or "present")
    return (await store.transaction([op])).stored[0]


async def delete(store: Datastore, kind: str, name: str, resource_version: str | None = None
                 ) -> Stored:
    op = Op("delete", kind, name, expect=resource_version)
    return (await store.transaction([op])).stored[0]


def check_expectation(op: Op, current_revision: int | None) -> None:
    """Raise NotFound or Conflict when `op` must not apply to the current state."""
    exists = current_revision is not None
    if op.expect == "absent":
        if exists:
            raise Conflict(op.kind, op.name, "already exists")
        return
    if (op.action == "delete" or op.expect is not None) and not exists:
        raise NotFound(op.kind, op.name)
    if op.expect not in (None, "absent", "present") and str(current_revision) != op.expect:
        raise Conflict(op.kind, op.name, f"resourceVersion is {current_revision}, not "
                       f"{op.expect}: it changed since it was read")
