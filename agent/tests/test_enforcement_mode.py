"""Per-host enforcement mode (observe / enforce): the label's validation, the mode of an
endpoint, and how the calculation, the evaluator and the renderer treat observe."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from bulkhead.agent.config import load_config
from bulkhead.agent.main import default_enforcer
from bulkhead.dataplane.nftables import Ruleset, render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.dataplane.nftables.render import FlowLogging
from bulkhead.model import (
    ENFORCE,
    ENFORCEMENT_LABEL,
    OBSERVE,
    Snapshot,
    ValidationError,
    parse_resource,
)
from bulkhead.model.flowlog import OBSERVE_STEP, parse_record
from bulkhead.observe.flows import FlowAggregator, conn_key
from bulkhead.policy import Failsafes
from bulkhead.policy.evaluate import Evaluator
from bulkhead.policy.explain import explain_text
from bulkhead.policy.flow import Flow
from bulkhead.policy.plan import calculate
from bulkhead.policy.semantics import effective_labels, enforcement_mode
from bulkhead.policy.trace import verdict_steps
from tests import nftfixture as nft
from tests import test_observe_flows as flows
from tests.conftest import Server
from tests.modelfixture import doc

FLOW_LOGS = FlowLogging()
IP = ipaddress.ip_address


def hep(name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return doc("HostEndpoint", name, {"node": name, "interfaceName": "eth0", **spec},
               labels=labels)


@pytest.mark.parametrize("value", ["audit", "Observe", "", "enforced"])
def test_a_host_endpoint_with_another_mode_is_refused(value: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_resource(hep("web", {ENFORCEMENT_LABEL: value}))
    assert str(err.value).startswith(
        f'HostEndpoint web: metadata.labels["{ENFORCEMENT_LABEL}"]: ')
    assert "expected observe or enforce" in str(err.value)


def test_a_profile_cannot_apply_another_mode() -> None:
    profile = doc("Profile", "rollout", {"labelsToApply": {ENFORCEMENT_LABEL: "maybe"}})
    with pytest.raises(ValidationError, match=r'Profile rollout: spec\.labelsToApply\['):
        parse_resource(profile)


@pytest.mark.parametrize("value", [OBSERVE, ENFORCE])
def test_observe_and_enforce_are_accepted(value: str) -> None:
    parsed = parse_resource(hep("web", {ENFORCEMENT_LABEL: value}))
    assert parsed.labels[ENFORCEMENT_LABEL] == value


def test_mode_is_the_label_else_the_default() -> None:
    assert enforcement_mode({}) == ENFORCE
    assert enforcement_mode({}, OBSERVE) == OBSERVE
    assert enforcement_mode({ENFORCEMENT_LABEL: OBSERVE}) == OBSERVE
    assert enforcement_mode({ENFORCEMENT_LABEL: ENFORCE}, OBSERVE) == ENFORCE


def test_mode_comes_from_the_effective_labels() -> None:
    snapshot = Snapshot.build([
        parse_resource(doc("Profile", "rollout", {"labelsToApply": {ENFORCEMENT_LABEL: OBSERVE}})),
        parse_resource(hep("a", {}, profiles=["rollout"])),
        parse_resource(hep("b", {ENFORCEMENT_LABEL: ENFORCE}, profiles=["rollout"])),
    ])
    modes = {h.name: enforcement_mode(effective_labels(snapshot, h))
             for h in snapshot.host_endpoints.values()}
    assert modes == {"a": OBSERVE, "b": ENFORCE}


async def test_the_server_refuses_another_mode_and_takes_observe(server: Server) -> None:
    body = json.dumps(hep("web", {ENFORCEMENT_LABEL: "audit"}))
    async with server.client("alice", "admin") as c:
        async with c.post("/v1/apply", data=body) as r:
            message = (await r.json())["error"]["message"]
            assert r.status == 422
        assert f'HostEndpoint web: metadata.labels["{ENFORCEMENT_LABEL}"]' in message
        async with c.post("/v1/apply", data=body.replace("audit", OBSERVE)) as r:
            assert r.status == 200


# ---------------------------------------------------------------- calculation, render
def observe_docs(db_labels: dict[str, str], iface: str = "*") -> list[dict[str, Any]]:
    """db (on `iface`: "*" takes no untracked policy, as in Calico) and web."""
    deny = nft.gnp("web", {"selector": "app == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [81]}},
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}],
        "egress": [{"action": "Deny", "protocol": "UDP"}, {"action": "Pass"}]})
    return [nft.hep("db", "n1", "198.18.0.12", {"app": "db", **db_labels}, iface=iface),
            nft.hep("web", "n2", "198.18.0.11", {"app": "web"}), nft.DB_POLICY, deny,
            nft.UNTRACKED_DB]


def rendered(db_labels: dict[str, str], default_mode: str = ENFORCE,
             flow_logs: FlowLogging | None = FLOW_LOGS, iface: str = "*") -> Ruleset:
    plan = calculate(nft.snap(*observe_docs(db_labels, iface)), "n1", {}, Failsafes(),
                     default_mode=default_mode)
    return render(plan, flow_logs=flow_logs)


def test_the_plan_carries_each_endpoint_s_mode() -> None:
    plan = calculate(nft.snap(*observe_docs({ENFORCEMENT_LABEL: OBSERVE})), "n1", {})
    assert [(ep.name, ep.mode) for ep in plan.endpoints] == [("db", OBSERVE)]
    assert calculate(nft.snap(*observe_docs({})), "n1", {}).endpoints[0].mode == ENFORCE
    plan = calculate(nft.snap(*observe_docs({})), "n1", {}, default_mode=OBSERVE)
    assert plan.endpoints[0].mode == OBSERVE


@pytest.mark.parametrize("flow_logs", [FLOW_LOGS, None])
def test_enforce_renders_as_without_modes(flow_logs: FlowLogging | None) -> None:
    plain = rendered({}, flow_logs=flow_logs)
    assert rendered({ENFORCEMENT_LABEL: ENFORCE}, OBSERVE, flow_logs).script() == \
        plain.script()
    observed = rendered({ENFORCEMENT_LABEL: OBSERVE}, flow_logs=flow_logs)
    assert rendered({}, OBSERVE, flow_logs).script() == observed.script()
    assert observed.script() != plain.script()


def drops(rs: Ruleset) -> list[str]:
    """Every rule and verdict-map element that drops, but conntrack's invalid state."""
    rules = [r for c in rs.chains.values() for r in c.rules
             if "drop" in r.split() and r != "ct state invalid drop"]
    return rules + [e for s in rs.sets.values() for e in s.elements if e.endswith("drop")]


