"""The impact preview's judge (`bulkhead.policy.impact`) against the reference evaluator:
for random policy sets (the differential test's strategies: tiers, order, Pass, Log,
nets, selectors, named ports, network sets, profiles, staged policies) and random flows
between their hosts, every record the agent would make of a flow (ends resolved as
`observe.flows.Ends` does) that the judge decides is decided as the evaluator decides
the flow, for the enforced policies and for the staged ones promoted, with some hosts in
observe mode. And the judge is
not vacuous: it decides most records, and says why when it does not.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.model import API_VERSION, ENFORCEMENT_LABEL, OBSERVE, Snapshot, parse_resource
from bulkhead.model.flowlog import OBSERVE_STEP, FlowRecord
from bulkhead.observe.flows import Ends
from bulkhead.policy import Evaluator, Failsafes
from bulkhead.policy.evaluate import DirectionVerdict
from bulkhead.policy.impact import Impact, promoted
from bulkhead.policy.trace import verdict_steps
from tests.test_differential import ALL_FLOWS, HOSTS, model_flow, policy_sets


def record_of(ends: Ends, flow: Any, reporter: str, verdict: DirectionVerdict) -> FlowRecord:
    """The record the reporting agent makes of the flow: what happened on the wire, the
    decisions its table logged, and the observe step when its endpoint observes."""
    f = model_flow(flow)
    steps = verdict_steps(verdict) + ((OBSERVE_STEP,) if verdict.observed else ())
    return FlowRecord(
        start=0.0, end=1.0, node=flow.src if reporter == "src" else flow.dst,
        reporter=reporter, src=ends.at(f.src), dst=ends.at(f.dst), proto=f.protocol,
        dst_port=f.dst_port or 0, action=verdict.wire_action.lower(), enforced_trace=steps,
        staged_action=verdict.action.lower(), staged_trace=verdict_steps(verdict),
        connections=1, started=1)


def observing(docs: list[dict[str, Any]], hosts: set[str]) -> list[dict[str, Any]]:
    """The docs with the host endpoints of `hosts` labelled to observe mode."""
    out = []
    for d in docs:
        if d["kind"] == "HostEndpoint" and d["metadata"]["name"] in hosts:
            d = {**d, "metadata": {**d["metadata"], "labels": {
                **d["metadata"].get("labels", {}), ENFORCEMENT_LABEL: OBSERVE}}}
        out.append(d)
    return out


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, **({"labels": labels} if labels else {})},
            "spec": spec}


def test_decided_records_agree_with_the_evaluator() -> None:
    tally: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(policy_sets(), st.lists(st.sampled_from(ALL_FLOWS), min_size=40, max_size=40,
                                   unique=True),
           st.sets(st.sampled_from(HOSTS), max_size=2))
    def check(docs: list[dict[str, Any]], flows: list[Any], observers: set[str]) -> None:
        snapshot = Snapshot.build(parse_resource(d) for d in observing(docs, observers))
        evaluator = Evaluator(snapshot, Failsafes.off())
        ends = Ends(snapshot)
        judges = {"enforced": Impact(snapshot), "promoted": Impact(promoted(snapshot))}
        for flow in flows:
            verdict = evaluator.evaluate(model_flow(flow))
            for view, judge in judges.items():
                sides = ((verdict.egress, verdict.ingress) if view == "enforced" else
                         (verdict.staged_egress, verdict.staged_ingress))
                for reporter, side in zip(("src", "dst"), sides, strict=True):
                    if side.endpoint is None:
                        continue
                    record = record_of(ends, flow, reporter, side)
                    got = judge.judge(record)
                    if not got.decided:
                        assert got.why, (flow, record)
                        tally["undecided"] += 1
                        continue
                    tally["decided"] += 1
                    tally["observed"] += side.observed
                    assert got.action == side.wire_action.lower(), (
                        f"{view} {reporter} {flow}: judged {got.action} {got.steps}, the "
                        f"evaluator says {side.summary()}")
                    # The deciding step the evaluator reached is among the judge's.
                    want = OBSERVE_STEP if side.observed else verdict_steps(side)[-1]
                    assert want in got.steps, (got, side.summary())

    check()
    print(dict(tally))
    assert tally["decided"] > 3 * tally["undecided"], tally
    assert tally["observed"] > 0.1 * tally["decided"], tally


def test_what_records_cannot_decide_is_undecided_with_the_reason() -> None:
    docs = [
        doc("HostEndpoint", "web", {"node": "web", "expectedIPs": ["198.18.0.10",
                                                                   "2001:2::10"]},
            {"app": "web"}),
        doc("HostEndpoint", "db", {"node": "db", "expectedIPs": ["198.18.0.11"]},
            {"app": "db"}),
        doc("GlobalNetworkPolicy", "db", {
            "selector": "app == 'db'", "types": ["Ingress"], "ingress": [
                {"action": "Deny", "protocol": "TCP", "source": {"ports": [1000]}},
                {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.18.0.0/16"]},
                 "destination": {"ports": [5432]}},
                {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8}},
                {"action": "Allow", "protocol": "ICMP"}]}),
        doc("GlobalNetworkPolicy", "web", {
            "selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.18.0.0/16"]}},
            ]}),
    ]
    snapshot = Snapshot.build(parse_resource(d) for d in docs)
    judge = Impact(snapshot)
    ends = Ends(snapshot)

    def record(src: str, dst: str, proto: int, port: int) -> FlowRecord:
        node = ends.at(ipaddress.ip_address(dst)).name
        return FlowRecord(0.0, 1.0, node, "dst", ends.at(ipaddress.ip_address(src)),
                          ends.at(ipaddress.ip_address(dst)), proto, port, "allow", (),
                          "allow", ())

    # A source port rule first: whatever comes after, it could have matched.
    got = judge.judge(record("198.18.0.10", "198.18.0.11", 6, 5432))
    assert not got.decided and any("source port" in w for w in got.why), got
    # ICMP type not kept: the Deny of echo requests may or may not have matched.
    got = judge.judge(record("198.19.0.1", "198.18.0.11", 1, 0))
    assert not got.decided and any("ICMP type" in w for w in got.why), got
    # An address end is exact: outside the nets, the tier denies it.
    got = judge.judge(record("198.19.0.1", "198.18.0.10", 6, 80))
    assert got.action == "deny" and got.steps == ("default|end-of-tier|-|deny",), got
    got = judge.judge(record("198.18.7.7", "198.18.0.10", 6, 80))
    assert got.action == "allow" and got.steps == ("default|web|0|allow",), got
    # web is dual-stack: from web itself, only one of its addresses is in the nets.
    got = judge.judge(record("198.18.0.10", "198.18.0.10", 6, 80))
    assert not got.decided and any("some of its addresses" in w for w in got.why), got
    # A host endpoint the proposed state no longer has: not guessed.
    gone = Impact(Snapshot.build(parse_resource(d) for d in docs[1:]))
    got = gone.judge(record("198.19.0.1", "198.18.0.10", 6, 80))
    assert not got.decided and "not in the proposed state" in got.why[0], got
