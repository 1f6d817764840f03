"""bulkhead.policy.failsafe: failsafe ports decide before any policy; their spec parses."""

from __future__ import annotations

import pytest

from bulkhead.policy import FailsafePort, Failsafes, Flow
from tests.policyfixture import DB, WEB, evaluator, res, tcp


def test_failsafe_ports_before_any_policy() -> None:
    deny_all = res("GlobalNetworkPolicy", "deny-all", {"selector": "all()",
                                                       "types": ["Ingress", "Egress"]})
    ev = evaluator(deny_all, failsafes=Failsafes())
    v = ev.evaluate(tcp(WEB, DB, 22))
    # SSH in is failsafe; web's egress to 22 is not (22 is not an outbound failsafe).
    assert v.ingress.decided_by == "failsafe" and not v.egress.allowed
    assert ev.evaluate(tcp(WEB, DB, 7443)).allowed         # the server's port, both ways
    assert ev.evaluate(Flow.make(WEB, DB, "UDP", 53)).egress.decided_by == "failsafe"
    assert not evaluator(deny_all, failsafes=Failsafes.off()).evaluate(tcp(WEB, DB, 7443)).allowed
    only = FailsafePort.parse("tcp:198.18.0.11/32:8080")
    custom = Failsafes((only,), (only,))
    assert evaluator(deny_all, failsafes=custom).evaluate(tcp(DB, WEB, 8080)).ingress.allowed is \
        False
    assert evaluator(deny_all, failsafes=custom).evaluate(tcp(WEB, DB, 8080)).ingress.allowed


@pytest.mark.parametrize("bad", ["tcp", "tcp:99999", "gre:22", "tcp:not-a-net:22"])
def test_failsafe_parse_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="failsafe port"):
        FailsafePort.parse(bad)
