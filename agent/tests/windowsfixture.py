"""What the Windows dataplane tests share: random snapshots (the differential test's
policy sets, with observe-mode endpoints, failsafes with peer nets and, rarely, what the
Windows backends refuse) and random packets at one host endpoint, each with the
reference evaluator's verdict for that endpoint and direction."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from hypothesis import strategies as st

from bulkhead.model import EGRESS, ENFORCEMENT_LABEL, INGRESS, OBSERVE, Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.failsafe import FailsafePort
from bulkhead.policy.plan import EndpointPlan, NodePlan, calculate
from tests.test_differential import HOSTS, V4, V6, doc, policy_sets, rare, rules, selectors

# Peers: the other hosts, and addresses no host has (in and out of the rules' nets).
OUTSIDE = {4: ("198.19.5.5", "10.1.2.3", "198.18.0.9", "198.18.0.14"),
           6: ("2001:2:0:1::5", "2001:db8::1", "2001:2::f", "2001:2::14")}
PORTS = (80, 443, 5432, 8080, 22, 9999, 1, 1024, 6000, 65535, 50000, 0)
PROTOCOLS = (6, 6, 17, 17, 1, 58, 132, 136, 47)
ICMP_TYPES = (8, 0, 128, 129, 3)
FAILSAFES = ("tcp:22", "udp:68", "tcp:80", "udp:53", "tcp:198.18.0.10/32:443",
             "tcp:198.18.0.8/30:5432", "udp:2001:2::/64:443", "tcp:10.0.0.0/8:8080")


@dataclass(frozen=True)
class World:
    docs: list[dict[str, Any]]
    snapshot: Snapshot
    failsafes: Failsafes
    evaluator: Evaluator

    def plan(self, host: str) -> NodePlan:
        return calculate(self.snapshot, host, {"eth0": [V4[host], V6[host]]}, self.failsafes)


@st.composite
def refused_extras(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rarely, what the Windows backends refuse: an untracked or pre-DNAT policy, a rule
    with domains, an egress Allow rule selecting a network set with allowedEgressDomains."""
    out: list[dict[str, Any]] = []
    if rare(draw, 8):
        kind = draw(st.sampled_from(["doNotTrack", "preDNAT"]))
        spec: dict[str, Any] = {"selector": draw(selectors(1)), kind: True,
                                "applyOnForward": True,
                                "ingress": draw(st.lists(rules(), max_size=2))}
        if kind == "doNotTrack" and draw(st.booleans()):
            spec["egress"] = draw(st.lists(rules(), min_size=1, max_size=2))
        if not spec["ingress"]:
            del spec["ingress"]
            spec["types"] = ["Ingress"]
        out.append(doc("GlobalNetworkPolicy", "early", spec))
    if rare(draw, 8):
        out.append(doc("GlobalNetworkPolicy", "names", {
            "selector": draw(selectors(1)), "order": 0.5, "types": ["Egress"],
            "egress": [{"action": "Allow", "destination": {"domains": ["example.com"]}}]}))
    if rare(draw, 8):
        out.append(doc("GlobalNetworkSet", "by-name", {
            "allowedEgressDomains": ["*.example.org"]}, {"dns": "yes"}))
        out.append(doc("GlobalNetworkPolicy", "by-name", {
            "selector": draw(selectors(1)), "order": 0.5, "types": ["Egress"],
            "egress": [{"action": "Allow", "destination": {"selector": "dns == 'yes'"}}]}))
    return out


