"""The nftables renderer: pure, resources in and a table out, no kernel involved."""

from __future__ import annotations

from typing import Any

from bulkhead.dataplane.nftables import render
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import DB_POLICY, base, gnp, hep, snap


def test_rules_reference_selector_sets_by_canonical_form() -> None:
    rs = render(calculate(snap(*base()), "n1", {}, Failsafes.off()), compile_runs=False)
    tiers = [c for name, c in rs.chains.items() if name.startswith("t_")]
    assert len(tiers) == 1
    rules = tiers[0].rules
    assert rules[-1].startswith("drop ")  # the default tier's defaultAction Deny
    v4 = next(r for r in rules if "ipv4" in r)
    assert "meta l4proto 6" in v4 and "th dport { 5432, 6000-6010 } accept" in v4
    set_name = v4.split("ip saddr @")[1].split()[0]
    assert rs.sets[set_name].elements == ("198.18.0.11",)
    # The same selector written differently shares the set.
    other = gnp("db2", {"selector": "app=='db'", "ingress": [
        {"action": "Deny", "source": {"selector": 'app == "web"'}}]})
    rs2 = render(calculate(snap(*base(), other), "n1", {}, Failsafes.off()), compile_runs=False)
    assert sum(1 for name in rs2.sets if name.startswith("s4_")) == 1


def test_pass_log_and_tier_default_pass() -> None:
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "security"}, "spec": {"order": 10, "defaultAction": "Pass"}}
    sec = gnp("security.p", {"tier": "security", "selector": "all()", "ingress": [
        {"action": "Log", "protocol": "UDP"},
        {"action": "Pass", "source": {"nets": ["10.0.0.0/8"]}},
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [23]}}]})
    rs = render(calculate(snap(*base(), tier, sec), "n1", {}, Failsafes.off()),
                compile_runs=False)
    endpoint = next(c for n, c in rs.chains.items() if n.startswith("e_") and
                any("tier security" in r for r in c.rules))
    assert [r.split()[0] for r in endpoint.rules] == ["jump", "jump", "jump", "drop"]
    sec_chain = rs.chains[endpoint.rules[0].split()[1]]
    assert sec_chain.rules[0].startswith("meta l4proto 17 log prefix")
    assert "ip saddr { 10.0.0.0/8 } return" in sec_chain.rules[1]
    assert not any(r.startswith("drop") for r in sec_chain.rules)  # defaultAction Pass


def test_endpoints_with_the_same_program_share_chains() -> None:
    docs = [hep("a", "n1", "198.18.0.20", {"app": "db"}, iface="eth1"),
            hep("b", "n1", "198.18.0.21", {"app": "db"}, iface="eth2"), DB_POLICY]
    rs = render(calculate(snap(*docs), "n1", {}, Failsafes.off()))
    dispatch = rs.sets["ep_in"]
    assert dispatch.map_to == "verdict" and len(dispatch.elements) == 2
    assert len({e.split("jump ")[1] for e in dispatch.elements}) == 1
    assert "iifname vmap @ep_in" in rs.chains["input"].rules


def test_failsafes_come_before_policy() -> None:
    rs = render(calculate(snap(*base()), "n1", {}, Failsafes()))
    rules = rs.chains["input"].rules
    assert rules[0] == "ct state established,related accept"
    fs = next(i for i, r in enumerate(rules) if "@fs_in accept" in r)
    assert fs < next(i for i, r in enumerate(rules) if r.startswith("jump e_"))
    assert "6 . 22" in rs.sets["fs_in"].elements and "6 . 7443" in rs.sets["fs_in"].elements


