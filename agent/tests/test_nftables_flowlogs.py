"""Flow logs in the rendered table: every decision counted and logged to NFLOG with a
prefix that names it, verdict-map cells through per-rule chains; the kernel takes it."""

from __future__ import annotations

from typing import Any

from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.dataplane.nftables.render import FlowLogging, log_prefix
from bulkhead.model import EGRESS, INGRESS
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from bulkhead.policy.trace import Decision
from tests.nftfixture import DB_POLICY, UNTRACKED_DB, base, gnp, hep, snap

TIER = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
        "metadata": {"name": "security"}, "spec": {"order": 10, "defaultAction": "Pass"}}
SEC = gnp("security.gate", {"tier": "security", "selector": "all()", "order": 1, "ingress": [
    {"action": "Pass", "protocol": "TCP", "destination": {"ports": [22]}},
    {"action": "Pass", "protocol": "TCP", "destination": {"ports": [80]}},
    {"action": "Deny", "protocol": "UDP"}]})
WEB = gnp("web", {"selector": "app == 'db'", "ingress": [
    {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}},
    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [81]}}],
    "egress": [{"action": "Allow"}]})


def docs() -> list[dict[str, Any]]:
    return [*base(), TIER, SEC, WEB,
            hep("bare", "n1", "198.18.0.13", {"app": "bare"}, iface="eth9")]


def rendered(compile_runs: bool = True) -> Any:
    plan = calculate(snap(*docs()), "n1", {}, Failsafes())
    return render(plan, compile_runs=compile_runs, flow_logs=FlowLogging(5, 6, 96))


def steps(rs: Any, direction: str) -> set[str]:
    return {d.step for d in rs.decisions.values() if d.direction == direction}


def test_every_decision_is_named_counted_and_logged() -> None:
    for compile_runs in (True, False):
        rs = rendered(compile_runs)
        assert steps(rs, INGRESS) >= {
            "security|security.gate|0|pass", "security|security.gate|1|pass",
            "security|security.gate|2|deny", "security|end-of-tier|-|pass",
            "default|db|0|allow", "default|web|0|allow", "default|web|1|deny",
            "default|end-of-tier|-|deny", "failsafe|failsafe|-|allow",
            "profile|projectcalico-default-allow|0|allow",
        }
        assert "default|web|0|allow" in steps(rs, EGRESS)
        text = rs.body()
        for prefix, decision in rs.decisions.items():
            group = 5 if decision.direction == INGRESS else 6
            assert f'log prefix "{prefix}" group {group} snaplen 96' in text, prefix
            assert len(prefix) <= 63
        # One named counter per decision, declared in the table.
        assert sorted(rs.counters.values()) == sorted(rs.decisions)
        for counter in rs.counters:
            assert f"counter {counter} {{" in text and f'counter name "{counter}"' in text


def test_verdict_map_cells_go_to_per_rule_chains() -> None:
    rs = rendered()
    maps = [s for s in rs.sets.values() if s.map_to == "verdict" and s.name.startswith("m")]
    assert maps
    targets = {e.split(" : ")[1] for s in maps for e in s.elements}
    assert targets and all(t.startswith("goto l_") for t in targets)
    for target in targets:
        chain = rs.chains[target.split()[1]]
        assert len(chain.rules) == 1
        rule = chain.rules[0]
        assert "log prefix" in rule and rule.split()[-1] in ("accept", "drop", "return")


def test_raw_priority_logs_only_a_deny_and_loopback_nothing() -> None:
    # db on an interface of its own: an endpoint on every interface takes no untracked
    # policy, as in Calico.
    named = [hep("db", "n1", "198.18.0.12", {"app": "db"}, iface="eth0") if
             d["kind"] == "HostEndpoint" and d["metadata"]["name"] == "db" else d
             for d in docs()]
    plan = calculate(snap(*named, UNTRACKED_DB), "n1", {}, Failsafes())
    rs = render(plan, flow_logs=FlowLogging())
    raw = [c for name, c in rs.chains.items() if name.startswith(("raw_", "n_", "u_"))]
    assert raw and not any("log" in r for c in raw for r in c.rules)   # via l_ chains
    raw_map = next(x for n, x in rs.sets.items() if n.startswith("m")
                   and any("untracked_accept" in e for e in x.elements))
    logged = {e.split(" : ")[0]: rs.chains[e.split(" : ")[1].split()[1]].rules[0]
              for e in raw_map.elements if "goto l_" in e}
    assert sorted(logged) == ["6 . 23", "6 . 25"]
    assert all(r.endswith(" drop") and "log prefix" in r for r in logged.values())
    assert any(e.endswith("goto untracked_accept") for e in raw_map.elements)
    assert not any("log" in r for r in rs.chains["input"].rules if '"lo"' in r)
    # The untracked policy is evaluated again by the filter chains, and logged there.
    assert "default|fast|0|allow" in steps(rs, INGRESS)


def test_without_flow_logs_the_table_is_unchanged() -> None:
    plan = calculate(snap(*docs()), "n1", {}, Failsafes())
    plain = render(plan)
    assert not plain.decisions and not plain.counters and "log prefix" not in plain.body()
    logged = render(plan, flow_logs=FlowLogging())
    assert not plain.same_structure(logged)


def test_long_names_get_a_hashed_prefix_that_maps_back() -> None:
    long_name = "x" * 200
    d = Decision(INGRESS, "default", long_name, 12, "allow")
    prefix = log_prefix(d)
    assert len(prefix) <= 63 and prefix.startswith("AI12|#")
    assert log_prefix(Decision(INGRESS, "default", long_name + "y", 12, "allow")) != prefix
    policy = gnp(long_name[:63], {"selector": "all()", "ingress": [{"action": "Allow"}]})
    rs = render(calculate(snap(*base(), policy), "n1", {}, Failsafes()),
                flow_logs=FlowLogging())
    assert any(d.policy == long_name[:63] for d in rs.decisions.values())


def test_the_kernel_takes_the_logging_table() -> None:
    for compile_runs in (True, False):
        listed = NftApplier().normalized(rendered(compile_runs))   # a throwaway namespace
        assert 'log prefix "DI-|default|end-of-tier" group 5 snaplen 96' in listed
        assert "goto l_" in listed if compile_runs else "goto l_" not in listed


def test_db_policy_alone_has_the_decisions_the_evaluator_names() -> None:
    rs = render(calculate(snap(*base()), "n1", {}, Failsafes.off()), flow_logs=FlowLogging())
    assert steps(rs, INGRESS) == {"default|db|0|allow", "default|end-of-tier|-|deny",
                                  "profile|projectcalico-default-allow|0|allow",
                                  "endpoint|no-profile|-|deny"}
    assert DB_POLICY["metadata"]["name"] == "db"
