"""The flow aggregator: logged first packets with the prefixes a rendered table uses,
conntrack counters joined, staged verdicts from the reference evaluator, bounded."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.render import FlowLogging
from bulkhead.model import EGRESS, INGRESS
from bulkhead.model.flowlog import parse_record
from bulkhead.observe.flows import Ends, FlowAggregator, Limits, conn_key, tracked_key
from bulkhead.policy import Failsafes
from bulkhead.policy.evaluate import Evaluator
from bulkhead.policy.flow import Flow
from bulkhead.policy.plan import calculate
from bulkhead.policy.trace import verdict_steps
from tests.nftfixture import gnp, hep, snap

IP = ipaddress.ip_address
DB, WEB, OUT = "198.18.0.12", "198.18.0.11", "198.19.7.7"


@dataclass(frozen=True)
class Logged:
    """A logged packet as observe.nflog reads it (the fields the aggregator uses)."""

    prefix: str
    proto: int
    src: Any
    dst: Any
    sport: int | None
    dport: int | None
    icmp_type: int | None = None
    icmp_code: int | None = None
    length: int = 60
    timestamp: float = 100.0


@dataclass(frozen=True)
class Counters:
    packets_orig: int
    bytes_orig: int
    packets_reply: int
    bytes_reply: int


TIER = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
        "metadata": {"name": "security"}, "spec": {"order": 10, "defaultAction": "Deny"}}
OUTSIDE = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
           "metadata": {"name": "partners", "labels": {"zone": "partner"}},
           "spec": {"nets": ["198.19.0.0/16"]}}


def docs(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [hep("db", "n1", DB, {"app": "db"}), hep("web", "n2", WEB, {"app": "web"}),
            OUTSIDE, TIER,
            gnp("security.ssh", {"tier": "security", "selector": "all()", "order": 1,
                                 "ingress": [{"action": "Pass", "protocol": "TCP",
                                              "destination": {"ports": [5432, 80]}}],
                                 "egress": [{"action": "Pass"}]}),
            gnp("db", {"selector": "app == 'db'", "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
                 "destination": {"ports": [5432]}}]}),
            *extra]


def setup(*extra: dict[str, Any], limits: Limits | None = None
          ) -> tuple[FlowAggregator, Any]:
    snapshot = snap(*docs(*extra))
    rs = render(calculate(snapshot, "n1", {}, Failsafes.off()), flow_logs=FlowLogging())
    return FlowAggregator("n1", snapshot, rs.decisions, Failsafes.off(),
                          limits or Limits()), rs


def prefix(rs: Any, step: str, direction: str = INGRESS) -> str:
    return next(p for p, d in rs.decisions.items() if d.step == step
                and d.direction == direction)


def test_an_allowed_connection_with_pass_steps_and_counts() -> None:
    agg, rs = setup()
    tuple5 = conn_key(6, IP(WEB), IP(DB), 40000, 5432)
    for step in ("security|security.ssh|0|pass", "default|db|0|allow"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40000, 5432))
    agg.counts([(tuple5, Counters(10, 10_000, 8, 20_000))], now=101.0)
    agg.ended(tuple5, Counters(12, 10_200, 9, 20_060), now=102.0)
    agg.counts([(tuple5, Counters(99, 99, 99, 99))], now=103.0)   # gone: not counted
    [record] = agg.flush(now=115.0)
    assert record.reporter == "dst" and record.node == "n1"
    assert (record.src.type, record.src.name, record.src.labels) == ("hep", "web",
                                                                     {"app": "web"})
    assert (record.dst.type, record.dst.name) == ("hep", "db")
    assert (record.proto, record.dst_port, record.action) == (6, 5432, "allow")
    assert record.enforced_trace == ("security|security.ssh|0|pass", "default|db|0|allow")
    assert record.staged_trace == record.enforced_trace and record.staged_action == "allow"
    assert (record.packets_in, record.bytes_in, record.packets_out, record.bytes_out) == \
        (12, 10_200, 9, 20_060)
    assert (record.connections, record.started) == (1, 1)
    assert (record.start, record.end) == (100.0, 115.0)
    # What the agent sends is what the server's parser takes.
    assert parse_record(record.json(), now=200.0) == record
    assert agg.flush(now=130.0) == []


def test_the_enforced_trace_is_the_evaluators() -> None:
    agg, rs = setup()
    evaluator = Evaluator(snap(*docs()), Failsafes.off())
    cases = [(WEB, DB, 5432), (WEB, DB, 80), (OUT, DB, 5432)]
    for i, (src, dst, port) in enumerate(cases):
        verdict = evaluator.evaluate(Flow.make(src, dst, "TCP", port, src_port=40000 + i))
        for step in verdict_steps(verdict.ingress):
            agg.packet(Logged(prefix(rs, step), 6, IP(src), IP(dst), 40000 + i, port))
    records = {(r.src.name, r.dst_port): r for r in agg.flush(now=110.0)}
    assert {k: r.action for k, r in records.items()} == {
        ("web", 5432): "allow", ("web", 80): "deny", ("partners", 5432): "deny"}
    assert records[("web", 80)].enforced_trace == ("security|security.ssh|0|pass",
                                                  "default|end-of-tier|-|deny")
    outside = records[("partners", 5432)]
    assert (outside.src.type, outside.src.labels) == ("ns", {"zone": "partner"})
    assert outside.enforced_trace == ("security|security.ssh|0|pass",
                                      "default|end-of-tier|-|deny")


def test_a_denied_syn_retransmitted_is_one_attempt() -> None:
    agg, rs = setup()
    step = prefix(rs, "security|end-of-tier|-|deny")
    for t in (100.0, 101.0, 103.0):
        agg.packet(Logged(step, 6, IP(OUT), IP(DB), 41000, 22, timestamp=t))
    [record] = agg.flush(now=110.0)
    assert (record.action, record.started, record.connections, record.packets_in) == \
        ("deny", 1, 1, 3)
    assert (record.dst.name, record.src.type) == ("db", "ns")


def test_staged_verdicts_and_a_tier_mixing_staged_and_enforced_keeps_its_end() -> None:
    """Calico PR #13416: a staged policy last in a tier with enforced ones must not
    suppress the tier's end-of-tier action in the staged verdict."""
    staged = gnp("security.web-80", {"tier": "security", "selector": "app == 'db'",
                                     "order": 50, "ingress": [
                                         {"action": "Allow", "protocol": "TCP",
                                          "destination": {"ports": [80]}}]},
                 kind="StagedGlobalNetworkPolicy")
    agg, rs = setup(staged)
    # 5432: the enforced tier passes it on; the staged tier too (the staged policy does
    # not match), so the staged trace is the same.
    for step in ("security|security.ssh|0|pass", "default|db|0|allow"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40001, 5432))
    # 22: denied at the end of tier security, enforced and staged alike.
    agg.packet(Logged(prefix(rs, "security|end-of-tier|-|deny"), 6, IP(WEB), IP(DB),
                      40002, 22))
    records = {r.dst_port: r for r in agg.flush(now=110.0)}
    assert records[5432].staged_trace == records[5432].enforced_trace
    assert records[22].staged_trace == ("security|end-of-tier|-|deny",)
    assert not records[22].staged_differs
    # 80 passes the enforced tier (security.ssh rule 0) and is denied in default; the
    # staged policy (order 50, after security.ssh) never sees it: same verdict.
    for step in ("security|security.ssh|0|pass", "default|end-of-tier|-|deny"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40003, 80))
    [r80] = agg.flush(now=120.0)
    assert r80.staged_trace == r80.enforced_trace


