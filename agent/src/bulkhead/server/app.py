"""bulkhead-server's HTTP API (aiohttp): resources, apply, watch, agent status, health.

Every request comes over TLS with a client certificate (mutual TLS); its subject names the
caller's role (see `bulkhead.pki`). Errors are JSON:
`{"error": {"code": 422, "reason": "Invalid", "message": "GlobalNetworkPolicy x: spec..."}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography import x509

from bulkhead import __version__
from bulkhead.api import OWNER_LABEL, ROUTES, SERVER_FIELDS
from bulkhead.model import (
    DEFAULT_TIER,
    KIND_ALIASES,
    GlobalNetworkPolicy,
    LoadError,
    Resource,
    StagedGlobalNetworkPolicy,
    Tier,
    ValidationError,
    check_resource_name,
    documents,
    enforceable,
    flatten,
    json_value,
    parse_documents,
    parse_resource,
)
from bulkhead.model.checks import check_label_key
from bulkhead.model.flowlog import MAX_BATCH_BYTES
from bulkhead.model.reader import Reader
from bulkhead.pki import Identity, identity_from_subject
from bulkhead.policy.impact import NotFound as UnknownStaged
from bulkhead.policy.impact import PromotionConflict, proposed_state
from bulkhead.selector import SelectorError, parse
from bulkhead.server import limits
from bulkhead.server import preview as preview_api
from bulkhead.server.dnslogs import DnsLogs, parse_dns_request
from bulkhead.server.flows import BATCH_KEY, FlowLogs, RecordLogs, Refused, parse_request
from bulkhead.server.hub import STATUS_KIND, Hub, WireEvent
from bulkhead.server.listen import Listener
from bulkhead.server.revocation import Revocation
from bulkhead.store import (
    Audit,
    BeforeUndo,
    Conflict,
    Datastore,
    FutureRevision,
    MissingReference,
    NotFound,
    Op,
    Referrers,
    StillReferenced,
    Stored,
    TooLarge,
    TooOld,
    Unavailable,
)
from bulkhead.store.base import AUDIT_MAX_CHANGES
from bulkhead.store.flowlog import FlowQueryTimeout, FlowStoreError

log = logging.getLogger("bulkhead.server")
access_log = logging.getLogger("bulkhead.server.access")

WHO = web.RequestKey("identity", Identity)
SERIAL = web.RequestKey("serial", int)  # the client certificate's serial number
REVOCATION = web.AppKey("revocation", Revocation)
METRICS = web.AppKey("metrics", dict)
STORE = web.AppKey("store", Datastore)
HUB = web.AppKey("hub", Hub)
STOPPING = web.AppKey("stopping", asyncio.Event)
LISTENER = web.AppKey("listener", Listener)
FLOWS = web.AppKey("flows", FlowLogs)
DNS = web.AppKey("dns", DnsLogs)
# Which requests get an access-log line (`accessLog`): every one, those answered 400 and
# up, or none. Agents' status, flow and DNS reports make most of them on a fleet.
ACCESS_LOG = web.AppKey("access_log", str)
ACCESS_LOG_MODES = ("all", "errors", "off")
MAX_BODY = 8 * 1024 * 1024
TEXT_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TIER_USERS = Referrers(("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"), ("spec", "tier"))


class ApiError(web.HTTPException):
    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": {"code": status, "reason": reason,
                                                     "message": message}}),
                         content_type="application/json", headers=headers)


def forbidden(who: Identity, what: str) -> ApiError:
    return ApiError(403, "Forbidden", f"{who.role} {who.name} may not {what}")


# ------------------------------------------------------------------------ middleware
# Who is at the other end of each TLS connection: the client certificate's serial number
# and the identity its subject names, read once per connection, not once per request. A
# connection's certificate cannot change: the server's TLS context refuses renegotiation
# (`bulkhead.server.main`) and never asks for a certificate after the handshake. Keyed by
# the connection's `ssl.SSLObject`, dropped with it; revocation is still checked per request.
_PEERS: weakref.WeakKeyDictionary[Any, tuple[int, Identity | str]] = \
    weakref.WeakKeyDictionary()


def _peer_certificate(ssl_object: Any) -> x509.Certificate:
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise ApiError(401, "Unauthorized", "a client certificate is required")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as e:   # the handshake took it; cryptography reads X.509 stricter
        raise ApiError(403, "Forbidden", f"the client certificate cannot be read: {e}"
                       ) from None


def _peer(ssl_object: Any) -> tuple[int, Identity | str]:
    """The serial number and identity of the client certificate (or why the certificate
    names no identity), kept for the connection; 401 without a certificate."""
    cert = _peer_certificate(ssl_object)
    who: Identity | str
    if cert.serial_number <= 0:
        # RFC 5280 wants it positive, and a CRL cannot name it: such a certificate could
        # never be revoked, so it is not taken.
        who = f"the client certificate's serial number {cert.serial_number} is not positive"
    else:
        try:
            who = identity_from_subject(cert.subject)
        except ValueError as e:
            who = str(e)
    peer = (cert.serial_number, who)
    _PEERS[ssl_object] = peer
    return peer


def _identity(request: web.Request) -> Identity:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    peer = _PEERS.get(ssl_object) if ssl_object is not None else None
    serial, who = peer if peer is not None else _peer(ssl_object)
    request[SERIAL] = serial
    if peer_revoked(request):
        log.warning("revoked certificate refused", extra={"fields": {
            "serial": f"{serial:X}",
            "subject": _peer_certificate(ssl_object).subject.rfc4514_string()}})
        raise ApiError(403, "Forbidden", "certificate revoked")
    if isinstance(who, str):
        raise ApiError(403, "Forbidden", who)
    return who


def peer_revoked(request: web.Request) -> bool:
    """Whether the client certificate of `request` is revoked now. Cheap (a set lookup;
    the CRL file is looked at most once a second): a long-lived response such as a
    streaming watch calls it between writes and ends when it turns true."""
    revocation = request.app.get(REVOCATION)
    serial = request.get(SERIAL)
    return revocation is not None and serial is not None and revocation.is_revoked(serial)


CLIENT_CLOSED = 499   # the access log's and metrics' status of a request its client ended
CLIENT_GONE = "bulkhead.client_gone"   # set by a handler whose client left mid-answer


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    who = "-"
    try:
        if request.path not in (ROUTES["healthz"], ROUTES["readyz"]):
            identity = _identity(request)
            request[WHO] = identity
            who = f"{identity.role}:{identity.name}"
        response = await handler(request)
        status = CLIENT_CLOSED if request.get(CLIENT_GONE) else response.status
        return response
    except web.HTTPException as e:
        status = e.status
        if isinstance(e, ApiError):
            raise
        raise ApiError(e.status, e.reason, e.text or e.reason) from None
    except limits.BadInput as e:
        status = 400
        raise ApiError(400, "BadRequest", str(e)) from None
    except TooLarge as e:
        status = 413
        raise ApiError(413, "RequestEntityTooLarge", f"{e}; nothing was written") from None
    except Unavailable as e:
        status = 503
        raise ApiError(503, "Unavailable", str(e)) from None
    except (asyncio.CancelledError, ConnectionResetError):
        # The client went away (a streaming watch it closed, a request it gave up on):
        # logged and counted as 499, as nginx does, never as the server's failure.
        status = CLIENT_CLOSED
        raise
    except Exception:
        # A bug, never bad input: logged with its traceback, answered without one.
        log.exception("request failed", extra={"fields": {"method": request.method,
                                                          "path": request.path}})
        raise ApiError(500, "InternalError", "the server failed on this request; its log "
                       "says why") from None
    finally:
        route = request.match_info.route.resource.canonical if \
            request.match_info.route.resource else "unmatched"
        request.app[METRICS]["requests"][(request.method, route, status)] += 1
        mode = request.app[ACCESS_LOG]
        if (mode == "all" or (mode == "errors" and status >= 400)) and \
                access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra={"fields": {
                "method": request.method, "path": request.path, "status": status,
                "who": who, "ms": round(1000 * (time.perf_counter() - started), 2)}})


# --------------------------------------------------------------------------- helpers
def _audit(identity: Identity, operation: str) -> Audit:
    """What the audit trail keeps of who writes: the certificate's name and role (and a
    tier admin's tiers), and the request's operation (promote, rollback, ...: what
    rollback.yml looks for)."""
    role = identity.role + (f" (tiers {', '.join(identity.tiers)})" if identity.tiers else "")
    return Audit(identity.name, role, operation)


def _require(request: web.Request, *roles: str) -> Identity:
    identity: Identity = request[WHO]
    if identity.role not in roles:
        raise forbidden(identity, f"{request.method} {request.path}")
    return identity


def _kind(request: web.Request) -> str:
    raw = request.match_info["kind"]
    kind = KIND_ALIASES.get(raw) or KIND_ALIASES.get(raw.lower())
    if kind is None:
        raise ApiError(404, "NotFound", f"unknown kind {raw[:64]!r}")
    return kind


def _name(request: web.Request, key: str = "name") -> str:
    """The NAME of the path, checked (400): for a resource, a valid name for its KIND.
    Handlers ask for it after the caller's role, so a caller the route is not for is
    told so (403) before anything of its request is read."""
    name = request.match_info[key]
    if key == "name" and "kind" in request.match_info:
        kind = _kind(request)
        try:
            check_resource_name(kind, name)
        except ValidationError as e:
            raise ApiError(400, "BadRequest", f"{kind} {e.problem}") from None
    if not name or len(name) > limits.MAX_NAME or not name.isprintable():
        raise ApiError(400, "BadRequest", f"{key} {name[:64]!r}: a name is 1 to "
                       f"{limits.MAX_NAME} printable characters")
    return name


def _dry_run(request: web.Request) -> bool:
    raw = request.query.get("dryRun")
    return (raw is not None and raw.lower() == "all") or limits.flag_param(raw, "dryRun")


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    """The document without the fields the server owns: what a user compares."""
    out: dict[str, Any] = json.loads(json.dumps(doc))
    for key in SERVER_FIELDS:
        out.get("metadata", {}).pop(key, None)
    return out


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d))


def _stored_json(stored: Stored, status: int = 200) -> web.Response:
    """A stored resource as the answer, in the JSON text the store wrote (when it kept
    it): the same bytes `_json` would make, without encoding the document again."""
    if stored.text is None:
        return _json(stored.doc, status)
    return web.Response(body=stored.text.encode(), status=status,
                        content_type="application/json", charset="utf-8")


def _tier_of(resource: Resource) -> str | None:
    if isinstance(resource, GlobalNetworkPolicy):
        return resource.spec.tier
    if isinstance(resource, Tier):
        return resource.name
    return None


def _stored_tier(kind: str, name: str, doc: Any) -> str | None:
    """The tier of a stored document, read without validating it again: a document an
    older server took may fail today's checks (a domain name it allowed), and must still
    be deletable, by whom it concerns."""
    if kind == "Tier":
        return name
    if kind in ("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"):
        spec = doc.get("spec") if isinstance(doc, dict) else None
        tier = spec.get("tier") if isinstance(spec, dict) else None
        return tier if isinstance(tier, str) and tier else "default"
    return None


def _stored_order(doc: Any) -> Any:
    """A stored Tier's order as written (None without one), read without validating."""
    spec = doc.get("spec") if isinstance(doc, dict) else None
    order = spec.get("order") if isinstance(spec, dict) else None
    return float(order) if isinstance(order, int | float) and not isinstance(order, bool) \
        else None


