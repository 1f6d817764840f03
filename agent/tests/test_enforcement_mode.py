"""Per-host enforcement mode (observe / enforce): the label's validation, the mode of an
endpoint, and how the calculation, the evaluator and the renderer treat observe."""

from __future__ import annotations

import json
from typing import Any

import pytest

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
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from bulkhead.policy.semantics import effective_labels, enforcement_mode
from tests import nftfixture as nft
from tests.conftest import Server
from tests.modelfixture import doc

FLOW_LOGS = FlowLogging()


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
def observe_docs(db_labels: dict[str, str]) -> list[dict[str, Any]]:
    untracked = nft.gnp("fast", {"selector": "app == 'db'", "doNotTrack": True,
                                 "applyOnForward": True, "ingress": [
                                     {"action": "Allow", "protocol": "UDP"},
                                     {"action": "Deny", "protocol": "TCP",
                                      "destination": {"ports": [23]}},
                                     {"action": "Deny", "protocol": "TCP",
                                      "destination": {"ports": [25]}}]})
    deny = nft.gnp("web", {"selector": "app == 'db'", "ingress": [
        {"action": "Deny", "protocol": "TCP", "destination": {"ports": [81]}},
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}],
        "egress": [{"action": "Deny", "protocol": "UDP"}, {"action": "Pass"}]})
    return [nft.hep("db", "n1", "198.18.0.12", {"app": "db", **db_labels}),
            nft.hep("web", "n2", "198.18.0.11", {"app": "web"}), nft.DB_POLICY, deny,
            untracked]


def rendered(db_labels: dict[str, str], default_mode: str = ENFORCE,
             flow_logs: FlowLogging | None = FLOW_LOGS) -> Ruleset:
    plan = calculate(nft.snap(*observe_docs(db_labels)), "n1", {}, Failsafes(),
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
    enforced, observed = rendered({}), rendered({ENFORCEMENT_LABEL: OBSERVE})
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
    observed = rendered({ENFORCEMENT_LABEL: OBSERVE})
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
