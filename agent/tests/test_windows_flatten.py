"""The Windows flattener (`bulkhead.dataplane.windows.flatten`): for random snapshots and
packets, the first match of the flattened list is the reference evaluator's verdict for
that endpoint and direction (what happens on the wire, and with `policy_decision` what
the policies decide); what Windows cannot enforce is refused, exactly then; each refusal
names the policy, rule and field."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.windows import flatten as flatten_module
from bulkhead.dataplane.windows.flat import (
    ALL_ICMP,
    ALLOW,
    DENY,
    Box,
    Entry,
    Unsupported,
    first_match,
)
from bulkhead.dataplane.windows.flatten import flatten, subtract
from bulkhead.model import EGRESS, INGRESS, OBSERVE, Snapshot, parse_resource
from bulkhead.net import difference
from bulkhead.policy import Evaluator, Failsafes
from bulkhead.policy.failsafe import FailsafePort
from bulkhead.policy.plan import EndpointPlan, NodePlan, calculate
from tests.policyfixture import DB, HOSTS, WEB, hep, on_interface, res
from tests.test_differential import HOSTS as HOST_NAMES
from tests.windowsfixture import DIRECTIONS, Packet, endpoint, packets, worlds

EXAMPLES = 40
PACKETS = 16


def refused(plan: NodePlan, ep: EndpointPlan, direction: str) -> bool:
    """Whether the endpoint's plan in `direction` holds what Windows cannot enforce."""
    dp = ep.direction(direction)
    rules = [r for t in dp.tiers for r in t.rules] + [r for p in dp.profiles for r in p.rules]
    return any(p.rules for p in dp.early) or any(
        r.destination.domains or plan.domains_of(r) for r in rules)


def test_flattened_lists_decide_as_the_evaluator() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])   # no shrinking: a failure shows the example drawn
    @given(worlds(), st.data())
    def check(world: Any, data: st.DataObject) -> None:
        for host in HOST_NAMES:
            plan = world.plan(host)
            ep = endpoint(plan, host)
            if ep is None:
                continue
            for direction in DIRECTIONS:
                refuse = refused(plan, ep, direction)
                observe = ep.mode == OBSERVE
                try:
                    decision = flatten(plan, ep, direction, policy_decision=True)
                except Unsupported:
                    assert refuse
                    seen["refused"] += 1
                    decision = None
                else:
                    assert not refuse
                try:
                    wire = flatten(plan, ep, direction)
                except Unsupported:
                    assert refuse and not observe
                    continue
                assert not refuse or observe
                for flat in (wire, decision):
                    if flat is not None:
                        for family, entries in flat.items():
                            assert entries[-1].box == Box.everything(family)
                for packet in data.draw(st.lists(packets(host), min_size=PACKETS,
                                                 max_size=PACKETS)):
                    verdict = world.evaluator.evaluate(packet.flow(direction), trace=False)
                    dv = verdict.ingress if direction == INGRESS else verdict.egress
                    assert dv.endpoint == host
                    got = first_match(wire[packet.family], *packet.args())
                    assert (got.action == ALLOW) == dv.allowed, (packet, direction, got, dv)
                    if decision is not None:
                        why = first_match(decision[packet.family], *packet.args())
                        assert why.action == dv.action, (packet, direction, why, dv)
                        seen[f"{dv.action} by {dv.decided_by}"] += 1
                        seen["passed"] += "after Pass" in why.where
                    seen["observed"] += observe

    check()
    print(dict(seen))
    # Not vacuous: rules, tier defaults and profiles decide, both ways; Pass is crossed;
    # observe endpoints and refusals occur.
    for key in ("Allow by rule", "Deny by rule", "Deny by tier-default", "Allow by profile"):
        assert seen[key] > 20, (key, seen)
    assert seen["Allow by failsafe"] > 5, seen
    assert seen["passed"] > 10 and seen["observed"] > 10 and seen["refused"] > 2, seen


