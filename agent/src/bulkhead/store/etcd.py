"""The HA datastore: etcd v3 through its JSON gateway (`/v3/...`), which etcd 3.4 serves.

Keys are `<prefix><kind>/<name>`; a resource's resourceVersion is its key's mod_revision,
so revisions and watch come from etcd itself and several bulkhead-servers sharing one
cluster stay consistent. A transaction reads the keys it touches, checks the caller's
expectations, then commits with a compare on exactly what it read: if another writer got
in between, it reads again and retries, so expectations hold at commit time.

Beside the watched range `<prefix>` (say `/bulkhead/`), three kinds of keys that agents
never watch: `/bulkhead!status/<node>` (agents' status reports), `/bulkhead!refs/<kind>/
<name>` (bumped by every write that requires that resource, so a delete that wants it
unreferenced notices a concurrent referrer by the key's mod_revision) and
`/bulkhead.history` (a marker written to know where a replay of the history ends).
One transaction holds at most `max_txn_ops` compares and as many writes (etcd's
`--max-txn-ops`, 128 by default); a bigger one is refused whole with TooLarge.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bulkhead.selector import Selector
from bulkhead.store.base import (
    AUDIT_MAX_CHANGES,
    Audit,
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

RETRIES = 20
LEGACY_STATUS_KIND = "AgentStatus"  # earlier versions kept status reports as resources
TOO_LARGE = ("too many operations in txn request", "request is too large")


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes end in "/", never 0xff
    return _b64(bytes(raw))


class EtcdStore:
    def __init__(self, endpoints: Sequence[str], prefix: str = "/bulkhead/",
                 timeout: float = 10.0, ssl: Any = None, max_txn_ops: int = 128) -> None:
        if not endpoints:
            raise ValueError("etcd: no endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        base = self.prefix.rstrip("/")
        self._status_prefix = base + "!status/"
        self._refs_prefix = base + "!refs/"
        self._audit_prefix = base + "!audit/"  # one key per write, its revision the key's
        self._marker = base + ".history"   # sorts just before the prefix
        self.max_ops = max_txn_ops
        self.audit_page = 256   # audit entries per read of the trail, newest first
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None
        self._current = 0  # index of the endpoint that answered last
        self.commits = CommitTimes()

    # -- HTTP -------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else
                                               True))
        return self._session

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                async with self._http().post(endpoint + path, json=body,
                                             timeout=self._timeout) as resp:
                    data: dict[str, Any] = await resp.json(content_type=None)
                    if resp.status != 200:
                        why = str(data.get("message") or data.get("error"))
                        if any(text in why for text in TOO_LARGE):
                            raise TooLarge(
                                f"etcd refused the transaction as too large ({why}); "
                                "nothing was written: split it into smaller ones, or raise "
                                "etcd's --max-txn-ops / --max-request-bytes on every member "
                                "(and set ?max-txn-ops=N in the datastore URL)")
                        raise Unavailable(f"etcd {endpoint}{path}: HTTP {resp.status}: "
                                          f"{why}")
                    self._current = (self._current + i) % len(self.endpoints)
                    return data
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
                errors.append(f"{endpoint}: {e or type(e).__name__}")
        raise Unavailable("etcd unreachable: " + "; ".join(errors))

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}/{name}"

    def _split(self, key: bytes) -> tuple[str, str]:
        kind, _, name = key.decode()[len(self.prefix):].partition("/")
        return kind, name

    def _stored(self, kv: dict[str, Any]) -> Stored:
        kind, name = self._split(_unb64(kv["key"]))
        revision = int(kv["mod_revision"])
        doc = json.loads(_unb64(kv["value"]))
        doc.setdefault("metadata", {})["resourceVersion"] = str(revision)
        return Stored(kind, name, revision, doc)

    # -- reads ------------------------------------------------------------------------
    async def get(self, kind: str, name: str) -> Stored:
        data = await self._call("/v3/kv/range", {"key": _b64(self._key(kind, name))})
        kvs = data.get("kvs") or []
        if not kvs:
            raise NotFound(kind, name)
        return self._stored(kvs[0])

    async def list_resources(self, kind: str | None = None, selector: Selector | None = None
                   ) -> tuple[list[Stored], int]:
        prefix = self.prefix if kind is None else f"{self.prefix}{kind}/"
        data = await self._call("/v3/kv/range", {"key": _b64(prefix),
                                                 "range_end": _prefix_end(prefix)})
        items = [self._stored(kv) for kv in data.get("kvs") or []
                 if self._split(_unb64(kv["key"]))[0] != LEGACY_STATUS_KIND]
        if selector is not None:
            items = [s for s in items if selector.matches(s.labels)]
        return items, int(data["header"]["revision"])

    async def revision(self) -> int:
        data = await self._call("/v3/kv/range", {"key": _b64(self.prefix + "\0revision"),
                                                 "count_only": True})
        return int(data["header"]["revision"])

        # -- writes -----------------------------------------------------------------------
    def _ref_key(self, kind: str, name: str) -> str:
        return f"{self._refs_prefix}{kind}/{name}"

    def _size(self, ops: Sequence[Op], audited: bool, unchanged: bool = False
              ) -> tuple[int, int]:
        """The compares and the writes the commit of `ops` holds (one more write for the
        audit entry when `audited`, two more compares for an unchanged store)."""
        keys = {(op.kind, op.name) for op in ops}
        required = {ref for op in ops if op.action == "put" for ref in op.requires}
        guarded = sum(1 for op in ops if op.action == "delete" and op.unreferenced)
        return (len(ops) + len(required - keys) + guarded + 2 * int(unchanged),
                len(ops) + len(required) + int(audited))

    def check_size(self, ops: Sequence[Op], audited: bool = False,
                   unchanged: bool = False) -> None:
        compares, writes = self._size(ops, audited, unchanged)
        needed = max(compares, writes)
        if needed > self.max_ops:
            extra = needed - len(ops)
            # the larger side's own: the audit entry is a write, the unchanged store two
            # compares
            own = 2 * int(unchanged) if compares > writes else int(audited)
            parts = ["one per resource"]
            if extra - own > 0:
                parts.append(f"{extra - own} for the tiers they refer to")
            if own:
                parts.append("2 to compare the store unchanged" if compares > writes
                             else "1 for the audit entry")
            refs = f" ({', '.join(parts)})"
            raise TooLarge(
                f"{len(ops)} resources need {needed} operations in one etcd transaction"
                f"{refs}; etcd takes at most {self.max_ops} (its --max-txn-ops): split the "
                f"apply into smaller ones of at most {max(1, self.max_ops - extra)} "
                "resources, each all or nothing, or raise --max-txn-ops on every etcd "
                "member and set ?max-txn-ops=N in the datastore URL", needed, self.max_ops)

    async def _changed_since(self, revision: int) -> bool:
        """Whether a resource or an audit entry was written after `revision`. (etcd counts
        a range before its mod-revision filter: the keys themselves, filtered, say it.)"""
        for start in (self.prefix, self._audit_prefix):
            found = await self._call("/v3/kv/range", {
                "key": _b64(start), "range_end": _prefix_end(start), "keys_only": True,
                "min_mod_revision": str(revision + 1)})
            if found.get("kvs"):
                return True
        return False

    async def _read(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The current key-values of `keys` (absent ones left out), read in chunks the
        transaction limit allows; the commit compares every one of them."""
        current: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), self.max_ops):
            read = await self._call("/v3/kv/txn", {"success": [
                {"request_range": {"key": _b64(k)}} for k in keys[start:start + self.max_ops]]})
            for response in read.get("responses") or []:
                for kv in response.get("response_range", {}).get("kvs") or []:
                    current[_unb64(kv["key"]).decode()] = kv
        return current

    async def _referrers(self, op: Op, ops: Sequence[Op]) -> tuple[list[tuple[str, str]], str]:
        """Who refers to what `op` deletes, as this transaction would leave it, and the
        mod_revision of its reference key read at the same revision."""
        assert op.unreferenced is not None
        kinds = op.unreferenced.kinds
        read = await self._call("/v3/kv/txn", {"success": [
            {"request_range": {"key": _b64(self._ref_key(op.kind, op.name))}},
            *({"request_range": {"key": _b64(f"{self.prefix}{k}/"),
                                 "range_end": _prefix_end(f"{self.prefix}{k}/")}}
              for k in kinds)]})
        responses = [r.get("response_range", {}).get("kvs") or []
                     for r in read.get("responses") or []]
        ref_revision = responses[0][0]["mod_revision"] if responses and responses[0] else "0"
        docs: dict[tuple[str, str], Any] = {}
        for kvs in responses[1:]:
            for kv in kvs:
                docs[self._split(_unb64(kv["key"]))] = json.loads(_unb64(kv["value"]))
        for other in ops:   # what this very transaction writes counts too
            if other.kind in kinds:
                if other.action == "delete":
                    docs.pop((other.kind, other.name), None)
                else:
                    docs[(other.kind, other.name)] = other.doc
        referrers = sorted(key for key, doc in docs.items()
                           if op.unreferenced.refers(key[0], doc or {}, op.name))
        return referrers, str(ref_revision)

    async def transaction(self, ops: Sequence[Op], audit: Audit | None = None, *,
                          unchanged_since: int | None = None) -> TxResult:
        if not ops:
            return TxResult(await self.revision())
        self.check_size(ops, audit is not None, unchanged_since is not None)
        # unchanged_since: no resource key, nor audit entry (a delete leaves no key, but
        # its transaction's entry), modified after that revision. Compared over their
        # ranges (status reports, which move etcd's revision too, are elsewhere).
        guards = [] if unchanged_since is None else [
            {"key": _b64(start), "range_end": _prefix_end(start), "target": "MOD",
             "result": "LESS", "mod_revision": str(unchanged_since + 1)}
            for start in (self.prefix, self._audit_prefix)]
        keys = [self._key(op.kind, op.name) for op in ops]
        writes = {(op.kind, op.name): op.action for op in ops}
        required = sorted({ref for op in ops if op.action == "put" for ref in op.requires})
        required_keys = [self._key(k, n) for k, n in required if (k, n) not in writes]
        for _ in range(RETRIES):
            current = await self._read([*keys, *required_keys])
            compares, requests, planned = list(guards), [], []
            # What each write expects of its own key first, then what it refers to, as
            # SQLite checks them: a refused write gets the same answer on either store.
            for op, key in zip(ops, keys, strict=True):
                kv = current.get(key)
                check_expectation(op, int(kv["mod_revision"]) if kv else None)
            for op in ops:
                if op.action == "put":
                    for kind, name in op.requires:
                        there = writes.get((kind, name), "present"
                                           if self._key(kind, name) in current else None)
                        if there != "put" and there != "present":
                            raise MissingReference(op.kind, op.name, kind, name)
            for key in required_keys:   # they must still be there when this commits
                compares.append({"key": _b64(key), "target": "MOD", "result": "EQUAL",
                                 "mod_revision": current[key]["mod_revision"]})
            for kind, name in required:  # tell deletes that want them unreferenced
                requests.append({"request_put": {"key": _b64(self._ref_key(kind, name)),
                                                 "value": ""}})
            for op in ops:
                if op.action == "delete" and op.unreferenced is not None:
                    referrers, ref_revision = await self._referrers(op, ops)
                    if referrers:
                        raise StillReferenced(op.kind, op.name, referrers)
                    compares.append({"key": _b64(self._ref_key(op.kind, op.name)),
                                     "target": "MOD", "result": "EQUAL",
                                     "mod_revision": ref_revision})
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            changes = []
            for op, key in zip(ops, keys, strict=True):
                kv = current.get(key)
                changes.append(change_of("DELETED" if op.action == "delete" else
                                         "MODIFIED" if kv else "ADDED", op))
                if kv:
                    compares.append({"key": _b64(key), "target": "MOD", "result": "EQUAL",
                                     "mod_revision": kv["mod_revision"]})
                else:
                    compares.append({"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                                     "create_revision": "0"})
                old = json.loads(_unb64(kv["value"])) if kv else None
                if op.action == "delete":
                    assert kv is not None and old is not None
                    old["metadata"]["resourceVersion"] = kv["mod_revision"]
                    requests.append({"request_delete_range": {"key": _b64(key)}})
                    planned.append((op, old))
                else:
                    assert op.doc is not None
                    meta = (old or {}).get("metadata", {})
                    doc = stamp(op.doc, 0, meta.get("uid") or str(uuid.uuid4()),
                                meta.get("creationTimestamp") or created)
                    del doc["metadata"]["resourceVersion"]  # it is the key's mod_revision
                    requests.append({"request_put": {"key": _b64(key),
                                                     "value": _b64(json.dumps(doc))}})
                    planned.append((op, doc))
            if audit is not None:  # its revision is the commit's: the key's mod_revision
                entry = audit.entry(0, changes)
                del entry["revision"]
                requests.append({"request_put": {
                    "key": _b64(self._audit_prefix + str(uuid.uuid4())),
                    "value": _b64(json.dumps(entry))}})
            started = time.perf_counter()
            try:
                done = await self._call("/v3/kv/txn", {"compare": compares,
                                                       "success": requests})
            except Unavailable:
                self.commits.failures += 1
                raise
            if not done.get("succeeded"):
                if unchanged_since is not None and await self._changed_since(unchanged_since):
                    raise StoreChanged(unchanged_since)
                continue  # another writer changed a key between our read and commit
            self.commits.add(time.perf_counter() - started)
            revision = int(done["header"]["revision"])
            result = TxResult(revision, changes=changes)
            for op, doc in planned:
                out = json.loads(json.dumps(doc))
                if op.action != "delete":
                    out["metadata"]["resourceVersion"] = str(revision)
                result.stored.append(Stored(op.kind, op.name, revision, out))
            return result
        raise Unavailable(f"etcd: transaction kept conflicting after {RETRIES} tries")

    async def compact(self, keep_after: int) -> None:
        """Compacts the whole cluster's history (etcd's is one for every key); the space
        comes back to the file system with etcd's own `etcdctl defrag`.

        etcd keeps the revision it compacts at, so compacting at `keep_after + 1` forgets
        `keep_after` as the contract says (at `keep_after` when that is the newest).
        Audit entries at and before `keep_after` go too (they are keys: deleted)."""
        await self._forget_audit(keep_after)
        for revision in (keep_after + 1, keep_after):
            try:
                await self._call("/v3/kv/compaction", {"revision": str(revision),
                                                       "physical": True})
                return
            except Unavailable as e:
                if "compacted" in str(e):  # already compacted past it: nothing to do
                    return
                if "future revision" not in str(e):
                    raise

    # -- the past ---------------------------------------------------------------------
    async def list_at(self, revision: int) -> list[Stored]:
        # etcd reads a range at revision 0 (or below) as one at the current revision. The
        # state at 0 is before every write, which is etcd's first revision, 1 (a cluster
        # starts there, empty): read there, so it is nothing, or TooOld once compacted.
        revision = max(revision, 1)
        try:
            data = await self._call("/v3/kv/range", {
                "key": _b64(self.prefix), "range_end": _prefix_end(self.prefix),
                "revision": str(revision)})
        except Unavailable as e:
            if "compacted" in str(e):
                raise TooOld(revision, revision) from None
            if "future revision" in str(e):
                raise FutureRevision(revision, await self.revision()) from None
            raise
        items = [self._stored(kv) for kv in data.get("kvs") or []]
        return sorted((s for s in items if s.kind != LEGACY_STATUS_KIND),
                      key=lambda s: (s.kind, s.name))

    async def _audit_kvs(self, keys_only: bool = False) -> list[dict[str, Any]]:
        data = await self._call("/v3/kv/range", {
            "key": _b64(self._audit_prefix), "range_end": _prefix_end(self._audit_prefix),
            "keys_only": keys_only})
        kvs: list[dict[str, Any]] = data.get("kvs") or []
        return sorted(kvs, key=lambda kv: -int(kv["mod_revision"]))

    async def _audit_newest_first(self) -> AsyncIterator[dict[str, Any]]:
        """The audit entries' keys and values, newest first, `audit_page` at a time (each
        page below the last one's mod revision): a read of the newest few never loads
        the whole trail."""
        below = 0     # max_mod_revision: 0 is no bound
        while True:
            body: dict[str, Any] = {
                "key": _b64(self._audit_prefix), "range_end": _prefix_end(self._audit_prefix),
                "limit": self.audit_page, "sort_order": "DESCEND", "sort_target": "MOD"}
            if below:
                body["max_mod_revision"] = below
            data = await self._call("/v3/kv/range", body)
            kvs: list[dict[str, Any]] = data.get("kvs") or []
            for kv in kvs:
                yield kv
            below = int(kvs[-1]["mod_revision"]) - 1 if kvs else 0
            if not data.get("more") or below < 1:
                return

    async def audit_log(self, limit: int, kind: str | None = None, name: str | None = None,
                        max_changes: int = AUDIT_MAX_CHANGES) -> tuple[list[Document], bool]:
        out: list[Document] = []
        changes = 0
        async for kv in self._audit_newest_first():
            entry = json.loads(_unb64(kv["value"]))
            entry = {"revision": int(kv["mod_revision"]), **entry}
            if audit_matches(entry, kind, name):
                changes = take_entry(out, entry, changes, max_changes)
                if changes < 0:
                    return out, True
                if len(out) >= limit:
                    break
        return out, False

    async def _forget_audit(self, keep_after: int) -> None:
        old = [kv["key"] for kv in await self._audit_kvs(keys_only=True)
               if int(kv["mod_revision"]) <= keep_after]
        for start in range(0, len(old), self.max_ops):
            await self._call("/v3/kv/txn", {"success": [
                {"request_delete_range": {"key": key}} for key in old[start:start + self.max_ops]]})

    # -- agents' status ---------------------------------------------------------------
    async def put_status(self, node: str, doc: Document) -> None:
        legacy = self._key(LEGACY_STATUS_KIND, node)
        await self._call("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(self._status_prefix + node),
                             "value": _b64(json.dumps(doc))}},
            {"request_delete_range": {"key": _b64(legacy)}}]})

    async def delete_status(self, node: str) -> bool:
        legacy = self._key(LEGACY_STATUS_KIND, node)
        data = await self._call("/v3/kv/txn", {"success": [
            {"request_delete_range": {"key": _b64(self._status_prefix + node)}},
            {"request_delete_range": {"key": _b64(legacy)}}]})
        return any(int(r.get("response_delete_range", {}).get("deleted", 0) or 0) > 0
                   for r in data.get("responses") or [])

    async def list_status(self) -> tuple[dict[str, Document], int]:
        legacy = f"{self.prefix}{LEGACY_STATUS_KIND}/"
        data = await self._call("/v3/kv/txn", {"success": [
            {"request_range": {"key": _b64(legacy), "range_end": _prefix_end(legacy)}},
            {"request_range": {"key": _b64(self._status_prefix),
                               "range_end": _prefix_end(self._status_prefix)}}]})
        out: dict[str, Document] = {}
        for response, start in zip(data.get("responses") or [],
                                   (legacy, self._status_prefix), strict=True):
            for kv in response.get("response_range", {}).get("kvs") or []:
                out[_unb64(kv["key"]).decode()[len(start):]] = json.loads(_unb64(kv["value"]))
        return dict(sorted(out.items())), int(data["header"]["revision"])

    # -- watch ------------------------------------------------------------------------
    async def watch(self, after: int) -> AsyncIterator[Event]:
        async with contextlib.aclosing(self._stream(after, self.prefix)) as stream:
            async for _, event in stream:
                if event is not None:
                    yield event

    async def history(self, after: int, until: int) -> list[Event]:
        """Replays the watch from `after` up to a marker written now: the marker's event
        comes after every event before it, so the replay is known to be complete."""
        if until <= after:
            return []
        marked = await self._call("/v3/kv/put", {"key": _b64(self._marker), "value": ""})
        end = int(marked["header"]["revision"])
        out: list[Event] = []
        async with contextlib.aclosing(self._stream(after, self._marker)) as stream:
            async for revision, event in stream:
                if event is None:
                    if revision >= end:
                        return out
                elif event.revision <= until:
                    out.append(event)
        raise Unavailable("etcd watch: the stream ended during a replay of the history")

    async def _stream(self, after: int, start_key: str
                      ) -> AsyncGenerator[tuple[int, Event | None]]:
        """(revision, event) for the changes after `after` from `start_key` to the end of
        the prefix; keys outside the prefix come as (revision, None)."""
        body = {"create_request": {"key": _b64(start_key),
                                   "range_end": _prefix_end(self.prefix),
                                   "start_revision": str(after + 1), "prev_kv": True}}
        endpoint = self.endpoints[self._current]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            async with self._http().post(endpoint + "/v3/watch", json=body,
                                         timeout=timeout) as resp:
                if resp.status != 200:
                    raise Unavailable(f"etcd watch: HTTP {resp.status}")
                decoder = json.JSONDecoder()
                buffer = ""
                async for chunk in resp.content.iter_any():
                    buffer += chunk.decode()
                    while True:
                        buffer = buffer.lstrip()
                        if not buffer:
                            break
                        try:
                            message, end = decoder.raw_decode(buffer)
                        except json.JSONDecodeError:
                            break  # incomplete: wait for more
                        buffer = buffer[end:]
                        for item in self._watch_events(message, after):
                            yield item
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"etcd watch: {e or type(e).__name__}") from None

    def _watch_events(self, message: dict[str, Any], after: int
                      ) -> list[tuple[int, Event | None]]:
        result = message.get("result") or {}
        if "error" in message:
            raise Unavailable(f"etcd watch: {message['error']}")
        compacted = int(result.get("compact_revision") or 0)
        if compacted:  # etcd keeps the revision it compacted at: history starts after
            raise TooOld(after, compacted - 1)
        out: list[tuple[int, Event | None]] = []
        prefix = self.prefix.encode()
        for ev in result.get("events") or []:
            kv = ev["kv"]
            key = _unb64(kv["key"])
            revision = int(kv["mod_revision"])
            if not key.startswith(prefix):
                out.append((revision, None))
                continue
            kind, name = self._split(key)
            etype: EventType
            if ev.get("type") == "DELETE":
                prev = ev.get("prev_kv")
                doc: dict[str, Any] = json.loads(_unb64(prev["value"])) if prev else {
                    "kind": kind, "metadata": {"name": name}}
                if prev:
                    doc["metadata"]["resourceVersion"] = prev["mod_revision"]
                etype = "DELETED"
            else:
                doc = json.loads(_unb64(kv["value"]))
                doc["metadata"]["resourceVersion"] = str(revision)
                etype = "ADDED" if kv.get("create_revision") == kv["mod_revision"] else \
                    "MODIFIED"
            out.append((revision, Event(etype, kind, name, revision, doc)))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
