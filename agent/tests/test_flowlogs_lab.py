"""Flow logs end to end, with real processes and real traffic: bulkhead-server and an
agent per lab host with flow logs on (NFLOG and conntrack in each host's namespace),
probes on the wire, records queried back from the server.

- allowed and denied flows appear with the enforced trace the evaluator gives
  (`bulkhead explain` for the same flow), counted from conntrack;
- a staged policy's would-deny appears where, and only where, the evaluator says;
- the server killed during traffic and started again: no record is lost (the agents
  keep them on disk meanwhile);
- the agent's /metrics carries each decision's hit counter.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bulkhead.api import route
from bulkhead.conformance.kernel import WireFlow
from bulkhead.model import API_VERSION, Snapshot, parse_resource
from bulkhead.policy import Failsafes
from bulkhead.policy.evaluate import Evaluator
from bulkhead.policy.flow import Flow
from bulkhead.policy.trace import verdict_steps
from bulkhead.testbed import Testbed
from tests.labfixture import need_root, unique_lab_name, wire

# The same three hosts (h3 runs no agent and has no endpoint: "outside") and helpers.
from tests.test_agent_faults import AGENTS, HOSTS, hep, ip, wait_until

FLOW_LOGS = {"enabled": True, "flushInterval": 1}


def policy(name: str, spec: dict[str, Any], kind: str = "GlobalNetworkPolicy"
           ) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


TIER = {"apiVersion": API_VERSION, "kind": "Tier", "metadata": {"name": "security"},
        "spec": {"order": 10, "defaultAction": "Pass"}}
DOCS = [
    TIER, hep("h1", {"app": "client"}), hep("h2", {"app": "web"}),
    policy("security.block-23", {"tier": "security", "selector": "all()", "ingress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [23]}}]}),
    policy("web", {"selector": "app == 'web'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'client'"},
         "destination": {"ports": [80, 81]}}]}),
    # Staged: web would take port 80 only.
    policy("web", {"selector": "app == 'web'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'client'"},
         "destination": {"ports": [80]}}]}, kind="StagedGlobalNetworkPolicy"),
]
FLOWS = [WireFlow("h1", ip("h1"), "h2", ip("h2"), "TCP", 80),
         WireFlow("h1", ip("h1"), "h2", ip("h2"), "TCP", 81),
         WireFlow("h3", ip("h3"), "h2", ip("h2"), "TCP", 80),
         WireFlow("h1", ip("h1"), "h2", ip("h2"), "TCP", 23)]


def flows(bed: Testbed, **query: str) -> list[dict[str, Any]]:
    answer = bed.request("GET", route("flows"), query={"since": "0", "limit": "10000",
                                                       **query})
    records: list[dict[str, Any]] = answer["flows"]
    return records


def ingress_of_h2(bed: Testbed) -> dict[tuple[str, int], dict[str, Any]]:
    """h2's records as the destination, by (source name, port), counts summed."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in flows(bed, node="h2", reporter="dst"):
        key = (r["src_name"], r["dst_port"])
        if key in out:
            for field in ("connections", "started", "packets_in", "packets_out",
                          "bytes_in", "bytes_out"):
                out[key][field] += r[field]
        else:
            out[key] = dict(r)
    return out


@pytest.fixture(params=[False, True], ids=["dumps", "destroy-events"])
def bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """Counts from conntrack dumps only (the default), or destroy events too."""
    need_root()
    settings = {"flowLogs": {**FLOW_LOGS, "conntrackEvents": request.param}}
    with Testbed(unique_lab_name(), list(HOSTS), failsafe_defaults=False,
                 agent_hosts=AGENTS, agent_settings=settings) as testbed:
        yield testbed


