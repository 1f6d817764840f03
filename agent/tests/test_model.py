"""Resources: loading, defaults, dumping, and validation errors that name kind, name, field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.model import (
    DEFAULT_TIER_ORDER,
    GlobalNetworkPolicy,
    HostEndpoint,
    LoadError,
    NamedPort,
    PortRange,
    Snapshot,
    StagedGlobalNetworkPolicy,
    Tier,
    ValidationError,
    dump_yaml,
    load_paths,
    load_text,
    parse_resource,
)

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


def test_every_kind_loads_and_round_trips() -> None:
    resources = load_text(EVERY_KIND)
    assert [r.kind for r in resources] == ["Tier", "GlobalNetworkPolicy",
                                           "StagedGlobalNetworkPolicy", "HostEndpoint",
                                           "GlobalNetworkSet", "Profile"]
    policy = resources[1]
    assert isinstance(policy, GlobalNetworkPolicy)
    assert policy.spec.types == ("Ingress", "Egress")
    assert policy.spec.ingress[0].destination.ports == (
        NamedPort("postgres"), PortRange(80, 80), PortRange(8000, 8080))
    assert policy.bare_name == "db-ingress"
    again = load_text(dump_yaml(resources))
    assert again == resources
    assert load_text(json.dumps([r.dump() for r in resources])) == resources
    Snapshot.build(resources)


def test_list_kind_and_multi_document() -> None:
    items = [gnp({"selector": "a == 'b'"}, "one"), gnp({}, "two")]
    text = yaml.safe_dump({"apiVersion": V3, "kind": "List", "items": items})
    assert [r.name for r in load_text(text)] == ["one", "two"]
    assert len(load_text(yaml.safe_dump_all(items))) == 2


@pytest.mark.parametrize(("spec", "types"), [
    ({}, ("Ingress",)),
    ({"ingress": [{"action": "Allow"}]}, ("Ingress",)),
    ({"egress": [{"action": "Allow"}]}, ("Egress",)),
    ({"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}]}, ("Ingress", "Egress")),
    ({"types": ["Egress", "Ingress"]}, ("Ingress", "Egress")),
])
def test_types_inferred_as_calico_does(spec: dict[str, Any], types: tuple[str, ...]) -> None:
    policy = parse_resource(gnp(spec))
    assert isinstance(policy, GlobalNetworkPolicy)
    assert policy.spec.types == types


def test_defaults() -> None:
    policy = parse_resource(gnp({}))
    assert isinstance(policy, GlobalNetworkPolicy)
    assert policy.spec.tier == "default" and policy.spec.order is None
    assert str(policy.spec.selector) == "all()"
    staged = parse_resource(doc("StagedGlobalNetworkPolicy", "s", {}))
    assert isinstance(staged, StagedGlobalNetworkPolicy) and staged.spec.staged_action == "Set"
    tier = parse_resource(doc("Tier", "t", {}))
    assert isinstance(tier, Tier) and tier.default_action == "Deny" and tier.order is None
    snap = Snapshot.build([])
    assert snap.tiers["default"].order == DEFAULT_TIER_ORDER
    assert snap.tiers["default"].default_action == "Deny"
    assert "projectcalico-default-allow" in snap.profiles


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


BAD: list[tuple[dict[str, Any], str]] = [
    (gnp({"ingress": [{"action": "Allow", "protocol": "TCP",
                       "destination": {"ports": [80, "80-90"]}}]}, "db-ingress"),
     'GlobalNetworkPolicy db-ingress: spec.ingress[0].destination.ports[1]: "80-90" is not a '
     'port, a range "a:b" or a port name'),
    (gnp({"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}),
     "GlobalNetworkPolicy p: spec.ingress[0].destination.ports: a numeric port or range "
     "needs protocol TCP, UDP or SCTP (protocol is unset)"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [0]}}]}),
     "spec.ingress[0].destination.ports[0]: 0 is out of range 1-65535"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "tcp"}]}),
     'spec.ingress[0].protocol: "tcp": protocol names are case-sensitive; write TCP'),
    (gnp({"ingress": [{"action": "Allow", "source": {
        "nets": ["198.18.0.0/15"], "notNets": ["2001:2::/48"]}}]}),
     "spec.ingress[0]: mixes IPv4 and IPv6 nets"),
    (gnp({"ingress": [{"action": "Allow", "source": {"notNets": ["0.0.0.0/0"]}}]}),
     'spec.ingress[0].source.notNets[0]: "0.0.0.0/0" would exclude every address'),
    (gnp({"ingress": [{"action": "Allow", "notProtocol": "ICMPv6", "ipVersion": 4}]}),
     "spec.ingress[0].ipVersion: notProtocol ICMPv6 does not go with ipVersion 4"),
    (doc("GlobalNetworkPolicy", "a.b.c", {}),
     'GlobalNetworkPolicy a.b.c: metadata.name: "a.b.c" is not a valid policy name'),
    (gnp({}, "security.p"),
     'spec.tier: policy name "security.p" has the prefix "security." but no tier is set'),
    (doc("StagedGlobalNetworkPolicy", "s", {"stagedAction": "Delete", "selector": "all()"}),
     "StagedGlobalNetworkPolicy s: spec.selector: with stagedAction Delete, every field but "
     "tier must be empty (selector given)"),
    (doc("StagedGlobalNetworkPolicy", "s", {"stagedAction": "Learn"}),
     "spec.stagedAction: Learn is not supported; use Set or Delete"),
    (doc("Tier", "default", {"defaultAction": "Pass"}),
     "Tier default: spec.defaultAction: the default tier's defaultAction is always Deny"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "ICMP",
                       "destination": {"ports": [80]}}]}),
     "spec.ingress[0].destination.ports: ports are only allowed with protocol TCP, UDP or SCTP"),
    (gnp({"egress": [{"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}}]}),
     "GlobalNetworkPolicy p: spec.egress[0].icmp: is only allowed with protocol ICMP or ICMPv6"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "ICMP", "icmp": {"code": 1}}]}),
     "spec.ingress[0].icmp.code: code needs a type"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "ICMP", "icmp": {"type": 255}}]}),
     "spec.ingress[0].icmp.type: 255 is out of range 0-254"),
    (gnp({"ingress": [{"action": "Allow", "protocol": "ICMP", "ipVersion": 6}]}),
     "spec.ingress[0].ipVersion: protocol ICMP does not go with ipVersion 6"),
    (gnp({"ingress": [{"action": "allow"}]}),
     'spec.ingress[0].action: "allow" is not an action (Allow, Deny, Log or Pass)'),
    (gnp({"ingress": [{"action": "Allow", "protocol": "GRE"}]}),
     'spec.ingress[0].protocol: "GRE" is not a protocol'),
    (gnp({"ingress": [{"action": "Allow", "protocol": 256}]}),
     "spec.ingress[0].protocol: 256 is not a protocol number (1-255)"),
    (gnp({"ingress": [{"action": "Allow", "source": {"nets": ["198.18.0.0/33"]}}]}),
     'spec.ingress[0].source.nets[0]: "198.18.0.0/33" is not a CIDR'),
    (gnp({"ingress": [{"action": "Allow", "ipVersion": 4,
                       "source": {"nets": ["2001:2::/48"]}}]}),
     'spec.ingress[0].source.nets[0]: "2001:2::/48" is IPv6 but ipVersion is 4'),
    (gnp({"ingress": [{"action": "Allow", "source": {"selector": "a =="}}]}),
     'spec.ingress[0].source.selector: "a ==" is not a valid selector: at position 4'),
    (gnp({"ingress": [{"action": "Allow", "destination": {"domains": ["x.com"]}}]}),
     "spec.ingress[0].destination.domains: domains may only be given in an egress rule's "
     "destination"),
    (gnp({"ingress": [{"action": "Allow", "http": {"methods": ["GET"]}}]}),
     "spec.ingress[0].http: unknown field (HTTP match needs an application-layer proxy"),
    (gnp({"ingress": [{"action": "Allow", "sourc": {}}]}),
     "GlobalNetworkPolicy p: spec.ingress[0].sourc: unknown field"),
    (gnp({"selectr": "a == 'b'"}), "GlobalNetworkPolicy p: spec.selectr: unknown field"),
    (gnp({"types": ["Ingress", "Sideways"]}), 'spec.types[1]: "Sideways" is not Ingress or Egress'),
    (gnp({"types": ["Egress"], "ingress": [{"action": "Allow"}]}),
     "spec.types: has ingress rules but does not include Ingress"),
    (gnp({"order": "first"}), 'spec.order: must be a number, not "first"'),
    (gnp({"preDNAT": True, "applyOnForward": True, "egress": [{"action": "Allow"}]}),
     "spec.egress: a preDNAT policy can only have ingress rules"),
    (gnp({"preDNAT": True}), "spec.applyOnForward: preDNAT needs applyOnForward: true"),
    (gnp({"doNotTrack": True}), "spec.applyOnForward: doNotTrack needs applyOnForward: true"),
    (gnp({"namespaceSelector": "all()"}),
     "spec.namespaceSelector: unknown field (namespaces exist only for Kubernetes workloads)"),
    (gnp({"tier": "security"}, "other.p"),
     'spec.tier: policy name "other.p" has the prefix "other." but the tier is "security"'),
    (gnp({"tier": "Bad_Tier"}), 'spec.tier: "Bad_Tier" is not a valid tier name'),
    (doc("StagedGlobalNetworkPolicy", "s", {"stagedAction": "Remove"}),
     'StagedGlobalNetworkPolicy s: spec.stagedAction: "Remove" is not Set or Delete'),
    (doc("GlobalNetworkPolicy", "Web_Policy", {}),
     'GlobalNetworkPolicy Web_Policy: metadata.name: "Web_Policy" is not a valid policy name'),
    (doc("GlobalNetworkPolicy", "p", {}, labels={"bad key!": "x"}),
     'metadata.labels: label key "bad key!" is not valid'),
    (doc("GlobalNetworkPolicy", "p", {}, labels={"app": "-x"}),
     'metadata.labels: label app="-x": value is not valid'),
    (doc("GlobalNetworkPolicy", "p", {}, namespace="prod"),
     "GlobalNetworkPolicy p: metadata.namespace: GlobalNetworkPolicy is not namespaced"),
    (doc("HostEndpoint", "h", {"node": "n"}),
     "HostEndpoint h: spec: a HostEndpoint needs interfaceName or expectedIPs"),
    (doc("HostEndpoint", "h", {"interfaceName": "eth0"}), "HostEndpoint h: spec.node: is required"),
    (doc("HostEndpoint", "h", {"node": "n", "expectedIPs": ["198.18.0.300"]}),
     'HostEndpoint h: spec.expectedIPs[0]: "198.18.0.300" is not an IP address'),
    (doc("HostEndpoint", "h", {"node": "n", "interfaceName": "this-name-is-too-long"}),
     'spec.interfaceName: "this-name-is-too-long" is not an interface name'),
    (doc("HostEndpoint", "h", {"node": "n", "interfaceName": "*",
                               "ports": [{"name": "web", "protocol": "ICMP", "port": 80}]}),
     'HostEndpoint h: spec.ports[0].protocol: "ICMP": named ports need TCP, UDP or SCTP'),
    (doc("HostEndpoint", "h", {"node": "n", "interfaceName": "*",
                               "ports": [{"name": "web", "protocol": "TCP"}]}),
     "HostEndpoint h: spec.ports[0].port: is required"),
    (doc("Tier", "t", {"defaultAction": "Allow"}),
     'Tier t: spec.defaultAction: "Allow" is not Deny or Pass'),
    (doc("Tier", "default", {"order": 5}),
     "Tier default: spec.order: the default tier's order is fixed at 1000000"),
    (doc("Tier", "my.tier", {}), 'Tier my.tier: metadata.name: "my.tier" is not a valid tier'),
    (doc("GlobalNetworkSet", "s", {"nets": ["not-a-net"]}),
     'GlobalNetworkSet s: spec.nets[0]: "not-a-net" is not a CIDR'),
    ({"apiVersion": "projectcalico.org/v2", "kind": "Tier", "metadata": {"name": "t"}},
     'Tier t: apiVersion: "projectcalico.org/v2": expected projectcalico.org/v3'),
    ({"apiVersion": V3, "kind": "NetworkPolicy", "metadata": {"name": "x"}},
     'NetworkPolicy x: kind: "NetworkPolicy" is not a supported kind'),
    ({"apiVersion": V3, "kind": "Tier"}, "Tier <unnamed>: metadata: is required"),
    ({"apiVersion": V3, "kind": "Tier", "metadata": {"name": "t"}, "spce": {}},
     "Tier t: spce: unknown field"),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m[:60] for _, m in BAD])
def test_validation_errors_name_kind_name_and_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_resource(data)
    assert message in str(err.value)


def test_load_text_names_file_and_document() -> None:
    text = yaml.safe_dump_all([gnp({}, "ok"), gnp({"order": "x"}, "bad")])
    with pytest.raises(ValidationError, match=r"^f.yaml: document 2: GlobalNetworkPolicy bad"):
        load_text(text, "f.yaml")


def test_yaml_errors_and_duplicate_keys() -> None:
    with pytest.raises(LoadError, match="not valid YAML"):
        load_text("a: [", "x.yaml")
    with pytest.raises(LoadError, match="duplicate key 'kind'"):
        load_text("kind: Tier\nkind: Tier\n", "x.yaml")
    with pytest.raises(LoadError, match="a List needs `items:`"):
        load_text("kind: List\n")


def test_snapshot_checks_tiers_and_duplicates() -> None:
    with pytest.raises(ValidationError) as err:
        Snapshot.build([parse_resource(gnp({"tier": "security"}, "security.p"))])
    assert str(err.value) == ('GlobalNetworkPolicy security.p: spec.tier: tier "security" '
                              "does not exist")
    with pytest.raises(ValidationError) as err:
        Snapshot.build([parse_resource(gnp({})), parse_resource(gnp({}))])
    assert str(err.value) == "GlobalNetworkPolicy p: metadata.name: is defined twice"
    tier = parse_resource(doc("Tier", "security", {"order": 1}))
    snap = Snapshot.build([tier, parse_resource(gnp({"tier": "security"}, "security.p"))])
    assert [t.name for t in snap.ordered_tiers()] == ["security", "default"]
    assert [r.name for r in snap.resources()] == ["security", "security.p"]


def test_load_paths_reads_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(gnp({}, "a")))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(gnp({}, "b")))
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [r.name for r in load_paths([tmp_path])] == ["a", "b"]
    with pytest.raises(LoadError, match="no such file"):
        load_paths([tmp_path / "missing.yaml"])


def test_host_endpoint_fields() -> None:
    hep = load_text(EVERY_KIND)[3]
    assert isinstance(hep, HostEndpoint)
    assert hep.expected_ips == ("198.18.0.12", "2001:2::12")
    assert hep.ports[0].protocol == "TCP" and hep.ports[0].port == 5432


def test_staged_delete_dumps_only_what_it_deletes() -> None:
    from bulkhead.model import parse_resource as parse

    doc = {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
           "metadata": {"name": "db-in"}, "spec": {"stagedAction": "Delete"}}
    dumped = parse(doc).dump()
    assert dumped["spec"] == {"stagedAction": "Delete", "tier": "default"}
    assert parse(dumped).dump() == dumped  # what the store holds reads back
