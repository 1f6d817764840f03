"""Sync: what the server says this node should enforce, kept in memory, and the watch stream.

`DesiredState` holds the objects from the server keyed by (kind, name), as snapshots and
events leave them, and turns them into a `Snapshot` for the enforcer. An object that does
not parse (the server validates every write, so this is a safety net) or names a tier that
does not exist is left out and reported; it never stops the rest from being enforced.

`watch_lines` reads the server's streaming watch (`GET /v1/watch?stream=true`, one JSON
document per line, each at most `MAX_LINE`) into a queue, `watch_message` decodes a line
when its turn comes, and `Backoff` spaces out reconnects. HTTP is `bulkhead.agent.http`
(not aiohttp: see there).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import ssl
import sys
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bulkhead.agent.cache import Texts
from bulkhead.agent.config import AgentConfig, ConfigError
from bulkhead.agent.http import HttpError, Response, Session, Timeout, TlsSource
from bulkhead.api import KINDS, route
from bulkhead.client.certificates import pem_problem
from bulkhead.model import (
    GlobalNetworkSet,
    HostEndpoint,
    Metadata,
    Resource,
    Snapshot,
    ValidationError,
    enforceable,
    parse_resource,
)
from bulkhead.model.table import Table

log = logging.getLogger("bulkhead.agent")
Key = tuple[str, str]
Doc = dict[str, Any]
HEP, NETSET = "HostEndpoint", "GlobalNetworkSet"

# A line of the watch stream: a snapshot there is one line, as large as GET /v1/snapshot's
# body (bulkhead.agent.http.MAX_BODY); what is kept of a line never grows past this.
MAX_LINE = 256 << 20
# An error answer's body: only its start is shown; read within this many seconds.
MAX_ERROR_BODY = 1 << 20
ERROR_READ_SECONDS = 10.0


class SyncError(Exception):
    """The server answered, but not with a usable watch stream."""


class DesiredState:
    """`version` counts the changes of `objects`. `changes()` builds the snapshot from the
    last one and the objects that changed since (a host endpoint or network set changed:
    its entry replaced in a new version of that table, a `Table` sharing every shard the
    change did not touch; nothing else parsed or checked again);
    anything else builds it whole, from the parsed objects kept.

    Each object is kept as its parse and its JSON text (compact, keys sorted), not as
    the decoded JSON: decoded, 10,000 host endpoints take about 16 MiB. The texts are
    what the cache is written from, kept compressed as the cache writes them
    (`cache.Texts`); `objects` holds a digest of each (BLAKE2b, 16 bytes), which tells an
    object written again unchanged. Texts and parses leave out what the server stamps on
    every write (`SERVER_OWNED`: resourceVersion, uid, creationTimestamp): none of it is
    enforced, and an object whose only change is a new stamp changes nothing here.
    Equal label maps are one map, shared by the objects that carry them (10,000 host
    endpoints in ten groups keep ten), and a kind is one string."""

    def __init__(self) -> None:
        self.objects: dict[Key, bytes] = {}      # each object's text's digest (or UNKEPT)
        self.version = 0
        # The parse of each object's text (the same keys as `objects`).
        self._parsed: dict[Key, Resource | str] = {}
        self._texts = Texts()
        self._labels: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
        self._dirty: set[Key] | None = None      # changed since the last build; None: all
        self._built: tuple[Snapshot, dict[Key, str]] | None = None

    def replace(self, items: Iterable[Doc]) -> None:
        """A snapshot: these objects and no others."""
        texts = {_key(doc): _text(doc) for doc in items}
        digests = {key: _digest(text) for key, text in texts.items()}
        if digests == self.objects:
            return
        before, parsed = self.objects, self._parsed
        self.objects, self._parsed = {}, {}
        self.version += 1
        self._dirty = None
        kept: dict[Key, bytes] = {}
        for key, text in texts.items():     # parses of the same text kept
            digest = digests[key]
            result = parsed[key] if digest is not UNKEPT and before.get(key) == digest \
                else self._parse(key, text)
            at = self._keep(key, digest, result)
            if text is not UNKEPT:
                kept[at] = text
        self._texts.reset(kept)
        self._prune_labels()

    def apply(self, events: Iterable[Doc]) -> None:
        for event in events:
            key = (_kind(event.get("kind", "")), str(event.get("name", "")))
            if event.get("type") == "DELETED":
                if self.objects.pop(key, None) is None:
                    continue
                self._parsed.pop(key, None)
                self._texts.drop(key)
            elif isinstance(event.get("object"), dict):
                text = _text(event["object"])
                digest = _digest(text)
                if digest is not UNKEPT and self.objects.get(key) == digest:
                    continue
                at = self._keep(key, digest, self._parse(key, text))
                if text is UNKEPT:
                    self._texts.drop(at)
                else:
                    self._texts.put(at, text)
            else:
                continue
            self.version += 1
            if self._dirty is not None:
                self._dirty.add(key)
        self._prune_labels()

    def items(self) -> list[Doc]:
        """The objects, decoded, in key order (but those that could not be written out)."""
        return [json.loads(text) for text in self.texts()]

    def texts(self) -> list[bytes]:
        """The objects' JSON texts in key order. An object that could not be written out
        is not in them: it is left out of every snapshot anyway."""
        return self._texts.texts()

    def cache_parts(self) -> list[bytes]:
        """The texts as the cache is written from them (`cache.save_cache`'s parts)."""
        return self._texts.parts()

    def changes(self) -> tuple[Snapshot, list[str], set[Key] | None]:
        """The snapshot to enforce, the objects left out of it (one message each), and
        the objects changed since the last call (None: any may have)."""
        dirty, self._dirty = self._dirty, set()
        built = self._built
        if dirty is not None and built is not None and \
                all(k[0] in (HEP, NETSET) for k in dirty):
            snapshot, errors = built
            errors = dict(errors)
            put: dict[str, dict[str, Any]] = {HEP: {}, NETSET: {}}
            drop: dict[str, list[str]] = {HEP: [], NETSET: []}
            for key in dirty:
                drop[key[0]].append(key[1])
                errors.pop(key, None)
                result = self._parsed.get(key)
                if result is None:                 # deleted
                    continue
                if isinstance(result, str):
                    errors[key] = result
                elif isinstance(result, HostEndpoint | GlobalNetworkSet):
                    put[key[0]][key[1]] = result
            heps = Table.of(snapshot.host_endpoints).changed(put[HEP], drop[HEP])
            sets = Table.of(snapshot.network_sets).changed(put[NETSET], drop[NETSET])
            snapshot = replace(snapshot, host_endpoints=heps, network_sets=sets)
            self._built = (snapshot, errors)
            return snapshot, _messages(errors), dirty
        snapshot, errors = self._build()
        self._built = (snapshot, errors)
        return snapshot, _messages(errors), None

    def build(self) -> tuple[Snapshot, list[str]]:
        """The snapshot to enforce and the objects left out of it, built whole."""
        snapshot, errors = self._build()
        return snapshot, _messages(errors)

    def _parse(self, key: Key, text: bytes) -> Resource | str:
        """The parse of an object's text: the resource, or why it is left out. Read
        from the text, not from the decoded message it came in: what is kept of it is
        then made between what is kept of the objects before it, and the message, once
        dropped, leaves no piece of itself behind to hold its memory."""
        if text is UNKEPT:
            return f"{key[0]} {key[1]}: the object is nested too deeply; left out"
        try:
            res = parse_resource(json.loads(text))
            if (res.kind, res.name) != key:
                return f"{key[0]} {key[1]}: the object is a {res.kind} named {res.name}"
            return self._lean(res)
        except ValidationError as e:
            return str(e)
        except Exception as e:  # a bug in a parser must not stop the agent
            return f"{key[0]} {key[1]}: cannot be read: {e!r}"

    def _keep(self, key: Key, digest: bytes, result: Resource | str) -> Key:
        """Keep an object's digest and parse, keyed by the parse's own strings where it
        has them (see `_parse`); that key."""
        if not isinstance(result, str):
            key = (result.kind, result.name)
        self.objects[key] = digest
        self._parsed[key] = result
        return key

    def _lean(self, res: Resource) -> Resource:
        """`res` as kept: without what it need not keep (the server's stamps are not in
        its text already), its labels the map shared by every object with the same
        labels, no map of its own for no annotations."""
        meta = res.metadata
        labels = self._labels.setdefault(tuple(sorted(meta.labels.items())), meta.labels)
        lean: dict[str, Any] = {"metadata": Metadata(
            name=meta.name, labels=labels, annotations=meta.annotations or NO_ANNOTATIONS,
            generation=meta.generation)}
        if isinstance(res, HostEndpoint) and res.interface_name:
            lean["interface_name"] = sys.intern(res.interface_name)
        return replace(res, **lean)

    def _prune_labels(self) -> None:
        """Forget the shared label maps no object carries any longer (when there are
        more of them than objects: the table stays within the objects' count)."""
        if len(self._labels) <= 2 * len(self._parsed) + 64:
            return
        kept: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
        for result in self._parsed.values():
            if not isinstance(result, str):
                labels = result.metadata.labels
                kept[tuple(sorted(labels.items()))] = labels
        self._labels = kept

    def _build(self) -> tuple[Snapshot, dict[Key, str]]:
        """The snapshot to enforce and the objects left out of it (one message each)."""
        resources: dict[Key, Resource] = {}
        errors: dict[Key, str] = {}
        for key, result in self._parsed.items():
            if isinstance(result, str):
                errors[key] = result
            else:
                resources[key] = result
        snapshot, left_out = enforceable(resources)
        errors.update(left_out)
        # In Tables, so that the next change's snapshot shares what it does not change.
        snapshot = replace(snapshot, host_endpoints=Table(snapshot.host_endpoints),
                           network_sets=Table(snapshot.network_sets))
        return snapshot, errors


def _messages(errors: Mapping[Key, str]) -> list[str]:
    return [f"invalid object left out: {errors[k]}" for k in sorted(errors)]


UNKEPT = b""    # the text of an object that could not be written back out
# What the server's store writes into every object's metadata on every write.
SERVER_OWNED = ("creationTimestamp", "resourceVersion", "uid")
NO_ANNOTATIONS: Mapping[str, str] = MappingProxyType({})   # shared by objects without any


def _text(doc: Doc) -> bytes:
    """An object's JSON text without `SERVER_OWNED`: compact, keys sorted (equal objects,
    equal texts); UNKEPT when it cannot be written (nested deeper than the encoder goes:
    such an object is left out and reported, never the end of the agent)."""
    meta = doc.get("metadata")
    if isinstance(meta, dict) and any(k in meta for k in SERVER_OWNED):
        doc = {**doc, "metadata": {k: v for k, v in meta.items() if k not in SERVER_OWNED}}
    try:
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    except (RecursionError, ValueError, TypeError):
        return UNKEPT


def _digest(text: bytes) -> bytes:
    """What tells two texts apart (UNKEPT for UNKEPT)."""
    return UNKEPT if text is UNKEPT else hashlib.blake2b(text, digest_size=16).digest()


def _key(doc: Doc) -> Key:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return (_kind(doc.get("kind", "")), str(name or ""))


_KINDS = {kind: kind for kind in KINDS}


def _kind(value: object) -> str:
    """A kind as text: one string per kind the model reads."""
    text = str(value)
    return _KINDS.get(text, text)


# ------------------------------------------------------------------------- connection
def client_ssl_context(config: AgentConfig) -> ssl.SSLContext:
    """Mutual TLS: trust the Bulkhead CA only, present the node's certificate."""
    try:
        ctx = ssl.create_default_context(cafile=config.ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("ca", f"{config.ca}: {_ssl_reason(e)}") from None
    try:
        ctx.load_cert_chain(config.cert, config.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("cert/key", f"{config.cert}, {config.key}: {_ssl_reason(e)} "
                          "(issue them with `bulkhead pki issue NODE --role agent`)") from None
    return ctx


def _ssl_reason(e: OSError | ssl.SSLError) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)


# A file's identity: device, inode, size, modification time (None: it cannot be seen).
Identity = tuple[int, int, int, int] | None


class ClientTls:
    """The agent's TLS context for its next connection, built again when the CA,
    certificate or key file has changed on disk (its identity: device, inode, size,
    modification time, looked at by each request), so a certificate renewed in place
    (`bulkhead pki issue --force` from cron) is presented without a restart. Files that
    do not load (half written, a key that is not the certificate's) leave the context in
    use as it was, said once in an error; they are tried again when they change. The
    connections already open keep the certificate they were opened with.

    `tls = ClientTls(config)` raises ConfigError as `client_ssl_context` does; `tls()` is
    the context to use now, `tls.problem()` what is wrong with the certificate it
    presents."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._seen = self._identity()
        self._failed: tuple[Identity, ...] | None = None
        self.context, self.presented, self.authorities = self._load()

    def _identity(self) -> tuple[Identity, ...]:
        out: list[Identity] = []
        for path in (self.config.ca, self.config.cert, self.config.key):
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _load(self) -> tuple[ssl.SSLContext, bytes, bytes]:
        """The context from the files, and the certificate and CA text read with it."""
        context = client_ssl_context(self.config)
        texts = []
        for where, path in (("cert", self.config.cert), ("ca", self.config.ca)):
            try:
                texts.append(Path(path).read_bytes())
            except OSError as e:
                raise ConfigError(where, f"{path}: {e.strerror or e}") from None
        return context, texts[0], texts[1]

    def _why(self) -> str | None:
        """Which file keeps the context from loading, and why, in words plainer than
        OpenSSL's ("PEM lib"); None when none of these is seen."""
        config = self.config
        try:
            ca, cert, key = (Path(p).read_bytes() for p in (config.ca, config.cert,
                                                             config.key))
        except OSError:
            return None    # client_ssl_context named the file
        try:
            x509.load_pem_x509_certificates(ca)
        except ValueError:
            return f"ca: {config.ca}: no complete PEM certificate (half written?)"
        try:
            public = x509.load_pem_x509_certificate(cert).public_key()
        except ValueError:
            return f"cert: {config.cert}: no complete PEM certificate (half written?)"
        try:
            private = serialization.load_pem_private_key(key, None)
        except (ValueError, TypeError):
            return (f"key: {config.key}: no complete PEM private key without a passphrase "
                    "(half written?)")
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != public.public_bytes(*spki):
            return (f"cert/key: {config.key} is not the key of the certificate in "
                    f"{config.cert} (one renewed, not yet the other?)")
        return None

    def __call__(self) -> ssl.SSLContext:
        now = self._identity()
        if now == self._seen or now == self._failed:
            return self.context
        try:
            loaded = self._load()
        except ConfigError as e:
            if self._identity() == now:   # not being written as we read: say it once
                self._failed = now
                log.error("the agent's TLS files changed but do not load; new connections "
                          "keep presenting the certificate loaded before", extra={
                              "fields": {"reason": self._why() or str(e)}})
            return self.context
        if self._identity() != now:   # written to as we read: the next request reads again
            return self.context
        self.context, self.presented, self.authorities = loaded
        self._seen, self._failed = now, None
        fields: dict[str, Any] = {"cert": self.config.cert}
        try:
            cert = x509.load_pem_x509_certificate(self.presented)
            fields.update(serial=f"{cert.serial_number:X}",
                          notAfter=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            pass
        log.info("TLS files reloaded: new connections present the certificate now in cert",
                 extra={"fields": fields})
        return self.context

    def problem(self) -> str | None:
        """What keeps the certificate this agent presents (the one in its context, which
        the file may no longer hold) from being accepted; None when nothing is seen."""
        cert = self.config.cert
        try:
            same = Path(cert).read_bytes() == self.presented
        except OSError:
            same = False
        name = f"the certificate {cert}" if same else \
            f"the certificate this agent presents (read from {cert}, changed since)"
        return pem_problem(self.presented, name, self.authorities, self.config.ca)


def open_session(config: AgentConfig, ctx: TlsSource) -> Session:
    """Requests to the server, at most 4 connections at a time (the watch, status, flow
    and DNS logs), kept alive between requests; `ctx` a context, or a ClientTls."""
    return Session(config.server.rstrip("/"), ctx, max_connections=4)


async def error_of(resp: Response) -> str:
    """`HTTP <status>: <the server's message>` (its JSON error, or the body's start)."""
    try:
        async with asyncio.timeout(ERROR_READ_SECONDS):
            text = (await resp.read(MAX_ERROR_BODY)).decode("utf-8", "replace")
    except HttpError as e:
        return f"HTTP {resp.status}: {resp.reason} (the body not read: {e})"
    except TimeoutError:
        resp.release()
        return f"HTTP {resp.status}: {resp.reason} (the body not read within " \
            f"{ERROR_READ_SECONDS:g} s)"
    try:
        message = str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError, RecursionError):
        message = text.strip()[:200] or resp.reason
    return f"HTTP {resp.status}: {message}"


async def fetch_snapshot(session: Session) -> tuple[int, list[Doc]]:
    async with session.get(route("snapshot"), timeout=Timeout(total=60, connect=10)) as r:
        if r.status != 200:
            raise SyncError(f"GET /v1/snapshot: {await error_of(r)}")
        body = await r.json()
    if not isinstance(body, dict) or not isinstance(body.get("revision"), int) \
            or not isinstance(body.get("items"), list):
        raise SyncError("GET /v1/snapshot: the answer has no revision and items")
    return body["revision"], [i for i in body["items"] if isinstance(i, dict)]


async def lines(chunks: AsyncIterable[bytes], max_line: int = MAX_LINE
                ) -> AsyncIterator[bytes]:
    """The non-empty lines of a streaming answer's pieces, as they come; SyncError for a
    line over `max_line` bytes (a snapshot of a large fleet is one long line)."""
    buffer = bytearray()
    async for chunk in chunks:
        scan = len(buffer)      # the bytes before hold no newline
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scan)) != -1:
            if end - start > max_line:
                break
            with memoryview(buffer) as view:
                line = bytes(view[start:end]).strip()
            start = scan = end + 1
            if line:
                yield line
        del buffer[:start]
        if len(buffer) > max_line:
            raise SyncError(f"a line of the stream is over {max_line >> 20} MiB")


