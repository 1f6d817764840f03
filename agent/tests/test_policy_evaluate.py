"""bulkhead.policy.evaluate, the reference evaluator: each rule of DESIGN.md's semantics,
with the trace it gives."""

from __future__ import annotations

import pytest

from bulkhead.policy import Flow
from bulkhead.policy.explain import explain_text
from tests.policyfixture import (
    APP,
    DB,
    DB_ALLOW_DMZ,
    HOSTS,
    OUT,
    WEB,
    evaluator,
    hep,
    on_interface,
    res,
    tcp,
)


def test_nothing_selects_a_host_so_profile_allows() -> None:
    v = evaluator().evaluate(tcp(WEB, DB, 5432))
    assert v.allowed
    assert v.ingress.decided_by == "profile" and v.ingress.policy.endswith("default-allow")
    assert "no policy in any tier selects db for Ingress" in v.ingress.steps[0].text


def test_allow_by_selector_and_named_port_with_trace() -> None:
    ev = evaluator(DB_ALLOW_DMZ)
    allowed = ev.evaluate(tcp(WEB, DB, 5432))
    assert allowed.allowed
    assert (allowed.ingress.tier, allowed.ingress.policy, allowed.ingress.rule) == (
        "default", "db-ingress", 0)
    assert "source selector zone == \"dmz\" selects host endpoint web" in \
        allowed.ingress.steps[-1].text
    denied = ev.evaluate(tcp(WEB, DB, 5433))
    assert not denied.allowed and denied.ingress.decided_by == "tier-default"
    assert "not destination port 5433 in ports [postgres]" in denied.ingress.steps[1].text
    assert not ev.evaluate(tcp(APP, DB, 5432)).allowed        # zone trusted is not dmz
    assert not ev.evaluate(Flow.make(WEB, DB, "UDP", 5432)).allowed   # named port is TCP
    assert ev.evaluate(tcp(DB, WEB, 80)).allowed              # db's egress is not selected


def test_rule_order_and_policy_order_nil_last_ties_by_name() -> None:
    deny_first = res("GlobalNetworkPolicy", "b-deny", {
        "selector": "app == 'db'", "order": 10, "ingress": [{"action": "Deny"}]})
    allow_nil = res("GlobalNetworkPolicy", "a-allow", {
        "selector": "app == 'db'", "ingress": [{"action": "Allow"}]})
    ev = evaluator(deny_first, allow_nil)
    assert ev.evaluate(tcp(WEB, DB, 1)).ingress.policy == "b-deny"   # order 10 before nil
    tie_a = res("GlobalNetworkPolicy", "a", {"selector": "app == 'db'", "order": 5,
                                             "ingress": [{"action": "Allow"}]})
    tie_b = res("GlobalNetworkPolicy", "b", {"selector": "app == 'db'", "order": 5,
                                             "ingress": [{"action": "Deny"}]})
    assert evaluator(tie_b, tie_a).evaluate(tcp(WEB, DB, 1)).allowed   # same order: by name
    rules = res("GlobalNetworkPolicy", "r", {"selector": "app == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [22]}},
        {"action": "Allow"}]})
    ev = evaluator(rules)
    assert not ev.evaluate(tcp(WEB, DB, 22)).allowed
    assert ev.evaluate(tcp(WEB, DB, 23)).ingress.rule == 1


def test_tiers_pass_and_default_action() -> None:
    security = res("Tier", "security", {"order": 100})
    platform = res("Tier", "platform", {"order": 200, "defaultAction": "Pass"})
    pass_web = res("GlobalNetworkPolicy", "security.pass-web", {
        "tier": "security", "selector": "app == 'db'",
        "ingress": [{"action": "Pass", "source": {"selector": "app == 'web'"}},
                    {"action": "Deny", "source": {"selector": "app == 'app'"}}]})
    platform_log = res("GlobalNetworkPolicy", "platform.log", {
        "tier": "platform", "selector": "all()", "ingress": [{"action": "Log"}]})
    ev = evaluator(security, platform, pass_web, platform_log)
    v = ev.evaluate(tcp(WEB, DB, 80))
    # security passes; platform logs, no decision, defaultAction Pass; default tier has no
    # policy for db, so the profile allows.
    assert v.allowed and v.ingress.decided_by == "profile"
    assert [s.policy for s in v.ingress.logged] == ["platform.log"]
    assert any("defaultAction Pass" in s.text for s in v.ingress.steps)
    v = ev.evaluate(tcp(APP, DB, 80))
    assert not v.allowed and v.ingress.policy == "security.pass-web" and v.ingress.rule == 1
    # A tier whose policies select db but match nothing ends in its defaultAction Deny.
    ev2 = evaluator(security, res("GlobalNetworkPolicy", "security.only-app", {
        "tier": "security", "selector": "app == 'db'",
        "ingress": [{"action": "Allow", "source": {"selector": "app == 'app'"}}]}))
    v = ev2.evaluate(tcp(WEB, DB, 80))
    assert not v.allowed and v.ingress.decided_by == "tier-default"
    assert v.ingress.tier == "security"