def test_a_staged_deny_shows_where_the_evaluator_says_and_follows_policy_changes() -> None:
    staged = gnp("db", {"selector": "app == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "source": {"selector": "app == 'web'"},
         "destination": {"ports": [5432]}}]}, kind="StagedGlobalNetworkPolicy")
    agg, rs = setup(staged)
    tuple5 = conn_key(6, IP(WEB), IP(DB), 40000, 5432)
    for step in ("security|security.ssh|0|pass", "default|db|0|allow"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40000, 5432))
    [record] = agg.flush(now=110.0)
    assert record.action == "allow" and record.staged_action == "deny"
    assert record.staged_trace == ("security|security.ssh|0|pass", "default|db|0|deny")
    # The staged policy is withdrawn: the open connection's later counts go under the
    # new staged verdict.
    snapshot = snap(*docs())
    agg.set_snapshot(snapshot, rs.decisions)
    agg.counts([(tuple5, Counters(3, 300, 3, 300))], now=111.0)
    [later] = agg.flush(now=120.0)
    assert later.staged_action == "allow" and later.started == 0 and later.bytes_in == 300


def test_egress_records_carry_the_names_the_destination_was_resolved_from() -> None:
    """With the agent's name cache, an egress record says which names the destination
    was resolved from when the connection began (sorted; connections alike but for their
    names are separate records), and its staged verdict follows them; an ingress record,
    or an agent without the cache, says it does not know (None)."""
    staged = gnp("db-out", {"selector": "app == 'db'", "egress": [
        {"action": "Allow", "destination": {"domains": ["*.example.com"]}}]},
        kind="StagedGlobalNetworkPolicy")
    snapshot = snap(*docs(staged))
    rs = render(calculate(snapshot, "n1", {}, Failsafes.off()), flow_logs=FlowLogging())
    # (The root, which a record may not carry, is left out of the record.)
    cache = {IP(OUT): frozenset({"www.example.com", "api.example.com", "."})}
    evaluator = Evaluator(snapshot, Failsafes.off())

    def connect(agg: FlowAggregator, dst: str, sport: int) -> None:
        verdict = evaluator.evaluate(Flow.make(DB, dst, "TCP", 443, src_port=sport))
        for step in verdict_steps(verdict.egress):
            agg.packet(Logged(prefix(rs, step, EGRESS), 6, IP(DB), IP(dst), sport, 443))

    agg = FlowAggregator("n1", snapshot, rs.decisions, Failsafes.off(),
                         names=lambda ip: cache.get(ip, frozenset()))
    connect(agg, OUT, 40000)
    cache[IP(OUT)] = frozenset({"api.example.com"})   # the cache changed: a new record
    connect(agg, OUT, 40001)
    connect(agg, "198.19.7.8", 40002)                  # resolved from no name
    for step in ("security|security.ssh|0|pass", "default|db|0|allow"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40003, 5432))
    records = agg.flush(now=110.0)
    got = {(r.reporter, r.dst.name, r.dst_domains, r.staged_action) for r in records}
    assert got == {("src", "partners", ("api.example.com", "www.example.com"), "allow"),
                   ("src", "partners", ("api.example.com",), "allow"),
                   ("src", "partners", (), "deny"),
                   ("dst", "db", None, "allow")}, got
    for r in records:
        assert parse_record(r.json(), now=200.0) == r
    blind = FlowAggregator("n1", snapshot, rs.decisions, Failsafes.off())
    connect(blind, OUT, 40000)
    [record] = blind.flush(now=110.0)
    assert record.dst_domains is None and record.staged_action == "deny"


