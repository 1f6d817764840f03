"""What the evaluator's tests share: three host endpoints, builders of documents, an
evaluator over them and a TCP flow."""

from __future__ import annotations

from typing import Any

from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes, Flow

V3 = "projectcalico.org/v3"
WEB, DB, APP, OUT = "198.18.0.11", "198.18.0.12", "198.18.0.13", "198.19.5.5"


def hep(name: str, ip: str, labels: dict[str, str],
        profiles: Any = ("projectcalico-default-allow",), ports: Any = ()) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": labels},
            "spec": {"node": name, "interfaceName": "*", "expectedIPs": [ip],
                     "profiles": list(profiles), "ports": list(ports)}}


def on_interface(endpoint: dict[str, Any], name: str = "eth0") -> dict[str, Any]:
    """The host endpoint on one named interface instead of "*": one that takes untracked
    (doNotTrack) policies, which Calico ignores on an endpoint on every interface."""
    return {**endpoint, "spec": {**endpoint["spec"], "interfaceName": name}}


def res(kind: str, name: str, spec: dict[str, Any], labels: Any = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": V3, "kind": kind, "metadata": meta, "spec": spec}


HOSTS = [hep("web", WEB, {"app": "web", "zone": "dmz"}),
         hep("db", DB, {"app": "db", "zone": "restricted"},
             ports=[{"name": "postgres", "protocol": "TCP", "port": 5432}]),
         hep("app", APP, {"app": "app", "zone": "trusted"})]


def evaluator(*docs: dict[str, Any], hosts: Any = None, failsafes: Any = None) -> Evaluator:
    snap = Snapshot.build(parse_resource(d) for d in [*(HOSTS if hosts is None else hosts),
                                                       *docs])
    return Evaluator(snap, failsafes if failsafes is not None else Failsafes.off())


def tcp(src: str, dst: str, port: int) -> Flow:
    return Flow.make(src, dst, "TCP", port)


DB_ALLOW_DMZ = res("GlobalNetworkPolicy", "db-ingress", {
    "selector": "app == 'db'",
    "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"selector": "zone == 'dmz'"},
                 "destination": {"ports": ["postgres"]}}]})
