"""`bulkhead.policy.semantics` on its own, against Calico's examples: what the calculation
and the reference evaluator both stand on, so a bug here is one neither could see in the
other."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bulkhead.model import (
    EGRESS,
    INGRESS,
    GlobalNetworkPolicy,
    Snapshot,
    StagedGlobalNetworkPolicy,
    parse_resource,
)
from bulkhead.policy.impact import promoted
from bulkhead.policy.semantics import effective_labels, rule_ip_version, selects, staged_view

V3 = "projectcalico.org/v3"
POLICY_DIR = Path(__file__).parents[1] / "src" / "bulkhead" / "policy"


def res(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": V3, "kind": kind, "metadata": meta, "spec": spec}


def snap(*docs: dict[str, Any]) -> Snapshot:
    return Snapshot.build(parse_resource(d) for d in docs)


def policy(spec: dict[str, Any], name: str = "p") -> GlobalNetworkPolicy:
    found = parse_resource(res("GlobalNetworkPolicy", name, spec))
    assert isinstance(found, GlobalNetworkPolicy)
    return found


def test_the_evaluator_never_imports_the_calculation() -> None:
    """Siblings: the reference evaluator, its rules and `explain` import nothing of
    `plan`, and `semantics` imports neither side."""
    def imports(name: str) -> set[str]:
        tree = ast.parse((POLICY_DIR / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    for name in ("evaluate", "rules", "explain", "flow", "failsafe"):
        assert "bulkhead.policy.plan" not in imports(name), name
    assert not {m for m in imports("semantics") if m.startswith("bulkhead.policy")}


# -------------------------------------------------------------------- effective labels
def test_endpoint_labels_win_then_profiles_in_order() -> None:
    """Felix looks a label up in the endpoint's own labels, then in each parent (profile)
    in order, the first that has it answering (felix/labelindex/endpoint_data.go,
    `GetHandle`): the endpoint wins over its profiles, an earlier profile over a later."""
    s = snap(res("Profile", "first", {"labelsToApply": {"zone": "dmz", "app": "ignored"}}),
             res("Profile", "second", {"labelsToApply": {"zone": "lan", "env": "prod"}}),
             res("HostEndpoint", "web", {"node": "n1", "interfaceName": "eth0",
                                         "profiles": ["first", "missing", "second"]},
                 {"app": "web"}))
    assert effective_labels(s, s.host_endpoints["web"]) == {
        "app": "web", "zone": "dmz", "env": "prod"}


def test_an_endpoint_without_profiles_has_its_own_labels() -> None:
    s = snap(res("HostEndpoint", "db", {"node": "n1", "interfaceName": "eth0"}, {"app": "db"}))
    assert effective_labels(s, s.host_endpoints["db"]) == {"app": "db"}


# --------------------------------------------------------------------------- types
ALLOW = [{"action": "Allow"}]


@pytest.mark.parametrize(("spec", "ingress", "egress"), [
    # libcalico-go defaultPolicyTypesField: no egress rules -> Ingress (even with no rules
    # at all); egress rules only -> Egress; both -> both.
    ({}, True, False),
    ({"ingress": ALLOW}, True, False),
    ({"egress": ALLOW}, False, True),
    ({"ingress": ALLOW, "egress": ALLOW}, True, True),
    # types given: it decides, rules of a direction it leaves out never apply
    # (validator_test: "allow Types without ingress when Ingress present").
    ({"types": ["Egress"], "ingress": ALLOW}, False, True),
    ({"types": ["Ingress", "Egress"], "ingress": ALLOW}, True, True),
])
def test_types_decide_the_directions_a_policy_selects_in(spec: dict[str, Any], ingress: bool,
                                                         egress: bool) -> None:
    p = policy({"selector": "app == 'db'", **spec})
    assert selects(p, {"app": "db"}, INGRESS) is ingress
    assert selects(p, {"app": "db"}, EGRESS) is egress
    assert not selects(p, {"app": "web"}, INGRESS)


def test_rules_of_a_direction_types_leaves_out_never_apply() -> None:
    p = policy({"types": ["Egress"], "ingress": ALLOW, "egress": ALLOW})
    assert p.spec.rules(INGRESS) == () and len(p.spec.rules(EGRESS)) == 1


# ------------------------------------------------------------------------ staged view
def test_staged_set_replaces_and_delete_removes_in_the_same_tier() -> None:
    """Calico's staged policies: stagedAction Set stands for the enforced policy of the
    same tier and name, Delete for its removal; a staged policy of a name nothing has
    yet is added."""
    s = snap(res("Tier", "security", {"order": 100}),
             res("GlobalNetworkPolicy", "security.a", {"tier": "security", "selector": "all()"}),
             res("GlobalNetworkPolicy", "b", {"selector": "all()"}),
             res("GlobalNetworkPolicy", "c", {"selector": "all()"}),
             res("StagedGlobalNetworkPolicy", "security.a",
                 {"tier": "security", "selector": "app == 'db'"}),
             res("StagedGlobalNetworkPolicy", "b", {"stagedAction": "Delete"}),
             res("StagedGlobalNetworkPolicy", "d", {"selector": "all()"}))
    view = {p.name: p for p in staged_view(s)}
    assert sorted(view) == ["c", "d", "security.a"]
    assert view["security.a"].staged and str(view["security.a"].spec.selector) == 'app == "db"'
    assert not view["c"].staged and view["d"].staged


def test_a_promoted_staged_policy_is_what_the_staged_view_evaluated() -> None:
    """`enforced()`: Calico's ConvertStagedGlobalPolicyToEnforced keeps name, labels,
    annotations and spec, and drops stagedAction; server-owned fields are not carried."""
    staged = parse_resource({
        "apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
        "metadata": {"name": "a", "labels": {"team": "net"}, "annotations": {"why": "x"},
                     "resourceVersion": "7", "uid": "u1"},
        "spec": {"stagedAction": "Set", "selector": "app == 'db'", "ingress": ALLOW}})
    assert isinstance(staged, StagedGlobalNetworkPolicy)
    enforced = staged.enforced()
    assert type(enforced) is GlobalNetworkPolicy and not enforced.staged
    assert enforced.spec == replace(staged.spec, staged_action=None)
    doc = enforced.dump()
    assert doc["kind"] == "GlobalNetworkPolicy" and "stagedAction" not in doc["spec"]
    assert doc["metadata"] == {"name": "a", "labels": {"team": "net"},
                               "annotations": {"why": "x"}}
    assert parse_resource(doc) == enforced


def test_enforced_policies_no_staged_policy_stands_for_stay_in_the_view() -> None:
    """`p` and `t1.p` in tier t1 may both be stored and are both enforced: a staged
    policy for another name leaves both in the view, as promoting it leaves both in the
    store (`impact.promoted`, `POST /v1/promote`); one of the spellings staged stands
    for both, as promote deletes both."""
    tier = res("Tier", "t1", {"order": 10})
    p = res("GlobalNetworkPolicy", "p", {"tier": "t1", "selector": "all()"})
    t1p = res("GlobalNetworkPolicy", "t1.p", {"tier": "t1", "selector": "all()"})
    other = res("StagedGlobalNetworkPolicy", "other", {"selector": "all()"})
    s = snap(tier, p, t1p, other)
    assert sorted(x.name for x in staged_view(s)) == ["other", "p", "t1.p"]
    assert sorted(x.name for x in staged_view(s)) == sorted(promoted(s).policies)
    for name in ("p", "t1.p"):
        s = snap(tier, p, t1p, res("StagedGlobalNetworkPolicy", name,
                                   {"tier": "t1", "selector": "all()"}))
        assert [(x.name, x.staged) for x in staged_view(s)] == [(name, True)]
        assert sorted(promoted(s).policies) == [name]
        s = snap(tier, p, t1p, res("StagedGlobalNetworkPolicy", name,
                                   {"tier": "t1", "stagedAction": "Delete"}))
        assert staged_view(s) == [] and promoted(s).policies == {}


def test_without_staged_policies_the_view_is_the_enforced_one() -> None:
    s = snap(res("GlobalNetworkPolicy", "a", {"selector": "all()"}))
    assert staged_view(s) == list(s.policies.values())


# ------------------------------------------------------------------------- IP version
@pytest.mark.parametrize(("rule", "version"), [
    ({"action": "Allow"}, None),
    ({"action": "Allow", "ipVersion": 6}, 6),
    # felix/rules FilterRuleToIPVersion: a rule whose nets are all IPv4 is rendered into
    # the IPv4 ruleset only (and the other way round).
    ({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}}, 4),
    ({"action": "Allow", "destination": {"notNets": ["2001:db8::/32"]}}, 6),
    ({"action": "Allow", "protocol": "ICMP"}, 4),
    ({"action": "Allow", "protocol": "ICMPv6"}, 6),
    ({"action": "Allow", "protocol": 58}, 6),
    ({"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}, None),
])
def test_rule_ip_version(rule: dict[str, Any], version: int | None) -> None:
    (parsed,) = policy({"ingress": [rule]}).spec.ingress
    assert rule_ip_version(parsed) == version


def test_icmp_and_not_icmp_are_criteria_only_with_a_type() -> None:
    """felix builds its ICMP match from the type only: `{}` is no criterion, a type (and
    a code) is."""
    from bulkhead.model import ICMPMatch
    from bulkhead.policy.semantics import icmp_criterion

    assert icmp_criterion(None) is None
    assert icmp_criterion(ICMPMatch()) is None
    assert icmp_criterion(ICMPMatch(8)) == ICMPMatch(8)
    assert icmp_criterion(ICMPMatch(8, 0)) == ICMPMatch(8, 0)