def test_types_and_egress() -> None:
    egress_only = res("GlobalNetworkPolicy", "web-out", {
        "selector": "app == 'web'",
        "egress": [{"action": "Allow", "destination": {"selector": "app == 'app'"}}]})
    ev = evaluator(egress_only)
    assert ev.evaluate(tcp(WEB, APP, 80)).allowed
    v = ev.evaluate(tcp(WEB, DB, 80))
    assert not v.allowed and v.egress.endpoint == "web" and v.ingress.allowed
    assert ev.evaluate(tcp(DB, WEB, 80)).allowed       # types inferred Egress: ingress open
    both = res("GlobalNetworkPolicy", "web-both", {
        "selector": "app == 'web'", "types": ["Ingress", "Egress"],
        "ingress": [{"action": "Allow"}]})
    ev = evaluator(both)
    assert ev.evaluate(tcp(DB, WEB, 80)).allowed
    assert not ev.evaluate(tcp(WEB, DB, 80)).allowed


def test_nets_not_nets_not_selector_and_outside_addresses() -> None:
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "source": {"nets": ["198.18.0.0/28"], "notNets": ["198.18.0.13/32"],
                                       "notSelector": "zone == 'trusted'"}}]})
    ev = evaluator(pol)
    assert ev.evaluate(tcp(WEB, DB, 1)).allowed
    assert not ev.evaluate(tcp(APP, DB, 1)).allowed
    v = ev.evaluate(tcp(OUT, DB, 1))
    assert not v.allowed and v.egress.decided_by == "no-endpoint"


def test_network_sets_and_domains() -> None:
    partners = res("GlobalNetworkSet", "partners", {"nets": ["198.19.0.0/16"],
                                                    "allowedEgressDomains": ["*.example.com"]},
                   labels={"role": "partner"})
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'web'", "types": ["Egress"],
                                           "egress": [{"action": "Allow", "destination": {
                                               "selector": "role == 'partner'"}}]})
    ev = evaluator(partners, pol)
    assert ev.evaluate(tcp(WEB, OUT, 443)).allowed
    assert not ev.evaluate(tcp(WEB, "203.0.113.9", 443)).allowed
    by_name = Flow.make(WEB, "203.0.113.9", "TCP", 443, domains=frozenset({"api.example.com"}))
    assert ev.evaluate(by_name).allowed
    dom = res("GlobalNetworkPolicy", "d", {"selector": "app == 'web'", "egress": [
        {"action": "Allow", "destination": {"domains": ["db.internal"]}}]})
    ev = evaluator(dom)
    assert ev.evaluate(Flow.make(WEB, DB, "TCP", 1, domains=frozenset({"db.internal"}))).allowed
    assert not ev.evaluate(tcp(WEB, DB, 1)).allowed


@pytest.mark.parametrize("pattern, name, matches", [
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "a.b.example.com", True),      # one or more labels
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    ("www.*.com", "www.sun.com", True),
    ("www.*.com", "www.a.b.com", True),
    ("www.*.com", "www.com", False),
    ("update.*.mycompany.com", "update.secure.suite.mycompany.com", True),
    ("update.*.mycompany.com", "update.mycompany.com", False),
    ("example.com", "www.example.com", False),       # exact without a wildcard
    ("example.com", "example.com", True),
])
def test_domain_wildcards_as_calico_documents(pattern: str, name: str, matches: bool) -> None:
    """Calico Enterprise's documented examples (docs "Domain names"): '*' stands for one
    or more whole labels at its place."""
    dom = res("GlobalNetworkPolicy", "d", {"selector": "app == 'web'", "egress": [
        {"action": "Allow", "destination": {"domains": [pattern]}}]})
    flow = Flow.make(WEB, "203.0.113.9", "TCP", 443, domains=frozenset({name}))
    assert evaluator(dom).evaluate(flow).allowed is matches