def test_observe_drops_nothing_and_logs_every_deny() -> None:
    enforced = rendered({}, iface="eth0")        # an interface of its own: untracked too
    observed = rendered({ENFORCEMENT_LABEL: OBSERVE}, iface="eth0")
    assert drops(enforced) and not drops(observed)
    # The same decisions are logged, under the same prefixes: a Deny still says Deny.
    assert set(observed.decisions) == set(enforced.decisions)
    denies = {d.step for d in observed.decisions.values() if d.action == "deny"}
    assert denies >= {"default|web|0|deny", "default|end-of-tier|-|deny",
                      "endpoint|no-profile|-|deny", "default|fast|1|deny"}
    body = observed.body()
    assert 'log prefix "DI-|default|end-of-tier" group 1 snaplen 128 accept' in body
    assert 'log prefix "DI-|endpoint|no-profile" group 1 snaplen 128 accept' in body
    # Failsafes are as in enforce.
    assert enforced.chains["input"].rules[:5] == observed.chains["input"].rules[:5]


def test_observe_lets_an_untracked_deny_on_to_the_filter_chains() -> None:
    observed = rendered({ENFORCEMENT_LABEL: OBSERVE}, iface="eth0")
    raw_map = next(s for n, s in observed.sets.items() if n.startswith("m")
                   and any("untracked_accept" in e for e in s.elements))
    by_key = {e.split(" : ")[0]: e.split(" : ")[1] for e in raw_map.elements}
    assert by_key["6 . 23"] == by_key["6 . 25"] == "accept"     # no notrack, no log
    assert by_key["17 . 0-65535"] == "goto untracked_accept"
    raw = [r for n, c in observed.chains.items() if n.startswith(("raw_", "n_", "u_"))
           for r in c.rules]
    assert raw and not any("log prefix" in r for r in raw)


def test_the_kernel_takes_an_observe_table() -> None:
    listed = NftApplier().normalized(rendered({ENFORCEMENT_LABEL: OBSERVE}))
    assert 'log prefix "DI-|default|end-of-tier" group 1 snaplen 128 accept' in listed


