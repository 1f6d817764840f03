"""The HA datastore: etcd v3 through its JSON gateway (`/v3/...`), which etcd 3.4 serves.

Keys are `<prefix><kind>/<name>`; a resource's resourceVersion is its key's mod_revision,
so revisions and watch come from etcd itself and several bulkhead-servers sharing one
cluster stay consistent. A transaction reads the keys it touches, checks the caller's
expectations, then commits with a compare on exactly what it read: if another writer got
in between, it reads again and retries, so expectations hold at commit time.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from bulkhead.selector import Selector
from bulkhead.store.base import (
    Event,
    EventType,
    NotFound,
    Op,
    Stored,
    TooOld,
    TxResult,
    Unavailable,
    check_expectation,
    stamp,
)

RETRIES = 20


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
                 timeout: float = 10.0, ssl: Any = None) -> None:
        if not endpoints:
            raise ValueError("etcd: no endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None
        self._current = 0  # index of the endpoint that answered last

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
                        raise Unavailable(f"etcd {endpoint}{path}: HTTP {resp.status}: "
                                          f"{data.get('message') or data.get('error')}")
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
        items = [self._stored(kv) for kv in data.get("kvs") or []]
        if selector is not None:
            items = [s for s in items if selector.matches(s.labels)]
        return items, int(data["header"]["revision"])

    async def revision(self) -> int:
        data = await self._call("/v3/kv/range", {"key": _b64(self.prefix + "\0revision"),
                                                 "count_only": True})
        return int(data["header"]["revision"])

    # -- writes -----------------------------------------------------------------------
    async def transaction(self, ops: Sequence[Op]) -> TxResult:
        if not ops:
            return TxResult(await self.revision())
        keys = [self._key(op.kind, op.name) for op in ops]
        for _ in range(RETRIES):
            read = await self._call("/v3/kv/txn", {"success": [
                {"request_range": {"key": _b64(k)}} for k in keys]})
            current: dict[str, dict[str, Any]] = {}
            for response in read.get("responses") or []:
                for kv in response.get("response_range", {}).get("kvs") or []:
                    current[_unb64(kv["key"]).decode()] = kv
            compares, requests, planned = [], [], []
            created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for op, key in zip(ops, keys, strict=True):
                kv = current.get(key)
                check_expectation(op, int(kv["mod_revision"]) if kv else None)
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
            done = await self._call("/v3/kv/txn", {"compare": compares, "success": requests})
            if not done.get("succeeded"):
                continue  # another writer changed a key between our read and commit
            revision = int(done["header"]["revision"])
            result = TxResult(revision)
            for op, doc in planned:
                out = json.loads(json.dumps(doc))
                if op.action != "delete":
                    out["metadata"]["resourceVersion"] = str(revision)
                result.stored.append(Stored(op.kind, op.name, revision, out))
            return result
        raise Unavailable(f"etcd: transaction kept conflicting after {RETRIES} tries")

    async def compact(self, keep_after: int) -> None:
        try:
            await self._call("/v3/kv/compaction", {"revision": str(keep_after),
                                                   "physical": True})
        except Unavailable as e:
            if "compacted" not in str(e):  # already compacted past it: nothing to do
                raise

    # -- watch ------------------------------------------------------------------------
    async def watch(self, after: int) -> AsyncIterator[Event]:
        body = {"create_request": {"key": _b64(self.prefix),
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
                        for event in self._watch_events(message, after):
                            yield event
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"etcd watch: {e or type(e).__name__}") from None

    def _watch_events(self, message: dict[str, Any], after: int) -> list[Event]:
        result = message.get("result") or {}
        if "error" in message:
            raise Unavailable(f"etcd watch: {message['error']}")
        compacted = int(result.get("compact_revision") or 0)
        if compacted:
            raise TooOld(after, compacted)
        out = []
        for ev in result.get("events") or []:
            kv = ev["kv"]
            kind, name = self._split(_unb64(kv["key"]))
            revision = int(kv["mod_revision"])
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
            out.append(Event(etype, kind, name, revision, doc))
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
