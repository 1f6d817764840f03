"""What every flow store offers (`FlowStore`), the query it answers (`FlowQuery`), and the
parts of answering it that are the same everywhere: the selector filter and the top
talkers computed over rows a backend scans.

A store keeps each record as the agent sent it (`bulkhead.model.flowlog.FlowRecord`) with
the time the server stored it (`received`, server clock). Queries select by the record's
`end` (the time its interval closed) and answer newest first; with `after`, they answer
what was stored at or after that time, oldest first (what `bulkhead flows --follow` polls).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bulkhead.model.flowlog import End, FlowRecord
from bulkhead.selector import Selector

DEFAULT_LIMIT = 1_000
MAX_LIMIT = 10_000
MAX_TOP = 1_000
# Rows a selector filter looks at before it gives up and answers `truncated`: labels are
# matched in Python (Calico selectors have no SQL form), about 5 µs a row.
MAX_SCAN = 100_000
SCAN_CHUNK = 2_000
QUERY_SECONDS = 10.0     # a query that runs longer is stopped: FlowQueryTimeout
MAX_INSERT = 100_000     # records in one insert (ClickHouse keeps one block atomic)


class FlowStoreError(Exception):
    """A flow store failed; nothing was written by the call that raised it."""


class FlowStoreUnavailable(FlowStoreError):
    """The backend cannot be reached or refused the operation; try again later."""


class FlowQueryTimeout(FlowStoreError):
    """A query ran longer than QUERY_SECONDS and was stopped."""


@dataclass(frozen=True)
class FlowQuery:
    """Which records: every field given narrows the answer (all must hold)."""

    since: float = 0.0                # end >= since (unix seconds)
    until: float | None = None        # end <= until
    node: str | None = None           # the reporting node
    reporter: str | None = None       # src | dst
    action: str | None = None         # allow | deny (enforced)
    policy: str | None = None         # named by a step of the enforced or staged trace
    tier: str | None = None           # likewise, a tier
    staged_differs: bool = False      # the staged action is not the enforced one
    selector: Selector | None = None  # matches the src or the dst end's labels
    endpoint: str | None = None       # the name at either end
    after: float | None = None        # stored at or after (received >= after)
    limit: int = DEFAULT_LIMIT
    scan_limit: int = MAX_SCAN        # rows a selector filter looks at, at most


@dataclass(frozen=True)
class StoredFlow:
    record: FlowRecord
    received: float                   # when the server stored it (server clock)

    def json(self) -> dict[str, Any]:
        return {**self.record.json(), "received": self.received}


@dataclass
class FlowPage:
    """Records found; `truncated`: more may match than are here (the limit was reached, or
    a selector filter stopped after `scan_limit` rows)."""

    flows: list[StoredFlow] = field(default_factory=list)
    truncated: bool = False


@dataclass(frozen=True)
class TopRow:
    src_type: str
    src_name: str
    dst_type: str
    dst_name: str
    proto: int
    dst_port: int
    bytes: int                        # in + out, summed
    packets: int
    connections: int                  # summed `connections` (active in each interval)
    started: int                      # summed `started`
    records: int

    def json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def key(self) -> tuple[str, str, str, str, int, int]:
        return (self.src_type, self.src_name, self.dst_type, self.dst_name, self.proto,
                self.dst_port)


@dataclass
class TopPage:
    top: list[TopRow] = field(default_factory=list)
    truncated: bool = False           # a selector filter stopped after `scan_limit` rows


@dataclass(frozen=True)
class GroupRow:
    """Records alike for a preview: same reporter, ends (with their labels), protocol,
    port, enforced action and trace, and destination domain names. `record` stands for
    them all: its counters are the sums, its start the first and its end the last, its
    node the least by name."""

    record: FlowRecord
    records: int
    nodes: tuple[str, ...] = ()       # the reporting nodes (at most MAX_GROUP_NODES)


@dataclass
class GroupPage:
    groups: list[GroupRow] = field(default_factory=list)
    truncated: bool = False           # more groups than asked for (in number or in bytes)


MAX_GROUP_NODES = 8
# Text (labels and traces) of the groups one answer holds at most: the memory a preview
# takes whatever the records (each may hold 64 long labels an end and 32 long steps).
GROUP_BYTES = 64 * 1024 * 1024
# The columns a preview groups records by (the same in every store).
GROUP_KEY = ("reporter", "src_type", "src_name", "src_labels", "src_scope", "dst_type",
             "dst_name", "dst_labels", "dst_scope", "proto", "dst_port", "action",
             "enforced_trace", "dst_domains")


class FlowStore(Protocol):
    """Where flow records are kept and queried. Calls block (run them off the event loop);
    a store is safe to call from several threads."""

    def insert(self, records: Sequence[FlowRecord], received: float | None = None) -> int:
        """Store every record, or none (FlowStoreError); how many were stored.
        `received` defaults to now."""
        ...

    def query(self, q: FlowQuery) -> FlowPage:
        ...

    def top(self, q: FlowQuery, n: int) -> TopPage:
        """Top talkers: records grouped by src end, dst end, protocol and port, with bytes,
        packets and connections summed; most bytes first, at most `n` groups."""
        ...

    def groups(self, q: FlowQuery, n: int) -> GroupPage:
        """Records grouped by GROUP_KEY (the selector filter does not apply), most
        connections first: at most `n` groups and GROUP_BYTES of their text."""
        ...

    def expire(self, before: float) -> int:
        """Delete the records whose `end` is before `before`; how many went."""
        ...

    def count(self) -> int:
        ...

    def close(self) -> None:
        ...


def check_insert(records: Sequence[object]) -> None:
    if len(records) > MAX_INSERT:
        raise FlowStoreError(f"{len(records)} records in one insert; at most {MAX_INSERT}")


def matches(q: FlowQuery, record: FlowRecord) -> bool:
    """The selector filter, the part of a query stores cannot do in their own language."""
    return q.selector is None or q.selector.matches(record.src.labels) or \
        q.selector.matches(record.dst.labels)


def page_of(rows: Iterable[StoredFlow], q: FlowQuery) -> FlowPage:
    """The first `q.limit` rows the selector matches, of rows a backend scans in answer
    order (already narrowed by every other filter). The scan stops after `q.scan_limit`
    rows when there is a selector; the page then says `truncated`."""
    page = FlowPage()
    for scanned, row in enumerate(rows):
        if q.selector is not None and scanned >= q.scan_limit:
            page.truncated = True
            break
        if matches(q, row.record):
            if len(page.flows) >= q.limit:
                page.truncated = True
                break
            page.flows.append(row)
    return page


def top_of(rows: Iterable[StoredFlow], q: FlowQuery, n: int) -> TopPage:
    """Top talkers over scanned rows (for a selector filter; without one, stores group in
    their own language). At most `q.scan_limit` rows are looked at."""
    groups: dict[tuple[str, str, str, str, int, int], list[int]] = {}
    page = TopPage()
    for scanned, row in enumerate(rows):
        if scanned >= q.scan_limit:
            page.truncated = True
            break
        r = row.record
        if not matches(q, r):
            continue
        sums = groups.setdefault((r.src.type, r.src.name, r.dst.type, r.dst.name, r.proto,
                                  r.dst_port), [0, 0, 0, 0, 0])
        sums[0] += r.bytes_in + r.bytes_out
        sums[1] += r.packets_in + r.packets_out
        sums[2] += r.connections
        sums[3] += r.started
        sums[4] += 1
    rows_out = [TopRow(*key, *sums) for key, sums in groups.items()]
    rows_out.sort(key=lambda t: (-t.bytes, t.key))
    page.top = rows_out[:n]
    return page


def group_row(row: dict[str, Any]) -> GroupRow:
    """A GroupRow from a store's row: GROUP_KEY's columns, then `start`, `end`, `nodes`
    (a list), the sums of connections, started, packets and bytes (in, out), and
    `records`."""
    nodes = tuple(sorted(row["nodes"]))[:MAX_GROUP_NODES]
    return GroupRow(record_of({**row, "node": nodes[0] if nodes else "",
                               "staged_action": row["action"],
                               "staged_trace": row["enforced_trace"]}),
                    int(row["records"]), nodes)


GROUP_SUMS = ("connections", "started", "packets_in", "packets_out", "bytes_in", "bytes_out")


def trace_names(trace: Sequence[str], part: int) -> set[str]:
    """The tiers (part 0) or policies (part 1) a trace's `tier|policy|rule|action` steps
    name."""
    return {step.split("|")[part] for step in trace}


def chunked(fetch: Any) -> Iterator[Any]:
    """Rows from `fetch(last_row_or_None)` called again after each chunk until one comes
    back empty: keyset pagination for the selector scan."""
    last = None
    while True:
        rows = fetch(last)
        if not rows:
            return
        yield from rows
        last = rows[-1]


def record_of(row: dict[str, Any]) -> FlowRecord:
    """A FlowRecord from a store's row of columns named as the record's fields (labels a
    mapping, traces and domains sequences; domains None or missing: not known): rows the
    store wrote itself, trusted."""
    return FlowRecord(
        start=float(row["start"]), end=float(row["end"]), node=row["node"],
        reporter=row["reporter"],
        src=End(row["src_type"], row["src_name"], dict(row["src_labels"]), row["src_scope"]),
        dst=End(row["dst_type"], row["dst_name"], dict(row["dst_labels"]), row["dst_scope"]),
        proto=int(row["proto"]), dst_port=int(row["dst_port"]), action=row["action"],
        enforced_trace=tuple(row["enforced_trace"]), staged_action=row["staged_action"],
        staged_trace=tuple(row["staged_trace"]), connections=int(row["connections"]),
        started=int(row["started"]), packets_in=int(row["packets_in"]),
        packets_out=int(row["packets_out"]), bytes_in=int(row["bytes_in"]),
        bytes_out=int(row["bytes_out"]),
        dst_domains=None if row.get("dst_domains") is None else tuple(row["dst_domains"]))