def _check_tiers(identity: Identity, kind: str, name: str, tiers: set[str | None],
                 order_moves: bool = False) -> None:
    """An admin's write of `kind` `name` touching `tiers` (None: not in a tier), which
    `order_moves` a Tier's order: refused beyond the admin's tier limits."""
    if identity.role != "admin":
        raise forbidden(identity, f"write {kind} {name}")
    if not identity.tiers:
        return
    if order_moves:
        # A tier's place among tiers decides what runs before whose policies: that is
        # the cluster admin's call, never a tier admin's.
        raise forbidden(identity, f"set the order of Tier {name} (only an admin without "
                        "tier limits sets tier order)")
    for tier in sorted(tiers, key=str):
        if tier is None or not identity.may_touch_tier(tier):
            where = f"tier {tier}" if tier else f"{kind} (not in a tier)"
            raise forbidden(identity, f"write {kind} {name} in {where}; allowed tiers: "
                            f"{', '.join(identity.tiers)}")


def _authorize_delete(identity: Identity, s: Stored) -> None:
    """`_authorize_write` for deleting what is stored, which need not be valid today.
    An ordered Tier deleted and made again without its order would run after every
    ordered tier: its deletion moves its order."""
    tiers = {_stored_tier(s.kind, s.name, s.doc)}
    if s.kind in ("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy") and "." in s.name:
        tiers.add(s.name.split(".", 1)[0])   # a valid policy's prefix is its tier
    _check_tiers(identity, s.kind, s.name, tiers,
                 s.kind == "Tier" and _stored_order(s.doc) is not None)


def _authorize_write(identity: Identity, resource: Resource, old: Stored | None) -> None:
    moves = False
    if isinstance(resource, Tier):
        old_order = _stored_order(old.doc) if old is not None else None
        moves = (None if resource.order is None else float(resource.order)) != old_order
    tiers = {_tier_of(resource)}
    if old is not None:
        tiers.add(_stored_tier(old.kind, old.name, old.doc))
    _check_tiers(identity, resource.kind, resource.name, tiers, moves)


def _parse(doc: Any) -> Resource:
    try:
        return parse_resource(doc)
    except ValidationError as e:
        raise ApiError(422, "Invalid", str(e)) from None


async def _current(store: Datastore, kind: str, name: str) -> Stored | None:
    try:
        return await store.get(kind, name)
    except NotFound:
        return None


def _no_tier(kind: str, name: str, tier: str) -> ApiError:
    return ApiError(422, "Invalid", f'{kind} {name}: spec.tier: tier "{tier}" does not exist')


def _requires(resource: Resource) -> tuple[tuple[str, str], ...]:
    """What must exist when a write of `resource` commits: a policy's tier. The store
    checks it inside the transaction (MissingReference), so a Tier deleted meanwhile
    cannot leave the policy orphaned."""
    if isinstance(resource, GlobalNetworkPolicy) and resource.spec.tier != DEFAULT_TIER:
        return (("Tier", resource.spec.tier),)
    return ()


async def _commit(store: Datastore, ops: list[Op], identity: Identity, dry_run: bool,
                  what: str, operation: str, unchanged_since: int | None = None
                  ) -> int | None:
    """Write `ops` as one audited transaction of `operation` (unless `dry_run`; the
    datastore's size limit is checked either way); the new revision. Each refusal names
    what went wrong and that nothing was `what` (applied, deleted, changed)."""
    try:
        store.check_size(ops, audited=True, unchanged=unchanged_since is not None)
        if dry_run or not ops:
            return None
        return (await store.transaction(ops, _audit(identity, operation),
                                        unchanged_since=unchanged_since)).revision
    except (Conflict, NotFound) as e:
        raise ApiError(409, "Conflict", f"{e}; nothing was {what}, try again") from None
    except MissingReference as e:
        raise _no_tier(e.kind, e.name, e.ref_name) from None
    except StillReferenced as e:
        raise ApiError(409, "Conflict", f"Tier {e.name} still holds policies: "
                       f"{', '.join(n for _, n in e.referrers[:10])}; nothing was {what}"
                       ) from None
    except TooLarge as e:
        raise ApiError(413, "RequestEntityTooLarge", f"{e}; nothing was {what}") from None


async def _check_refs(store: Datastore, resources: list[Resource]) -> None:
    """Policies must name a tier that exists (in the store or in the same request). An
    early answer (and the one dry runs get); the write itself carries `_requires`."""
    coming = {r.name for r in resources if isinstance(r, Tier)}
    for r in resources:
        if isinstance(r, GlobalNetworkPolicy) and r.spec.tier != DEFAULT_TIER \
                and r.spec.tier not in coming and await _current(store, "Tier", r.spec.tier) \
                is None:
            raise _no_tier(r.kind, r.name, r.spec.tier)


# -------------------------------------------------------------------------- handlers
async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if not request.app[HUB].ready.is_set():
        raise ApiError(503, "Unavailable", "not in sync with the datastore")
    return web.Response(text="ready\n")


async def list_resources(request: web.Request) -> web.Response:
    _require(request, "admin", "viewer")
    kind = _kind(request) if "kind" in request.match_info else None
    selector = None
    if "selector" in request.query:
        if len(request.query["selector"]) > limits.MAX_SELECTOR:
            raise ApiError(400, "BadRequest", f"selector: longer than {limits.MAX_SELECTOR} "
                           "characters")
        try:
            selector = parse(request.query["selector"])
        except SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
    items, revision = await request.app[STORE].list_resources(kind, selector)
    return _json({"kind": "List", "revision": revision,
                  "items": [s.doc for s in items if s.kind != STATUS_KIND]})


async def get_resource(request: web.Request) -> web.Response:
    _require(request, "admin", "viewer")
    kind, name = _kind(request), _name(request)
    try:
        return _json((await request.app[STORE].get(kind, name)).doc)
    except NotFound as e:
        raise ApiError(404, "NotFound", str(e)) from None


