"""Flows from the kernel's logs: first packets (NFLOG) joined with conntrack counts,
given staged verdicts by the reference evaluator, aggregated per flush interval.

Input, in the order the kernel gives it:
- `packet(p)`: one NFLOG message. Every decision a connection's first packet meets logs
  it once, with the prefix of that decision (`Ruleset.decisions` maps prefixes back): any
  Pass steps, then the final Allow or Deny. The steps of one packet arrive one after the
  other; the final one completes the connection's enforced trace.
- `counts(entries)` and `ended(entry)`: conntrack entries (a periodic dump, destroy
  events) with byte and packet counters; they are joined to allowed connections by
  their original tuple. A denied first packet never makes a conntrack entry: its record
  counts the logged packets alone (a retransmitted SYN is a packet, not a connection).
  An untracked (doNotTrack) flow has no conntrack entry either, and every one of its
  packets is logged as a first packet: each counts as a connection started.

Each new connection gets its staged verdict from the reference evaluator (staged
policies in force, never rendered), computed again for the connections still open when
the policy changes (`set_snapshot`). The evaluator also gives the reporting endpoint's
enforcement mode: an endpoint in observe mode blocks nothing, so its records say `allow`,
their enforced trace is the logged decisions (a Deny too) followed by OBSERVE_STEP, and
their staged verdict is the staged view's policy decision; a connection keeps the mode
it was accepted in. `flush(now)` turns the interval's aggregates into
`FlowRecord`s, keyed by reporter, both ends (host endpoint, else the GlobalNetworkSet
holding the address, else the address), protocol, destination port, the enforced and
the staged traces.

Memory is bounded: pending traces, open connections and aggregates each have a cap;
what does not fit is dropped and counted in `dropped` by reason.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bulkhead.model import EGRESS, ENFORCE, INGRESS, Snapshot
from bulkhead.model.flowlog import (
    MAX_DOMAINS,
    MAX_LABELS,
    MAX_TRACE,
    OBSERVE_STEP,
    PORTED,
    End,
    FlowRecord,
    is_hostname,
    scope_of,
)
from bulkhead.policy import Failsafes
from bulkhead.policy.evaluate import Evaluator
from bulkhead.policy.flow import Flow
from bulkhead.policy.semantics import effective_labels
from bulkhead.policy.trace import Decision, verdict_steps

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Packet(Protocol):
    """What the aggregator reads of a logged packet (observe.nflog.LoggedPacket)."""

    @property
    def prefix(self) -> str: ...
    @property
    def proto(self) -> int: ...
    @property
    def src(self) -> IPAddress: ...
    @property
    def dst(self) -> IPAddress: ...
    @property
    def sport(self) -> int | None: ...
    @property
    def dport(self) -> int | None: ...
    @property
    def icmp_type(self) -> int | None: ...
    @property
    def icmp_code(self) -> int | None: ...
    @property
    def length(self) -> int: ...
    @property
    def timestamp(self) -> float: ...


class Tracked(Protocol):
    """What the aggregator reads of a conntrack entry (observe.conntrack)."""

    @property
    def packets_orig(self) -> int: ...
    @property
    def bytes_orig(self) -> int: ...
    @property
    def packets_reply(self) -> int: ...
    @property
    def bytes_reply(self) -> int: ...


# A connection: IP version, protocol, source and destination as integers (hashed far
# faster than ipaddress objects), ports where the protocol has them.
Tuple5 = tuple[int, int, int, int, int | None, int | None]


def conn_key(proto: int, src: IPAddress, dst: IPAddress, sport: int | None,
             dport: int | None) -> Tuple5:
    """The aggregator's key of a connection, from a logged packet or a conntrack tuple."""
    if proto in PORTED:
        return (src.version, proto, int(src), int(dst), sport, dport)
    return (src.version, proto, int(src), int(dst), None, None)


