"""What the model's tests share: a manifest holding every kind, and builders of documents."""

from __future__ import annotations

from typing import Any

V3 = "projectcalico.org/v3"

EVERY_KIND = """
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.db-ingress, labels: {owner: dba}}
spec:
  tier: security
  order: 10.5
  selector: app == 'db'
  ingress:
    - action: Allow
      protocol: TCP
      source: {selector: zone == 'dmz', notNets: [198.18.9.0/24]}
      destination: {ports: [postgres, 80, "8000:8080"], notPorts: [8081]}
    - action: Log
      protocol: ICMP
      icmp: {type: 8, code: 0}
    - action: Deny
      notProtocol: UDP
      ipVersion: 6
      source: {nets: ["2001:2::/48"]}
  egress:
    - action: Allow
      protocol: UDP
      destination: {domains: ["*.example.com"], ports: [53]}
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {name: lockdown}
spec: {stagedAction: Set, selector: all(), types: [Ingress, Egress]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: db-eth0, labels: {app: db}}
spec:
  node: db
  interfaceName: eth0
  expectedIPs: [198.18.0.12, "2001:2::12"]
  profiles: [projectcalico-default-allow]
  ports: [{name: postgres, protocol: TCP, port: 5432}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: partners, labels: {role: partner}}
spec: {nets: [198.19.0.0/16], allowedEgressDomains: [api.example.com]}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: quiet}
spec:
  labelsToApply: {quiet: "true"}
  ingress: [{action: Deny}]
"""


def doc(kind: str, name: str, spec: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}


def gnp(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return doc("GlobalNetworkPolicy", name, spec)
