"""HNS ACLs (`bulkhead.dataplane.windows.hns`) and their fake: for random snapshots and
packets, the fake HNS over the compiled rules decides as the reference evaluator for that
endpoint and direction; what HNS cannot express is refused, exactly then; priorities,
chunks and bounds as documented."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.windows import hns, hns_json
from bulkhead.dataplane.windows.fake_hns import FakeHns
from bulkhead.dataplane.windows.flat import (
    ALL_ICMP,
    ALL_PORTS,
    ALLOW,
    DENY,
    Box,
    Entry,
    Flat,
    Unsupported,
    icmp_span,
)
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.dataplane.windows.rules import AclRule
from bulkhead.model import EGRESS, INGRESS
from tests.test_differential import HOSTS as HOST_NAMES
from tests.windowsfixture import DIRECTIONS, check_backend, endpoint, worlds

EXAMPLES = 40


def hns_refuses(flat: dict[int, Flat]) -> bool:
    """Whether a list holds what HNS cannot express: ICMP types or codes, or ports of
    protocols other than TCP and UDP."""
    for entries in flat.values():
        for e in entries:
            ports = e.box.local_ports != ALL_PORTS or e.box.remote_ports != ALL_PORTS
            others = any(p in (132, 136) for lo, hi in e.box.protocols for p in range(lo, hi + 1))
            if e.box.icmp != ALL_ICMP or (ports and others):
                return True
    return False


def test_fake_hns_over_compiled_rules_decides_as_the_evaluator() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])   # no shrinking: a failure shows the example drawn
    @given(worlds(refusals=False), st.data())
    def check(world: Any, data: st.DataObject) -> None:
        for host in HOST_NAMES:
            plan = world.plan(host)
            ep = endpoint(plan, host)
            if ep is None:
                continue
            rules: list[AclRule] = []
            try:
                for direction in DIRECTIONS:
                    flat = flatten(plan, ep, direction, neighbour_discovery=False)
                    refuse = hns_refuses(flat)
                    try:
                        rules += hns.compile(flat, direction, host)
                    except Unsupported as e:
                        assert refuse and e.field in ("icmp", "ports"), e
                        seen["refused"] += 1
                        raise
                    assert not refuse
            except Unsupported:
                continue
            seen["rules"] += len(rules)
            check_backend(world, data, host, FakeHns(rules), seen)

    check()
    print(dict(seen))
    assert seen["allowed"] > 200 and seen["denied"] > 200 and seen["refused"] > 2, seen


# ------------------------------------------------------------------------ plain tests
EVERY4, EVERY6 = Box.everything(4), Box.everything(6)


def box(**fields: Any) -> Box:
    return Box(4, fields.pop("protocols", ((6, 6),)), fields.pop("local", EVERY4.local),
               fields.pop("remote", EVERY4.remote), **fields)


def flat_of(*entries: Entry, last: str = DENY) -> dict[int, Flat]:
    return {4: (*entries, Entry(last, EVERY4, "end")), 6: (Entry(last, EVERY6, "end"),)}


def test_priorities_rise_when_the_action_changes() -> None:
    flat = flat_of(Entry(ALLOW, box(local_ports=((80, 80),)), "a"),
                   Entry(ALLOW, box(local_ports=((443, 443),)), "b"),
                   Entry(DENY, box(remote=((5, 5),)), "c"),
                   Entry(ALLOW, box(protocols=((17, 17),)), "d"))
    rules = hns.compile(flat, INGRESS, "web")
    assert [(r.action, r.priority) for r in rules] == [
        ("Allow", 1000), ("Allow", 1000), ("Block", 1001), ("Allow", 1002), ("Block", 1003)]
    assert rules[0] == AclRule("web-in-0", "Allow", "In", 1000, "6", (), ("0.0.0.0/0",),
                               ("80",), ())
    assert rules[2].remote_addresses == ("0.0.0.5/32",)
    # Both families end the same way: one last rule, no protocol and no address.
    assert rules[-1] == AclRule("web-in-4", "Block", "In", 1003)


def test_allow_ends_come_before_the_last_block() -> None:
    every = {4: (Entry(ALLOW, EVERY4, "a"),), 6: (Entry(ALLOW, EVERY6, "b"),)}
    rules = hns.compile(every, INGRESS, "x")
    assert [(r.action, r.priority, r.protocols, r.remote_addresses) for r in rules] == [
        ("Allow", 1000, "", ()), ("Block", 1001, "", ())]
    assert FakeHns(rules).allows(INGRESS, 6, 47, 1, 2, None, None, None)


def test_the_families_ends_differ() -> None:
    flat = {4: (Entry(ALLOW, EVERY4, "a"),), 6: (Entry(DENY, EVERY6, "b"),)}
    rules = hns.compile(flat, EGRESS, "x")
    assert [(r.action, r.direction, r.protocols, r.remote_addresses) for r in rules] == [
        ("Allow", "Out", "", ("0.0.0.0/0",)), ("Block", "Out", "", ())]
    fake = FakeHns(rules)
    assert fake.allows(EGRESS, 4, 6, 1, 2, 1000, 80, None)
    assert not fake.allows(EGRESS, 6, 6, 1, 2, 1000, 80, None)


def test_long_address_lists_are_split_as_calico_does() -> None:
    # 4001 addresses no CIDR can join (every other one): two rules, 4000 and 1.
    remote = tuple((2 * i, 2 * i) for i in range(4001))
    rules = hns.compile(flat_of(Entry(ALLOW, box(remote=remote), "big")), INGRESS, "n")
    assert [len(r.remote_addresses) for r in rules[:-1]] == [4000, 1]
    assert rules[0].priority == rules[1].priority
    fake = FakeHns(rules)
    assert fake.allows(INGRESS, 4, 6, 7, 8000, 1, 2, None)
    assert not fake.allows(INGRESS, 4, 6, 7, 8001, 1, 2, None)


def test_one_rule_per_protocol_and_port_ranges() -> None:
    rules = hns.compile(flat_of(Entry(ALLOW, box(protocols=((6, 6), (17, 17)),
                                                 remote_ports=((1, 1), (80, 90))), "p")),
                        INGRESS, "p")
    assert [(r.protocols, r.remote_ports) for r in rules[:-1]] == [
        ("6", ("1", "80-90")), ("17", ("1", "80-90"))]


def test_icmp_types_are_refused() -> None:
    entry = Entry(ALLOW, box(protocols=((1, 1),), icmp=(icmp_span(8, None),)),
                  "policy ping ingress rule 0")
    with pytest.raises(Unsupported, match="policy ping ingress rule 0: icmp: HNS ACLs match "
                       "no ICMP type or code"):
        hns.compile(flat_of(entry), INGRESS, "x")


def test_ports_of_sctp_are_refused() -> None:
    entry = Entry(ALLOW, box(protocols=((132, 132),), local_ports=((9, 9),)),
                  "policy sctp ingress rule 1")
    with pytest.raises(Unsupported, match="policy sctp ingress rule 1: ports: HNS ACLs match "
                       "the ports of TCP and UDP only, not of protocol 132"):
        hns.compile(flat_of(entry), INGRESS, "x")


def test_rule_count_is_bounded() -> None:
    # Protocol 47 carries no ports: no packet of it is in the box, no rule for it.
    entry = Entry(ALLOW, box(protocols=((6, 6), (17, 17), (47, 47)), local_ports=((1, 1),)),
                  "w")
    assert [r.protocols for r in hns.compile(flat_of(entry), INGRESS, "x", max_rules=3)] \
        == ["6", "17", ""]
    many = Entry(DENY, box(protocols=((0, 254),)), "policy many ingress rule 3")
    with pytest.raises(Unsupported, match="policy many ingress rule 3: rules: the Ingress "
                       "list needs more than 100 HNS ACL rules"):
        hns.compile(flat_of(many, last=ALLOW), INGRESS, "x", max_rules=100)


def test_a_list_that_does_not_decide_is_an_error() -> None:
    with pytest.raises(ValueError, match="the IPv4 list does not end with an entry"):
        hns.compile({4: (Entry(ALLOW, box(), "a"),)}, INGRESS, "x")
    with pytest.raises(ValueError, match="direction 'In'"):
        hns.compile(flat_of(), "In", "x")


# ------------------------------------------------------------------------------ fake
def test_the_fake_allows_without_acls_and_denies_by_default_with_any() -> None:
    assert FakeHns([]).allows(INGRESS, 4, 6, 1, 2, 80, 1000, None)
    only_out = FakeHns([AclRule("o", "Allow", "Out", 1000, "6")])
    assert not only_out.allows(INGRESS, 4, 6, 1, 2, 80, 1000, None)
    assert only_out.allows(EGRESS, 4, 6, 1, 2, 80, 1000, None)


def test_the_fake_reads_priorities_lower_first_and_block_wins_a_tie() -> None:
    allow = AclRule("a", "Allow", "In", 2000)
    block = AclRule("b", "Block", "In", 1000, "17")
    fake = FakeHns([allow, block])
    assert not fake.allows(INGRESS, 4, 17, 1, 2, 53, 53, None)
    assert fake.allows(INGRESS, 4, 6, 1, 2, 53, 53, None)
    tie = FakeHns([AclRule("a", "Allow", "In", 1000), AclRule("b", "Block", "In", 1000, "6")])
    assert not tie.allows(INGRESS, 4, 6, 1, 2, 53, 53, None)
    assert tie.allows(INGRESS, 4, 17, 1, 2, 53, 53, None)


def test_the_fake_matches_ports_of_tcp_and_udp_only() -> None:
    fake = FakeHns([AclRule("a", "Allow", "In", 1000, "6", local_ports=("0-65535",))])
    assert fake.allows(INGRESS, 4, 6, 1, 2, 80, 1000, None)
    assert not fake.allows(INGRESS, 4, 17, 1, 2, 80, 1000, None)
    assert not fake.allows(INGRESS, 4, 1, 1, 2, None, None, 8 << 8)
    # Ports without TCP or UDP: hns_json cannot send them, so the fake refuses them too
    # (it is no more lenient than what reaches HNS).
    for protocols in ("", "132"):
        with pytest.raises(ValueError, match="ACL a: ports: only with protocol 6"):
            FakeHns([AclRule("a", "Allow", "In", 1000, protocols, local_ports=("80",))])


def test_the_fake_refuses_what_hns_would_not_take() -> None:
    with pytest.raises(ValueError, match="ACL r: remote_addresses: 'Any' is not an IP"):
        FakeHns([AclRule("r", "Allow", "In", 1000, remote_addresses=("Any",))])
    with pytest.raises(ValueError, match="ACL r: protocols: '6,17' is not one protocol"):
        FakeHns([AclRule("r", "Allow", "In", 1000, "6,17")])
    with pytest.raises(ValueError, match="ACL r: local_ports: '70000' is not within"):
        FakeHns([AclRule("r", "Allow", "In", 1000, "6", local_ports=("70000",))])
    with pytest.raises(ValueError, match="ACL r: direction: 'Ingress' is not In or Out"):
        FakeHns([AclRule("r", "Allow", "Ingress", 1000)])
    # Priority 0 is left out of HCN's JSON (omitempty), so HNS would not get it; and it
    # is a uint16. hns_json refuses both; so does the fake.
    for priority in (0, 65536):
        with pytest.raises(ValueError, match=f"ACL r: priority: {priority} is not 1-65535"):
            FakeHns([AclRule("r", "Allow", "In", priority)])
    with pytest.raises(ValueError, match="ACL r: rule type: 'Port' is not Switch or Host"):
        FakeHns([AclRule("r", "Allow", "In", 1000, rule_type="Port")])
    # Everything the fake takes, hns_json can send.
    hns_json.render([AclRule("r", "Allow", "In", 1, "17", remote_ports=("53",)),
                     AclRule("s", "Block", "Out", 65535, rule_type="Host")])
