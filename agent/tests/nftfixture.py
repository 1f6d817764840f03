"""What the nftables tests share: builders of endpoints and policies, a snapshot of them,
and a base of two endpoints with a policy on db."""

from __future__ import annotations

from typing import Any

from bulkhead.model import Snapshot, parse_resource


def hep(name: str, node: str, ip: str, labels: dict[str, str], iface: str | None = "*",
        ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"node": node, "expectedIPs": [ip],
                            "profiles": ["projectcalico-default-allow"]}
    if iface:
        spec["interfaceName"] = iface
    if ports:
        spec["ports"] = ports
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": labels}, "spec": spec}


def gnp(name: str, spec: dict[str, Any], kind: str = "GlobalNetworkPolicy") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind,
            "metadata": {"name": name}, "spec": spec}


def snap(*docs: dict[str, Any]) -> Snapshot:
    return Snapshot.build(parse_resource(d) for d in docs)


DB_POLICY = gnp("db", {"selector": "app == 'db'", "ingress": [
    {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
     "destination": {"ports": [5432, "6000:6010"]}}]})


def base(labels_web: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return [hep("db", "n1", "198.18.0.12", {"app": "db"}),
            hep("web", "n2", "198.18.0.11", labels_web or {"app": "web"}),
            DB_POLICY]


# An untracked policy on db: UDP allowed, TCP 23 and 25 denied, before conntrack.
UNTRACKED_DB = gnp("fast", {"selector": "app == 'db'", "doNotTrack": True,
                            "applyOnForward": True, "ingress": [
                                {"action": "Allow", "protocol": "UDP"},
                                {"action": "Deny", "protocol": "TCP",
                                 "destination": {"ports": [23]}},
                                {"action": "Deny", "protocol": "TCP",
                                 "destination": {"ports": [25]}}]})