def test_named_ports_and_negations() -> None:
    docs = [hep("db", "n1", "198.18.0.12", {"app": "db"},
                ports=[{"name": "pg", "protocol": "TCP", "port": 5432}]),
            hep("web", "n2", "198.18.0.11", {"app": "web"}),
            gnp("db", {"selector": "app == 'db'", "ingress": [
                {"action": "Allow", "protocol": "TCP", "destination": {"ports": ["pg", 80]},
                 "source": {"notSelector": "app == 'web'", "notNets": ["198.18.9.0/24"]}},
                {"action": "Deny", "protocol": "ICMP", "notICMP": {"type": 8}}]})]
    rs = render(calculate(snap(*docs), "n1", {}, Failsafes.off()))
    tier = next(c for n, c in rs.chains.items() if n.startswith("t_"))
    v4 = [r for r in tier.rules if "ipv4" in r and "accept" in r]
    assert len(v4) == 2  # the numeric port and the named port are two alternatives
    assert all("ip saddr != { 198.18.9.0/24 }" in r and "ip saddr != @s4_" in r for r in v4)
    named = next(r for r in v4 if "ip daddr . meta l4proto . th dport @np4_" in r)
    np_set = named.split("th dport @")[1].split()[0]
    assert rs.sets[np_set].elements == ("198.18.0.12 . 6 . 5432",)
    assert any("meta l4proto 1 @th,0,8 != 8 drop" in r for r in tier.rules)


def test_not_icmp_matches_only_the_icmp_of_the_packets_family() -> None:
    """felix renders notICMP as `icmp type != N` (IPv4) and `icmpv6 type != N` (IPv6):
    with no protocol in the rule, the match names the ICMP of each family, and a rule of
    another protocol can never match."""
    docs = [hep("db", "n1", "198.18.0.12", {"app": "db"}),
            gnp("db", {"selector": "app == 'db'", "ingress": [
                {"action": "Deny", "notICMP": {"type": 8}},
                {"action": "Deny", "notICMP": {"type": 3, "code": 1}},
                {"action": "Deny", "destination": {"nets": ["2001:2::/48"]},
                 "notICMP": {"type": 128}},
                {"action": "Deny", "protocol": "TCP", "notICMP": {"type": 8}}]})]
    rs = render(calculate(snap(*docs), "n1", {}, Failsafes.off()))
    tier = next(c for n, c in rs.chains.items() if n.startswith("t_"))
    drops = [r for r in tier.rules if " drop " in r]
    assert any("meta nfproto . meta l4proto { ipv4 . 1, ipv6 . 58 } @th,0,8 != 8 drop"
               in r for r in drops)
    assert any("{ ipv4 . 1, ipv6 . 58 } @th,0,8 . @th,8,8 != { 3 . 1 } drop" in r
               for r in drops)
    assert any("meta nfproto ipv6 meta l4proto 58 @th,0,8 != 128 " in r for r in drops)
    assert not any("l4proto 6" in r for r in drops)   # TCP and notICMP: never a match


def test_staged_policies_do_not_change_the_table() -> None:
    staged = gnp("db", {"selector": "all()", "ingress": [{"action": "Deny"}]},
                 kind="StagedGlobalNetworkPolicy")
    plain = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    with_staged = render(calculate(snap(*base(), staged), "n1", {}, Failsafes.off()))
    assert plain.body() == with_staged.body()


SAAS_SET = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": "saas", "labels": {"egress": "saas"}},
            "spec": {"nets": ["198.18.9.0/24"],
                     "allowedEgressDomains": ["api.example.com", "*.saas.example"]}}


def test_domains_match_through_domain_sets_with_timeouts() -> None:
    domains = gnp("egress", {"selector": "app == 'db'", "egress": [
        {"action": "Allow", "protocol": "TCP",
         "destination": {"domains": ["*.example.com"], "ports": [443]}},
        {"action": "Allow", "destination": {"selector": "egress == 'saas'"}},
        {"action": "Deny", "destination": {"selector": "egress == 'saas'"}}]})
    rs = render(calculate(snap(*base(), SAAS_SET, domains), "n1", {}, Failsafes.off()))
    assert sorted(rs.domain_sets.items()) == [
        (f"d{f}_{h}", patterns) for f in (4, 6) for h, patterns in sorted(
            [(n[3:], p) for n, p in rs.domain_sets.items() if n.startswith("d4_")])]
    by_patterns = {p: n[3:] for n, p in rs.domain_sets.items()}
    rule_set, netset = by_patterns[("*.example.com",)], by_patterns[
        ("*.saas.example", "api.example.com")]
    for name in rs.domain_sets:
        assert rs.sets[name].flags == ("timeout",) and rs.sets[name].elements == ()
    tier = next(c for n, c in rs.chains.items() if n.startswith("t_")
                and any("egress rule" in r for r in c.rules))
    rules = [r.split(" comment ")[0] for r in tier.rules]
    # The rule's own domains: an address match on the domain set, per family.
    assert f"meta nfproto ipv4 meta l4proto 6 ip daddr @d4_{rule_set} th dport {{ 443 }} " \
           "accept" in rules
    assert f"meta nfproto ipv6 meta l4proto 6 ip6 daddr @d6_{rule_set} th dport {{ 443 }} " \
           "accept" in rules
    # An egress Allow whose selector takes the network set: its nets or its domains.
    allow = [r for r in rules if r.endswith("accept") and "l4proto 6" not in r]
    assert any(f"ip daddr @d4_{netset}" in r for r in allow)
    assert any("ip daddr @s4_" in r for r in allow)
    # The Deny with the same selector sees the set by its nets alone (felix).
    deny = [r for r in rules if r.endswith("drop") and "daddr" in r]
    assert deny and not any("@d4_" in r or "@d6_" in r for r in deny)


