"""Flow logs in the server: ingest (`POST /v1/flows`, agents), queries (`GET /v1/flows`,
admins and viewers), retention, and their metrics. The HTTP handlers in `app.py` are thin;
what they call is here, as plain code that blocks (they run it off the event loop).

Ingest takes a batch whole or not at all: the body is parsed strictly, every record's
node must be the caller's (checked before any other field), then the store takes the
batch in one transaction. Only then is it appended to the JSON lines file, if configured:
the file is a copy for shippers, so a failure there is logged and counted
(`bulkhead_flow_jsonlines_errors_total`), never a refusal of what the store already has.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bulkhead.model import LoadError, json_value
from bulkhead.model.flowlog import (
    ACTIONS,
    MAX_TEXT,
    REPORTERS,
    End,
    FlowRecordError,
    ForeignNode,
    TooManyRecords,
    parse_batch,
)
from bulkhead.selector import Selector, SelectorError, parse
from bulkhead.server.limits import MAX_SELECTOR, BadInput
from bulkhead.store.flowlog import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_SCAN,
    MAX_TOP,
    FlowLogConfig,
    FlowQuery,
    FlowQueryTimeout,
    FlowStore,
    FlowStoreError,
    FlowStoreUnavailable,
    JsonLinesSink,
)

log = logging.getLogger("bulkhead.server.flows")

DEFAULT_WINDOW = 3600.0          # seconds a query looks back without `since`
# Unix seconds a time parameter may give: 2286-11-20, inside ClickHouse's DateTime64(6).
MAX_TIME = 10_000_000_000.0
# A batch sent again after its answer was lost (the agent keeps a spool file until it
# sees a 200) carries the key it was first sent with (`Idempotency-Key`, a hash of the
# body): the last few keys stored for each node are kept, so the batch is not stored
# twice. In memory: a resend across a server restart is stored again.
RECENT_BATCHES = 16
BATCH_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
INGEST_CONCURRENCY = 4           # batches parsed and stored at once; more wait their turn
QUERY_CONCURRENCY = 2            # queries run at once
PARAMS = ("since", "until", "node", "reporter", "action", "policy", "tier", "staged",
          "selector", "endpoint", "limit", "top", "after")
REFUSALS = ("forbidden", "invalid", "too_large", "unavailable", "rate_limited",
            "foreign_endpoint")


class NodeBudget:
    """The bytes each node may send a minute: a bucket per node holding at most one
    minute's worth, filled continuously. A batch is taken while the node's bucket is not
    empty and its size is then taken out (it may go below zero, so the long-run rate
    holds whatever the batches' sizes); an empty bucket says how long until it is not.
    Nodes are certificate names; a bucket back to full is the same as none, so those are
    dropped first when there are more than `max_nodes`."""

    def __init__(self, per_minute: int, max_nodes: int = 65_536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.max_nodes = max_nodes
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}   # node -> (level, when)

    def _level(self, node: str, now: float) -> float:
        level, when = self._buckets.get(node, (float(self.per_minute), now))
        return min(float(self.per_minute), level + (now - when) * self.rate)

    def wait(self, node: str) -> float:
        """Seconds until `node` may send again; 0 when it may now."""
        level = self._level(node, self.clock())
        return 0.0 if level > 0 else (1.0 - level) / self.rate

    def charge(self, node: str, size: int) -> None:
        """Take `size` bytes out of the node's bucket (a negative size gives back what was
        taken out beforehand and did not come)."""
        now = self.clock()
        self._buckets[node] = (self._level(node, now) - size, now)
        if len(self._buckets) > self.max_nodes:   # down to three quarters: seldom
            for n in [n for n in self._buckets if self._level(n, now) >= self.per_minute]:
                del self._buckets[n]
            for n in list(self._buckets)[:max(0, len(self._buckets) - self.max_nodes * 3 // 4)]:
                del self._buckets[n]


class Refused(Exception):
    """A request refused: the HTTP status, its reason word, the message, and the metric
    reason of a refused batch (None for a query)."""

    def __init__(self, status: int, reason: str, message: str, metric: str | None = None
                 ) -> None:
        self.status, self.reason, self.message, self.metric = status, reason, message, metric
        super().__init__(message)


@dataclass
class Request:
    """A checked `GET /v1/flows`: the query, and `top` (groups wanted) or None."""

    query: FlowQuery
    top: int | None = None


class ForeignEndpoint(ForeignNode):
    """A record's reporting end is a HostEndpoint the store has on another node."""


