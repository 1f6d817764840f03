"""Windows Firewall compilation (`dataplane.windows.firewall`) against first-match: for
random first-match lists per address family (boxes of a few spans per field, Allow and
Deny, complements, port ranges, ICMP types and codes, many protocols, a final catch-all)
and random packets, the first matching entry's action is the verdict of the fake Windows
Firewall (`fake_firewall`, which reads the rules' text itself) over the compiled rules,
in each of the three `blocks` modes. With every Deny region blocked, a foreign Allow-all
rule on the host changes no verdict; with none blocked, it opens what the list denies.
Then the text formats, chunking, refusals and the rule bound, one by one.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.windows import firewall
from bulkhead.dataplane.windows.fake_firewall import FakeFirewall
from bulkhead.dataplane.windows.firewall import CHUNK, address_texts, compile
from bulkhead.dataplane.windows.flat import (
    ALL_ICMP,
    ALL_PORTS,
    ALLOW,
    DENY,
    Box,
    Entry,
    Flat,
    Unsupported,
    all_addresses,
    icmp_span,
)
from bulkhead.dataplane.windows.rules import FirewallRule
from bulkhead.net import difference as minus
from bulkhead.net import intersection as meet
from bulkhead.net import merge, parse_network
from bulkhead.policy.flow import PORTED

Packet = tuple[int, int, int, int, int | None, int | None, int | None]  # family first


def first_match(flat: Flat, protocol: int, local: int, remote: int, local_port: int | None,
                remote_port: int | None, icmp: int | None) -> Entry:
    """The entry that decides a packet (until `flat.first_match` is on main)."""
    for entry in flat:
        if entry.box.matches(protocol, local, remote, local_port, remote_port, icmp):
            return entry
    raise AssertionError("the list decides no verdict for the packet")


def net(text: str) -> tuple[tuple[int, int], ...]:
    _, first, last = parse_network(text)
    return ((first, last),)


# --- strategies ----------------------------------------------------------------------------

BASE = {4: parse_network("198.18.0.0")[1], 6: parse_network("2001:2::")[1]}


def cuts(family: int) -> list[int]:
    """Span edges that make boxes overlap often: around two test networks, and the ends."""
    top = (1 << (32 if family == 4 else 128)) - 1
    b = BASE[family]
    return sorted({0, 1, b - 1, b, b + 1, b + 255, b + 256, b + 511, b + 0xFFFF, b + 0x10000,
                   b + 0x1FFFF, top - 1, top})


PORT_CUTS = [0, 1, 21, 22, 23, 79, 80, 443, 1000, 2000, 2001, 65534, 65535]
ICMP_CUTS = [0, icmp_span(3, None)[0], icmp_span(3, 4)[0], icmp_span(3, None)[1],
             icmp_span(8, 0)[0], icmp_span(8, None)[1], icmp_span(128, None)[0],
             icmp_span(129, None)[1], 0xFFFF]
PROTOCOLS = [0, 1, 2, 6, 17, 47, 50, 58, 132, 136, 254, 255]


@st.composite
def spans(draw: st.DrawFn, points: list[int], whole: tuple[int, int]) -> tuple[
        tuple[int, int], ...]:
    """All, or one to three spans between cut points, or the complement of those."""
    if draw(st.booleans()):
        return (whole,)
    chosen = sorted(draw(st.lists(st.sampled_from(points), min_size=1, max_size=6)))
    pairs = [(chosen[i], chosen[i + 1] if i + 1 < len(chosen) else chosen[i])
             for i in range(0, len(chosen), 2)]
    result = merge(pairs)
    if draw(st.booleans()):
        result = minus((whole,), result) or result
    return result


@st.composite
def boxes(draw: st.DrawFn, family: int) -> Box:
    top = all_addresses(family)[0]
    kind = draw(st.sampled_from(["any", "ported", "icmp", "protocols", "wide"]))
    local = draw(spans(cuts(family), top))
    remote = draw(spans(cuts(family), top))
    if kind == "ported":         # ports only with protocols that carry them or lack them
        protocols = draw(st.sampled_from([((6, 6),), ((17, 17),), ((6, 6), (17, 17)),
                                          ((6, 6), (17, 17), (50, 50))]))
        return Box(family, protocols, local, remote, draw(spans(PORT_CUTS, (0, 65535))),
                   draw(spans(PORT_CUTS, (0, 65535))))
    if kind == "icmp":
        protocols = draw(st.sampled_from([((1, 1),), ((58, 58),), ((1, 1), (58, 58))]))
        return Box(family, protocols, local, remote,
                   icmp=draw(spans(ICMP_CUTS, (0, 0xFFFF))))
    if kind == "wide":           # ports and ICMP with protocols that lack them
        protocols = minus(draw(spans(PROTOCOLS, (0, 255))), ((132, 132), (136, 136)))
        ports = draw(spans(PORT_CUTS, (0, 65535)))
        icmp = draw(spans(ICMP_CUTS, (0, 0xFFFF))) if ports == ALL_PORTS else ALL_ICMP
        return Box(family, protocols or ((6, 6),), local, remote, ports, ALL_PORTS, icmp)
    if kind == "protocols":
        protocols = draw(spans(PROTOCOLS, (0, 255)))
        return Box(family, protocols, local, remote)
    return Box(family, ((0, 255),), local, remote)


@st.composite
def flats(draw: st.DrawFn, family: int) -> Flat:
    entries = [Entry(draw(st.sampled_from([ALLOW, DENY])), draw(boxes(family)),
                     f"policy p{family} ingress rule {i}")
               for i in range(draw(st.integers(0, 5)))]
    entries.append(Entry(draw(st.sampled_from([ALLOW, DENY])), Box.everything(family),
                         "tier default default"))
    return tuple(entries)


def near(spans_: tuple[tuple[int, int], ...], value: int) -> list[int]:
    return [v for lo, hi in spans_ for v in (lo - 1, lo, hi, hi + 1)] + [value]


@st.composite
def packets(draw: st.DrawFn, flat: dict[int, Flat]) -> list[Packet]:
    """Random packets of both families, most on or next to an edge of one of the boxes."""
    out: list[Packet] = []
    for _ in range(draw(st.integers(16, 32))):
        family = draw(st.sampled_from([4, 6]))
        box = draw(st.sampled_from(flat[family])).box
        top = all_addresses(family)[0][1]
        own = [v for span in box.protocols for v in span]
        protocol = draw(st.sampled_from(own if draw(st.booleans()) else PROTOCOLS))
        local = clamp(draw(st.sampled_from(near(box.local, BASE[family]))), top)
        remote = clamp(draw(st.sampled_from(near(box.remote, BASE[family] + 300))), top)
        local_port = remote_port = icmp = None
        if protocol in PORTED:
            local_port = clamp(draw(st.sampled_from(near(box.local_ports, 22))), 0xFFFF)
            remote_port = clamp(draw(st.sampled_from(near(box.remote_ports, 40000))), 0xFFFF)
        if protocol in (1, 58):
            icmp = clamp(draw(st.sampled_from(near(box.icmp, icmp_span(8, 0)[0]))), 0xFFFF)
        out.append((family, protocol, local, remote, local_port, remote_port, icmp))
    return out


def clamp(value: int, top: int) -> int:
    return min(max(value, 0), top)


def verdicts(rules: list[FirewallRule], packets_: list[Packet], direction: str = "Inbound"
             ) -> list[bool]:
    fake = FakeFirewall(rules)
    return [fake.allows(direction, *p) for p in packets_]


def expected(flat: dict[int, Flat], packets_: list[Packet]) -> list[bool]:
    return [first_match(flat[p[0]], *p[1:]).action == ALLOW for p in packets_]


PROPERTY = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[int, Flat], list[Packet]]:
    flat = {4: draw(flats(4)), 6: draw(flats(6))}
    return flat, draw(packets(flat))


# --- the property ---------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", ["all", "explicit", "none"])
@PROPERTY
@given(case=cases())
def test_compiled_rules_decide_as_first_match(blocks: str, case: Any) -> None:
    flat, packets_ = case
    rules = compile(flat, "Ingress", "bulkhead-1-hep", blocks=blocks)
    assert verdicts(rules, packets_) == expected(flat, packets_)
    # A Block rule never covers a packet the list allows (Block beats Allow).
    blocks_only = [r for r in rules if r.action == "Block"]
    allowed = [p for p, ok in zip(packets_, expected(flat, packets_), strict=True) if ok]
    everything = FirewallRule("foreign", "Inbound", "Allow")
    assert all(verdicts([*blocks_only, everything], allowed))
    if blocks == "none":
        assert not blocks_only


@PROPERTY
@given(case=cases())
def test_blocked_denies_hold_against_a_foreign_allow_all(case: Any) -> None:
    flat, packets_ = case
    foreign = FirewallRule("CoreNet-Foreign-In", "Inbound", "Allow")
    want = expected(flat, packets_)
    rules = compile(flat, "Ingress", "bulkhead-1-hep", blocks="all")
    assert verdicts([*rules, foreign], packets_) == want
    # "explicit": what a Deny other than the last decides stays denied.
    rules = compile(flat, "Ingress", "bulkhead-1-hep", blocks="explicit")
    got = verdicts([*rules, foreign], packets_)
    for p, ok, allowed in zip(packets_, got, want, strict=True):
        decider = first_match(flat[p[0]], *p[1:])
        if decider is not flat[p[0]][-1]:
            assert ok == allowed, (p, decider.where)
    # "none": only the default action blocks, and a foreign Allow-all opens everything.
    rules = compile(flat, "Ingress", "bulkhead-1-hep", blocks="none")
    assert all(verdicts([*rules, foreign], packets_))


# --- examples -------------------------------------------------------------------------------

V4 = Box.everything(4)
V6 = Box.everything(6)


def test_address_texts() -> None:
    spans_ = (*net("198.18.0.1"), *net("198.18.1.0/24"),
              (net("198.18.2.0")[0][0], net("198.18.2.9")[0][0]))
    assert list(address_texts(spans_, 4)) == ["198.18.0.1", "198.18.1.0/24",
                                               "198.18.2.0-198.18.2.9"]
    assert list(address_texts(all_addresses(4), 4)) == ["0.0.0.0/1", "128.0.0.0/1"]
    assert list(address_texts(all_addresses(6), 6)) == ["::/1", "8000::/1"]
    assert list(address_texts(net("2001:2::/48"), 6)) == ["2001:2::/48"]
    assert list(address_texts(((1, 2),), 6)) == ["::1-::2"]


def test_ports_icmp_and_protocol_text() -> None:
    flat = {4: (Entry(ALLOW, replace(V4, protocols=((6, 6), (17, 17)),
                                     local_ports=((22, 22), (1000, 2000))), "p rule 0"),
                Entry(ALLOW, replace(V4, protocols=((1, 1),),
                                     icmp=(icmp_span(3, None), icmp_span(8, 0))), "p rule 1"),
                Entry(DENY, V4, "tier default default"))}
    rules = compile(flat, "Ingress", "bh", blocks="none")
    assert [(r.protocol, r.local_ports, r.icmp_types) for r in rules] == [
        (6, ("22", "1000-2000"), ()), (17, ("22", "1000-2000"), ()), (1, (), ("3", "8:0"))]
    # Only IPv4 is allowed: every rule names IPv4 addresses, so none matches IPv6.
    assert all(r.remote_addresses == ("0.0.0.0/1", "128.0.0.0/1") for r in rules)
    assert [r.name for r in rules] == ["bh-1", "bh-2", "bh-3"]
    assert rules[0].description == "p rule 0" and rules[0].direction == "Inbound"
    fake = FakeFirewall(rules)
    assert fake.allows("Ingress", 4, 6, "198.18.0.1", "198.18.0.2", 1500, 40000, None)
    assert not fake.allows("Ingress", 6, 6, "2001:2::1", "2001:2::2", 1500, 40000, None)
    assert fake.allows("Ingress", 4, 1, "198.18.0.1", "198.18.0.2", None, None, 3 << 8 | 4)
    assert not fake.allows("Ingress", 4, 1, "198.18.0.1", "198.18.0.2", None, None, 8 << 8 | 1)


def test_icmp_complement_lists_codes() -> None:
    flat = {6: (Entry(ALLOW, replace(V6, protocols=((58, 58),),
                                     icmp=minus(ALL_ICMP, (icmp_span(128, 0),))), "p rule 0"),
                Entry(DENY, V6, "tier default default"))}
    (rule,) = compile(flat, "Egress", "bh", blocks="none")
    assert rule.direction == "Outbound" and rule.protocol == 58
    assert rule.icmp_types[:3] == ("0", "1", "2") and "128" not in rule.icmp_types
    assert "128:1" in rule.icmp_types and "128:0" not in rule.icmp_types
    assert len(rule.icmp_types) == 255 + 255


def test_families_share_a_rule_without_addresses_only_when_both_decide_alike() -> None:
    tcp22 = {4: (Entry(ALLOW, replace(V4, protocols=((6, 6),), local_ports=((22, 22),)),
                       "failsafe tcp:22"), Entry(DENY, V4, "no profile")),
             6: (Entry(ALLOW, replace(V6, protocols=((6, 6),), local_ports=((22, 22),)),
                       "failsafe tcp:22"), Entry(DENY, V6, "no profile"))}
    (rule,) = compile(tcp22, "Ingress", "bh", blocks="none")
    assert (rule.protocol, rule.local_ports, rule.local_addresses, rule.remote_addresses) \
        == (6, ("22",), (), ())
    allow_all_v6 = {4: (Entry(DENY, V4, "no profile"),), 6: (Entry(ALLOW, V6, "profile a"),)}
    (rule,) = compile(allow_all_v6, "Ingress", "bh", blocks="none")
    assert rule.protocol is None and rule.remote_addresses == ("::/1", "8000::/1")
    rules = compile(allow_all_v6, "Ingress", "bh", blocks="all")
    assert [(r.action, r.remote_addresses) for r in rules] == [
        ("Block", ("0.0.0.0/1", "128.0.0.0/1")), ("Allow", ("::/1", "8000::/1"))]


def test_remote_and_local_lists_are_chunked() -> None:
    base = BASE[4]
    many = tuple((base + 2 * i, base + 2 * i) for i in range(2 * CHUNK + 500))
    flat = {4: (Entry(ALLOW, replace(V4, remote=many, local=many[:CHUNK + 1]), "p rule 0"),
                Entry(DENY, V4, "tier default default"))}
    rules = compile(flat, "Ingress", "bh", blocks="none")
    assert sorted((len(r.local_addresses), len(r.remote_addresses)) for r in rules) == sorted(
        [(CHUNK, CHUNK), (CHUNK, CHUNK), (CHUNK, 500), (1, CHUNK), (1, CHUNK), (1, 500)])
    fake = FakeFirewall(rules)
    assert fake.allows("Ingress", 4, 6, base + 2 * CHUNK, base + 2 * (2 * CHUNK + 499), 1, 2,
                       None)
    assert not fake.allows("Ingress", 4, 6, base + 2 * CHUNK, base + 1, 1, 2, None)


def test_ports_on_other_protocols_are_refused_naming_the_rule_and_field() -> None:
    sctp = {4: (Entry(ALLOW, replace(V4, protocols=((132, 132),), local_ports=((80, 80),)),
                      "policy web ingress rule 1"), Entry(DENY, V4, "no profile"))}
    with pytest.raises(Unsupported) as raised:
        compile(sctp, "Ingress", "bh")
    assert (raised.value.where, raised.value.field) == ("policy web ingress rule 1",
                                                        "destination.ports")
    assert "TCP and UDP" in raised.value.why and "132" in raised.value.why
    with pytest.raises(Unsupported) as raised:
        compile({4: (Entry(ALLOW, replace(V4, protocols=((132, 132),),
                                          remote_ports=((80, 80),)), "p rule 0"),)},
                "Egress", "bh")
    assert raised.value.field == "destination.ports"
    # All ports of SCTP are a rule for protocol 132 without ports.
    (rule,) = compile({4: (Entry(ALLOW, replace(V4, protocols=((132, 132),)), "p"),
                           Entry(DENY, V4, "d"))}, "Ingress", "bh", blocks="none")
    assert rule.protocol == 132 and rule.local_ports == ()


def test_max_rules_names_the_entry_past_the_bound() -> None:
    entries = [Entry(ALLOW, replace(V4, protocols=((6, 6),), local_ports=((p, p),),
                                    remote=net(f"198.18.{p}.0/24")), f"policy p ingress rule {p}")
               for p in range(10)]
    flat = {4: (*entries, Entry(DENY, V4, "tier default default"))}
    assert len(compile(flat, "Ingress", "bh", max_rules=10, blocks="none")) == 10
    with pytest.raises(Unsupported) as raised:
        compile(flat, "Ingress", "bh", max_rules=9, blocks="none")
    assert raised.value.where == "policy p ingress rule 9"
    assert raised.value.field == "rule count" and "max_rules 9" in raised.value.why


def test_explicit_blocks_cost_a_rule_per_protocol_an_allow_leaves() -> None:
    """Windows Firewall takes one protocol per rule: blocking "all but TCP port 22" is a
    rule for each of the 255 other protocols and one for the rest of TCP."""
    flat = {f: (Entry(ALLOW, replace(Box.everything(f), protocols=((6, 6),),
                                     local_ports=((22, 22),)), "failsafe tcp:22"),
                Entry(DENY, Box.everything(f), "tier default default")) for f in (4, 6)}
    rules = compile(flat, "Ingress", "bh", interface_alias="Ethernet")
    assert len(rules) == 1 + 256
    assert {r.interface_alias for r in rules} == {"Ethernet"}
    tcp = [r for r in rules if r.action == "Block" and r.protocol == 6]
    assert [r.local_ports for r in tcp] == [("0-21", "23-65535")]
    fake = FakeFirewall(rules)
    ssh = ("Ingress", 4, 6, "198.18.0.1", "198.18.0.2", 22, 40000, None)
    assert fake.allows(*ssh, interface="Ethernet")
    assert not fake.allows(*ssh, interface="Ethernet 2")
    assert len(compile(flat, "Ingress", "bh", blocks="none")) == 1


def test_bad_arguments() -> None:
    flat = {4: (Entry(DENY, V4, "d"),)}
    with pytest.raises(ValueError, match="direction 'In'"):
        compile(flat, "In", "bh")
    with pytest.raises(ValueError, match="blocks 'some'"):
        compile(flat, "Ingress", "bh", blocks="some")
    with pytest.raises(ValueError, match="family 6 box in the family 4 list"):
        compile({4: (Entry(DENY, V6, "d"),)}, "Ingress", "bh")
    assert firewall.windows_direction("Egress") == "Outbound"


def test_fake_reads_text_strictly() -> None:
    for bad in (FirewallRule("x", "Inbound", "Allow", 6, local_ports=("22-",)),
                FirewallRule("x", "Inbound", "Allow", 50, local_ports=("22",)),
                FirewallRule("x", "Inbound", "Allow", 6, icmp_types=("8",)),
                FirewallRule("x", "Inbound", "Allow", 1, icmp_types=("8:256",)),
                FirewallRule("x", "Inbound", "Allow", remote_addresses=("198.18.0.1/24",)),
                FirewallRule("x", "Inbound", "Allow", remote_addresses=("198.18.0.9-198.18.0.1",))):
        with pytest.raises(ValueError, match="rule x"):
            FakeFirewall([bad])
    fake = FakeFirewall([FirewallRule("x", "Inbound", "Allow", None,
                                      remote_addresses=("198.18.0.5-198.18.0.7", "2001:2::/48"))])
    assert fake.allows("Inbound", 4, 47, "198.18.0.1", "198.18.0.7", None, None, None)
    assert not fake.allows("Inbound", 4, 47, "198.18.0.1", "198.18.0.8", None, None, None)
    assert fake.allows("Inbound", 6, 47, "2001:2::1", "2001:2::ffff", None, None, None)
    assert not fake.allows("Outbound", 6, 47, "2001:2::1", "2001:2::ffff", None, None, None)
    assert ALL_PORTS == ((0, 65535),)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(a=spans(list(range(0, 40, 3)), (0, 40)), b=spans(list(range(1, 40, 4)), (0, 40)),
       c=spans(list(range(0, 40, 5)), (0, 40)), d=spans(list(range(2, 40, 3)), (0, 40)))
def test_span_and_box_arithmetic(a: Any, b: Any, c: Any, d: Any) -> None:
    """`minus`, `meet` and `subtract` against sets of values: the pieces of x - y are
    disjoint, at most one per field, and hold exactly the values of x not in y."""
    def values(spans_: Any) -> set[int]:
        return {v for lo, hi in spans_ for v in range(lo, hi + 1)}

    assert values(minus(a, b)) == values(a) - values(b)
    assert values(meet(a, b)) == values(a) & values(b)
    assert merge(minus(a, b)) == minus(a, b) and merge(meet(a, b)) == meet(a, b)
    x, y = (a, b, c, a, b, c), (c, d, a, d, d, b)
    pieces = firewall.subtract(x, y)
    assert len(pieces) <= 6

    chooser = random.Random(len(pieces))   # points of x, on edges of y's spans often
    edges = [sorted(values(f) & {e for lo, hi in g for e in (lo - 1, lo, hi, hi + 1)}
                    | set(sorted(values(f))[::9])) for f, g in zip(x, y, strict=True)]
    inside = {tuple(chooser.choice(e) for e in edges) for _ in range(300)}
    for p in inside:
        in_y = all(any(lo <= v <= hi for lo, hi in f) for v, f in zip(p, y, strict=True))
        holders = [q for q in pieces
                   if all(any(lo <= v <= hi for lo, hi in f) for v, f in zip(p, q, strict=True))]
        assert len(holders) == (0 if in_y else 1), p


def test_pieces_before_merging_are_bounded() -> None:
    """A Deny after many Allows that each cut every protocol is refused while subtracting,
    long before its rules are merged, naming the Deny."""
    entries = [Entry(ALLOW, replace(V4, protocols=((6, 6),), local_ports=((p, p),),
                                    remote=net(f"198.18.{p}.0/24")), f"policy p rule {p}")
               for p in range(1, 40, 2)]
    flat = {4: (*entries, Entry(DENY, V4, "tier default default"))}
    with pytest.raises(Unsupported) as raised:
        compile(flat, "Ingress", "bh", max_rules=3)
    assert raised.value.where == "tier default default"
    assert raised.value.field == "rule count"
