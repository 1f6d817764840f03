"""Sync: what the server says this node should enforce, kept in memory, and the watch stream.

`DesiredState` holds the objects from the server keyed by (kind, name), as snapshots and
events leave them, and turns them into a `Snapshot` for the enforcer. An object that does
not parse (the server validates every write, so this is a safety net) or names a tier that
does not exist is left out and reported; it never stops the rest from being enforced.

`watch_lines` reads the server's streaming watch (`GET /v1/watch?stream=true`, one JSON
document per line, each at most `MAX_LINE`) into a queue, and `Backoff` spaces out
reconnects. HTTP is `bulkhead.agent.http` (not aiohttp: see there).
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import replace
from typing import Any

from bulkhead.agent.config import AgentConfig, ConfigError
from bulkhead.agent.http import HttpError, Response, Session, Timeout
from bulkhead.api import route
from bulkhead.model import (
    DEFAULT_TIER,
    GlobalNetworkPolicy,
    GlobalNetworkSet,
    HostEndpoint,
    Resource,
    Snapshot,
    StagedGlobalNetworkPolicy,
    Tier,
    ValidationError,
    parse_resource,
)
from bulkhead.model.table import Table

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

    Each object is kept as its JSON text (compact, keys sorted) and its parse, not as
    the decoded JSON: decoded, 10,000 host endpoints take about 16 MiB, as text 4 MiB.
    The text is what the cache is written from (`texts`)."""

    def __init__(self) -> None:
        self.objects: dict[Key, bytes] = {}
        self.version = 0
        self._parsed: dict[Key, tuple[bytes, Resource | str]] = {}
        self._dirty: set[Key] | None = None      # changed since the last build; None: all
        self._built: tuple[Snapshot, dict[Key, str]] | None = None

    def replace(self, items: Iterable[Doc]) -> None:
        """A snapshot: these objects and no others."""
        docs = {_key(doc): doc for doc in items}
        objects = {key: _text(doc) for key, doc in docs.items()}
        if objects != self.objects:
            self.objects = objects
            self.version += 1
            self._dirty = None
            # Parsed now, from the decoded JSON at hand; parses of the same text kept.
            self._parsed = {key: self._parse(key, text, docs[key])
                            for key, text in objects.items()}

    def apply(self, events: Iterable[Doc]) -> None:
        for event in events:
            key = (str(event.get("kind", "")), str(event.get("name", "")))
            if event.get("type") == "DELETED":
                if self.objects.pop(key, None) is None:
                    continue
                self._parsed.pop(key, None)
            elif isinstance(event.get("object"), dict):
                text = _text(event["object"])
                if text is not UNKEPT and self.objects.get(key) == text:
                    continue
                self.objects[key] = text
                self._parsed[key] = self._parse(key, text, event["object"])
            else:
                continue
            self.version += 1
            if self._dirty is not None:
                self._dirty.add(key)

    def items(self) -> list[Doc]:
        """The objects, decoded, in key order (those left out as UNKEPT too)."""
        return [json.loads(text) for text in self.texts()]

    def texts(self) -> list[bytes]:
        """The objects' JSON texts in key order (what the cache is written from). An
        object that could not be written out is not in them: it is left out of every
        snapshot anyway."""
        return [self.objects[k] for k in sorted(self.objects) if self.objects[k]]

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
                parsed = self._parsed.get(key)
                if parsed is None:                 # deleted
                    continue
                result = parsed[1]
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

    def _parse(self, key: Key, text: bytes, doc: Doc) -> tuple[bytes, Resource | str]:
        """(`text`, its parse): kept from before when the text is the same."""
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == text and text is not UNKEPT:
            return cached
        result: Resource | str
        if text is UNKEPT:
            return text, f"{key[0]} {key[1]}: the object is nested too deeply; left out"
        try:
            res = parse_resource(doc)
            result = res if (res.kind, res.name) == key else \
                f"{key[0]} {key[1]}: the object is a {res.kind} named {res.name}"
        except ValidationError as e:
            result = str(e)
        except Exception as e:  # a bug in a parser must not stop the agent
            result = f"{key[0]} {key[1]}: cannot be read: {e!r}"
        return text, result

    def _build(self) -> tuple[Snapshot, dict[Key, str]]:
        """The snapshot to enforce and the objects left out of it (one message each)."""
        resources: dict[Key, Resource] = {}
        errors: dict[Key, str] = {}
        for key, (_, result) in self._parsed.items():
            if isinstance(result, str):
                errors[key] = result
            else:
                resources[key] = result
        tiers = {DEFAULT_TIER} | {r.name for r in resources.values() if isinstance(r, Tier)}
        for key, res in list(resources.items()):
            if isinstance(res, GlobalNetworkPolicy | StagedGlobalNetworkPolicy) \
                    and res.spec.tier not in tiers:
                errors[key] = (f'{res.kind} {res.name}: spec.tier: tier "{res.spec.tier}" '
                               "does not exist; the policy is left out")
                del resources[key]
        while True:
            try:
                snapshot = Snapshot.build(resources.values())
                break
            except ValidationError as e:  # cannot happen after the checks above; be safe
                key = (e.kind, e.name)
                if key not in resources:
                    raise
                errors[key] = f"{e}; left out"
                del resources[key]
        # In Tables, so that the next change's snapshot shares what it does not change.
        snapshot = replace(snapshot, host_endpoints=Table(snapshot.host_endpoints),
                           network_sets=Table(snapshot.network_sets))
        return snapshot, errors


def _messages(errors: Mapping[Key, str]) -> list[str]:
    return [f"invalid object left out: {errors[k]}" for k in sorted(errors)]


UNKEPT = b""    # the text of an object that could not be written back out


def _text(doc: Doc) -> bytes:
    """An object's JSON text: compact, keys sorted (equal objects, equal texts); UNKEPT
    when it cannot be written (nested deeper than the encoder goes: such an object is
    left out and reported, never the end of the agent)."""
    try:
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    except (RecursionError, ValueError, TypeError):
        return UNKEPT


def _key(doc: Doc) -> Key:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return (str(doc.get("kind", "")), str(name or ""))


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


def open_session(config: AgentConfig, ctx: ssl.SSLContext) -> Session:
    """Requests to the server, at most 4 connections at a time (the watch, status, flow
    and DNS logs), kept alive between requests."""
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


async def watch_lines(resp: Response, queue: asyncio.Queue[Doc | Exception]) -> None:
    """Put each JSON line of a streaming watch on `queue`; an exception when it ends."""
    try:
        async for line in lines(resp.iter_chunks()):
            message = json.loads(line)
            if not isinstance(message, dict):
                raise SyncError(f"watch: expected a JSON object, got {line[:80]!r}")
            queue.put_nowait(message)
        queue.put_nowait(SyncError("the server closed the watch stream"))
    except (HttpError, ValueError, SyncError, OSError, RecursionError) as e:
        # (RecursionError: JSON nested deeper than the decoder goes, from a hostile
        # server: a broken stream like any other, never the end of the agent.)
        queue.put_nowait(e)


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