def check_own_end(end: End, field: str, node: str, owner: Callable[[str], str | None],
                  what: str) -> None:
    """ForeignEndpoint when `end` names a HostEndpoint the store has on a node other
    than `node` (the sender's). An endpoint the store does not hold (deleted since, or
    never there) is taken: nothing can be judged by it, and no other node's is touched."""
    if end.type != "hep":
        return
    found = owner(end.name)
    if found is not None and found != node:
        raise ForeignEndpoint(
            f"{field}: host endpoint {end.name[:60]!r} is on node {found[:60]!r}, not "
            f"this agent's ({node!r}); an agent reports only its own endpoints' {what}")


class RecordLogs:
    """What flow logs and DNS logs share in the server: a store, the JSON lines sink,
    counters, the bounds on concurrent work, strict ingest and retention. `kind` names
    the records in messages ("flow", "DNS"); `parse` reads an ingest body."""

    kind = "flow"

    def __init__(self, config: FlowLogConfig, store: Any,
                 sink: JsonLinesSink | None = None) -> None:
        self.config = config
        self.store = store
        self.sink = sink
        self.counters: Counter[str] = Counter()
        self.budget = NodeBudget(config.node_bytes_per_minute)
        self._ingesting: asyncio.Semaphore | None = None
        self._querying: asyncio.Semaphore | None = None
        self._recent: dict[str, OrderedDict[str, int]] = {}   # node: batch key -> stored
        self._storing: set[tuple[str, str]] = set()           # (node, key) under way

    # -- batches sent again -----------------------------------------------------------
    def stored_before(self, node: str, key: str) -> int | None:
        """How many records the batch `key` of `node` stored, if it was stored lately."""
        return self._recent.get(node, OrderedDict()).get(key)

    def storing(self, node: str, key: str) -> bool:
        """Mark the batch as under way; False when it already is (a resend racing it)."""
        if (node, key) in self._storing:
            return False
        self._storing.add((node, key))
        return True

    def settled(self, node: str, key: str, stored: int | None) -> None:
        """The batch is no longer under way; `stored` (None: not stored) is remembered."""
        self._storing.discard((node, key))
        if stored is None:
            return
        recent = self._recent.setdefault(node, OrderedDict())
        recent[key] = stored
        while len(recent) > RECENT_BATCHES:
            recent.popitem(last=False)

    @staticmethod
    def parse(doc: Any, now: float, node: str) -> Sequence[Any]:
        return parse_batch(doc, now, node)

    def answer(self, wanted: Any) -> dict[str, Any]:
        """The answer to a checked query (the subclass's kind of query)."""
        raise NotImplementedError

    @property
    def ingesting(self) -> asyncio.Semaphore:
        if self._ingesting is None:
            self._ingesting = asyncio.Semaphore(INGEST_CONCURRENCY)
        return self._ingesting

    @property
    def querying(self) -> asyncio.Semaphore:
        if self._querying is None:
            self._querying = asyncio.Semaphore(QUERY_CONCURRENCY)
        return self._querying

    def refused(self, reason: str) -> None:
        self.counters[f"refused:{reason}"] += 1

    # -- ingest -----------------------------------------------------------------------
    @staticmethod
    def check_owners(records: Sequence[Any], node: str,
                     owner: Callable[[str], str | None]) -> None:
        """ForeignNode when a record is not `node`'s own to report (a kind whose
        records name no endpoint: nothing to check)."""

    def ingest(self, text: str, node: str,
               owner: Callable[[str], str | None] | None = None) -> int:
        """Parse and store one batch from the agent of `node`; how many records were
        stored. Refused (counted) when the batch is not taken. `owner`: the node of a
        HostEndpoint in the store now (None: not there), to refuse records an agent
        makes up about another node's endpoints."""
        try:
            records = self.parse(json_value(text, "the body"), time.time(), node)
            if owner is not None:
                self.check_owners(records, node, owner)
        except ForeignEndpoint as e:
            # 409, not 403: the agent drops the batch (logged, counted) instead of keeping
            # it, since an endpoint moved to another node refuses it every time.
            self.refused("foreign_endpoint")
            raise Refused(409, "Conflict", f"agent {node}: {e}; nothing was stored",
                          "foreign_endpoint") from None
        except ForeignNode as e:
            self.refused("forbidden")
            raise Refused(403, "Forbidden", f"agent {node}: {e}; nothing was stored",
                          "forbidden") from None
        except TooManyRecords as e:
            self.refused("too_large")
            raise Refused(413, "RequestEntityTooLarge", f"{e}; nothing was stored",
                          "too_large") from None
        except (FlowRecordError, LoadError) as e:
            self.refused("invalid")
            raise Refused(400, "BadRequest", f"{e}; nothing was stored", "invalid") from None
        received = time.time()
        try:
            stored: int = self.store.insert(records, received)
        except FlowStoreError as e:
            self.refused("unavailable")
            log.warning(f"{self.kind} records not stored", extra={"fields": {
                "node": node, "records": len(records), "error": str(e)}})
            raise Refused(503, "Unavailable", f"the {self.kind} log store failed: {e}; "
                          "nothing was stored, send the batch again later",
                          "unavailable") from None
        self.counters["records"] += stored
        self.counters["batches"] += 1
        if self.sink is not None and records:
            try:
                self.sink.write(records, received)
            except OSError as e:
                self.counters["jsonlines_errors"] += 1
                log.error(f"{self.kind} records not written to the JSON lines file",
                          extra={"fields": {"path": str(self.sink.path), "error": str(e),
                                            "records": len(records)}})
        return stored

    # -- retention --------------------------------------------------------------------
    def expire(self) -> int:
        gone: int = self.store.expire(time.time() - self.config.retention_seconds)
        self.counters["expired"] += gone
        return gone

    async def expire_forever(self) -> None:
        """Every expireInterval seconds, delete what is older than the retention (stores
        whose own TTL does it, ClickHouse, are left to it)."""
        if getattr(self.store, "expires_by_itself", False):
            return
        while True:
            try:
                gone = await asyncio.to_thread(self.expire)
                if gone:
                    log.info(f"{self.kind} records expired",
                             extra={"fields": {"records": gone}})
            except FlowStoreError as e:
                log.warning(f"{self.kind} record expiry failed",
                            extra={"fields": {"error": str(e)}})
            except Exception as e:   # never dies: it alone frees the space
                log.error(f"{self.kind} record expiry failed",
                          extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
            await asyncio.sleep(self.config.expire_interval)

    def close(self) -> None:
        self.store.close()


class FlowLogs(RecordLogs):
    """The server's flow log state (`RecordLogs`), its queries and metrics."""

    store: FlowStore

    @classmethod
    def open(cls, config: FlowLogConfig) -> FlowLogs:
        return cls(config, config.open(), config.sink())

    @staticmethod
    def check_owners(records: Sequence[Any], node: str,
                     owner: Callable[[str], str | None]) -> None:
        """A record's reporting end (the source of a `src` record, the destination of
        a `dst` one) is an endpoint of the sender's node: one naming a HostEndpoint the
        store has on another node is refused (an agent could otherwise put made-up
        traffic of other hosts before the preview's gates). An endpoint the store does
        not hold (deleted since the flow, or never there) is taken: the preview cannot
        judge its records, and no other node's are touched."""
        for i, record in enumerate(records):
            if record.reporter == "src":
                check_own_end(record.src, f"records[{i}].src_name", node, owner, "flows")
            else:
                check_own_end(record.dst, f"records[{i}].dst_name", node, owner, "flows")

    # -- queries ----------------------------------------------------------------------
    def answer(self, request: Request) -> dict[str, Any]:
        try:
            if request.top is not None:
                top = self.store.top(request.query, request.top)
                return {"top": [t.json() for t in top.top], "truncated": top.truncated}
            page = self.store.query(request.query)
            return {"flows": [f.json() for f in page.flows], "truncated": page.truncated}
        except FlowQueryTimeout as e:
            raise Refused(503, "Unavailable", str(e)) from None
        except FlowStoreUnavailable as e:
            raise Refused(503, "Unavailable", f"the flow log store is unavailable: {e}"
                          ) from None
        except FlowStoreError as e:
            raise Refused(503, "Unavailable", f"the flow log store failed: {e}") from None

    def metrics(self) -> list[str]:
        c = self.counters
        lines = [
            "# HELP bulkhead_flow_records_stored_total Flow records stored.",
            "# TYPE bulkhead_flow_records_stored_total counter",
            f"bulkhead_flow_records_stored_total {c['records']}",
            "# HELP bulkhead_flow_batches_stored_total Flow record batches stored.",
            "# TYPE bulkhead_flow_batches_stored_total counter",
            f"bulkhead_flow_batches_stored_total {c['batches']}",
            "# HELP bulkhead_flow_batches_duplicate_total Batches sent again after their "
            "answer was lost (the same Idempotency-Key): not stored twice.",
            "# TYPE bulkhead_flow_batches_duplicate_total counter",
            f"bulkhead_flow_batches_duplicate_total {c['duplicates']}",
            "# HELP bulkhead_flow_batches_refused_total Flow record batches refused whole, "
            "by reason.",
            "# TYPE bulkhead_flow_batches_refused_total counter"]
        lines += [f'bulkhead_flow_batches_refused_total{{reason="{r}"}} {c["refused:" + r]}'
                  for r in REFUSALS]
        lines += [
            "# HELP bulkhead_flow_records_expired_total Flow records deleted by retention.",
            "# TYPE bulkhead_flow_records_expired_total counter",
            f"bulkhead_flow_records_expired_total {c['expired']}",
            "# HELP bulkhead_flow_jsonlines_errors_total Stored batches the JSON lines file "
            "could not take.",
            "# TYPE bulkhead_flow_jsonlines_errors_total counter",
            f"bulkhead_flow_jsonlines_errors_total {c['jsonlines_errors']}"]
        return lines


# ------------------------------------------------------------------- query parameters
def query_params(items: Sequence[tuple[str, str]], known: Sequence[str], now: float
                 ) -> tuple[dict[str, str], float, float | None]:
    """A query's parameters (each known, each once), and its time window: `since`
    (default: DEFAULT_WINDOW before `until` or now) and `until`. BadInput otherwise."""
    given: dict[str, str] = {}
    for key, value in items:
        if key not in known:
            raise BadInput(f"{key[:40]}: unknown parameter (known: {', '.join(known)})")
        if key in given:
            raise BadInput(f"{key}: given more than once")
        given[key] = value
    since = _time(given.get("since"), "since")
    until = _time(given.get("until"), "until")
    if since is None:
        since = max(0.0, (until if until is not None else now) - DEFAULT_WINDOW)
    if until is not None and since > until:
        # In full: two times of this century differ past the sixth digit `:g` shows.
        raise BadInput(f"since: {since!r} is after until {until!r}")
    return given, since, until


def parse_request(items: Sequence[tuple[str, str]], now: float) -> Request:
    """`GET /v1/flows`'s parameters, checked: BadInput naming the parameter otherwise."""
    given, since, until = query_params(items, PARAMS, now)
    staged = given.get("staged")
    if staged not in (None, "differs"):
        raise BadInput(f"staged: {staged[:40]!r}: the one value is `differs` (the staged "
                       "action is not the enforced one)")
    top = _count(given.get("top"), "top", MAX_TOP)
    limit = _count(given.get("limit"), "limit", MAX_LIMIT)
    if top is not None and limit is not None:
        raise BadInput("limit: not with top (top=N is how many groups)")
    query = FlowQuery(
        since=since, until=until, node=_name(given.get("node"), "node"),
        reporter=_choice(given.get("reporter"), "reporter", REPORTERS),
        action=_choice(given.get("action"), "action", ACTIONS),
        policy=_name(given.get("policy"), "policy", step_part=True),
        tier=_name(given.get("tier"), "tier", step_part=True),
        staged_differs=staged == "differs", selector=_selector(given.get("selector")),
        endpoint=address_or_name(_name(given.get("endpoint"), "endpoint")),
        after=_time(given.get("after"), "after"),
        limit=limit or DEFAULT_LIMIT, scan_limit=MAX_SCAN)
    return Request(query, top)


def _time(raw: str | None, name: str) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw) if 0 < len(raw) <= 32 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= MAX_TIME:
        raise BadInput(f"{name}: {raw[:40]!r} is not a time (unix seconds, e.g. "
                       "1764950400 or 1764950400.5)")
    return value


