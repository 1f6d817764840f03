"""bulkhead.model.checks: the field checks, here the port forms."""

from __future__ import annotations

from bulkhead.model import (
    GlobalNetworkPolicy,
    NamedPort,
    PortRange,
    parse_resource,
)
from tests.modelfixture import gnp


def test_port_forms() -> None:
    policy = parse_resource(gnp({"ingress": [{"action": "Allow", "protocol": "TCP",
                                              "destination": {"ports": ["22", 1, "1:65535"]}}]}))
    assert isinstance(policy, GlobalNetworkPolicy)
    rule = policy.spec.ingress[0]
    assert rule.protocol == "TCP"
    assert rule.destination.ports == (PortRange(22, 22), PortRange(1, 1), PortRange(1, 65535))
    named = parse_resource(gnp({"ingress": [{"action": "Allow", "destination": {
        "ports": ["http"]}}]}))   # named ports need no protocol (Calico)
    assert isinstance(named, GlobalNetworkPolicy)
    assert named.spec.ingress[0].destination.ports == (NamedPort("http"),)
