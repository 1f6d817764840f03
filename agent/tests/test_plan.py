"""bulkhead.policy.plan on its own: what one node must enforce, asserted on the plan
itself (no renderer, no kernel). The plan is read through the small helpers below, so a
change of the plan's types only needs them changed."""

from __future__ import annotations

import random
from typing import Any

import netaddr
import pytest

from bulkhead.model import Snapshot, parse_resource
from bulkhead.net import AddressSet, address_text
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from bulkhead.policy.semantics import effective_labels, rule_ip_version, staged_view
from bulkhead.selector import parse as parse_selector
from tests import nftfixture

V3 = "projectcalico.org/v3"


def doc(kind: str, name: str, spec: dict[str, Any],
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": V3, "kind": kind, "metadata": meta, "spec": spec}


def hep(name: str, node: str, ips: list[str], labels: dict[str, str], **spec: Any
        ) -> dict[str, Any]:
    """An endpoint on its own interface, named after it (one `*` per node at most)."""
    return doc("HostEndpoint", name, {"node": node, "expectedIPs": ips,
                                      "interfaceName": name,
                                      "profiles": ["projectcalico-default-allow"], **spec},
               labels)


def gnp(name: str, selector: str, kind: str = "GlobalNetworkPolicy", **spec: Any
        ) -> dict[str, Any]:
    return doc(kind, name, {"selector": selector, **spec})


def tier(name: str, order: float | None, default_action: str = "Deny") -> dict[str, Any]:
    spec: dict[str, Any] = {"defaultAction": default_action}
    if order is not None:
        spec["order"] = order
    return doc("Tier", name, spec)


def snapshot(*docs: dict[str, Any]) -> Snapshot:
    return Snapshot.build(parse_resource(d) for d in docs)


ALLOW_443 = [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [443]}}]
WEB = hep("web", "n1", ["198.18.0.11"], {"app": "web"})


# -------------------------------------------------- reading the plan (kept small)
def plan_of(*docs: dict[str, Any], node: str = "n1", staged: bool = False,
            interfaces: dict[str, list[str]] | None = None) -> Any:
    return calculate(snapshot(*docs), node, interfaces or {}, Failsafes.off(), staged=staged)


def endpoint(plan: Any, name: str) -> Any:
    (found,) = [ep for ep in plan.endpoints if ep.name == name]
    return found


def tiers(plan: Any, ep: str, direction: str) -> list[tuple[str, list[str]]]:
    """(tier, its policies selecting the endpoint, in order) per applicable tier."""
    return [(t.name, list(t.policies)) for t in endpoint(plan, ep).direction(direction).tiers]


def early(plan: Any, ep: str, direction: str) -> list[str]:
    """The untracked and pre-DNAT policies, evaluated before the tiers."""
    return [p.name for p in endpoint(plan, ep).direction(direction).early]


def rule_names(plan: Any, ep: str, direction: str) -> list[str]:
    """Where each rule of the applicable tiers comes from, in evaluation order."""
    return [r.where for t in endpoint(plan, ep).direction(direction).tiers for r in t.rules]


def selector_set(plan: Any, selector: str) -> tuple[list[str], list[str]]:
    """(IPv4 CIDRs, IPv6 CIDRs) of a selector, by canonical form."""
    members = {str(sel): addresses for sel, addresses in plan.selector_sets.items()}
    return tuple([f"{address_text(first, family)}/{length}"   # type: ignore[return-value]
                  for first, length in members[selector].cidrs(family)] for family in (4, 6))


# ----------------------------------------------------------------------- the tests
def test_policies_apply_per_direction_by_types_and_selector() -> None:
    plan = plan_of(
        WEB, hep("db", "n1", ["198.18.0.12"], {"app": "db"}),
        gnp("in-only", "app == 'web'", types=["Ingress"], ingress=ALLOW_443),
        gnp("out-by-rules", "app == 'web'", egress=[{"action": "Deny"}]),   # types: Egress
        gnp("both", "all()", ingress=ALLOW_443, egress=[{"action": "Allow"}]),
        gnp("db-only", "app == 'db'", ingress=ALLOW_443))
    assert tiers(plan, "web", "Ingress") == [("default", ["both", "in-only"])]
    assert tiers(plan, "web", "Egress") == [("default", ["both", "out-by-rules"])]
    assert tiers(plan, "db", "Ingress") == [("default", ["both", "db-only"])]
    assert tiers(plan, "db", "Egress") == [("default", ["both"])]