async def _text(request: web.Request, limit: int = MAX_BODY) -> str:
    """The body as text: at most `limit` bytes, UTF-8 (or ASCII), else a 4xx."""
    # aiohttp would inflate a compressed body (the server turns that off: main.py) while
    # Content-Length gives the compressed size, so a body read by it would be cut short
    # and an apply half-read; no client of ours compresses, so a coding is refused.
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise ApiError(415, "UnsupportedMediaType", f"Content-Encoding {coding[:40]!r}: "
                       "bodies are not compressed; send the body as it is")
    charset = (request.charset or "utf-8").lower()
    if charset not in TEXT_CHARSETS:
        raise ApiError(415, "UnsupportedMediaType", f"charset {charset[:40]!r}: bodies are "
                       "UTF-8")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "RequestEntityTooLarge", f"the body is larger than {limit:,} "
                       "bytes")
    try:
        raw = await request.content.readexactly(request.content_length) \
            if request.content_length is not None else await _until_end(request, limit + 1)
    except asyncio.IncompleteReadError:
        raise ApiError(400, "BadRequest", "the body is shorter than Content-Length") from None
    if len(raw) > limit:
        raise ApiError(413, "RequestEntityTooLarge", f"the body is larger than {limit:,} "
                       "bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "BadRequest", f"the body is not UTF-8: {e}") from None


async def _until_end(request: web.Request, most: int) -> bytes:
    """A body without Content-Length (chunked): read until it ends or `most` bytes came.
    One `read(n)` returns what has arrived so far, which may be the first chunk only."""
    chunks: list[bytes] = []
    size = 0
    while size < most:
        chunk = await request.content.read(most - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _body(request: web.Request, limit: int = MAX_BODY) -> Any:
    """The body as strict JSON (no duplicate keys, no NaN)."""
    text = await _text(request, limit)
    try:
        return json_value(text, "the body") if len(text) < 65536 else \
            await asyncio.to_thread(json_value, text, "the body")
    except LoadError as e:
        raise ApiError(400, "BadRequest", str(e)) from None


async def write_resource(request: web.Request) -> web.Response:
    identity = _require(request, "admin")
    store = request.app[STORE]
    kind = _kind(request)
    if request.method == "PUT":
        _name(request)
    doc = await _body(request)
    if isinstance(doc, dict) and doc.get("kind") != kind:
        what = "has no kind" if doc.get("kind") is None else \
            f"is a {str(doc.get('kind'))[:64]!r}"
        raise ApiError(400, "BadRequest", f"the body {what}, the URL says {kind}")
    resource = _parse(doc)
    if request.method == "PUT" and resource.name != request.match_info["name"]:
        raise ApiError(400, "BadRequest", f"the body names {resource.name}, the URL "
                       f"{request.match_info['name']}")
    dry_run = _dry_run(request)
    creating = request.method == "POST"
    # The resource as stored now: a tier admin's rights and a dry run's diff depend on
    # it. An admin without tier limits needs nothing of it: the transaction itself
    # refuses a create of what exists and an update of what does not, with the same
    # answers, so a write spares the read.
    pre_read = bool(identity.tiers) or dry_run
    old = await _current(store, kind, resource.name) if pre_read else None
    _authorize_write(identity, resource, old)
    await _check_refs(store, [resource])
    if pre_read:
        if creating and old is not None:
            raise _already_exists(kind, resource.name)
        if not creating and old is None:
            raise ApiError(404, "NotFound", f"{kind} {resource.name} not found")
    version = resource.metadata.resource_version
    if not creating and version is not None and not (version.isascii() and version.isdigit()):
        # Never passed on: the store's own words for "only create" and "only replace"
        # are not versions, and no other text is one this server wrote.
        raise ApiError(409, "Conflict", f"{kind} {resource.name}: resourceVersion "
                       f"{version!r} is not one this server wrote; read the resource again")
    expect = "absent" if creating else (version or "present")
    if identity.tiers and old is not None and version is None:
        # The rights were checked against `old`: the write commits only over it. A
        # change in between (another admin moving the policy to a tier outside this
        # admin's, or giving its Tier an order) makes it a 409, not a write over it.
        expect = str(old.revision)
    if dry_run:
        return _json(_diff_entry(resource, old), 200)
    try:
        tx = await store.transaction([Op("put", kind, resource.name, resource.dump(), expect,
                                         requires=_requires(resource))],
                                     _audit(identity, "create" if creating else "replace"))
    except Conflict as e:
        if creating:
            raise _already_exists(kind, resource.name) from None
        raise ApiError(409, "Conflict", str(e)) from None
    except NotFound as e:
        raise ApiError(404, "NotFound", str(e)) from None
    except MissingReference as e:
        raise _no_tier(e.kind, e.name, e.ref_name) from None
    return _stored_json(tx.stored[0], 201 if creating else 200)


def _already_exists(kind: str, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f"{kind} {name} already exists")


async def delete_resource(request: web.Request) -> web.Response:
    identity = _require(request, "admin")
    store = request.app[STORE]
    kind, name = _kind(request), _name(request)
    version = limits.revision_param(request.query.get("resourceVersion"), "resourceVersion")
    old = await _current(store, kind, name)
    if old is None:
        raise ApiError(404, "NotFound", f"{kind} {name} not found")
    _authorize_delete(identity, old)
    # An early answer (and the dry run's); the delete itself checks again as it commits.
    await _check_tiers_emptied(store, [Op("delete", kind, name)], then="")
    if _dry_run(request):
        return _json({"kind": kind, "name": name, "action": "deleted"})
    try:
        # Without a resourceVersion, the delete commits only over what was read (and
        # authorized, and is answered): a change in between is a 409, as in delete_many.
        tx = await store.transaction([Op("delete", kind, name,
                                         expect=str(old.revision if version is None
                                                    else version),
                                         unreferenced=TIER_USERS if kind == "Tier" else None)],
                                     _audit(identity, "delete"))
    except Conflict as e:
        raise ApiError(409, "Conflict", str(e)) from None
    except NotFound as e:
        raise ApiError(404, "NotFound", str(e)) from None
    except StillReferenced as e:
        raise ApiError(409, "Conflict", f"Tier {name} still holds policies: "
                       f"{', '.join(n for _, n in e.referrers[:10])}") from None
    return _stored_json(tx.stored[0])


# Dependents go first in a multi-document delete: policies, then what they may name, then
# the tiers that held them (one transaction, so the order is what a reader is shown).
DELETE_ORDER = {"StagedGlobalNetworkPolicy": 0, "GlobalNetworkPolicy": 1, "HostEndpoint": 2,
                "GlobalNetworkSet": 3, "Profile": 4, "Tier": 5}


def _delete_keys(text: str, is_json: bool) -> list[tuple[str, str]]:
    """(kind, name) of every document of a delete body: `kind` and `metadata.name` are
    all a document needs (the rest, as in the file that applied it, is not read)."""
    docs = flatten([json_value(text, "body")], "body") if is_json else documents(text, "body")
    keys: list[tuple[str, str]] = []
    for i, doc in enumerate(docs):
        where = f"body: document {i + 1}"
        raw_kind = doc.get("kind") if isinstance(doc, dict) else None
        kind = (KIND_ALIASES.get(raw_kind) or KIND_ALIASES.get(raw_kind.lower())) \
            if isinstance(raw_kind, str) else None
        if kind is None:
            raise LoadError(f"{where}: kind: {str(raw_kind)[:64]!r} is not a kind Bulkhead "
                            "stores")
        meta = doc.get("metadata")
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise LoadError(f"{where}: {kind}: metadata.name: is required")
        try:
            check_resource_name(kind, name)
        except ValidationError as e:
            raise LoadError(f"{where}: {kind} {name[:64]!r}: metadata.name: {e.problem}"
                            ) from None
        if (kind, name) not in keys:
            keys.append((kind, name))
    return keys


async def delete_many(request: web.Request) -> web.Response:
    """Delete every resource a YAML/JSON body names, all or nothing, in one transaction,
    dependents first (a Tier with the policies it holds goes in one request).

    `?dryRun=true` checks everything and deletes nothing; `?ignoreNotFound=true` reports
    resources already gone as `absent` instead of refusing the whole request."""
    identity = _require(request, "admin")
    store = request.app[STORE]
    dry_run = _dry_run(request)
    ignore_missing = limits.flag_param(request.query.get("ignoreNotFound"), "ignoreNotFound")
    text = await _text(request)
    try:
        keys = await asyncio.to_thread(_delete_keys, text,
                                       request.content_type == "application/json")
    except LoadError as e:
        raise ApiError(400, "BadRequest", str(e)) from None
    keys.sort(key=lambda k: DELETE_ORDER.get(k[0], 3))
    results: list[dict[str, Any]] = []
    ops: list[Op] = []
    for kind, name in keys:
        old = await _current(store, kind, name)
        if old is None:
            if not ignore_missing:
                raise ApiError(404, "NotFound", f"{kind} {name} not found; nothing was "
                               "deleted")
            results.append({"kind": kind, "name": name, "action": "absent"})
            continue
        _authorize_delete(identity, old)
        ops.append(Op("delete", kind, name, expect=str(old.revision),
                      unreferenced=TIER_USERS if kind == "Tier" else None))
        results.append({"kind": kind, "name": name, "action": "deleted"})
    await _check_tiers_emptied(store, ops)
    revision = await _commit(store, ops, identity, dry_run, "deleted", "delete")
    return _json({"dryRun": dry_run, "revision": revision, "results": results})


async def _check_tiers_emptied(store: Datastore, ops: list[Op],
                               leaving: set[tuple[str, str]] | None = None,
                               then: str = "; nothing was deleted") -> None:
    """An early answer (and the dry run's): every Tier deleted must lose all its policies
    in the same request (`leaving`: the policies that leave it; default: those `ops`
    delete). The transaction checks again as it commits."""
    tiers = {op.name for op in ops if op.kind == "Tier"}
    if not tiers:
        return
    going = leaving if leaving is not None else {(op.kind, op.name) for op in ops}
    held: dict[str, list[str]] = {}
    for kind in TIER_USERS.kinds:
        items, _ = await store.list_resources(kind)
        for s in items:
            tier = s.doc.get("spec", {}).get("tier")
            if tier in tiers and (s.kind, s.name) not in going:
                held.setdefault(tier, []).append(s.name)
    for tier, names in sorted(held.items()):
        raise ApiError(409, "Conflict", f"Tier {tier} still holds policies: "
                       f"{', '.join(names[:10])}{then}")


def _diff_entry(resource: Resource, old: Stored | None) -> dict[str, Any]:
    new = resource.dump()
    if old is None:
        action = "created"
    elif _strip(old.doc) == _strip(new):
        action = "unchanged"
    else:
        action = "configured"
    entry: dict[str, Any] = {"kind": resource.kind, "name": resource.name, "action": action}
    if action == "configured":
        assert old is not None
        entry["before"], entry["after"] = _strip(old.doc), _strip(new)
    elif action == "created":
        entry["after"] = _strip(new)
    return entry


async def apply(request: web.Request) -> web.Response:
    """Create or update every resource in a YAML/JSON body, all or nothing.

    `?mode=create` refuses resources that exist, `?mode=replace` ones that do not;
    `?dryRun=true` validates and returns the diff without writing. The caller's role is
    checked before the body is read; the body is decoded and validated off the event
    loop (YAML aliases refused, at most MAX_DOCUMENTS documents)."""
    identity = _require(request, "admin")
    store = request.app[STORE]
    mode = request.query.get("mode", "apply")
    if mode not in ("apply", "create", "replace"):
        raise ApiError(400, "BadRequest", f"mode {mode[:40]!r}: expected apply, create or "
                       "replace")
    dry_run = _dry_run(request)
    resources = await _resources_of_body(request)
    olds = [await _current(store, r.kind, r.name) for r in resources]
    for r, old in zip(resources, olds, strict=True):
        _authorize_write(identity, r, old)
        if mode == "create" and old is not None:
            raise ApiError(409, "AlreadyExists", f"{r.kind} {r.name} already exists; nothing "
                           "was created")
        if mode == "replace" and old is None:
            raise ApiError(404, "NotFound", f"{r.kind} {r.name} not found; nothing was "
                           "replaced")
    await _check_refs(store, resources)
    # Comparing and serializing thousands of documents is CPU work: off the event loop.
    diff, ops = await asyncio.to_thread(_plan_puts, resources, olds)
    revision = await _commit(store, ops, identity, dry_run, "applied", mode)
    return await _big_json({"dryRun": dry_run, "revision": revision, "results": diff})


def _plan_puts(resources: list[Resource], olds: list[Stored | None]
               ) -> tuple[list[dict[str, Any]], list[Op]]:
    """The diff of each resource against what the store holds, and the puts it takes."""
    diff = [_diff_entry(r, old) for r, old in zip(resources, olds, strict=True)]
    ops = [Op("put", r.kind, r.name, r.dump(), str(old.revision) if old else "absent",
              requires=_requires(r))
           for r, old, d in zip(resources, olds, diff, strict=True) if d["action"] != "unchanged"]
    return diff, ops


async def _big_json(data: dict[str, Any]) -> web.Response:
    """A JSON answer serialized off the event loop (it may hold thousands of documents)."""
    body = await asyncio.to_thread(json.dumps, data)
    return web.Response(text=body, content_type="application/json")


async def _resources_of_body(request: web.Request) -> list[Resource]:
    """The resources of a write's body, decoded and validated off the event loop; a
    resource named twice is refused."""
    text = await _text(request)
    try:
        resources = await asyncio.to_thread(_load_body, text,
                                            request.content_type == "application/json")
    except (ValidationError, LoadError) as e:
        raise ApiError(422 if isinstance(e, ValidationError) else 400,
                       "Invalid" if isinstance(e, ValidationError) else "BadRequest",
                       str(e)) from None
    seen: set[tuple[str, str]] = set()
    for r in resources:
        if r.key in seen:
            raise ApiError(422, "Invalid", f"{r.kind} {r.name}: metadata.name: is defined "
                           "twice in the body")
        seen.add(r.key)
    return resources


def _load_body(text: str, is_json: bool) -> list[Resource]:
    """An apply body's resources: strict JSON when the client says JSON, else YAML."""
    docs = flatten([json_value(text, "body")], "body") if is_json else documents(text, "body")
    return parse_documents(docs, "body")


# ------------------------------------ desired states: sync, rollback and promote
POLICY_KINDS = ("GlobalNetworkPolicy", "StagedGlobalNetworkPolicy")


async def _converge(request: web.Request, identity: Identity, desired: list[Resource],
                    scope: list[Stored], operation: str, unchanged_since: int | None = None,
                    preconditions: bool = False) -> web.Response:
    """Make the store hold exactly `desired` where it now holds `scope`: puts for what is
    new or differs, deletes for what `scope` has and `desired` lacks, in one transaction
    (all or nothing); with `?dryRun=true` only the answer. Results as apply's, with
    `deleted` (and its `before`) for what goes. With `preconditions`, a resource of
    `desired` that carries a `metadata.resourceVersion` must be stored at that version
    (`_check_precondition`)."""
    store = request.app[STORE]
    dry_run = _dry_run(request)
    current = {(s.kind, s.name): s for s in scope}
    wanted = {r.key for r in desired}
    olds: list[Stored | None] = []
    for r in desired:
        old = current.get(r.key) or await _current(store, r.kind, r.name)
        _authorize_write(identity, r, old)
        if preconditions:
            _check_precondition(r, old)
        olds.append(old)

    def plan() -> tuple[list[dict[str, Any]], list[Op]]:
        # Comparing thousands of documents is CPU work: off the event loop, as apply's.
        results, ops = _plan_puts(desired, olds)
        for key, s in sorted(current.items(), key=lambda kv: DELETE_ORDER.get(kv[0][0], 3)):
            if key not in wanted:
                _plan_delete(identity, s, results, ops)
        return results, ops

    results, ops = await asyncio.to_thread(plan)
    await _check_refs(store, desired)
    # A Tier that goes must lose its policies here: deleted, or moved to another tier.
    deletes = [op for op in ops if op.action == "delete"]
    gone_tiers = {op.name for op in deletes if op.kind == "Tier"}
    moved = {r.key for r in desired
             if isinstance(r, GlobalNetworkPolicy) and r.spec.tier not in gone_tiers}
    await _check_tiers_emptied(store, deletes,
                               leaving={(op.kind, op.name) for op in deletes} | moved)
    revision = await _commit(store, ops, identity, dry_run, "changed", operation,
                             unchanged_since)
    return await _big_json({"dryRun": dry_run, "revision": revision, "results": results})


def _check_precondition(r: Resource, old: Stored | None) -> None:
    """A sync's `?preconditions=true`: `r`, if it carries a resourceVersion, must be
    stored at that version; 409 otherwise, nothing changed. A document sent back as it
    was read (the host endpoints a purge keeps) then cannot undo a write that came after
    the reading. Its put, if any, expects the version read, and a resource left
    unchanged is not written, so a write after this check cannot be undone either."""
    version = r.metadata.resource_version
    if version is None:
        return
    if old is None:
        raise ApiError(409, "Conflict", f"{r.kind} {r.name}: resourceVersion is "
                       f"{version[:64]}, but it does not exist (deleted after it was read, "
                       "or never written); read it again; nothing was changed")
    if str(old.revision) != version:
        raise ApiError(409, "Conflict", f"{r.kind} {r.name}: resourceVersion is "
                       f"{old.revision}, not {version[:64]}: it changed after it was read; "
                       "read it again; nothing was changed")


def _plan_delete(identity: Identity, s: Stored, results: list[dict[str, Any]],
                 ops: list[Op]) -> None:
    """Authorize the delete of `s`, then add its result (`deleted`, with its `before`) and
    its op, which expects the revision read."""
    _authorize_delete(identity, s)
    results.append({"kind": s.kind, "name": s.name, "action": "deleted",
                    "before": _strip(s.doc)})
    ops.append(Op("delete", s.kind, s.name, expect=str(s.revision),
                  unreferenced=TIER_USERS if s.kind == "Tier" else None))


async def sync(request: web.Request) -> web.Response:
    """`POST /v1/sync?tier=T` or `?owner=O`: the policies in the body become exactly the
    policies of tier T (or those labelled microseg.bulkhead.io/managed-by=O): new ones
    created, changed ones updated, the others of the scope deleted, in one transaction.
    `?kind=HostEndpoint&owner=O` does the same for the host endpoints of an owner (an
    inventory's); `label=KEY` names the owner's label instead of managed-by, and
    `adopt=true` takes over resources of the body that exist with another owner (409
    otherwise). `preconditions=true` makes the body's resourceVersions preconditions."""
    identity = _require(request, "admin")
    query = request.query
    tier, owner = query.get("tier"), query.get("owner")
    if (tier is None) == (owner is None):
        raise ApiError(400, "BadRequest", "give exactly one of tier=NAME and owner=VALUE")
    kind = query.get("kind")
    if kind not in (None, "HostEndpoint"):
        raise ApiError(400, "BadRequest", f"kind: {kind[:64]!r}: a sync is of policies (no "
                       "kind) or of HostEndpoint")
    if "label" in query and owner is None:
        raise ApiError(400, "BadRequest", "label: only with owner=VALUE")
    label = query.get("label", OWNER_LABEL)
    try:
        check_label_key(Reader("sync", "label", "label", label), label)
        adopt = limits.flag_param(query.get("adopt"), "adopt")
        preconditions = limits.flag_param(query.get("preconditions"), "preconditions")
    except ValidationError as e:
        raise ApiError(400, "BadRequest", f"label: {e.problem}") from None
    except limits.BadInput as e:
        raise ApiError(400, "BadRequest", str(e)) from None
    if kind is not None and tier is not None:
        raise ApiError(400, "BadRequest", "a sync of HostEndpoint is by owner=VALUE, not tier")
    desired = await _resources_of_body(request)
    kinds = POLICY_KINDS if kind is None else (kind,)
    for r in desired:
        if r.kind not in kinds:
            raise ApiError(422, "Invalid", f"{r.kind} {r.name}: a sync "
                           f"{'of HostEndpoint ' if kind else ''}holds only "
                           f"{' and '.join(kinds)} resources")
        if tier is not None and isinstance(r, GlobalNetworkPolicy) and r.spec.tier != tier:
            raise ApiError(422, "Invalid", f"{r.kind} {r.name}: spec.tier: is "
                           f'"{r.spec.tier}", not the tier synced ("{tier}")')
        if owner is not None and r.metadata.labels.get(label) != owner:
            raise ApiError(422, "Invalid", f"{r.kind} {r.name}: metadata.labels: "
                           f'{label} must be "{owner}", the owner synced')
    scope: list[Stored] = []
    for k in kinds:
        items, _ = await request.app[STORE].list_resources(k)
        scope += [s for s in items
                  if (tier is not None and s.doc.get("spec", {}).get("tier", DEFAULT_TIER)
                      == tier) or (owner is not None and s.labels.get(label) == owner)]
    if owner is not None and not adopt:
        for r in desired:   # another owner's resource is not taken over silently
            old = await _current(request.app[STORE], r.kind, r.name)
            theirs = old.labels.get(label) if old else None
            if old is not None and theirs != owner:
                raise ApiError(409, "Conflict", f"{r.kind} {r.name} exists and is "
                               f"{'owned by ' + repr(theirs) if theirs else 'not owned'} "
                               f"({label}); adopt=true takes it over; nothing was changed")
    # Not committed on the reading of the whole store, as a rollback is: a write anywhere
    # in between (another tier's, another owner's) would fail it. Each put and delete
    # expects the version read; a resource of the scope created in between survives, as
    # if created just after the sync.
    return await _converge(request, identity, desired, scope, "sync",
                           preconditions=preconditions)


async def rollback(request: web.Request) -> web.Response:
    """`POST /v1/rollback?revision=N`: every resource back to what it was at revision N
    (what came later deleted), in one transaction; a cluster admin's."""
    identity = _require(request, "admin")
    if identity.tiers:
        raise forbidden(identity, "roll back the whole store (only an admin without tier "
                        "limits may)")
    target = limits.revision_param(request.query.get("revision"))
    if target is None:
        raise ApiError(400, "BadRequest", "revision: required (the revision to go back to)")
    then = await _past(request, target)
    try:   # every resource validated: CPU work, off the event loop
        desired = await asyncio.to_thread(lambda: [parse_resource(_strip(s.doc))
                                                   for s in then])
    except ValidationError as e:
        raise ApiError(422, "Invalid", f"at revision {target}: {e}; it is not valid today, "
                       "nothing was changed") from None
    scope, read_at = await request.app[STORE].list_resources()
    # Committed on this reading or not at all: a write that came in between (a change
    # the rollback would not undo, a resource it would not delete) fails it, 409.
    return await _converge(request, identity, desired, scope, "rollback",
                           unchanged_since=read_at)


# The most names, each of the longest a policy may have (253), twice: in names and, with
# a version of up to 64 characters, in resourceVersions (about 580 KB).
PROMOTE_MAX_BODY = 640 * 1024
PROMOTE_MAX_NAMES = 1000


async def promote(request: web.Request) -> web.Response:
    """`POST /v1/promote` with `{"names": [NAME...], "dryRun": false}`: each
    StagedGlobalNetworkPolicy named takes effect, in one transaction with its staged copy
    deleted. stagedAction Set writes the GlobalNetworkPolicy of its name from it
    (`StagedGlobalNetworkPolicy.enforced`); Delete deletes the enforced policy it stands
    for. Either way an enforced policy the staged view pairs with it under another
    spelling of the name (`foo` and `TIER.foo` in TIER) goes too, so the store ends as
    the staged view showed. An unknown name: 404, nothing changed. `"resourceVersions":
    {NAME: VERSION}` pins named ones to the versions a preview judged: one changed since
    (or written anew) refuses the whole request, 409."""
    identity = _require(request, "admin")
    store = request.app[STORE]
    names, pinned, dry_run = _promote_request(await _body(request, PROMOTE_MAX_BODY))
    dry_run = dry_run or _dry_run(request)
    results: list[dict[str, Any]] = []
    ops: list[Op] = []
    enforced: list[Resource] = []
    standing: dict[tuple[str, str], str] = {}
    for name in names:
        staged = await _current(store, "StagedGlobalNetworkPolicy", name)
        if staged is None:
            raise ApiError(404, "NotFound", f"StagedGlobalNetworkPolicy {name} not found; "
                           "nothing was promoted")
        _authorize_delete(identity, staged)   # its tier's admin, before what it says
        if name in pinned and pinned[name] != str(staged.revision):
            # The staged copy's delete below expects the version read, so a change after
            # this check fails the transaction too.
            raise ApiError(409, "Conflict", f"StagedGlobalNetworkPolicy {name}: "
                           f"resourceVersion is {staged.revision}, not {pinned[name][:64]}: "
                           "it changed after the version given was read (by a preview?); "
                           "preview it again; nothing was promoted")
        try:
            policy = parse_resource(staged.doc)
        except ValidationError as e:
            raise ApiError(422, "Invalid", f"{e} (as stored, by an older server: today's "
                           "checks refuse it; apply it again corrected); nothing was "
                           "promoted") from None
        assert isinstance(policy, StagedGlobalNetworkPolicy)
        _authorize_write(identity, policy, None)
        key = (policy.spec.tier, policy.bare_name)
        if key in standing:
            raise ApiError(422, "Invalid", f"StagedGlobalNetworkPolicy {standing[key]} and "
                           f"{name} both stand for the policy {key[1]} of tier {key[0]}; "
                           "promote one of them; nothing was promoted")
        standing[key] = name
        await _check_no_rival(store, policy, names)
        paired = await _paired(store, policy)
        if policy.spec.staged_action != "Delete":
            new = policy.enforced()
            old = paired.pop(new.name, None) or \
                await _current(store, "GlobalNetworkPolicy", new.name)
            if old is not None and old.doc.get("spec", {}).get("tier", DEFAULT_TIER) != \
                    policy.spec.tier:
                raise ApiError(422, "Invalid", f"GlobalNetworkPolicy {new.name} is in tier "
                               f"{old.doc.get('spec', {}).get('tier', DEFAULT_TIER)}; "
                               f"promoting StagedGlobalNetworkPolicy {name} of tier "
                               f"{policy.spec.tier} would replace it; nothing was promoted")
            _authorize_write(identity, new, old)
            enforced.append(new)
            diff, puts = _plan_puts([new], [old])
            results += diff
            ops += puts
        for s in paired.values():
            _plan_delete(identity, s, results, ops)
        _plan_delete(identity, staged, results, ops)
    touched = Counter((op.kind, op.name) for op in ops)
    for (kind, name), times in touched.items():
        if times > 1:
            raise ApiError(422, "Invalid", f"{kind} {name}: more than one of the staged "
                           "policies named stands for it; nothing was promoted")
    await _check_refs(store, enforced)
    revision = await _commit(store, ops, identity, dry_run, "promoted", "promote")
    return _json({"dryRun": dry_run, "revision": revision, "results": results})


def _promote_request(body: Any) -> tuple[list[str], dict[str, str], bool]:
    """The names (each once, in order), the versions some are pinned to and the dry-run
    flag of a promote body."""
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", 'the body: expected {"names": [...], "dryRun": '
                       "false}")
    unknown = sorted(set(body) - {"names", "resourceVersions", "dryRun"})
    if unknown:
        raise ApiError(400, "BadRequest", f"the body: unknown field {unknown[0][:64]!r} "
                       "(names, resourceVersions, dryRun)")
    names, dry_run = body.get("names"), body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise ApiError(400, "BadRequest", "dryRun: expected true or false")
    if not isinstance(names, list) or not names or len(names) > PROMOTE_MAX_NAMES:
        raise ApiError(400, "BadRequest", f"names: expected a list of 1 to "
                       f"{PROMOTE_MAX_NAMES} StagedGlobalNetworkPolicy names")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ApiError(400, "BadRequest", f"names[{i}]: expected a string")
        try:
            check_resource_name("StagedGlobalNetworkPolicy", name)
        except ValidationError as e:
            raise ApiError(400, "BadRequest", f"names[{i}]: {e.problem}") from None
    pinned = body.get("resourceVersions", {})
    if not isinstance(pinned, dict):
        raise ApiError(400, "BadRequest", "resourceVersions: expected an object of "
                       "StagedGlobalNetworkPolicy names and their versions")
    named = set(names)
    for name, version in pinned.items():
        if name not in named:
            raise ApiError(400, "BadRequest", f"resourceVersions: {name[:256]!r} is not "
                           "among names")
        if not (isinstance(version, str) and 0 < len(version) <= 64 and
                version.isprintable()):
            raise ApiError(400, "BadRequest", f"resourceVersions.{name}: expected a "
                           "version as the server wrote it (text of 1 to 64 printable "
                           "characters)")
    return list(dict.fromkeys(names)), pinned, dry_run


async def _check_no_rival(store: Datastore, staged: StagedGlobalNetworkPolicy,
                          names: list[str]) -> None:
    """422 when another staged policy, not named, stands for the same policy (`p` and
    `TIER.p` in TIER): the staged view shows only one of them, so promoting either
    alone would enforce what no staged verdict showed. (Both named: promote's own
    check.)"""
    tier, bare = staged.spec.tier, staged.bare_name
    for other in dict.fromkeys((bare, f"{tier}.{bare}")):
        if other == staged.name or other in names:
            continue
        rival = await _current(store, "StagedGlobalNetworkPolicy", other)
        if rival is not None and \
                rival.doc.get("spec", {}).get("tier", DEFAULT_TIER) == tier:
            raise ApiError(422, "Invalid", f"StagedGlobalNetworkPolicy {other} stands for "
                           f"the policy {bare} of tier {tier} too, and the staged view "
                           f"shows only one of them; delete one, then promote {staged.name}; "
                           "nothing was promoted")


async def _paired(store: Datastore, staged: StagedGlobalNetworkPolicy) -> dict[str, Stored]:
    """The enforced policies `staged` replaces or deletes in the staged view
    (`bulkhead.policy.semantics.staged_view`): those of its tier and bare name, by name."""
    tier, bare = staged.spec.tier, staged.bare_name
    found: dict[str, Stored] = {}
    for name in dict.fromkeys((staged.name, bare, f"{tier}.{bare}")):
        s = await _current(store, "GlobalNetworkPolicy", name)
        if s is not None and s.doc.get("spec", {}).get("tier", DEFAULT_TIER) == tier:
            found[name] = s
    return found


async def _past(request: web.Request, revision: int) -> list[Stored]:
    try:
        return await request.app[STORE].list_at(revision)
    except BeforeUndo as e:
        raise ApiError(410, "Gone", str(e)) from None
    except TooOld:
        raise ApiError(410, "Gone", f"revision {revision} is older than the kept history "
                       "(see compactionRetain)") from None
    except FutureRevision as e:
        raise ApiError(400, "BadRequest", str(e)) from None


async def export(request: web.Request) -> web.Response:
    """`GET /v1/export[?revision=N][&tier=T]`: every resource (or tier T and its policies)
    as it was at revision N (default: now), without the fields the server owns."""
    _require(request, "admin", "viewer")
    revision = limits.revision_param(request.query.get("revision"))
    tier = request.query.get("tier")
    if revision is None:
        items, revision = await request.app[STORE].list_resources()
    else:
        items = await _past(request, revision)
    return web.Response(text=await asyncio.to_thread(_export_body, items, revision, tier),
                        content_type="application/json")


def _export_body(items: list[Stored], revision: int, tier: str | None) -> str:
    """The export's answer: the resources (of `tier`), dependencies first, without the
    fields the server owns. Stripping and serializing every resource is CPU work: the
    caller runs it off the event loop."""
    if tier is not None:
        items = [s for s in items if (s.kind == "Tier" and s.name == tier) or
                 (s.kind in POLICY_KINDS and s.doc.get("spec", {}).get("tier") == tier)]
    items = sorted(items, key=lambda s: (DELETE_ORDER.get(s.kind, 3) * -1, s.kind, s.name))
    return json.dumps({"revision": revision, "items": [_strip(s.doc) for s in items]})


HISTORY_MAX_CHANGES = AUDIT_MAX_CHANGES


async def history(request: web.Request) -> web.Response:
    """`GET /v1/history[?limit=N][&kind=K][&name=NAME]`: who changed what, newest first."""
    _require(request, "admin", "viewer")
    raw = request.query.get("limit", "100")
    # ASCII digits only (str.isdigit takes "²", which int() refuses), the whole of them
    # read: "00001000000" is a million, not 1.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and 1 <= int(raw) <= 1000):
        raise ApiError(400, "BadRequest", f"limit: {raw[:20]!r} is not a number from 1 to "
                       "1000")
    kind = None
    if "kind" in request.query:
        raw_kind = request.query["kind"]
        kind = KIND_ALIASES.get(raw_kind) or KIND_ALIASES.get(raw_kind.lower())
        if kind is None:
            raise ApiError(400, "BadRequest", f"kind: unknown kind {raw_kind[:64]!r}")
    # At most HISTORY_MAX_CHANGES changes in one answer: the rest is left out, and said.
    entries, cut = await request.app[STORE].audit_log(
        int(raw), kind, request.query.get("name"), max_changes=HISTORY_MAX_CHANGES)
    return _json({"entries": entries, **({"truncated": True} if cut else {})})


async def snapshot(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if not hub.ready.is_set():
        raise ApiError(503, "Unavailable", "not in sync with the datastore")
    return _json({"revision": hub.revision, "items": hub.policy_objects()})


def _snapshot_body(hub: Hub) -> bytes:
    return json.dumps({"type": "snapshot", "revision": hub.revision,
                       "items": hub.policy_objects()}).encode()


def _events_body(revision: int, events: list[WireEvent]) -> bytes:
    # Events are serialized once, in the hub, and shared by every watcher.
    return b'{"type":"events","revision":%d,"events":[' % revision + \
        b",".join(e.json for e in events) + b"]}"


class _LastLine:
    """The last streamed events line and what it answers (the revision it starts after,
    the one it brings to): the watchers a change wakes all want the same one, so it is
    built once and the same bytes are written to each."""

    def __init__(self) -> None:
        self.key: tuple[int, int] = (-1, -1)
        self.last: WireEvent | None = None   # the same object: not a window refilled since
        self.line = b""

    def get(self, after: int, revision: int, events: list[WireEvent]) -> bytes:
        if self.key != (after, revision) or self.last is not events[-1]:
            self.key, self.last = (after, revision), events[-1]
            self.line = _events_body(revision, events) + b"\n"
        return self.line


LAST_LINE = web.AppKey("last_line", _LastLine)


async def watch(request: web.Request) -> web.StreamResponse:
    """`?revision=R&timeout=S`: the events after R, or a snapshot (without `revision`, on
    first contact, or when R is older than the server's window).

    Long-poll by default: one answer, after the first change or `timeout` seconds. With
    `stream=true` the answer stays open and carries one JSON document per line: events as
    they come, and `{"type": "heartbeat", "revision": R}` every `timeout` seconds."""
    hub = request.app[HUB]
    after = limits.revision_param(request.query.get("revision"))
    stream = limits.flag_param(request.query.get("stream"), "stream")
    timeout = limits.seconds_param(request.query.get("timeout"), "timeout", 30.0,
                                   limits.MIN_HEARTBEAT if stream else 0.0)
    if not hub.ready.is_set():
        raise ApiError(503, "Unavailable", "not in sync with the datastore")
    if not stream:
        events, revision = (None, hub.revision) if after is None else \
            await hub.wait(after, timeout)
        if peer_revoked(request):   # revoked while it waited: nothing more for it
            raise ApiError(403, "Forbidden", "certificate revoked")
        body = _snapshot_body(hub) if events is None else _events_body(revision, events)
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    if after is None:
        after = hub.revision
        await response.write(_snapshot_body(hub) + b"\n")
    stopping = request.app[STOPPING]
    last_line = request.app[LAST_LINE]
    # Every pass awaits the hub for at least MIN_HEARTBEAT seconds unless there is news,
    # and ends when the client is gone, its certificate is revoked, or the server stops
    # (agents reconnect elsewhere).
    while not stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing() or peer_revoked(request):
            break
        events, revision = await hub.wait(after, timeout)
        # The wait may have lasted the whole heartbeat interval: a certificate revoked
        # meanwhile gets nothing more, not even the change that ended the wait.
        if stopping.is_set() or peer_revoked(request):
            break
        if events is None:
            after, line = hub.revision, _snapshot_body(hub) + b"\n"
        elif events:
            after, line = revision, last_line.get(after, revision, events)
        else:
            after, line = revision, b'{"type":"heartbeat","revision":%d}\n' % revision
        try:
            await response.write(line)
        except ConnectionResetError:   # the agent closed the stream: its answer ends here
            request[CLIENT_GONE] = True
            break
    return response


async def post_status(request: web.Request) -> web.Response:
    # A node's status is its own: only the agent whose certificate names the node reports
    # it, so no admin (and no other agent) can fake convergence.
    identity = _require(request, "agent")
    node = _name(request, "node")
    if identity.name != node:
        raise forbidden(identity, f"report status for node {node}")
    body = await _body(request, limits.STATUS_MAX_BYTES)
    try:
        status = limits.agent_status(node, body)
    except limits.BadInput as e:
        raise ApiError(422, "Invalid", str(e)) from None
    version = limits.agent_version(request.headers.get("User-Agent"))
    if version is not None:
        status["agentVersion"] = version
    doc = {"kind": STATUS_KIND, "metadata": {"name": node},
           "status": {**status,
                      "lastReport": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}}
    # Kept apart from the resources: no revision, no event, no history to compact.
    await request.app[STORE].put_status(node, doc)
    return _json(doc)


async def delete_status(request: web.Request) -> web.Response:
    """Forget a node's status report: a host decommissioned, renamed or down for a
    while no longer holds up every wait for convergence (`bulkhead nodes`, the
    collection's `wait`). Its agent's next report brings it back. Fleet-wide, so for
    admins without tier limits. `?dryRun=true` says what would go."""
    identity = _require(request, "admin")
    node = _name(request, "node")
    if identity.tiers:
        raise forbidden(identity, f"forget node {node}'s status (not a tier's)")
    store = request.app[STORE]
    dry_run = _dry_run(request)
    found = node in (await store.list_status())[0] if dry_run \
        else await store.delete_status(node)
    if not found:
        raise ApiError(404, "NotFound", f"node {node} has no status report")
    if dry_run:
        return _json({"node": node, "action": "forgotten", "dryRun": True})
    log.info("node %s's status report forgotten by %s", node, identity.name)
    return _json({"node": node, "action": "forgotten", "dryRun": False})


def _flow_logs(request: web.Request) -> FlowLogs:
    logs = request.app.get(FLOWS)
    if logs is None:
        raise ApiError(503, "Unavailable", "flow logs are not set up on this server")
    return logs


def _dns_logs(request: web.Request) -> DnsLogs:
    logs = request.app.get(DNS)
    if logs is None:
        raise ApiError(503, "Unavailable", "DNS logs are not set up on this server")
    return logs


async def _ingest(request: web.Request, key: web.AppKey[Any]) -> web.Response:
    """An agent's batch of records, `{"records": [...]}`, stored whole or not at all.
    Only agents send them, each only its own node's: the role is checked before the body
    is read, every record's node before any other field."""
    try:
        identity = _require(request, "agent")
    except ApiError:
        if key in request.app:
            request.app[key].refused("forbidden")
        raise
    logs: RecordLogs = _flow_logs(request) if key is FLOWS else _dns_logs(request)
    batch = request.headers.get("Idempotency-Key")
    if batch is not None:
        if not BATCH_KEY.fullmatch(batch):
            logs.refused("invalid")
            raise ApiError(400, "BadRequest", "Idempotency-Key: 1 to 64 letters, digits, "
                           "'-' or '_'")
        before = logs.stored_before(identity.name, batch)
        if before is not None:   # sent again, its answer lost: stored once, said so
            logs.counters["duplicates"] += 1
            return _json({"stored": 0, "duplicate": True, "storedBefore": before})
        if not logs.storing(identity.name, batch):
            raise ApiError(503, "Unavailable", f"agent {identity.name}: this batch is being "
                           "stored now; send it again in a moment", headers={"Retry-After": "1"})
    try:
        stored = await _ingest_body(request, logs, identity)
    except BaseException:
        if batch is not None:
            logs.settled(identity.name, batch, None)
        raise
    if batch is not None:
        logs.settled(identity.name, batch, stored)
    return _json({"stored": stored})


async def _ingest_body(request: web.Request, logs: RecordLogs, identity: Identity) -> int:
    """The body of `_ingest` once the batch is known new: charged to the node's budget,
    read, parsed and stored; the number of records stored."""
    wait = logs.budget.wait(identity.name)
    if wait > 0:   # over its share: told so before its body is read
        logs.refused("rate_limited")
        raise ApiError(429, "TooManyRequests", f"agent {identity.name}: more than "
                       f"{logs.budget.per_minute:,} bytes of {logs.kind} records a minute; "
                       f"nothing was stored, send again in {math.ceil(wait)} s",
                       headers={"Retry-After": str(math.ceil(wait))})
    # Taken out now, what the body says it holds (a chunked one: the most a batch may):
    # a node's requests arriving together cannot all pass the check above before any
    # is charged. Settled with what arrived once the body is read.
    reserved = min(MAX_BATCH_BYTES + 1, request.content_length
                   if request.content_length is not None else MAX_BATCH_BYTES)
    logs.budget.charge(identity.name, reserved)
    async with logs.ingesting:   # a few batches at a time; the others wait unread
        try:
            text = await _text(request, MAX_BATCH_BYTES)
        except ApiError as e:
            logs.refused("too_large" if e.status == 413 else "invalid")
            raise
        finally:   # what arrived counts, taken or not
            logs.budget.charge(identity.name, request.content.total_bytes - reserved)
        try:
            stored: int = await asyncio.to_thread(logs.ingest, text, identity.name,
                                                  request.app[HUB].endpoint_node)
        except Refused as e:
            raise ApiError(e.status, e.reason, e.message) from None
    return stored


async def post_flows(request: web.Request) -> web.Response:
    """`POST /v1/flows`: an agent's batch of flow records (`_ingest`)."""
    return await _ingest(request, FLOWS)


async def post_dns(request: web.Request) -> web.Response:
    """`POST /v1/dns`: an agent's batch of DNS log records (`_ingest`)."""
    return await _ingest(request, DNS)


async def _query(request: web.Request, logs: RecordLogs, wanted: Any) -> web.Response:
    """A checked query answered off the event loop, a few at a time."""
    async with logs.querying:
        try:
            answer = await asyncio.to_thread(logs.answer, wanted)
        except Refused as e:
            raise ApiError(e.status, e.reason, e.message) from None
    return await _big_json(answer)


async def get_dns(request: web.Request) -> web.Response:
    """`GET /v1/dns?since=&until=&node=&client=&qname=&rcode=&after=&limit=` (records,
    newest first; with `after`, what was stored since, oldest first)."""
    _require(request, "admin", "viewer")
    logs = _dns_logs(request)
    return await _query(request, logs, parse_dns_request(list(request.query.items()),
                                                         time.time()))


async def get_flows(request: web.Request) -> web.Response:
    """`GET /v1/flows?since=&until=&node=&reporter=&action=&policy=&tier=&staged=differs&
    selector=&endpoint=&after=&limit=` (records, newest first; with `after`, what was
    stored since, oldest first) or `&top=N` (top talkers by bytes)."""
    _require(request, "admin", "viewer")
    logs = _flow_logs(request)
    return await _query(request, logs, parse_request(list(request.query.items()),
                                                     time.time()))


async def post_preview(request: web.Request) -> web.Response:
    """`POST /v1/preview` with `{"manifests": "...", "promote": [...] | "all" | "none",
    "enforce": SELECTOR, "hours": 24, "until": T, "protected": SELECTOR, "limit": 100}`:
    which stored flows the proposed state would decide differently
    (`bulkhead.server.preview`). Admins and viewers: it changes nothing. Checked, then
    judged off the event loop, a few at a time (the flow queries' bound)."""
    _require(request, "admin", "viewer")
    logs = _flow_logs(request)
    hub = request.app[HUB]
    if not hub.ready.is_set():
        raise ApiError(503, "Unavailable", "not in sync with the datastore")
    wanted = preview_api.parse_preview(await _body(request, preview_api.MAX_BODY))
    objects = hub.policy_objects()

    def judge() -> dict[str, Any]:
        manifests = preview_api.load_manifests(wanted.manifests) if wanted.manifests else []
        # What the agents enforce: a stored object today's checks refuse (taken by an
        # older server), or a policy whose tier is left out, is left out, and named.
        parsed: dict[tuple[str, str], Resource] = {}
        left_out: list[str] = []
        gone: set[tuple[str, str]] = set()
        for doc in objects:
            try:
                r = parse_resource(doc)
                parsed[r.key] = r
            except ValidationError as e:
                left_out.append(str(e))
                gone.add((e.kind, e.name))
        now_snapshot, refused = enforceable(parsed)
        left_out += [refused[k] for k in sorted(refused)]
        if isinstance(wanted.promote, tuple):
            for name in wanted.promote:
                if ("StagedGlobalNetworkPolicy", name) in gone | set(refused):
                    raise PromotionConflict(
                        f"StagedGlobalNetworkPolicy {name} is stored, but left out as the "
                        "agents leave it out (today's checks refuse it: see leftOut); "
                        "apply it again corrected")
        current = [r for k, r in sorted(parsed.items()) if k not in refused]
        proposed, names = proposed_state(current, manifests, wanted.promote, wanted.enforce)
        answer = preview_api.preview(logs.store, proposed, wanted, time.time(), names,
                                     now_snapshot)
        # The version of each promoted staged policy judged as stored, for a promote
        # pinned to what was judged. None when files were judged too: the state judged
        # is not the store's until they are applied, whatever they hold.
        answer["promotedVersions"] = {} if manifests else {
            n: version for n in names
            if (k := ("StagedGlobalNetworkPolicy", n)) in parsed
            and (version := parsed[k].metadata.resource_version)}
        if left_out:
            answer["leftOut"] = left_out
        return answer

    # Parsing the manifests and judging are CPU work: off the event loop, and a few at a
    # time, with the flow queries.
    async with logs.querying:
        try:
            answer = await asyncio.to_thread(judge)
        except LoadError as e:
            raise ApiError(400, "BadRequest", f"manifests: {e}; nothing was previewed"
                           ) from None
        except UnknownStaged as e:
            raise ApiError(404, "NotFound", str(e)) from None
        except PromotionConflict as e:
            raise ApiError(422, "Invalid", f"{e}; nothing was previewed") from None
        except ValidationError as e:
            raise ApiError(422, "Invalid", f"manifests: {e}; nothing was previewed"
                           ) from None
        except FlowQueryTimeout as e:
            raise ApiError(503, "Unavailable", str(e)) from None
        except FlowStoreError as e:
            raise ApiError(503, "Unavailable", f"the flow log store failed: {e}") from None
    return await _big_json(answer)


async def nodes(request: web.Request) -> web.Response:
    _require(request, "admin", "viewer")
    reports, revision = await request.app[STORE].list_status()
    target = limits.revision_param(request.query.get("revision"))
    out = []
    for node, doc in reports.items():
        status = doc.get("status", {})
        entry = {"node": node, **status}
        if target is not None:
            applied = status.get("appliedRevision")
            entry["converged"] = type(applied) is int and applied >= target and \
                not status.get("errors")
        out.append(entry)
    body: dict[str, Any] = {"revision": revision, "serverVersion": __version__, "nodes": out}
    if target is not None:
        body["converged"] = all(e["converged"] for e in out)
    return _json(body)


def event_loop_name() -> str:
    """The running event loop: uvloop's or asyncio's own (`eventLoop`, bulkhead.server.main)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def _node_metrics(store: Datastore) -> list[str]:
    """Each node's last status report, for alerts on a fleet: a node that stopped
    reporting, one behind the revision, one with errors (docs/observability.md). Nothing
    but a note when the datastore cannot say."""
    try:
        reports, _ = await store.list_status()
    except (Unavailable, OSError) as e:
        log.warning("metrics: the nodes' status reports cannot be read: %s", e)
        return ["# the nodes' status reports could not be read"]
    applied, reported, errors, started, versions = [], [], [], [], []
    for node, doc in reports.items():
        status = doc.get("status", {}) if isinstance(doc, dict) else {}
        name = _label(node)
        revision = status.get("appliedRevision")
        if type(revision) is int:
            applied.append(f'bulkhead_node_applied_revision{{node="{name}"}} {revision}')
        try:
            when = datetime.strptime(str(status.get("lastReport")), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            pass
        else:
            reported.append(f'bulkhead_node_last_report_timestamp_seconds{{node="{name}"}} '
                            f"{int(when.replace(tzinfo=UTC).timestamp())}")
        found = status.get("errors")
        errors.append(f'bulkhead_node_errors{{node="{name}"}} '
                      f"{len(found) if isinstance(found, list) else 0}")
        counters = status.get("counters")
        at = counters.get("startedAt") if isinstance(counters, dict) else None
        if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at):
            started.append(f'bulkhead_node_agent_start_time_seconds{{node="{name}"}} {at}')
        version = status.get("agentVersion")
        if isinstance(version, str):
            versions.append(f'bulkhead_node_agent_info{{node="{name}",'
                            f'version="{_label(version)}"}} 1')
    return [
        "# HELP bulkhead_nodes Nodes with a status report (bulkhead nodes).",
        "# TYPE bulkhead_nodes gauge", f"bulkhead_nodes {len(reports)}",
        "# HELP bulkhead_node_applied_revision The revision a node's agent last reported "
        "in force.",
        "# TYPE bulkhead_node_applied_revision gauge", *applied,
        "# HELP bulkhead_node_last_report_timestamp_seconds When a node's agent last "
        "reported (unix seconds).",
        "# TYPE bulkhead_node_last_report_timestamp_seconds gauge", *reported,
        "# HELP bulkhead_node_errors Errors in a node's last report (an apply that failed, "
        "an endpoint left unenforced, policies it left out).",
        "# TYPE bulkhead_node_errors gauge", *errors,
        "# HELP bulkhead_node_agent_start_time_seconds When the process of a node's agent "
        "that last reported started (unix seconds, the node's clock).",
        "# TYPE bulkhead_node_agent_start_time_seconds gauge", *started,
        "# HELP bulkhead_node_agent_info The version of a node's agent that last reported "
        "(from the User-Agent of its reports).",
        "# TYPE bulkhead_node_agent_info gauge", *versions]


async def metrics(request: web.Request) -> web.Response:
    _require(request, "admin", "viewer")
    hub = request.app[HUB]
    lines = [
        "# HELP bulkhead_server_info The server process: the event loop it runs on, and "
        "its version.",
        "# TYPE bulkhead_server_info gauge",
        f'bulkhead_server_info{{event_loop="{event_loop_name()}",version="{__version__}"}} 1',
        "# HELP bulkhead_revision The datastore revision the server has caught up with.",
        "# TYPE bulkhead_revision gauge", f"bulkhead_revision {hub.revision}",
        "# HELP bulkhead_watchers Agents waiting on a watch now.",
        "# TYPE bulkhead_watchers gauge", f"bulkhead_watchers {hub.watchers}",
        "# HELP bulkhead_resyncs_total Times the server re-listed the datastore.",
        "# TYPE bulkhead_resyncs_total counter", f"bulkhead_resyncs_total {hub.resyncs}",
        "# HELP bulkhead_objects Resources held in memory.",
        "# TYPE bulkhead_objects gauge", f"bulkhead_objects {len(hub.objects)}",
    ]
    commits = request.app[STORE].commits
    lines += [
        "# HELP bulkhead_datastore_commit_seconds Transactions this server committed to "
        "the datastore (SQLite: BEGIN to the durable COMMIT, a group commit once; etcd: "
        "the txn that succeeded); agents' status reports are not among them.",
        "# TYPE bulkhead_datastore_commit_seconds summary",
        f"bulkhead_datastore_commit_seconds_sum {commits.seconds:.6f}",
        f"bulkhead_datastore_commit_seconds_count {commits.count}",
        "# HELP bulkhead_datastore_commit_failures_total Commits the datastore did not "
        "take (a database error, etcd unreachable), not writes it refused.",
        "# TYPE bulkhead_datastore_commit_failures_total counter",
        f"bulkhead_datastore_commit_failures_total {commits.failures}",
    ]
    listener = request.app.get(LISTENER)
    if listener is not None:
        lines += [
            "# HELP bulkhead_connections Client connections open now (TLS handshakes too).",
            "# TYPE bulkhead_connections gauge", f"bulkhead_connections {listener.connections}",
            "# HELP bulkhead_connections_refused_total Connections closed at the limit.",
            "# TYPE bulkhead_connections_refused_total counter",
            f"bulkhead_connections_refused_total {listener.refused}",
            "# HELP bulkhead_tls_handshake_failures_total Handshakes that failed or timed out.",
            "# TYPE bulkhead_tls_handshake_failures_total counter",
            f"bulkhead_tls_handshake_failures_total {listener.handshake_failures}"]
    lines += ["# HELP bulkhead_http_requests_total HTTP requests by method, route and status.",
              "# TYPE bulkhead_http_requests_total counter"]   # its samples right after
    for (method, route, status), count in sorted(request.app[METRICS]["requests"].items()):
        lines.append(f'bulkhead_http_requests_total{{method="{method}",route="{route}",'
                     f'status="{status}"}} {count}')
    for logs in (request.app.get(FLOWS), request.app.get(DNS)):
        if logs is not None:
            lines += logs.metrics()
    lines += await _node_metrics(request.app[STORE])
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        charset="utf-8", headers={"X-Content-Type": "version=0.0.4"})


# Every route of the API (bulkhead.api.ROUTES) and who answers it.
HANDLERS: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "healthz", healthz), ("GET", "readyz", readyz), ("GET", "metrics", metrics),
    ("GET", "snapshot", snapshot), ("GET", "watch", watch), ("POST", "apply", apply),
    ("POST", "delete", delete_many), ("POST", "sync", sync), ("POST", "rollback", rollback),
    ("POST", "promote", promote),
    ("GET", "export", export), ("GET", "history", history),
    ("GET", "resources", list_resources), ("GET", "kind", list_resources),
    ("POST", "kind", write_resource), ("GET", "resource", get_resource),
    ("PUT", "resource", write_resource), ("DELETE", "resource", delete_resource),
    ("POST", "status", post_status), ("DELETE", "status", delete_status),
    ("GET", "nodes", nodes),
    ("POST", "flows", post_flows), ("GET", "flows", get_flows),
    ("POST", "dns", post_dns), ("GET", "dns", get_dns),
    ("POST", "preview", post_preview),
)


def make_app(store: Datastore, hub: Hub, listener: Listener | None = None,
             revocation: Revocation | None = None,
             flow_logs: FlowLogs | None = None,
             dns_logs: DnsLogs | None = None, access_log: str = "all") -> web.Application:
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BODY)
    app[ACCESS_LOG] = access_log
    app[STORE] = store
    app[HUB] = hub
    app[STOPPING] = asyncio.Event()
    app[LAST_LINE] = _LastLine()
    if listener is not None:
        app[LISTENER] = listener
    app[METRICS] = {"requests": Counter()}
    if revocation is not None:
        app[REVOCATION] = revocation
    if flow_logs is not None:
        app[FLOWS] = flow_logs
    if dns_logs is not None:
        app[DNS] = dns_logs
    for method, which, handler in HANDLERS:
        app.router.add_route(method, ROUTES[which], handler)
    return app