def test_a_network_sets_domains_count_only_for_egress_allow_destination_selectors() -> None:
    """Calico Enterprise (felix rule_scanner, docs GlobalNetworkSet): a set's
    allowedEgressDomains add the addresses they resolved to only to the positive
    destination selector of an egress Allow rule; a Deny, a notSelector or an ingress rule
    sees the set by its nets alone."""
    saas = res("GlobalNetworkSet", "saas", {"allowedEgressDomains": ["*.saas.example"]},
               labels={"kind": "saas"})
    named = frozenset({"api.saas.example"})
    out = Flow.make(WEB, "203.0.113.9", "TCP", 443, domains=named)
    allow = res("GlobalNetworkPolicy", "a", {"selector": "app == 'web'", "egress": [
        {"action": "Allow", "destination": {"selector": "kind == 'saas'"}}]})
    assert evaluator(saas, allow).evaluate(out).allowed
    deny = res("GlobalNetworkPolicy", "d", {"selector": "app == 'web'", "order": 1, "egress": [
        {"action": "Deny", "destination": {"selector": "kind == 'saas'"}},
        {"action": "Allow"}]})
    assert evaluator(saas, deny).evaluate(out).allowed          # the Deny does not see it
    not_sel = res("GlobalNetworkPolicy", "n", {"selector": "app == 'web'", "egress": [
        {"action": "Allow", "destination": {"notSelector": "kind == 'saas'"}}]})
    assert evaluator(saas, not_sel).evaluate(out).allowed       # nor does a notSelector
    ingress = res("GlobalNetworkPolicy", "i", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "destination": {"selector": "kind == 'saas'"}}]})
    to_db = Flow.make(WEB, DB, "TCP", 5432, domains=frozenset({"db.saas.example"}))
    assert not evaluator(saas, ingress).evaluate(to_db).allowed  # nor an ingress rule


def test_domains_narrowed_by_not_nets() -> None:
    dom = res("GlobalNetworkPolicy", "d", {"selector": "app == 'web'", "egress": [
        {"action": "Allow", "destination": {"domains": ["*.example.com"],
                                            "notNets": ["203.0.113.0/28"]}}]})
    ev = evaluator(dom)
    named = frozenset({"api.example.com"})
    assert ev.evaluate(Flow.make(WEB, "203.0.113.99", "TCP", 443, domains=named)).allowed
    assert not ev.evaluate(Flow.make(WEB, "203.0.113.9", "TCP", 443, domains=named)).allowed


def test_icmp_and_protocol_less_rules() -> None:
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}},
        {"action": "Deny", "protocol": "ICMP"},
        {"action": "Allow", "notProtocol": "UDP"}]})
    ev = evaluator(pol)
    assert ev.evaluate(Flow.make(WEB, DB, "ICMP")).allowed
    assert not ev.evaluate(Flow.make(WEB, DB, "ICMP", icmp_type=13)).allowed
    assert ev.evaluate(tcp(WEB, DB, 9)).allowed
    assert not ev.evaluate(Flow.make(WEB, DB, "UDP", 9)).allowed


def test_not_icmp_matches_only_icmp_messages_of_the_flows_family() -> None:
    """felix: `icmp type != N` in the IPv4 table, `icmpv6 type != N` in the IPv6 one."""
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "notICMP": {"type": 0}}]})
    web6, db6 = "2001:2::11", "2001:2::12"
    ev = evaluator(pol, hosts=[hep("web", WEB, {"app": "web"}), hep("db", DB, {"app": "db"}),
                               hep("web6", web6, {"app": "web"}),
                               hep("db6", db6, {"app": "db"})])
    assert ev.evaluate(Flow.make(WEB, DB, "ICMP", icmp_type=8)).allowed
    assert not ev.evaluate(Flow.make(WEB, DB, "ICMP", icmp_type=0)).allowed
    assert not ev.evaluate(tcp(WEB, DB, 5432)).allowed
    assert not ev.evaluate(Flow.make(WEB, DB, "UDP", 5353)).allowed
    assert ev.evaluate(Flow.make(web6, db6, "ICMPv6", icmp_type=128)).allowed
    assert not ev.evaluate(Flow.make(web6, db6, "ICMP", icmp_type=8)).allowed
    assert not ev.evaluate(tcp(web6, db6, 5432)).allowed
    words = explain_text(ev, ev.evaluate(tcp(WEB, DB, 5432)))
    assert "protocol TCP is ICMP" in words, words
    # With another protocol in the rule, a notICMP never matches.
    tcp_rule = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "notICMP": {"type": 0}}]})
    assert not evaluator(tcp_rule).evaluate(tcp(WEB, DB, 5432)).allowed


def test_source_ports_unknown_unless_given() -> None:
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"ports": ["1024:65535"]}}]})
    ev = evaluator(pol)
    assert not ev.evaluate(tcp(WEB, DB, 80)).allowed
    assert ev.evaluate(Flow.make(WEB, DB, "TCP", 80, src_port=40000)).allowed


def test_profiles_no_profile_and_labels_to_apply() -> None:
    hosts = [hep("web", WEB, {"app": "web"}, profiles=["tagged"]),
             hep("db", DB, {"app": "db"}, profiles=[])]
    tagged = res("Profile", "tagged", {"labelsToApply": {"zone": "dmz", "app": "ignored"},
                                       "egress": [{"action": "Allow"}]})
    pol = res("GlobalNetworkPolicy", "p", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "source": {"selector": "zone == 'dmz' && app == 'web'"}}]})
    ev = evaluator(tagged, pol, hosts=hosts)
    assert ev.evaluate(tcp(WEB, DB, 1)).allowed
    v = ev.evaluate(tcp(DB, WEB, 1))
    assert v.egress.decided_by == "no-profile" and not v.allowed
    assert v.ingress.decided_by == "profile" and not v.ingress.allowed  # profile has no ingress