def test_only_this_nodes_endpoints_are_planned() -> None:
    plan = plan_of(WEB, hep("far", "n2", ["198.18.0.20"], {"app": "web"}))
    assert [ep.name for ep in plan.endpoints] == ["web"]
    assert [ep.name for ep in plan_of(WEB, node="n9").endpoints] == []


def test_tiers_in_order_nil_last_ties_by_name_and_empty_tiers_left_out() -> None:
    plan = plan_of(
        WEB, tier("late", None), tier("b", 10, "Pass"), tier("a", 10), tier("first", 1),
        tier("unused", 5),
        gnp("late.p", "all()", tier="late", ingress=ALLOW_443),
        gnp("b.p", "all()", tier="b", ingress=ALLOW_443),
        gnp("a.p", "all()", tier="a", ingress=ALLOW_443),
        gnp("first.p", "all()", tier="first", ingress=ALLOW_443),
        gnp("unused.p", "app == 'nobody'", tier="unused", ingress=ALLOW_443),
        gnp("d", "all()", ingress=ALLOW_443))
    assert [name for name, _ in tiers(plan, "web", "Ingress")] == [
        "first", "a", "b", "default", "late"]   # default's order is 1,000,000
    ingress = endpoint(plan, "web").direction("Ingress")
    assert {t.name: t.default_action for t in ingress.tiers}["b"] == "Pass"
    assert tiers(plan, "web", "Egress") == []


def test_policies_in_a_tier_by_order_nil_last_then_name_rules_in_order() -> None:
    two = [{"action": "Log"}, {"action": "Allow", "protocol": "UDP"}]
    plan = plan_of(WEB,
                   gnp("z", "all()", order=1, ingress=ALLOW_443),
                   gnp("nil-b", "all()", ingress=ALLOW_443),
                   gnp("nil-a", "all()", ingress=two),
                   gnp("y", "all()", order=1, ingress=ALLOW_443),
                   gnp("early", "all()", order=0.5, ingress=ALLOW_443))
    assert tiers(plan, "web", "Ingress") == [("default", ["early", "y", "z", "nil-a", "nil-b"])]
    assert rule_names(plan, "web", "Ingress") == [
        "policy early ingress rule 0", "policy y ingress rule 0", "policy z ingress rule 0",
        "policy nil-a ingress rule 0", "policy nil-a ingress rule 1",
        "policy nil-b ingress rule 0"]


def test_untracked_and_pre_dnat_policies_come_first_and_leave_the_tiers() -> None:
    plan = plan_of(
        WEB,
        gnp("raw", "all()", doNotTrack=True, applyOnForward=True, types=["Ingress", "Egress"],
            ingress=ALLOW_443, egress=[{"action": "Allow"}]),
        gnp("nat", "all()", preDNAT=True, applyOnForward=True, ingress=ALLOW_443),
        gnp("plain", "all()", ingress=ALLOW_443))
    assert early(plan, "web", "Ingress") == ["raw", "nat"]
    assert early(plan, "web", "Egress") == ["raw"]          # pre-DNAT is ingress only
    assert tiers(plan, "web", "Ingress") == [("default", ["plain"])]
    assert tiers(plan, "web", "Egress") == []


def test_staged_policies_are_left_out_of_the_enforced_plan() -> None:
    enforced = gnp("p", "all()", ingress=[{"action": "Deny"}])
    staged = gnp("p", "all()", kind="StagedGlobalNetworkPolicy", ingress=ALLOW_443)
    new = gnp("s", "all()", kind="StagedGlobalNetworkPolicy", ingress=ALLOW_443,
              egress=[{"action": "Deny"}])
    plan = plan_of(WEB, enforced, staged, new)
    assert tiers(plan, "web", "Ingress") == [("default", ["p"])]
    assert rule_names(plan, "web", "Ingress") == ["policy p ingress rule 0"]
    assert tiers(plan, "web", "Egress") == []
    # The staged view (for flow verdicts, never rendered): a staged policy replaces the
    # enforced one of the same tier and name, and a new one joins.
    view = plan_of(WEB, enforced, staged, new, staged=True)
    assert rule_names(view, "web", "Ingress") == ["staged policy p ingress rule 0",
                                                  "staged policy s ingress rule 0"]
    delete = doc("StagedGlobalNetworkPolicy", "p", {"stagedAction": "Delete"})
    assert [p.name for p in staged_view(snapshot(WEB, enforced, delete))] == []