def test_runs_of_plain_rules_become_one_map_lookup_per_family() -> None:
    web2 = hep("web2", "n3", "198.18.0.13", {"app": "web"})
    allow_more = gnp("db-more", {"selector": "app == 'db'", "order": 200, "ingress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [22]}},
        {"action": "Allow", "protocol": "UDP", "source": {"selector": "app == 'web'"}}]})
    rs = render(calculate(snap(*base(), web2, allow_more), "n1", {}, Failsafes.off()))
    tier = next(c for n, c in rs.chains.items() if n.startswith("t_"))
    assert len(tier.rules) == 3  # v4 map, v6 map, default Deny
    name = tier.rules[0].split("vmap @")[1].split()[0]
    m = rs.sets[name]
    assert m.map_to == "verdict" and m.type == "inet_proto . inet_service . ipv4_addr"
    assert "6 . 5432 . 198.18.0.13 : accept" in m.elements
    assert m.flags == ("interval",)  # the UDP rule takes every port: a range
    assert "17 . 0-65535 . 198.18.0.11 : accept" in m.elements
    # A label change moves map elements; the chains stay as they are.
    moved = render(calculate(snap(*base({"app": "cache"}), web2, allow_more), "n1", {},
                             Failsafes.off()))
    assert moved.structure() == rs.structure()
    _, removed = moved.element_changes(rs)
    assert removed and all("198.18.0.11" in e for _, e in removed)
    assert "delete element inet bulkhead " + name in moved.element_script(rs)


def test_dns_snooping_rules_come_first_and_hold_answers_only_while_the_agent_renews() -> None:
    from bulkhead.dataplane.nftables.render import HOLD_SET, DnsSnooping

    plan = calculate(snap(*base()), "n1", {}, Failsafes())
    plain = render(plan, dns=DnsSnooping(("198.18.0.53", "2001:2::53")))
    inbound, outbound = plain.chains["input"].rules, plain.chains["output"].rules
    assert list(inbound[:2]) == [
        'meta l4proto udp ip saddr { 198.18.0.53 } udp sport 53 ct state '
        'established,untracked log group 3 snaplen 8192 comment "dns answers"',
        'meta l4proto udp ip6 saddr { 2001:2::53 } udp sport 53 ct state '
        'established,untracked log group 3 snaplen 8192 comment "dns answers"']
    assert outbound[0] == ('meta l4proto udp ip daddr { 198.18.0.53 } udp dport 53 log '
                           'group 3 snaplen 8192 comment "dns queries"')
    assert inbound[2] == "ct state established,related accept" and HOLD_SET not in plain.sets
    held = render(plan, dns=DnsSnooping(("198.18.0.53",), hold=True))
    rules = held.chains["input"].rules
    # Held: logged whole and dropped while the hold set has its element (the agent sends
    # the answer on, marked); the mark lets a sent-on answer through both rules.
    assert rules[0] == ('meta l4proto udp ip saddr { 198.18.0.53 } udp sport 53 ct state '
                        'established,untracked meta mark & 0xffff0000 != 0xbd50000 udp sport '
                        '@dns_hold log prefix "dns-held" group 3 snaplen 65535 drop comment '
                        '"dns answers held for the agent"')
    assert rules[1].endswith('log group 3 snaplen 8192 comment "dns answers"')
    assert "meta mark & 0xffff0000 != 0xbd50000" in rules[1]
    assert held.sets[HOLD_SET].flags == ("timeout",) and held.sets[HOLD_SET].elements == ()
    assert held.chains["output"].rules[0] == plain.chains["output"].rules[0]