def address_or_name(raw: str | None) -> str | None:
    """An end's name as records give it: an address in its one form (agents write
    `str(ip_address)`: 2001:db8::1, never 2001:DB8:0::1, which matched nothing)."""
    if raw is None:
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        return raw


def _count(raw: str | None, name: str, high: int) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= high:
        raise BadInput(f"{name}: {raw[:40]!r} is not a number from 1 to {high:,}")
    return int(raw)


def _name(raw: str | None, name: str, step_part: bool = False) -> str | None:
    if raw is None:
        return None
    if not raw or len(raw) > MAX_TEXT or not raw.isprintable() or (step_part and "|" in raw):
        extra = " without |" if step_part else ""
        raise BadInput(f"{name}: {raw[:40]!r} is not a name (1 to {MAX_TEXT} printable "
                       f"characters{extra})")
    return raw


def _choice(raw: str | None, name: str, choices: Sequence[str]) -> str | None:
    if raw is not None and raw not in choices:
        raise BadInput(f"{name}: {raw[:40]!r} is not one of {', '.join(choices)}")
    return raw


def _selector(raw: str | None) -> Selector | None:
    if raw is None:
        return None
    if len(raw) > MAX_SELECTOR:
        raise BadInput(f"selector: longer than {MAX_SELECTOR} characters")
    try:
        return parse(raw)
    except SelectorError as e:
        raise BadInput(f"selector: {e}") from None