def test_selector_sets_hold_endpoint_addresses_and_network_sets_merged() -> None:
    plan = plan_of(
        WEB,
        hep("web2", "n2", ["198.18.0.10", "2001:db8::a"], {"app": "web"}),
        hep("db", "n3", ["198.18.0.12"], {"app": "db"}),
        doc("GlobalNetworkSet", "office", {"nets": ["10.1.0.0/25", "10.1.0.128/25",
                                                   "2001:db8:1::/64"]}, {"app": "web"}),
        gnp("from-web", "all()", ingress=[
            {"action": "Allow", "source": {"selector": "app == 'web'"}},
            {"action": "Deny", "source": {"notSelector": "app=='db'"}}]))
    assert selector_set(plan, "app == \"web\"") == (
        ["10.1.0.0/24", "198.18.0.10/31"], ["2001:db8::a/128", "2001:db8:1::/64"])
    assert selector_set(plan, "app == \"db\"") == (["198.18.0.12/32"], [])
    assert {str(sel) for sel in plan.selector_sets} == {"app == \"web\"", "app == \"db\""}


def test_named_ports_resolve_through_every_endpoints_ports() -> None:
    db = hep("db", "n2", ["198.18.0.12", "2001:db8::c"], {"app": "db"},
             ports=[{"name": "pg", "protocol": "TCP", "port": 5432}])
    db2 = hep("db2", "n3", ["198.18.0.13"], {"app": "db"},
              ports=[{"name": "pg", "protocol": "UDP", "port": 6000}])
    db3 = hep("db3", "n4", ["198.18.0.14"], {"app": "cache"},
              ports=[{"name": "pg", "protocol": "TCP", "port": 5432}])
    plan = plan_of(WEB, db, db2, db3, gnp("to-pg", "app == 'web'", egress=[
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["pg"]}},
        {"action": "Allow", "protocol": "TCP",
         "destination": {"selector": "app == 'db'", "notPorts": ["pg"]}}]))
    assert [(address_text(e.address, e.family), e.protocol, e.port)
            for e in plan.named_ports[(None, "pg")]] == [
        ("198.18.0.12", 6, 5432), ("198.18.0.13", 17, 6000), ("198.18.0.14", 6, 5432),
        ("2001:db8::c", 6, 5432)]
    # Under a selector, only the endpoints it matches (felix's named-port IP sets), for
    # notPorts too: db3 has pg but is no app == 'db'.
    assert [(address_text(e.address, e.family), e.protocol, e.port)
            for e in plan.named_ports[(parse_selector("app == 'db'"), "pg")]] == [
        ("198.18.0.12", 6, 5432), ("198.18.0.13", 17, 6000), ("2001:db8::c", 6, 5432)]


def test_profiles_give_labels_and_rules() -> None:
    profile = doc("Profile", "ops", {"labelsToApply": {"team": "ops", "app": "nope"},
                                     "ingress": [{"action": "Deny"}]})
    bare = hep("bare", "n1", ["198.18.0.14"], {"app": "bare"}, profiles=["ops"])
    snap = snapshot(profile, bare)
    assert effective_labels(snap, snap.host_endpoints["bare"]) == {"team": "ops",
                                                                    "app": "bare"}
    plan = plan_of(profile, bare, WEB, gnp("ops", "team == 'ops'", ingress=ALLOW_443))
    assert tiers(plan, "bare", "Ingress") == [("default", ["ops"])]
    assert tiers(plan, "web", "Ingress") == []
    ingress = endpoint(plan, "bare").direction("Ingress")
    assert [(p.name, [r.action for r in p.rules]) for p in ingress.profiles] == [
        ("ops", ["Deny"])]
    nothing = hep("nothing", "n1", ["198.18.0.15"], {}, profiles=[])
    assert endpoint(plan_of(nothing), "nothing").direction("Ingress").profiles == ()