def test_bounds_are_kept_and_counted() -> None:
    agg, rs = setup(limits=Limits(pending=5, connections=3, aggregates=4, verdicts=2))
    allow = prefix(rs, "default|db|0|allow")
    passed = prefix(rs, "security|security.ssh|0|pass")
    for i in range(10):   # passes whose final step never comes
        agg.packet(Logged(passed, 6, IP(WEB), IP(DB), 50000 + i, 5432))
    assert agg.dropped["pending"] == 5
    for i in range(10):
        agg.packet(Logged(allow, 6, IP(WEB), IP(DB), 40000 + i, 5432))
    assert agg.open_connections == 3 and agg.dropped["connections"] == 7
    for i in range(10):   # each from another address in no set: its own record
        agg.packet(Logged(allow, 6, IP(f"198.18.9.{i}"), IP(DB), 40000, 5432))
    assert agg.dropped["aggregates"] == 7
    assert len(agg.flush(now=110.0)) == 4
    agg.packet(Logged("AI9|nothing", 6, IP(WEB), IP(DB), 1, 2))
    assert agg.dropped["unknown_prefix"] == 1


def test_a_complete_dump_ends_connections_it_no_longer_holds() -> None:
    agg, rs = setup()
    agg.packet(Logged(prefix(rs, "default|db|0|allow"), 6, IP(WEB), IP(DB), 40000, 5432,
                      timestamp=100.0))
    agg.counts([], now=102.0)
    assert agg.open_connections == 1   # once could be a connection the dump just missed
    agg.counts([], now=117.0)
    assert agg.open_connections == 0