def test_flows_carry_the_enforced_and_staged_traces_the_evaluator_gives(bed: Testbed
                                                                        ) -> None:
    bed.enforce(DOCS, "flows")
    expected = [True, True, False, False]
    assert wire(bed, FLOWS, expected) == expected
    wanted = {("h1", 80), ("h1", 81), ("198.18.0.12", 80), ("h1", 23)}
    def counted() -> bool:
        # The first packet's record and conntrack's counts can come a flush apart.
        records = ingress_of_h2(bed)
        return wanted <= set(records) and records[("h1", 80)]["packets_in"] >= 2

    wait_until(counted, "h2's records of the four flows, with conntrack's counts")
    records = ingress_of_h2(bed)
    evaluator = Evaluator(Snapshot.build(parse_resource(d) for d in DOCS), Failsafes.off())
    for f in FLOWS:
        name = f.src if f.src in AGENTS else f.src_ip
        record = records[(name, f.port or 0)]
        verdict = evaluator.evaluate(Flow.make(f.src_ip, f.dst_ip, "TCP", f.port))
        assert tuple(record["enforced_trace"]) == verdict_steps(verdict.ingress), f
        assert record["action"] == verdict.ingress.action.lower(), f
        assert tuple(record["staged_trace"]) == verdict_steps(verdict.staged_ingress), f
        assert record["staged_action"] == verdict.staged_ingress.action.lower(), f
        assert record["started"] >= 1
    # The staged policy would deny 81 (and only 81) of what is allowed today.
    changed = {(r["src_name"], r["dst_port"]) for r in flows(bed, staged="differs",
                                                            node="h2")}
    assert changed == {("h1", 81)}
    assert records[("h1", 81)]["staged_trace"] == ["security|end-of-tier|-|pass",
                                                   "default|end-of-tier|-|deny"]
    # Allowed connections have conntrack's counts both ways (a handshake and a close).
    allowed = records[("h1", 80)]
    assert allowed["packets_in"] >= 2 and allowed["bytes_in"] > 0
    assert allowed["src_type"] == "hep" and allowed["src_labels"] == {"app": "client"}
    outside = records[("198.18.0.12", 80)]
    assert (outside["src_type"], outside["src_scope"], outside["action"]) == \
        ("net", "private", "deny")
    # The sender's side: h1 reports its egress, allowed by the default profile.
    def sent() -> list[dict[str, Any]]:
        return [r for r in flows(bed, node="h1", reporter="src") if r["dst_port"] == 80]

    wait_until(lambda: bool(sent()), "h1's record of what it sent")
    assert sent()[0]["enforced_trace"] == [
        "profile|projectcalico-default-allow|0|allow"]
    # Every decision's hits on the agent's /metrics (counted at the agent's flush, which
    # may come after the records above reached the server).
    def web_allow() -> list[float]:
        return [v for k, v in bed.agent_metrics("h2").items()
                if k.startswith("bulkhead_agent_rule_hits_total") and 'policy="web"' in k
                and 'action="allow"' in k]

    wait_until(lambda: bool(web_allow()) and web_allow()[0] >= 2,
               "h2's hits of web's Allow on /metrics")


def test_a_server_restart_during_traffic_loses_no_record(bed: Testbed) -> None:
    bed.enforce(DOCS, "flows")
    bed.stop_server()
    rounds = 5
    for _ in range(rounds):   # traffic while the server is away: records spool on h2
        assert wire(bed, FLOWS[:1], [True]) == [True]
    metrics: dict[str, float] = {}

    def spooled() -> bool:
        metrics.update(bed.agent_metrics("h2"))
        return metrics.get('bulkhead_agent_flow_logs{counter="flowRecordsSpooled"}', 0) > 0

    wait_until(spooled, "h2 to keep records on disk while the server is away")
    bed.start_server()
    try:
        wait_until(lambda: ingress_of_h2(bed).get(("h1", 80), {}).get("started", 0) >= rounds,
                   f"all {rounds} connections' records after the restart")
    except AssertionError:
        raise AssertionError(f"h2's records: {flows(bed, node='h2')}; its counters: "
                             f"{bed.agent_metrics('h2')}") from None
    assert ingress_of_h2(bed)[("h1", 80)]["started"] == rounds
    final = bed.agent_metrics("h2")
    assert final['bulkhead_agent_flow_logs{counter="flowRecordsDroppedSpool"}'] == 0