def test_a_pass_rule_gets_all_that_follows_its_tier() -> None:
    """Every packet of a grid, at db, both directions: the flattened lists decide as the
    evaluator when a Pass rule covers part of what later tiers decide rule by rule."""
    docs = [res("Tier", "first", {"order": 1}),
            res("GlobalNetworkPolicy", "first.pass", {
                "tier": "first", "selector": "app == 'db'", "types": ["Ingress", "Egress"],
                "ingress": [{"action": "Pass", "protocol": "TCP",
                             "source": {"notNets": ["198.18.0.13/32"]}},
                            {"action": "Allow", "protocol": "UDP"}],
                "egress": [{"action": "Pass", "destination": {"notPorts": ["postgres"]}}]}),
            res("GlobalNetworkPolicy", "rest", {
                "selector": "app == 'db'", "types": ["Ingress", "Egress"],
                "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {
                    "ports": [80]}},
                            {"action": "Allow", "protocol": "TCP", "destination": {
                                "ports": [443, "postgres"]}},
                            {"action": "Log"},
                            {"action": "Allow", "protocol": "TCP", "source": {
                                "selector": "zone == 'dmz'"}}],
                "egress": [{"action": "Allow", "protocol": "UDP", "destination": {
                    "ports": [53]}}]})]
    snap = Snapshot.build(parse_resource(d) for d in [*HOSTS, *docs])
    evaluator = Evaluator(snap, Failsafes.off())
    plan = calculate(snap, "db", {}, Failsafes.off())
    ep = plan.endpoints[0]
    db, decided = int(ipaddress.ip_address(DB)), Counter[str]()
    for direction in (INGRESS, EGRESS):
        flat = flatten(plan, ep, direction)[4]
        for peer in ("198.18.0.11", "198.18.0.13", "198.19.5.5"):
            for protocol in (6, 17, 1):
                for port in ((80, 443, 5432, 53, 9) if protocol != 1 else (None,)):
                    icmp = 8 << 8 if protocol == 1 else None
                    packet = Packet(4, protocol, db, int(ipaddress.ip_address(peer)), port,
                                    port if protocol != 1 else None, icmp)
                    verdict = evaluator.evaluate(packet.flow(direction), trace=False)
                    dv = verdict.ingress if direction == INGRESS else verdict.egress
                    entry = first_match(flat, *packet.args())
                    assert entry.action == dv.action, (direction, packet, entry, dv)
                    decided[f"{dv.action} {'after Pass' in entry.where}"] += 1
    assert min(decided.values()) > 3 and len(decided) == 4, decided


# ------------------------------------------------------------------------ the algebra
def test_difference_and_subtract_keep_every_packet() -> None:
    assert difference(((0, 10),), ((3, 4), (6, 6))) == ((0, 2), (5, 5), (7, 10))
    assert difference(((0, 10), (20, 30)), ((5, 25),)) == ((0, 4), (26, 30))
    assert difference(((0, 10),), ()) == ((0, 10),)
    everything = Box.everything(4)
    ports = Box(4, ((6, 6),), everything.local, everything.remote, local_ports=((80, 80),))
    pieces = subtract(everything, ports)
    # A packet without ports (ICMP) and TCP to another port stay; TCP to 80 does not.
    assert any(b.matches(1, 5, 6, None, None, 8 << 8) for b in pieces)
    assert any(b.matches(6, 5, 6, 81, 1000, None) for b in pieces)
    assert not any(b.matches(6, 5, 6, 80, 1000, None) for b in pieces)
    assert all(b.icmp == ALL_ICMP for b in pieces)


def test_first_match_needs_a_list_that_decides() -> None:
    box = Box(4, ((6, 6),), ((0, 9),), ((0, 9),))
    entry = Entry(ALLOW, box, "x")
    assert first_match((entry,), 6, 1, 2, 80, 90, None) is entry
    with pytest.raises(ValueError, match="no entry of the list matches"):
        first_match((entry,), 17, 1, 2, 80, 90, None)


# ------------------------------------------------------------------- plain refusals
def plan_of(*docs: dict[str, Any], failsafes: Failsafes | None = None,
            hosts: Any = None) -> tuple[NodePlan, EndpointPlan]:
    snap = Snapshot.build(parse_resource(d) for d in [*(hosts or HOSTS), *docs])
    plan = calculate(snap, "db", {}, failsafes or Failsafes.off())
    return plan, plan.endpoints[0]


def test_untracked_and_pre_dnat_policies_are_refused() -> None:
    one_interface = [on_interface(h) if h["metadata"]["name"] == "db" else h for h in HOSTS]
    for flag in ("doNotTrack", "preDNAT"):
        plan, ep = plan_of(res("GlobalNetworkPolicy", "early", {
            "selector": "app == 'db'", flag: True, "applyOnForward": True,
            "ingress": [{"action": "Deny", "protocol": "TCP"}]}), hosts=one_interface)
        with pytest.raises(Unsupported) as e:
            flatten(plan, ep, INGRESS)
        assert (e.value.where, e.value.field) == ("policy early", flag)
        assert "Windows has no" in e.value.why and "selects db for Ingress" in e.value.why
        flatten(plan, ep, EGRESS)   # nothing early on egress