def test_pass_in_a_profile_goes_to_the_next_profile() -> None:
    hosts = [hep("web", WEB, {"app": "web"}),
             hep("db", DB, {"app": "db"}, profiles=["screen", "projectcalico-default-allow"])]
    screen = res("Profile", "screen", {"ingress": [
        {"action": "Pass", "protocol": "TCP"}, {"action": "Deny"}]})
    ev = evaluator(screen, hosts=hosts)
    v = ev.evaluate(tcp(WEB, DB, 80))
    assert v.allowed and v.ingress.policy == "profile projectcalico-default-allow"
    assert not ev.evaluate(Flow.make(WEB, DB, "UDP", 80)).allowed


def test_staged_policies_never_change_the_enforced_verdict() -> None:
    staged_deny = res("StagedGlobalNetworkPolicy", "db-ingress", {
        "selector": "app == 'db'", "ingress": [{"action": "Deny"}]})
    ev = evaluator(DB_ALLOW_DMZ, staged_deny)
    v = ev.evaluate(tcp(WEB, DB, 5432))
    assert v.allowed and not v.staged_allowed and v.staged_differs
    assert v.staged_ingress.staged and v.staged_ingress.policy == "db-ingress"
    text = explain_text(ev, v)
    assert "would deny" in text and "Deny by staged policy db-ingress (tier default)" in text
    staged_delete = res("StagedGlobalNetworkPolicy", "db-ingress", {"stagedAction": "Delete"})
    v = evaluator(DB_ALLOW_DMZ, staged_delete).evaluate(tcp(APP, DB, 5432))
    assert not v.allowed and v.staged_allowed   # deleting db-ingress would open db again


def test_an_untracked_pass_skips_the_rest_of_its_tier_only() -> None:
    """felix walks untracked policies tier by tier: a Pass skips its tier's others, not
    the next tier's; no match at the end falls through to the tiers."""
    tiers = [res("Tier", "first", {"order": 10}), res("Tier", "second", {"order": 20})]

    def untracked(name: str, tier: str, order: int, rule: dict[str, object]
                  ) -> dict[str, object]:
        return res("GlobalNetworkPolicy", name, {
            "tier": tier, "order": order, "selector": "app == 'db'", "doNotTrack": True,
            "applyOnForward": True, "ingress": [rule]})

    hosts = [hep("web", WEB, {"app": "web"}), hep("app", APP, {"app": "app"}),
             on_interface(hep("db", DB, {"app": "db"}))]
    ev = evaluator(*tiers,
                   untracked("first.pass-web", "first", 1,
                             {"action": "Pass", "source": {"selector": "app == 'web'"}}),
                   untracked("first.deny-tcp", "first", 2, {"action": "Deny", "protocol": "TCP"}),
                   untracked("second.deny-81", "second", 1,
                             {"action": "Deny", "protocol": "TCP",
                              "destination": {"ports": [81]}}),
                   hosts=hosts)
    assert ev.evaluate(tcp(WEB, DB, 80)).allowed          # passed, then no match: profile
    assert not ev.evaluate(tcp(WEB, DB, 81)).allowed      # passed, the next tier denies
    assert not ev.evaluate(tcp(APP, DB, 80)).allowed      # first.deny-tcp
    words = explain_text(ev, ev.evaluate(tcp(WEB, DB, 80)))
    assert "first.deny-tcp skipped: a Pass left tier first" in words, words


def test_untracked_and_pre_dnat_stages_come_first() -> None:
    untracked = res("GlobalNetworkPolicy", "raw", {
        "selector": "app == 'db'", "doNotTrack": True, "applyOnForward": True, "order": 1,
        "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]})
    deny = res("GlobalNetworkPolicy", "deny", {"selector": "app == 'db'",
                                              "ingress": [{"action": "Deny"}]})
    one_interface = [on_interface(h) if h["metadata"]["name"] == "db" else h for h in HOSTS]
    ev = evaluator(untracked, deny, hosts=one_interface)
    assert ev.evaluate(tcp(WEB, DB, 80)).allowed
    assert not ev.evaluate(tcp(WEB, DB, 81)).allowed    # no match falls through to normal
    # On every interface ("*"), the endpoint takes no untracked policy, as in Calico.
    star = evaluator(untracked, deny)
    verdict = star.evaluate(tcp(WEB, DB, 80))
    assert not verdict.allowed
    assert 'untracked policies raw select db, but an endpoint on every interface' in \
        explain_text(star, verdict)
