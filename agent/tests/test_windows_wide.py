"""A wider differential test of the Windows dataplanes: the node's Windows Firewall rules
(`win_enforcer.compile_plan`, interface aliases and all) and each host endpoint's HNS
ACLs, decided by their fakes, against the reference evaluator, for policy sets the
hypothesis generators draw rarely or never: several tiers with order ties and
defaultAction Pass, Pass in policies and profiles, staged policies, selector and
notSelector with notNets and notPorts on one side, named ports several endpoints give
differently, port ranges touching 1 and 65535, ICMP type and code with notICMP, accepted
applyOnForward, preDNAT and doNotTrack policies, network sets overlapping endpoint
addresses, endpoints with several expectedIPs and two endpoints on one node, the
enforcement label on endpoints and profiles, and the agent's default mode. Plain seeded
`random`, bounded (WORLDS worlds, PACKETS packets per endpoint address and direction);
a refusal is counted, never compared."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from typing import Any

from bulkhead.agent.win_enforcer import compile_plan
from bulkhead.dataplane.windows import fake_firewall, fake_hns, hns
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.model import API_VERSION, EGRESS, INGRESS, Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.failsafe import FailsafePort
from bulkhead.policy.plan import calculate

WORLDS = 120
PACKETS = 6


NODES = ("n1", "n2", "n3")


def v4(i: int, k: int) -> str:
    return f"198.18.{i}.{10 + k}"


def v6(i: int, k: int) -> str:
    return f"2001:2::{i}:{10 + k}"


OUTSIDE = {4: ["198.19.5.5", "10.1.2.3", "198.18.9.1", "0.0.0.0", "255.255.255.255",
               "198.18.1.9", "198.18.1.12", "198.18.2.255", "198.18.3.0", "198.17.255.255",
               "198.20.0.0", "10.255.255.255", "11.0.0.0", "127.255.255.255", "128.0.0.0"],
           6: ["2001:2:0:1::5", "2001:db8::1", "::", "ffff::1", "2001:2::1:f",
               "2001:2::1:12", "2001:2::2:ffff", "2001:2::3:0",
               "2001:1:ffff:ffff:ffff:ffff:ffff:ffff",
               "2001:3::", "7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "8000::"]}
LABELS = {"app": ("web", "db"), "zone": ("dmz", "lan"), "env": ("prod", "dev")}
NAMES = ("web", "pg", "svc", "dual", "nope")
PORT_VALUES = [0, 1, 22, 53, 80, 443, 1024, 5432, 8080, 9999, 50000, 65534, 65535]
RULE_PORTS = [1, 80, 443, 5432, 8080, 65535, "1:1", "1:80", "1:1024", "80:443",
              "8080:65535", "65535:65535", "65534:65535", "1:65535", "2:65534"]
NETS = {4: ["198.18.1.10/32", "198.18.1.10/31", "198.18.2.0/24", "198.18.0.0/16",
            "0.0.0.0/0", "10.0.0.0/8", "198.18.3.11/32", "198.18.0.0/15"],
        6: ["2001:2::1:10/128", "2001:2::1:10/127", "2001:2::2:0/112", "2001:2::/48",
            "::/0", "2001:db8::/32", "2001:2::3:11/128"]}
PROTOS = [None, None, None, "TCP", "TCP", "TCP", "UDP", "UDP", "ICMP", "ICMPv6", "UDPLite", 47,
          6, 17, 1, 58]
ICMPS = {4: [{"type": 8}, {"type": 8, "code": 0}, {"type": 3, "code": 1}, {"type": 0},
             {"type": 254}, {"type": 8, "code": 255}],
         6: [{"type": 128}, {"type": 128, "code": 0}, {"type": 1, "code": 3}, {"type": 135}]}


def doc(kind: str, name: str, spec: dict, labels: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


class Gen:
    def __init__(self, rnd: random.Random) -> None:
        self.r = rnd

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def labels(self) -> dict:
        return {k: self.r.choice(v) for k, v in LABELS.items() if self.chance(0.6)}

    def selector(self, depth: int = 1) -> str:
        r = self.r
        k = r.choice(sorted(LABELS))
        v = r.choice([*LABELS[k], "x"])
        leaf = r.choice([f"{k} == '{v}'", f"{k} != '{v}'", f"has({k})", f"!has({k})",
                         "all()", f"{k} in {{'{v}', 'x'}}", f"{k} not in {{'{v}'}}"])
        if depth and self.chance(0.3):
            op = r.choice(["&&", "||"])
            return f"({leaf}) {op} ({self.selector(depth - 1)})"
        return leaf

    def side(self, protocol: Any, family: int, ported: bool) -> dict:
        r = self.r
        s: dict[str, Any] = {}
        kinds = ["nets", "notNets", "selector", "notSelector"]
        if ported:
            kinds += ["ports", "notPorts", "ports", "notPorts"]
        elif protocol is None:
            kinds += ["namedPorts", "notNamedPorts"]
        n = r.choice([0, 1, 1, 2, 3, 4])
        for kind in r.sample(kinds, min(n, len(kinds))):
            if kind in ("nets", "notNets"):
                pool = [x for x in NETS[family] if kind == "nets" or not x.endswith("/0")]
                s[kind] = r.sample(pool, r.choice([1, 1, 2]))
            elif kind in ("selector", "notSelector"):
                s[kind] = self.selector()
            elif kind in ("namedPorts", "notNamedPorts"):
                key = "ports" if kind == "namedPorts" else "notPorts"
                s[key] = r.sample(NAMES, r.choice([1, 2]))
            else:
                pool = RULE_PORTS + list(NAMES)
                if kind in s:
                    continue
                s[kind] = r.sample(pool, r.choice([1, 2, 3]))
        return s

    def rule(self) -> dict:
        r = self.r
        rule: dict[str, Any] = {"action": r.choice(["Allow", "Allow", "Deny", "Deny", "Pass",
                                                    "Pass", "Log"])}
        proto = r.choice(PROTOS)
        name = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6", 132: "SCTP"}.get(proto, proto) \
            if isinstance(proto, int) else proto
        family = 6 if name == "ICMPv6" else 4 if name == "ICMP" else r.choice([4, 6])
        if proto is not None:
            rule["protocol"] = proto
        elif self.chance(0.25):
            rule["notProtocol"] = r.choice(["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", 47])
        if name in ("ICMP", "ICMPv6") or proto is None:
            fam_icmp = ICMPS[6 if name == "ICMPv6" else 4 if name == "ICMP" else family]
            if name in ("ICMP", "ICMPv6") and self.chance(0.4):
                rule["icmp"] = r.choice(fam_icmp)
            if self.chance(0.3):
                rule["notICMP"] = r.choice(fam_icmp)
        if self.chance(0.2):
            rule["ipVersion"] = family
        ported = name in ("TCP", "UDP", "SCTP")
        for side in ("source", "destination"):
            s = self.side(proto, family, ported)
            if s:
                rule[side] = s
        return rule

    def world(self) -> tuple[list[dict], Failsafes, str]:
        r = self.r
        docs: list[dict] = []
        tiers = ["default"]
        for t in range(r.choice([0, 1, 2, 3])):
            spec: dict[str, Any] = {"defaultAction": r.choice(["Deny", "Pass", "Pass"])}
            if self.chance(0.8):
                spec["order"] = r.choice([1, 10, 10, 100])   # ties broken by name
            name = ["tz", "ta", "tm"][t]
            docs.append(doc("Tier", name, spec))
            tiers.append(name)
        for i in range(r.randint(1, 6)):
            spec = {"tier": r.choice(tiers), "selector": r.choice(["", self.selector()])}
            if self.chance(0.7):
                spec["order"] = r.choice([1, 1, 2.5, 5])
            ing = [self.rule() for _ in range(r.randint(0, 4))]
            eg = [self.rule() for _ in range(r.randint(0, 4))]
            if ing:
                spec["ingress"] = ing
            if eg:
                spec["egress"] = eg
            if self.chance(0.3):
                spec["types"] = r.choice([["Ingress"], ["Egress"], ["Ingress", "Egress"]])
            if self.chance(0.15):
                spec["applyOnForward"] = True
            if self.chance(0.05):
                spec["applyOnForward"] = True
                spec["doNotTrack"] = True
            elif self.chance(0.05):
                spec["applyOnForward"] = True
                spec["preDNAT"] = True
                spec.pop("egress", None)
                spec["types"] = ["Ingress"]
            pname = r.choice(["pa", "pb", "pc", "pd", "pe", "pf"]) + str(i)
            if spec["tier"] != "default":
                pname = f"{spec['tier']}.{pname}"
            docs.append(doc("GlobalNetworkPolicy", pname, spec))
            if self.chance(0.2):
                if self.chance(0.5):
                    staged = {"stagedAction": "Delete", "tier": spec["tier"]}
                else:
                    staged = {"tier": spec["tier"], "selector": self.selector(),
                              "ingress": [self.rule()], "egress": [self.rule()]}
                docs.append(doc("StagedGlobalNetworkPolicy", pname, staged))
        if self.chance(0.1):
            docs.append(doc("StagedGlobalNetworkPolicy", "onlystaged", {
                "tier": r.choice(tiers), "selector": "all()",
                "ingress": [{"action": "Deny"}], "egress": [{"action": "Deny"}]}))
        profiles = [[], ["projectcalico-default-allow"]]
        if self.chance(0.5):
            prof: dict[str, Any] = {"labelsToApply": self.labels()}
            if self.chance(0.2):
                prof["labelsToApply"]["microseg.bulkhead.io/enforcement"] = r.choice(
                    ["observe", "enforce"])
            for d in ("ingress", "egress"):
                rs = [self.rule() for _ in range(r.randint(0, 3))]
                if rs:
                    prof[d] = rs
            docs.append(doc("Profile", "prof", prof))
            profiles += [["prof"], ["prof", "projectcalico-default-allow"],
                         ["projectcalico-default-allow", "prof"]]
        for k in range(r.randint(0, 3)):
            fam = r.choice([4, 6])
            docs.append(doc("GlobalNetworkSet", f"ns{k}", {
                "nets": r.sample(NETS[fam], r.choice([1, 2]))}, self.labels()))
        for i, node in enumerate(NODES, start=1):
            if self.chance(0.1):
                continue
            two = self.chance(0.3)
            for part, ks in (("a", (0, 1)), ("b", (2, 3)))[: 2 if two else 1]:
                ips = []
                for k in ks:
                    if self.chance(0.8) or not ips:
                        ips.append(v4(i, k))
                    if self.chance(0.8):
                        ips.append(v6(i, k))
                spec = {"node": node, "expectedIPs": ips}
                iface = r.choice([None, None, "*", "eth0" if part == "a" else "eth1"])
                if iface:
                    spec["interfaceName"] = iface
                p = r.choice(profiles)
                if p:
                    spec["profiles"] = p
                ports = []
                for nm, opts in (("web", [("TCP", 80), ("TCP", 8080), ("UDP", 80)]),
                                 ("pg", [("TCP", 5432), ("TCP", 1), ("TCP", 65535)]),
                                 ("svc", [("UDP", 443), ("UDP", 9999), ("UDP", 53)])):
                    if self.chance(0.5):
                        pr, po = r.choice(opts)
                        ports.append({"name": nm, "protocol": pr, "port": po})
                if self.chance(0.3):
                    ports += [{"name": "dual", "protocol": pr, "port": 443}
                              for pr in ("TCP", "UDP")]
                if ports:
                    spec["ports"] = ports
                labels = self.labels()
                if self.chance(0.15):
                    labels["microseg.bulkhead.io/enforcement"] = r.choice(["observe",
                                                                           "enforce"])
                docs.append(doc("HostEndpoint", f"h{i}{part}", spec, labels))
        fs_pool = ["tcp:22", "udp:68", "tcp:0", "tcp:65535", "udp:53",
                   "tcp:198.18.2.0/24:443", "udp:2001:2::/48:443", "tcp:10.0.0.0/8:80"]
        choice = r.choice(["off", "default", "some"])
        if choice == "off":
            fs = Failsafes.off()
        elif choice == "default":
            fs = Failsafes()
        else:
            fs = Failsafes(tuple(FailsafePort.parse(s) for s in r.sample(fs_pool, 2)),
                           tuple(FailsafePort.parse(s) for s in r.sample(fs_pool, 2)))
        return docs, fs, r.choice(["enforce", "enforce", "observe"])


INTERFACES = {"eth0": (0, 1), "eth1": (2, 3)}


def interfaces_of(i: int) -> dict[str, list[str]]:
    return {name: [f(i, k) for k in ks for f in (v4, v6)] for name, ks in INTERFACES.items()}


def packets(r: random.Random, local: str, peers: list[str], n: int
            ) -> list[tuple[int, tuple[int, int, int, int | None, int | None, int | None]]]:
    """`n` packets at `local` (family, then `first_match`'s arguments)."""
    family = ipaddress.ip_address(local).version
    pool = [p for p in peers if ipaddress.ip_address(p).version == family]
    out = []
    for _ in range(n):
        protocol = r.choice([6, 6, 17, 17, 1, 58, 132, 136, 47, 0])
        local_port = remote_port = icmp = None
        if protocol in (6, 17, 132, 136):
            local_port, remote_port = r.choice(PORT_VALUES), r.choice(PORT_VALUES)
        elif protocol in (1, 58):
            kind = r.choice([8, 0, 3, 128, 129, 1, 255, 135])
            if family == 6 and protocol == 58 and 133 <= kind <= 136:
                kind = 128   # neighbour discovery: allowed first, the evaluator skips it
            icmp = kind * 256 + r.choice([0, 0, 1, 3, 255])
        out.append((family, (protocol, int(ipaddress.ip_address(local)),
                             int(ipaddress.ip_address(r.choice(pool))), local_port,
                             remote_port, icmp)))
    return out


def flow_of(family: int, args: tuple[int, int, int, int | None, int | None, int | None],
            direction: str) -> Flow:
    protocol, local, remote, local_port, remote_port, icmp = args
    make = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    here, there = make(local), make(remote)
    src, dst = (there, here) if direction == INGRESS else (here, there)
    sport, dport = (remote_port, local_port) if direction == INGRESS else (local_port,
                                                                           remote_port)
    return Flow(src, dst, protocol, dport, sport, None if icmp is None else icmp >> 8,
                None if icmp is None else icmp & 0xFF)


def check_world(seed: int, seen: Counter[str]) -> list[str]:
    """The disagreements in one world (empty when the fakes decide as the evaluator)."""
    r = random.Random(seed)
    docs, failsafes, mode = Gen(r).world()
    try:
        snapshot = Snapshot.build(parse_resource(d) for d in docs)
    except ValueError:
        seen["invalid"] += 1
        return []
    evaluator = Evaluator(snapshot, failsafes, default_mode=mode)
    everyone = {ip for h in snapshot.host_endpoints.values() for ip in h.expected_ips}
    everyone |= {f(i, k) for i in (1, 2, 3) for k in range(4) for f in (v4, v6)}
    wrong: list[str] = []
    for i, node in enumerate(NODES, start=1):
        plan = calculate(snapshot, node, interfaces_of(i), failsafes, default_mode=mode)
        firewall: fake_firewall.FakeFirewall | None = None
        try:
            firewall = fake_firewall.FakeFirewall(compile_plan(plan))
        except Unsupported as e:
            seen[f"firewall refused: {e.field}"] += 1
        acls: dict[str, fake_hns.FakeHns] = {}
        for ep in plan.endpoints:
            try:
                acls[ep.name] = fake_hns.FakeHns([
                    rule for d in (INGRESS, EGRESS)
                    for rule in hns.compile(flatten(plan, ep, d, neighbour_discovery=False),
                                            d, ep.name)])
            except Unsupported as e:
                seen[f"hns refused: {e.field}"] += 1
        planned = {ep.name for ep in plan.endpoints}
        peers = [p for p in everyone if not p.startswith((f"198.18.{i}.", f"2001:2::{i}:"))]
        peers += OUTSIDE[4] + OUTSIDE[6]
        for hep in sorted(snapshot.host_endpoints.values(), key=lambda h: h.name):
            if hep.node != node or hep.name not in planned:
                continue
            for local in hep.expected_ips:
                owners = evaluator.endpoints_at(ipaddress.ip_address(local))
                if owners[0].name != hep.name:
                    continue   # two endpoints at one address: a documented limit
                interface = next(n for n, a in interfaces_of(i).items() if local in a)
                for family, args in packets(r, local, sorted(peers), PACKETS):
                    for direction in (INGRESS, EGRESS):
                        verdict = evaluator.evaluate(flow_of(family, args, direction),
                                                     trace=False)
                        want = (verdict.ingress if direction == INGRESS
                                else verdict.egress).allowed
                        seen["allowed" if want else "denied"] += 1
                        for name, fake, where in (("firewall", firewall, interface),
                                                  ("hns", acls.get(hep.name), None)):
                            if fake is None:
                                continue
                            seen[f"{name} checked"] += 1
                            if fake.allows(direction, family, *args, interface=where) != want:
                                wrong.append(f"seed {seed} {name} {hep.name} {direction} "
                                             f"{args}: evaluator {want}")
    return wrong


def test_windows_fakes_decide_as_the_evaluator_on_wider_worlds() -> None:
    seen: Counter[str] = Counter()
    wrong = [w for seed in range(WORLDS) for w in check_world(seed, seen)]
    print(dict(seen))
    assert not wrong, "\n".join(wrong[:20])
    # Not vacuous: both fakes decide many packets, both ways.
    assert seen["firewall checked"] > 3000 and seen["hns checked"] > 3000, seen
    assert seen["allowed"] > 1000 and seen["denied"] > 1000, seen