def test_an_address_belongs_to_the_longest_prefix_set_then_the_first_name() -> None:
    def netset(name: str, nets: list[str]) -> dict[str, Any]:
        return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                "metadata": {"name": name, "labels": {"set": name}}, "spec": {"nets": nets}}

    snapshot = snap(*docs(), netset("inner", ["198.19.7.0/24", "2001:2:0:7::/64"]),
                    netset("also-inner", ["198.19.7.0/24"]))
    ends = Ends(snapshot)
    assert ends.at(IP(OUT)).name == "also-inner"          # /24 beats /16; ties by name
    assert ends.at(IP("198.19.8.1")).name == "partners"
    assert ends.at(IP("2001:2:0:7::5")).name == "inner"
    assert ends.at(IP(DB)).type == "hep"
    outside = ends.at(IP("8.8.8.8"))
    assert (outside.type, outside.name, outside.scope) == ("net", "8.8.8.8", "public")


def test_a_pair_seen_again_after_a_flush_still_has_its_ends() -> None:
    agg, rs = setup()
    allow = prefix(rs, "default|db|0|allow")
    for round_, now in ((0, 110.0), (1, 120.0)):
        agg.packet(Logged(allow, 6, IP(WEB), IP(DB), 40000 + round_, 5432))
        agg.counts([], now=now + 100)    # the connection is gone from conntrack
        [record] = agg.flush(now=now)
        assert (record.src.name, record.dst.name, record.started) == ("web", "db", 1)


def test_server_bounds_hold_for_big_label_sets_and_long_traces() -> None:
    many = {f"topology.example.com/k{i:02d}": "v" for i in range(70)}
    agg, rs = setup(hep("big", "n1", "198.18.0.30", {"app": "db", **many}))
    agg.packet(Logged(prefix(rs, "default|db|0|allow"), 6, IP(WEB), IP("198.18.0.30"),
                      40000, 5432))
    [record] = agg.flush(now=110.0)
    assert len(record.dst.labels) == 64
    assert parse_record(record.json(), now=200.0) == record


def test_a_connection_read_just_after_a_flush_is_not_counted_twice() -> None:
    agg, rs = setup()
    tuple5 = conn_key(6, IP(WEB), IP(DB), 40000, 5432)
    agg.flush(now=100.0)
    agg.packet(Logged(prefix(rs, "default|db|0|allow"), 6, IP(WEB), IP(DB), 40000, 5432,
                      timestamp=99.99))   # stamped before the flush, read after it
    agg.counts([(tuple5, Counters(2, 200, 2, 200))], now=101.0)
    [record] = agg.flush(now=110.0)
    assert (record.connections, record.started) == (1, 1)
    agg.counts([(tuple5, Counters(4, 400, 4, 400))], now=111.0)
    [later] = agg.flush(now=120.0)
    assert (later.connections, later.started, later.bytes_in) == (1, 0, 200)


def test_a_spoofed_flood_keeps_memory_within_the_caps() -> None:
    agg, rs = setup(limits=Limits(pending=100, aggregates=10, verdicts=50))
    deny = prefix(rs, "security|end-of-tier|-|deny")
    for i in range(5000):
        agg.packet(Logged(deny, 6, IP(f"198.18.{100 + i // 250}.{i % 250}"), IP(DB),
                          1024 + i, 22))
    assert len(agg._ends_of) <= 10 and len(agg._denied_seen) <= 100
    assert agg.dropped["aggregates"] == 4990


def test_a_connection_through_destination_nat_gets_its_counts() -> None:
    """The client dialled a service address (198.19.9.9:80) that DNAT sent to db:5432:
    the table logged the translated packet, conntrack's original tuple is untranslated,
    its reply comes from db."""
    from bulkhead.observe.conntrack import ConntrackEntry, ConnTuple

    agg, rs = setup()
    for step in ("security|security.ssh|0|pass", "default|db|0|allow"):
        agg.packet(Logged(prefix(rs, step), 6, IP(WEB), IP(DB), 40000, 5432))
    entry = ConntrackEntry(None, ConnTuple(4, 6, IP(WEB), IP("198.19.9.9"), 40000, 80),
                           ConnTuple(4, 6, IP(DB), IP(WEB), 5432, 40000), 5, 500, 4, 900)
    agg.counts([(tracked_key(entry), entry)], now=101.0)
    [record] = agg.flush(now=110.0)
    assert (record.bytes_in, record.bytes_out, record.dst_port) == (500, 900, 5432)
    plain = ConntrackEntry(None, ConnTuple(4, 6, IP(WEB), IP(DB), 1, 2),
                           ConnTuple(4, 6, IP(DB), IP(WEB), 2, 1))
    assert tracked_key(plain) == conn_key(6, IP(WEB), IP(DB), 1, 2)