@dataclass(frozen=True)
class Limits:
    pending: int = 10_000        # first packets whose trace is not complete yet
    connections: int = 100_000   # open connections followed for their counts
    aggregates: int = 50_000     # records in one interval
    verdicts: int = 20_000       # staged verdicts kept for flows seen again


@dataclass
class _Aggregate:
    start: float
    end: float
    continuing: set[Tuple5] = field(default_factory=set)   # opened in an earlier interval
    started: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class _Key:
    """What one record aggregates over."""

    reporter: str
    src: tuple[str, str]          # (type, name) of each end
    dst: tuple[str, str]
    proto: int
    port: int
    action: str
    trace: tuple[str, ...]
    staged_action: str
    staged_trace: tuple[str, ...]
    domains: tuple[str, ...] | None      # the destination's names (None: not known)


@dataclass
class _Connection:
    flow: Flow
    reporter: str
    key: _Key
    interval: int                  # the flush interval it started in
    logged: tuple[str, tuple[str, ...]] = ("allow", ())   # the kernel's action and trace
    observed: bool = False         # accepted by an endpoint in observe mode
    seen: tuple[int, int, int, int] = (0, 0, 0, 0)   # counters already attributed
    misses: int = 0                # complete dumps in a row that did not hold it


@dataclass(frozen=True)
class _Staged:
    action: str
    trace: tuple[str, ...]
    observed: bool = False         # the reporting endpoint is in observe mode


def _capped(trace: tuple[str, ...], limit: int = MAX_TRACE) -> tuple[str, ...]:
    """At most `limit` steps (the server's bound): the first ones and the final one."""
    return trace if len(trace) <= limit else (*trace[:limit - 1], trace[-1])


def _end_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """At most MAX_LABELS labels (the server's bound), the first by name."""
    return dict(sorted(labels.items())[:MAX_LABELS])


def tracked_key(entry: Any) -> Tuple5:
    """The key of a conntrack entry (`observe.conntrack.ConntrackEntry`: its original and
    reply tuples) as the table's logged packet gives it. The filter hooks see a packet
    after destination NAT (prerouting, output) and before source NAT (postrouting,
    input): the original source, and the destination the reply comes from. Without NAT
    that is the original tuple."""
    orig, reply = entry.orig, entry.reply
    return conn_key(orig.proto, orig.src, reply.src, orig.sport, reply.sport)