def test_interfaces_by_name_by_expected_ips_and_claimed_once() -> None:
    by_ip = hep("by-ip", "n1", ["198.18.0.21"], {}, interfaceName="")
    lost = hep("lost", "n1", ["198.18.0.99"], {}, interfaceName="")
    first = hep("a-first", "n1", ["198.18.0.22"], {}, interfaceName="eth1")
    second = hep("b-second", "n1", ["198.18.0.23"], {}, interfaceName="eth1")
    every = hep("every", "n1", ["198.18.0.24"], {}, interfaceName="*")
    plan = plan_of(WEB, by_ip, lost, first, second, every, interfaces={
        "lo": ["198.18.0.21"], "eth0": ["198.18.0.21/24"], "eth1": ["198.18.0.22"]})
    assert {ep.name: ep.interfaces for ep in plan.endpoints} == {
        "web": ("web",), "by-ip": ("eth0",), "a-first": ("eth1",), "every": ("*",)}
    assert any("lost" in w and "not enforced" in w for w in plan.warnings)
    assert any("interface eth1 already belongs to HostEndpoint a-first" in w
               for w in plan.warnings)


@pytest.mark.parametrize(("rule", "version"), [
    ({"action": "Allow"}, None),
    ({"action": "Allow", "ipVersion": 6, "protocol": "TCP"}, 6),
    ({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}}, 4),
    ({"action": "Allow", "destination": {"notNets": ["2001:db8::/32"]}}, 6),
    ({"action": "Allow", "protocol": "ICMP"}, 4),
    ({"action": "Allow", "protocol": "ICMPv6"}, 6),
])
def test_a_rules_ip_version(rule: dict[str, Any], version: int | None) -> None:
    snap = snapshot(gnp("p", "all()", ingress=[rule]))
    assert rule_ip_version(snap.policies["p"].spec.ingress[0]) == version


def test_address_sets_are_netaddrs_fewest_cidrs() -> None:
    rng = random.Random(18)
    for _ in range(200):
        addresses = [f"10.0.{rng.randrange(4)}.{rng.randrange(256)}" for _ in range(20)]
        addresses += [f"10.0.{rng.randrange(4)}.{rng.randrange(8) * 32}/27"]
        if rng.random() < 0.2:
            addresses.append("2001:db8::1")
        want = [str(c) for c in netaddr.IPSet(addresses).iter_cidrs()]
        merged = AddressSet.of(addresses)
        got = [f"{t}/32" if "/" not in t else t for t in merged.texts(4)] + \
            [f"{t}/128" if "/" not in t else t for t in merged.texts(6)]
        assert got == want, addresses


def test_interfaces_found_by_expected_ips() -> None:
    docs = [nftfixture.hep("db", "n1", "198.18.0.12", {"app": "db"}, iface=None),
            nftfixture.DB_POLICY]
    plan = calculate(nftfixture.snap(*docs), "n1",
                     {"lo": ["127.0.0.1"], "ens3": ["198.18.0.12/24"]})
    assert [e.interfaces for e in plan.endpoints] == [("ens3",)]
    plan = calculate(nftfixture.snap(*docs), "n1", {"ens3": ["198.18.0.99/24"]})
    assert plan.endpoints == [] and "no interface of this host" in plan.warnings[0]