# ------------------------------------------------------------------------ evaluator
def test_the_evaluator_decides_as_enforce_and_lets_it_through() -> None:
    flow = Flow.make("198.18.0.11", "198.18.0.12", "TCP", 81)
    enforced = Evaluator(nft.snap(*observe_docs({}))).evaluate(flow)
    observed = Evaluator(nft.snap(*observe_docs({ENFORCEMENT_LABEL: OBSERVE}))).evaluate(flow)
    assert not enforced.allowed and not enforced.observed
    assert observed.allowed and observed.staged_allowed and observed.observed
    assert not observed.policy_allowed
    # The policy decision and its trace are enforce mode's.
    ingress = observed.ingress
    assert (ingress.action, ingress.policy, ingress.rule) == ("Deny", "web", 0)
    assert ingress.observed and ingress.allowed and ingress.wire_action == "Allow"
    assert ingress.steps == enforced.ingress.steps
    assert verdict_steps(ingress) == verdict_steps(enforced.ingress) == ("default|web|0|deny",)
    assert ingress.summary() == ("ingress of db: observe mode: would Deny by policy web "
                                 "(tier default) ingress rule 0, allowed")
    text = explain_text(Evaluator(nft.snap(*observe_docs({ENFORCEMENT_LABEL: OBSERVE}))),
                        observed)
    assert "verdict: ALLOWED" in text and "observe mode: would Deny by policy web" in text
    # An endpoint without the label takes the evaluator's default; web is no endpoint
    # of the observed kind, so its egress stays enforce's.
    default = Evaluator(nft.snap(*observe_docs({})), default_mode=OBSERVE).evaluate(flow)
    assert default.allowed and default.ingress.observed and default.egress.observed
    allowed = Evaluator(nft.snap(*observe_docs({ENFORCEMENT_LABEL: OBSERVE}))).evaluate(
        Flow.make("198.18.0.11", "198.18.0.12", "TCP", 80))
    assert allowed.ingress.summary().endswith("(observe mode)")


# -------------------------------------------------------------------- flow records
def observe_setup(labels: dict[str, str]) -> tuple[FlowAggregator, Ruleset]:
    snapshot = nft.snap(*flows_docs(labels))
    rs = render(calculate(snapshot, "n1", {}, Failsafes.off()), flow_logs=FLOW_LOGS)
    return FlowAggregator("n1", snapshot, rs.decisions, Failsafes.off()), rs


def flows_docs(labels: dict[str, str]) -> list[dict[str, Any]]:
    """test_observe_flows' resources, db with `labels` too."""
    return [nft.hep("db", "n1", flows.DB, {"app": "db", **labels})
            if d["kind"] == "HostEndpoint" and d["metadata"]["name"] == "db" else d
            for d in flows.docs()]


def send(agg: FlowAggregator, rs: Ruleset, steps: tuple[str, ...], port: int,
         sport: int = 40000) -> None:
    for step in steps:
        agg.packet(flows.Logged(flows.prefix(rs, step), 6, IP(flows.WEB), IP(flows.DB),
                                sport, port))


DENIED = ("security|security.ssh|0|pass", "default|end-of-tier|-|deny")
ALLOWED = ("security|security.ssh|0|pass", "default|db|0|allow")


def test_an_observe_endpoint_reports_allow_with_the_deny_it_would_give() -> None:
    agg, rs = observe_setup({ENFORCEMENT_LABEL: OBSERVE})
    send(agg, rs, DENIED, 80)
    send(agg, rs, ALLOWED, 5432, 40001)
    denied_key = conn_key(6, IP(flows.WEB), IP(flows.DB), 40000, 80)
    agg.counts([(denied_key, flows.Counters(3, 180, 2, 120))], now=101.0)
    records = {r.dst_port: r for r in agg.flush(now=110.0)}
    would = records[80]
    assert (would.action, would.staged_action) == ("allow", "deny")
    assert would.enforced_trace == (*DENIED, OBSERVE_STEP)
    assert would.staged_trace == DENIED
    # It went through: conntrack's counts are joined as for any allowed connection.
    assert (would.packets_in, would.packets_out, would.connections) == (3, 2, 1)
    fine = records[5432]
    assert (fine.action, fine.staged_action) == ("allow", "allow")
    assert fine.enforced_trace == (*ALLOWED, OBSERVE_STEP)
    for record in records.values():
        assert parse_record(record.json(), now=200.0) == record


def test_an_enforce_endpoint_reports_as_before() -> None:
    agg, rs = observe_setup({})
    send(agg, rs, DENIED, 80)
    [record] = agg.flush(now=110.0)
    assert (record.action, record.enforced_trace) == ("deny", DENIED)


def test_an_open_connection_keeps_the_mode_it_was_accepted_in() -> None:
    agg, rs = observe_setup({ENFORCEMENT_LABEL: OBSERVE})
    send(agg, rs, DENIED, 80)
    enforce = nft.snap(*flows_docs({}))
    agg.set_snapshot(enforce, rs.decisions)
    key = conn_key(6, IP(flows.WEB), IP(flows.DB), 40000, 80)
    agg.counts([(key, flows.Counters(3, 180, 2, 120))], now=101.0)
    [record] = agg.flush(now=110.0)
    assert (record.action, record.enforced_trace[-1]) == ("allow", OBSERVE_STEP)


def test_the_agent_setting_defaults_to_enforce(tmp_path: Path) -> None:
    assert load_config(None).enforcement == ENFORCE
    conf = tmp_path / "agent.yaml"
    conf.write_text("enforcement: observe\n")
    assert load_config(conf).enforcement == OBSERVE
    assert load_config(conf, {"enforcement": "enforce"}).enforcement == ENFORCE
    enforcer = default_enforcer(load_config(conf))
    assert getattr(enforcer, "default_mode", None) == OBSERVE