@st.composite
def worlds(draw: st.DrawFn, refusals: bool = True) -> World:
    docs = draw(policy_sets())
    if draw(st.booleans()):
        # More Pass: a policy early in some tier whose first rules pass (a Pass rule's
        # boxes get a copy of what follows its tier).
        tiers = ["default", *(d["metadata"]["name"] for d in docs if d["kind"] == "Tier")]
        passing = [{**r, "action": "Pass"} for r in draw(st.lists(rules(), min_size=1,
                                                                   max_size=2))]
        docs.append(doc("GlobalNetworkPolicy", "passer", {
            "tier": draw(st.sampled_from(tiers)), "order": 0, "selector": draw(selectors(1)),
            "types": ["Ingress", "Egress"], "ingress": passing,
            "egress": [{**r, "action": "Pass"} for r in draw(st.lists(rules(), max_size=2))]}))
    for d in docs:
        if d["kind"] == "HostEndpoint" and rare(draw, 5):
            d["metadata"].setdefault("labels", {})[ENFORCEMENT_LABEL] = OBSERVE
    if refusals:
        docs += draw(refused_extras())
    choice = draw(st.sampled_from(["off", "default", "some"]))
    if choice == "off":
        failsafes = Failsafes.off()
    elif choice == "default":
        failsafes = Failsafes()
    else:
        inbound = draw(st.lists(st.sampled_from(FAILSAFES), max_size=3, unique=True))
        outbound = draw(st.lists(st.sampled_from(FAILSAFES), max_size=3, unique=True))
        failsafes = Failsafes(tuple(FailsafePort.parse(s) for s in inbound),
                              tuple(FailsafePort.parse(s) for s in outbound))
    snapshot = Snapshot.build(parse_resource(d) for d in docs)
    return World(docs, snapshot, failsafes, Evaluator(snapshot, failsafes))


@dataclass(frozen=True)
class Packet:
    """One packet at an endpoint, from the endpoint's side (as `first_match` takes it)."""

    family: int
    protocol: int
    local: int
    remote: int
    local_port: int | None
    remote_port: int | None
    icmp: int | None

    def args(self) -> tuple[int, int, int, int | None, int | None, int | None]:
        return (self.protocol, self.local, self.remote, self.local_port, self.remote_port,
                self.icmp)

    def flow(self, direction: str) -> Flow:
        """The flow the evaluator sees: from the remote address on ingress."""
        make = ipaddress.IPv4Address if self.family == 4 else ipaddress.IPv6Address
        local, remote = make(self.local), make(self.remote)
        src, dst = (remote, local) if direction == INGRESS else (local, remote)
        src_port, dst_port = (self.remote_port, self.local_port) if direction == INGRESS \
            else (self.local_port, self.remote_port)
        icmp_type = None if self.icmp is None else self.icmp >> 8
        icmp_code = None if self.icmp is None else self.icmp & 0xFF
        return Flow(src, dst, self.protocol, dst_port, src_port, icmp_type, icmp_code)


@st.composite
def packets(draw: st.DrawFn, host: str) -> Packet:
    """A packet at `host`'s endpoint: TCP, UDP, SCTP and UDP-Lite with both ports, ICMP
    and ICMPv6 with a type and code, another protocol with neither."""
    family = draw(st.sampled_from([4, 6]))
    own = V4 if family == 4 else V6
    peers = [own[h] for h in HOSTS if h != host] + list(OUTSIDE[family])
    remote = draw(st.sampled_from(peers))
    protocol = draw(st.sampled_from(PROTOCOLS))
    local_port = remote_port = icmp = None
    if protocol in (6, 17, 132, 136):
        local_port, remote_port = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    elif protocol in (1, 58):
        icmp = draw(st.sampled_from(ICMP_TYPES)) * 256 + draw(st.sampled_from([0, 0, 1]))
    return Packet(family, protocol, int(ipaddress.ip_address(own[host])),
                  int(ipaddress.ip_address(remote)), local_port, remote_port, icmp)


def endpoint(plan: NodePlan, host: str) -> EndpointPlan | None:
    found = [ep for ep in plan.endpoints if ep.name == host]
    return found[0] if found else None


DIRECTIONS = (INGRESS, EGRESS)


class Backend(Protocol):
    def allows(self, direction: str, family: int, protocol: int, local: int, remote: int,
               local_port: int | None, remote_port: int | None, icmp: int | None,
               interface: str | None = None) -> bool: ...


PACKETS = 16


def check_backend(world: World, data: st.DataObject, host: str, fake: Backend,
                  seen: Counter[str], count: int = PACKETS) -> None:
    """Random packets at `host`'s endpoint, both directions: the backend's fake, fed
    with the rules compiled for the endpoint, decides as the reference evaluator
    (`allowed`: what happens on the wire). Counts the verdicts in `seen`."""
    for direction in DIRECTIONS:
        for packet in data.draw(st.lists(packets(host), min_size=count, max_size=count)):
            verdict = world.evaluator.evaluate(packet.flow(direction), trace=False)
            dv = verdict.ingress if direction == INGRESS else verdict.egress
            got = fake.allows(direction, packet.family, *packet.args())
            assert got == dv.allowed, (packet, direction, dv)
            seen["allowed" if got else "denied"] += 1