class Ends:
    """Who is at an address: a host endpoint (with its labels, profiles' labelsToApply
    under them), else the GlobalNetworkSet with the longest prefix holding it (ties by
    name), else the address itself, public or private. A lookup costs one dict probe
    per prefix length the sets use, not one test per net."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._heps: dict[IPAddress, End] = {}
        for hep in sorted(snapshot.host_endpoints.values(), key=lambda h: h.name):
            labels = dict(effective_labels(snapshot, hep))
            for ip in hep.expected_ips:
                self._heps.setdefault(ipaddress.ip_address(ip),
                                      End("hep", hep.name, _end_labels(labels)))
        # (family, prefix length) -> network address as an integer -> the set's end
        self._nets: dict[tuple[int, int], dict[int, End]] = {}
        for netset in sorted(snapshot.network_sets.values(), key=lambda s: s.name):
            end = End("ns", netset.name, _end_labels(netset.labels))
            for text in netset.nets:
                net = ipaddress.ip_network(text, strict=False)
                by_net = self._nets.setdefault((net.version, net.prefixlen), {})
                by_net.setdefault(int(net.network_address), end)
        self._lengths = {v: sorted((n for f, n in self._nets if f == v), reverse=True)
                         for v in (4, 6)}
        self._cache: dict[IPAddress, End] = {}

    def at(self, ip: IPAddress) -> End:
        found = self._heps.get(ip) or self._cache.get(ip)
        if found is not None:
            return found
        value, bits = int(ip), ip.max_prefixlen
        end = End("net", str(ip), {}, scope_of(str(ip)))
        for length in self._lengths[ip.version]:
            mask = ((1 << length) - 1) << (bits - length)
            hit = self._nets[(ip.version, length)].get(value & mask)
            if hit is not None:
                end = hit
                break
        if len(self._cache) >= 10_000:
            self._cache.clear()
        self._cache[ip] = end
        return end


class FlowAggregator:
    def __init__(self, node: str, snapshot: Snapshot, decisions: Mapping[str, Decision],
                 failsafes: Failsafes | None = None, limits: Limits = Limits(),
                 now: float = 0.0, default_mode: str = ENFORCE,
                 names: Callable[[IPAddress], frozenset[str]] | None = None) -> None:
        self.node = node
        # The names a destination address was resolved from (the agent's DNS name
        # cache): egress flows carry them, so the staged verdict of a `domains` rule is
        # the one the kernel's domain sets give.
        self.names = names
        self.default_mode = default_mode   # endpoints without the enforcement label
        self.limits = limits
        self.failsafes = failsafes if failsafes is not None else Failsafes()
        self.decisions: Mapping[str, Decision] = decisions
        self.dropped: dict[str, int] = {"pending": 0, "connections": 0, "aggregates": 0,
                                        "unknown_prefix": 0}
        self.connections_seen = 0
        self._pending: OrderedDict[tuple[Tuple5, str], list[Decision]] = OrderedDict()
        self._open: dict[Tuple5, _Connection] = {}
        self._interval: dict[_Key, _Aggregate] = {}
        self._ends_of: dict[_Key, tuple[End, End]] = {}
        self._denied_seen: set[Tuple5] = set()
        self._interval_no = 0
        self.set_snapshot(snapshot, decisions)

    # -- policy ------------------------------------------------------------------------
    def set_snapshot(self, snapshot: Snapshot, decisions: Mapping[str, Decision]) -> None:
        """New policy (or sets, or endpoints): staged verdicts are computed again, for
        the connections still open too; their later counts go under the new verdict."""
        self.decisions = decisions
        self._evaluator = Evaluator(snapshot, self.failsafes, self.default_mode)
        self._ends = Ends(snapshot)
        self._verdicts: OrderedDict[tuple[object, ...], _Staged] = OrderedDict()
        self._keys: dict[tuple[object, ...], tuple[_Key, tuple[End, End]]] = {}
        self._source_ports = any(
            r.source.ports or r.source.not_ports
            for p in [*snapshot.policies.values(), *snapshot.staged.values()]
            for d in (INGRESS, EGRESS) for r in p.spec.rules(d))
        for conn in self._open.values():
            conn.key, ends = self._key(conn.flow, conn.reporter, *conn.logged,
                                       observed=conn.observed)
            self._ends_of[conn.key] = ends

    def _staged(self, flow: Flow, reporter: str) -> _Staged:
        sport = flow.src_port if self._source_ports else None
        cache_key = (flow.src, flow.dst, flow.protocol, flow.dst_port, sport,
                     flow.icmp_type, flow.icmp_code, reporter, flow.dst_domains)
        found = self._verdicts.get(cache_key)
        if found is None:
            verdict = self._evaluator.evaluate(flow, trace=True)
            side = verdict.staged_ingress if reporter == "dst" else verdict.staged_egress
            # The staged view's policy decision: what enforcing would do, if observed.
            found = _Staged(side.action.lower(), verdict_steps(side), side.observed)
            self._verdicts[cache_key] = found
            if len(self._verdicts) > self.limits.verdicts:
                self._verdicts.popitem(last=False)
        return found

    def _key(self, flow: Flow, reporter: str, action: str, trace: tuple[str, ...],
             observed: bool | None = None) -> tuple[_Key, tuple[End, End]]:
        """The record key of a connection from the kernel's action and trace, and its two
        ends (kept in `_ends_of` only for keys that get a record or an open connection:
        memory follows the caps). `observed`: the mode the connection was accepted in
        (None: the reporting endpoint's mode now)."""
        src, dst = self._ends.at(flow.src), self._ends.at(flow.dst)
        staged = self._staged(flow, reporter)
        # The names go with egress records of an agent that snoops DNS (None: not known).
        # (Names the server would refuse, such as the root, are left out of the record.)
        domains = (tuple(sorted(n for n in flow.dst_domains if is_hostname(n)))[:MAX_DOMAINS]
                   if self.names is not None and reporter == "src" else None)
        port = flow.dst_port if flow.carries_ports and flow.dst_port is not None else 0
        # The server takes at most MAX_TRACE steps: the first ones and the final one.
        if staged.observed if observed is None else observed:
            action, trace = "allow", (*_capped(trace, MAX_TRACE - 1), OBSERVE_STEP)
        key = _Key(reporter, (src.type, src.name), (dst.type, dst.name), flow.protocol, port,
                   action, _capped(trace), staged.action, _capped(staged.trace), domains)
        return key, (src, dst)

    # -- input -------------------------------------------------------------------------
    def packet(self, p: Packet) -> None:
        decision = self.decisions.get(p.prefix)
        if decision is None:
            self.dropped["unknown_prefix"] += 1   # a table from before a policy change
            return
        tuple5 = conn_key(p.proto, p.src, p.dst, p.sport, p.dport)
        pending_key = (tuple5, decision.direction)
        steps = self._pending.pop(pending_key, [])
        steps.append(decision)
        if not decision.final:
            if len(self._pending) >= self.limits.pending:
                self._pending.popitem(last=False)
                self.dropped["pending"] += 1
            self._pending[pending_key] = steps
            return
        self._first_packet(p, tuple5, decision, tuple(d.step for d in steps))

    def _first_packet(self, p: Packet, tuple5: Tuple5, final: Decision,
                      trace: tuple[str, ...]) -> None:
        reporter = "dst" if final.direction == INGRESS else "src"
        # The names the destination was resolved from, as the kernel's domain sets had
        # them: the staged verdict of a `domains` rule is then the one they give.
        domains = self.names(p.dst) if self.names is not None and reporter == "src" \
            else frozenset()
        flow = Flow(p.src, p.dst, p.proto, tuple5[5], tuple5[4], p.icmp_type, p.icmp_code,
                    domains)
        # Every new connection of one pair, port, trace and names has the same key:
        # computed once.
        sport = tuple5[4] if self._source_ports else None
        memo = (reporter, tuple5[:4], tuple5[5], sport, p.icmp_type, p.icmp_code,
                final.action, trace, domains)
        known = self._keys.get(memo)
        if known is None:
            known = self._key(flow, reporter, final.action, trace)
            if len(self._keys) >= self.limits.verdicts:
                self._keys.clear()
            self._keys[memo] = known
        key, ends = known
        agg = self._aggregate(key, p.timestamp, ends)
        if agg is None:
            return
        inbound = reporter == "dst"
        if key.action == "deny":     # an observe endpoint's Deny went through
            agg.packets_in += inbound
            agg.packets_out += not inbound
            agg.bytes_in += p.length if inbound else 0
            agg.bytes_out += 0 if inbound else p.length
            if tuple5 not in self._denied_seen:   # a retransmission is no new attempt
                if len(self._denied_seen) < self.limits.pending:
                    self._denied_seen.add(tuple5)   # past the cap: each is an attempt
                agg.started += 1
            return
        self.connections_seen += 1
        agg.started += 1
        if p.proto not in PORTED:
            # No conntrack join (no ports to match on): the first packet is what we know.
            agg.packets_in += inbound
            agg.packets_out += not inbound
            agg.bytes_in += p.length if inbound else 0
            agg.bytes_out += 0 if inbound else p.length
            return
        # A tuple already open is a new connection on a reused port (conntrack logs only
        # a connection's first packet), whose old one's end was not seen yet.
        if tuple5 not in self._open and len(self._open) >= self.limits.connections:
            self.dropped["connections"] += 1
            return
        self._open[tuple5] = _Connection(flow, reporter, key, self._interval_no,
                                         (final.action, trace),
                                         key.trace[-1:] == (OBSERVE_STEP,))
        self._ends_of[key] = ends

    def _aggregate(self, key: _Key, at: float, ends: tuple[End, End] | None = None
                   ) -> _Aggregate | None:
        agg = self._interval.get(key)
        if agg is None:
            if len(self._interval) >= self.limits.aggregates:
                self.dropped["aggregates"] += 1
                return None
            agg = self._interval[key] = _Aggregate(at, at)
            if ends is not None:
                self._ends_of[key] = ends
        agg.start, agg.end = min(agg.start, at), max(agg.end, at)
        return agg

    def counts(self, entries: Iterable[tuple[Tuple5, Tracked]], now: float,
               complete: bool = True) -> None:
        """Counters of open connections (a conntrack dump): what is new since the last
        look goes to this interval. A `complete` dump also ends the connections it does
        not hold twice in a row (their destroy event was missed, or they were never
        tracked): once could be a connection logged just before the dump began."""
        present = set()
        for tuple5, entry in entries:
            conn = self._open.get(tuple5)
            if conn is not None:
                present.add(tuple5)
                conn.misses = 0
                self._account(tuple5, conn, entry, now)
        if complete:
            gone = []
            for tuple5, conn in self._open.items():
                if tuple5 not in present:
                    conn.misses += 1
                    if conn.misses >= 2:
                        gone.append(tuple5)
            for tuple5 in gone:
                del self._open[tuple5]

    def ended(self, tuple5: Tuple5, entry: Tracked, now: float) -> None:
        """A connection's last counters (a conntrack destroy event)."""
        conn = self._open.pop(tuple5, None)
        if conn is not None:
            self._account(tuple5, conn, entry, now)

    def _account(self, tuple5: Tuple5, conn: _Connection, entry: Tracked, now: float) -> None:
        counters = (entry.packets_orig, entry.bytes_orig, entry.packets_reply,
                    entry.bytes_reply)
        delta = [max(0, new - old) for new, old in zip(counters, conn.seen, strict=True)]
        conn.seen = counters
        if not any(delta):
            return
        agg = self._aggregate(conn.key, now, self._ends_of[conn.key])
        if agg is None:
            return
        if conn.interval < self._interval_no:
            agg.continuing.add(tuple5)
        if conn.reporter == "dst":    # the original direction came in
            agg.packets_in += delta[0]
            agg.bytes_in += delta[1]
            agg.packets_out += delta[2]
            agg.bytes_out += delta[3]
        else:
            agg.packets_out += delta[0]
            agg.bytes_out += delta[1]
            agg.packets_in += delta[2]
            agg.bytes_in += delta[3]

    # -- output ------------------------------------------------------------------------
    def flush(self, now: float) -> list[FlowRecord]:
        """The interval's records; a new interval starts."""
        records = []
        for key, agg in self._interval.items():
            src, dst = self._ends_of[key]
            records.append(FlowRecord(
                start=min(agg.start, now), end=now, node=self.node, reporter=key.reporter,
                src=src, dst=dst, proto=key.proto, dst_port=key.port, action=key.action,
                enforced_trace=key.trace, staged_action=key.staged_action,
                staged_trace=key.staged_trace, connections=agg.started + len(agg.continuing),
                started=agg.started,
                packets_in=agg.packets_in, packets_out=agg.packets_out,
                bytes_in=agg.bytes_in, bytes_out=agg.bytes_out, dst_domains=key.domains))
        self._interval = {}
        live = {c.key for c in self._open.values()}
        self._ends_of = {k: v for k, v in self._ends_of.items() if k in live}
        self._denied_seen.clear()
        self._pending.clear()
        self._interval_no += 1
        return records

    @property
    def open_connections(self) -> int:
        return len(self._open)