def test_the_selectors_that_match_labels_are_those_whose_expression_is_true() -> None:
    """members_of looks `key == "value"` selectors up by the label pairs an object holds
    and evaluates only the others: the same selectors, in the same order, as evaluating
    every selector."""
    from bulkhead.policy.plan import _matcher
    from bulkhead.selector import parse

    rng = random.Random(23)
    keys, values = ["a", "b", "list"], ["x", "y", "l1", ""]

    def one() -> str:
        k, v, w = rng.choice(keys), rng.choice(values), rng.choice(values)
        return rng.choice([f"{k} == '{v}'", f"{k} != '{v}'", f"has({k})", "all()",
                           f"{k} in {{'{v}', '{w}'}}", f"!has({k})", f"{k} == '{v}' && has({k})",
                           f"{k} == '{v}' || {rng.choice(keys)} == '{w}'",
                           f"{k} starts with '{v}'"])

    for _ in range(300):
        selectors = list(dict.fromkeys(parse(one()) for _ in range(rng.randint(1, 12))))
        matching = _matcher(selectors)
        for _ in range(10):
            labels = {k: rng.choice(values) for k in keys if rng.random() < 0.6}
            assert matching(labels) == [s for s in selectors if s.matches(labels)]


def test_addresses_an_endpoints_interfaces_hold_outside_its_expected_ips_are_warned() -> None:
    """An endpoint is its interfaces: its table enforces every address they hold, but
    whatever finds endpoints by address (other hosts' selector sets, explain, the preview,
    staged verdicts) knows only its expectedIPs. A dual-stack host listed by its IPv4
    address alone is said, naming the IPv6 one; loopback and link-local are not."""
    from bulkhead.policy.plan import uncovered

    interfaces = {"lo": ["127.0.0.1", "::1"],
                  "eth0": ["198.18.0.11", "2001:2::11", "fe80::1", "ff02::1"],
                  "eth1": ["198.18.1.11"]}
    every = doc("HostEndpoint", "web", {"node": "n1", "expectedIPs": ["198.18.0.11"],
                                        "interfaceName": "*"})
    snap = snapshot(every)
    (said,) = uncovered(snap, plan_of(every, interfaces=interfaces), interfaces)
    assert said.startswith("HostEndpoint web: its interfaces hold 198.18.1.11, 2001:2::11, "
                           "not in its expectedIPs"), said
    one = doc("HostEndpoint", "web", {"node": "n1", "expectedIPs": ["198.18.0.11"],
                                      "interfaceName": "eth0"})
    (said,) = uncovered(snapshot(one), plan_of(one, interfaces=interfaces), interfaces)
    assert "hold 2001:2::11, not in" in said
    listed = doc("HostEndpoint", "web", {"node": "n1", "interfaceName": "eth0",
                                         "expectedIPs": ["198.18.0.11", "2001:2::11"]})
    assert uncovered(snapshot(listed), plan_of(listed, interfaces=interfaces),
                     interfaces) == []
    # Found by its expectedIPs (no interfaceName): the interface holding one of them.
    found = doc("HostEndpoint", "web", {"node": "n1", "expectedIPs": ["198.18.1.11"]})
    assert uncovered(snapshot(found), plan_of(found, interfaces=interfaces),
                     interfaces) == []
    many = {"eth0": [f"2001:2::{n:x}" for n in range(1, 8)]}
    (said,) = uncovered(snap, plan_of(every, interfaces=many), many)
    assert "2001:2::1, 2001:2::2, 2001:2::3, 2001:2::4 and 3 more, not in" in said


def test_a_star_endpoint_is_not_warned_of_the_addresses_of_interfaces_of_their_own() -> None:
    """Beside an endpoint naming eth1, the `*` endpoint's table decides every interface
    but eth1: eth1's addresses are the other endpoint's (in its expectedIPs), not ones
    the `*` endpoint should list (listing them would give one address two endpoints)."""
    from bulkhead.policy.plan import uncovered

    interfaces = {"lo": ["127.0.0.1"], "eth0": ["198.18.0.11"], "eth1": ["198.18.1.11"],
                  "eth2": ["198.18.2.11"]}
    every = doc("HostEndpoint", "all", {"node": "n1", "expectedIPs": ["198.18.0.11"],
                                        "interfaceName": "*"})
    eth1 = doc("HostEndpoint", "eth1", {"node": "n1", "expectedIPs": ["198.18.1.11"],
                                        "interfaceName": "eth1"})
    plan = plan_of(every, eth1, interfaces=interfaces)
    (said,) = uncovered(snapshot(every, eth1), plan, interfaces)
    assert said.startswith("HostEndpoint all: its interfaces hold 198.18.2.11, not in"), said