def test_domains_are_refused() -> None:
    plan, ep = plan_of(res("GlobalNetworkPolicy", "names", {
        "selector": "app == 'db'", "types": ["Egress"],
        "egress": [{"action": "Allow", "destination": {"domains": ["example.com"]}}]}))
    with pytest.raises(Unsupported, match=r"policy names egress rule 0: destination\.domains: "
                       "Windows has no address sets learned from DNS answers yet"):
        flatten(plan, ep, EGRESS)
    plan, ep = plan_of(
        res("GlobalNetworkSet", "by-name", {"allowedEgressDomains": ["*.example.org"]},
            {"dns": "yes"}),
        res("GlobalNetworkPolicy", "names", {
            "selector": "app == 'db'", "types": ["Egress"],
            "egress": [{"action": "Allow", "destination": {"selector": "dns == 'yes'"}}]}))
    with pytest.raises(Unsupported, match=r"policy names egress rule 0: destination.selector:"
                       r" selects network sets with allowedEgressDomains \(\*.example.org\)"):
        flatten(plan, ep, EGRESS)


def test_a_failsafe_without_ports_is_refused() -> None:
    plan, ep = plan_of(failsafes=Failsafes((FailsafePort(47, 5),), ()))
    with pytest.raises(Unsupported, match="failsafe 47:5: protocol: protocol 47 carries no"):
        flatten(plan, ep, INGRESS)


def test_observe_mode_blocks_nothing_and_keeps_the_decision() -> None:
    hosts = [*HOSTS[:1], hep("db", DB, {"app": "db",
                                        "microseg.bulkhead.io/enforcement": "observe"})]
    deny = res("GlobalNetworkPolicy", "deny", {"selector": "app == 'db'",
                                               "ingress": [{"action": "Deny"}]})
    plan, ep = plan_of(deny, hosts=hosts)
    for family, flat in flatten(plan, ep, INGRESS).items():
        assert [(e.action, e.box) for e in flat] == [(ALLOW, Box.everything(family))]
        assert "observe mode" in flat[0].where
    decision = flatten(plan, ep, INGRESS, policy_decision=True)
    assert [(e.action, e.where) for e in decision[4]] == [(DENY, "policy deny ingress rule 0")]


def test_pass_growth_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flatten_module, "MAX_ENTRIES", 5)
    tier = res("Tier", "first", {"order": 1})
    passing = res("GlobalNetworkPolicy", "first.pass", {
        "tier": "first", "selector": "app == 'db'",
        "ingress": [{"action": "Pass", "protocol": "TCP", "destination": {"ports": [p]}}
                    for p in (1, 2, 3)]})
    rest = res("GlobalNetworkPolicy", "many", {
        "selector": "app == 'db'",
        "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"nets": [f"{WEB}/32"]},
                     "destination": {"ports": [p]}} for p in (1, 2, 3, 4)]})
    plan, ep = plan_of(tier, passing, rest)
    with pytest.raises(Unsupported, match="the IPv4 Ingress list passes 5 entries"):
        flatten(plan, ep, INGRESS)


def test_rule_growth_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flatten_module, "MAX_RULE_BOXES", 1)
    plan, ep = plan_of(res("GlobalNetworkPolicy", "neg", {
        "selector": "app == 'db'",
        "ingress": [{"action": "Allow", "protocol": "TCP",
                     "destination": {"notPorts": ["postgres"]},
                     "source": {"notNets": ["198.18.0.0/24"]}}]}))
    with pytest.raises(Unsupported, match="policy neg ingress rule 0: rule: its matches "
                       "become 2 boxes in IPv4, more than 1"):
        flatten(plan, ep, INGRESS)


def test_a_direction_that_is_none_is_refused() -> None:
    plan, ep = plan_of()
    with pytest.raises(ValueError, match="direction 'In': expected Ingress or Egress"):
        flatten(plan, ep, "In")


def test_ipv6_neighbour_discovery_is_allowed_before_any_policy() -> None:
    """As the nftables table accepts it: a deny-all policy leaves ICMPv6 types 133-136
    allowed (an IPv6 host endpoint keeps its neighbours), and nothing else of ICMPv6;
    IPv4 has no such head, and HNS's lists (no ICMP types there) can leave it out."""
    deny = res("GlobalNetworkPolicy", "deny", {"selector": "app == 'db'",
                                               "ingress": [{"action": "Deny"}],
                                               "egress": [{"action": "Deny"}]})
    plan, ep = plan_of(deny)
    local, remote = int(ipaddress.ip_address("2001:2::1")), int(ipaddress.ip_address("2001:2::9"))
    for direction in (INGRESS, EGRESS):
        flat = flatten(plan, ep, direction)
        for icmp_type in range(256):
            entry = first_match(flat[6], 58, local, remote, None, None, icmp_type << 8)
            assert entry.action == (ALLOW if 133 <= icmp_type <= 136 else DENY), icmp_type
        assert first_match(flat[4], 1, 1, 2, None, None, 135 << 8).action == DENY
        assert all(e.where != "IPv6 neighbour discovery" for e in flat[4])
        bare = flatten(plan, ep, direction, neighbour_discovery=False)
        assert first_match(bare[6], 58, local, remote, None, None, 135 << 8).action == DENY