def test_a_run_over_its_cell_budget_is_rendered_rule_by_rule() -> None:
    """A policy of 100 rules whose port ranges nest and whose nets differ would be a map
    of about a million cells (seconds and hundreds of MiB to render, more to load): its
    rules are rendered one by one instead, as `compile_runs=False` renders them."""
    rules = [{"action": "Allow" if i % 2 else "Deny", "protocol": "TCP",
              "source": {"ports": [f"{1000 + i}:{60000 - i}"]},
              "destination": {"ports": [f"{1000 + i}:{60000 - i}"],
                              "nets": [f"10.0.{i}.0/24"]}} for i in range(100)]
    docs = [*base(), gnp("nested", {"selector": "app == 'db'", "ingress": rules})]
    compiled = render(calculate(snap(*docs), "n1", {}, Failsafes.off()))
    plain = render(calculate(snap(*docs), "n1", {}, Failsafes.off()), compile_runs=False)

    def nested_lines(rs: object) -> list[str]:
        return [r for c in rs.chains.values() for r in c.rules  # type: ignore[attr-defined]
                if "policy nested" in r]

    assert len(nested_lines(compiled)) == 100
    assert nested_lines(compiled) == nested_lines(plain)
    assert all(len(s.elements) < 1000 for s in compiled.sets.values())
    # With flow logs the lookup makes a logging chain per rule before it compiles: they
    # go with it, and the table is the one the rules one by one make.
    from bulkhead.dataplane.nftables.render import FlowLogging
    logged = render(calculate(snap(*docs), "n1", {}, Failsafes.off()),
                    flow_logs=FlowLogging())
    logged_plain = render(calculate(snap(*docs), "n1", {}, Failsafes.off()),
                          compile_runs=False, flow_logs=FlowLogging())
    assert sorted(logged.chains) == sorted(logged_plain.chains)


def test_untracked_and_pre_dnat_policies_are_one_chain_per_stage_and_tier() -> None:
    """A Pass (`return`) in an untracked or pre-DNAT policy skips the rest of its tier's
    policies of that stage: their rules share one chain, the next tier's are another."""
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "second"}, "spec": {"order": 20}}

    def early(name: str, stage: str, order: int, rule: dict[str, Any],
              in_tier: str = "default") -> dict[str, Any]:
        return gnp(name, {"tier": in_tier, "order": order, "selector": "app == 'db'",
                          stage: True, "applyOnForward": True, "ingress": [rule]})

    docs = [hep("db", "n1", "198.18.0.12", {"app": "db"}, iface="eth0"), tier,
            early("u1", "doNotTrack", 1, {"action": "Pass", "protocol": "UDP"}),
            early("u2", "doNotTrack", 2, {"action": "Deny", "protocol": "UDP"}),
            early("second.u3", "doNotTrack", 1, {"action": "Deny", "protocol": "TCP"},
                  "second"),
            early("p1", "preDNAT", 1, {"action": "Pass", "protocol": "TCP"}),
            early("p2", "preDNAT", 2, {"action": "Deny", "protocol": "TCP"})]
    rs = render(calculate(snap(*docs), "n1", {"eth0": ["198.18.0.12/24"]}, Failsafes.off()),
                compile_runs=False)
    endpoint = next(c for n, c in rs.chains.items() if n.startswith("e_"))
    jumps = [r for r in endpoint.rules if r.startswith("jump p_")]
    # Tier second (order 20) before default (Calico's default tier is ordered last).
    assert [r.split("comment ")[1] for r in jumps] == [
        '"policy second.u3"', '"policy u1, u2"', '"policy p1, p2"']
    first = rs.chains[jumps[1].split()[1]].rules
    assert [r.split(" comment")[0].split()[-1] for r in first] == ["return", "drop"]
    raw = next(c for n, c in rs.chains.items() if n.startswith("u_"))
    assert [r.split("comment ")[1] for r in raw.rules] == [
        '"untracked policy second.u3"', '"untracked policy u1, u2"']