QUEUED_BYTES = 64 << 20   # lines of the watch waiting for the agent, at most (and one)


class LineQueue:
    """The watch's lines waiting for the agent's turn: at most QUEUED_BYTES of them (one
    line is always taken, whatever its size). Past that the reader waits, so the socket
    fills and TCP holds the server back: a server sending faster than the agent applies
    (a burst of events during a long apply, or a hostile one) cannot grow the agent
    without bound. Anything else put (an exception, a restart) goes in at once."""

    def __init__(self, limit: int = QUEUED_BYTES) -> None:
        self.limit = limit
        self.queued = 0                       # bytes of the lines waiting
        self._items: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, line: bytes) -> None:
        while self.queued and self.queued + len(line) > self.limit:
            self._room.clear()
            await self._room.wait()
        self.queued += len(line)
        self._items.put_nowait(line)

    def put_nowait(self, item: bytes | Exception) -> None:
        if isinstance(item, bytes):
            self.queued += len(item)
        self._items.put_nowait(item)

    async def get(self) -> bytes | Exception:
        item = await self._items.get()
        if isinstance(item, bytes):
            self.queued -= len(item)
            if self.queued + 1 <= self.limit:
                self._room.set()
        return item


async def watch_lines(resp: Response, queue: LineQueue | asyncio.Queue[bytes | Exception]
                      ) -> None:
    """Put each line of a streaming watch on `queue` as it came; an exception when it
    ends. Lines are decoded (`watch_message`) when their turn comes, not here: the reader
    goes on while the agent applies (up to the queue's bound), and a burst of lines
    waiting decoded would take five times their size, made in between what the apply
    keeps (its memory then held by the few pieces of the apply left among it)."""
    try:
        async for line in lines(resp.iter_chunks()):
            await queue.put(line)
        queue.put_nowait(SyncError("the server closed the watch stream"))
    except (HttpError, SyncError, OSError) as e:
        queue.put_nowait(e)


def watch_message(line: bytes) -> Doc:
    """A line of the watch stream, decoded; SyncError when it is not a JSON object
    (nested deeper than the decoder goes included: from a hostile server, a broken
    stream like any other, never the end of the agent)."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise SyncError(f"watch: a line that is not JSON ({type(e).__name__}: "
                        f"{str(e)[:80]})") from None
    if not isinstance(message, dict):
        raise SyncError(f"watch: expected a JSON object, got {line[:80]!r}")
    return message


class Backoff:
    """Exponential backoff with jitter: each delay is drawn between half and all of 0.2 s,
    0.4 s, 0.8 s, ... up to `cap` seconds, so a fleet does not reconnect in step."""

    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(ceiling / 2, ceiling)
