"""Per-host enforcement mode (observe / enforce): the label's validation, the mode of an
endpoint, and how the calculation, the evaluator and the renderer treat observe."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bulkhead.model import (
    ENFORCE,
    ENFORCEMENT_LABEL,
    OBSERVE,
    Snapshot,
    ValidationError,
    parse_resource,
)
from bulkhead.policy.semantics import effective_labels, enforcement_mode
from tests.conftest import Server
from tests.modelfixture import doc


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
