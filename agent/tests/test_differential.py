"""Differential test: the verdict real agents enforce with nftables, seen on the wire,
equals the reference evaluator's (`bulkhead.policy`), for random policy sets and flows.

Hypothesis draws policy sets from the whole rule model (tiers with order and
defaultAction Pass, policies with order and types, Allow/Deny/Pass/Log rules, protocols,
ICMP type/code, ports, ranges, named ports, notPorts, nets, notNets, selectors and
notSelectors, network sets, host endpoints with labels, interfaces, named ports and with
or without the default-allow profile) and flows between the hosts of one testbed (TCP,
UDP and ICMP echo, IPv4 and IPv6). Each policy set is enforced by the agents the way the
kernel conformance runner does it (`Testbed.enforce`, then `wire_verdicts`), and every
flow's verdict is compared with `Evaluator.evaluate`. The examples are derandomized, so
every run tries the same policy sets; there is no shrinking (each example costs seconds),
so a failure shows the policy set as drawn, each differing flow, both verdicts, the
evaluator's `explain` and the two hosts' tables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.conformance import wire_flow
from bulkhead.conformance.kernel import RETRY_TIMEOUT, WireFlow, wire_verdicts
from bulkhead.model import API_VERSION, DEFAULT_ALLOW_PROFILE, Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.explain import explain_text
from bulkhead.testbed import Testbed
from tests.labfixture import need_root, unique_lab_name

HOSTS = ("h1", "h2", "h3", "h4")
V4 = {h: f"198.18.0.{10 + i}" for i, h in enumerate(HOSTS)}   # the lab's own addresses
V6 = {h: f"2001:2::{10 + i}" for i, h in enumerate(HOSTS)}
POLICY_SETS = 14          # examples per run
FLOWS = 48                # flows per policy set: 672 per run
MIN_FLOWS = 500

LABELS = {"app": ("web", "db", "cache"), "zone": ("dmz", "lan"), "env": ("prod", "dev")}
PORTS = (80, 443, 5432, 8080)                     # the ports flows go to
RULE_PORTS = (80, 443, 5432, 8080, 22, 9999, "80:443", "400:6000", "5000:9000", "1:1024",
              "8080:65535", "1:65535")
EPHEMERAL = 32768   # source ports the kernel picks start here: rules' source ports stay below
# Named ports: per host, each name is absent or one of these (protocol, port).
NAMED = {"web": (("TCP", 80), ("TCP", 8080)), "pg": (("TCP", 5432),),
         "svc": (("UDP", 443), ("UDP", 80))}
DUAL = "dual"   # a name some hosts give to TCP 443 and UDP 443 both
PORT_NAMES = (*NAMED, DUAL, "nope")
NETS = {4: ("198.18.0.10/32", "198.18.0.12/32", "198.18.0.8/30", "198.18.0.12/31",
            "198.18.0.0/16", "198.18.0.0/15", "10.0.0.0/8"),
        6: ("2001:2::10/128", "2001:2::13/128", "2001:2::10/127", "2001:2::12/127",
            "2001:2::/64", "2001:2::/48", "2001:db8::/32")}
ICMP = {"ICMP": ({"type": 8}, {"type": 8, "code": 0}, {"type": 0}, {"type": 8, "code": 1},
                 {}),
        "ICMPv6": ({"type": 128}, {"type": 128, "code": 0}, {"type": 129}, {})}
ALL_NETS = {4: "0.0.0.0/0", 6: "::/0"}   # nets only: as notNets the model refuses them
PROTOCOLS = (None, None, None, "TCP", "TCP", "UDP", "UDP", "ICMP", "ICMPv6", 6, 17, 1, 58)
PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6"}
TIERS = ("ta", "tb")


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


# ------------------------------------------------------------------------- strategies
def rare(draw: st.DrawFn, n: int) -> bool:
    """True about once in `n` draws. Hypothesis leans to small integers, so the rare
    outcome is the largest one."""
    return bool(draw(st.integers(0, n - 1)) == n - 1)


label_sets = st.fixed_dictionaries({}, optional={
    k: st.sampled_from(v) for k, v in LABELS.items()})


@st.composite
def selectors(draw: st.DrawFn, depth: int = 2) -> str:
    key = draw(st.sampled_from(sorted(LABELS)))
    value = draw(st.sampled_from([*LABELS[key], "x"]))
    values = draw(st.lists(st.sampled_from([*LABELS[key], "x"]), min_size=1, max_size=2,
                           unique=True))
    choices = ["all()", f"{key} == '{value}'", f"{key} != '{value}'", f"has({key})",
               f"!has({key})", f"{key} in {{{', '.join(repr(v) for v in values)}}}",
               f"{key} not in {{{', '.join(repr(v) for v in values)}}}",
               f"{key} starts with '{value[0]}'", f"{key} ends with '{value[-1]}'",
               f"{key} contains '{value[1:3]}'"]
    leaf = draw(st.sampled_from(choices))
    if depth == 0:
        return leaf
    shape = draw(st.sampled_from(["leaf", "leaf", "leaf", "not", "and", "or"]))
    if shape == "leaf":
        return leaf
    if shape == "not":
        return f"!({draw(selectors(depth - 1))})"
    op = "&&" if shape == "and" else "||"
    return f"({leaf}) {op} ({draw(selectors(depth - 1))})"


@st.composite
def sides(draw: st.DrawFn, protocol: str | None, family: int, source: bool
          ) -> dict[str, Any]:
    """A rule's source or destination with none, one or two criteria (more rarely match
    any flow, and a rule that never matches tests little)."""
    if protocol in ("TCP", "UDP"):
        numeric = [p for p in RULE_PORTS
                   if not source or int(str(p).split(":")[-1]) < EPHEMERAL]
        pool: tuple[Any, ...] = (*numeric, *PORT_NAMES)
    elif protocol is None:
        pool = PORT_NAMES         # numeric ports need a protocol that has them
    else:
        pool = ()                 # ICMP: no ports at all
    kinds = ["selector", "nets", "notSelector", "notNets", *(["ports", "notPorts"] * bool(pool))]
    count = draw(st.sampled_from([0, 0, 1, 1, 2]))
    side: dict[str, Any] = {}
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=count, max_size=count,
                              unique=True)):
        if kind in ("nets", "notNets"):
            pool_nets = (*NETS[family], ALL_NETS[family]) if kind == "nets" else NETS[family]
            side[kind] = draw(st.lists(st.sampled_from(pool_nets), min_size=1,
                                       max_size=2, unique=True))
        elif kind in ("selector", "notSelector"):
            side[kind] = draw(selectors(1))
        else:
            side[kind] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3,
                                       unique=True))
    return side


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": draw(st.sampled_from(
        ["Allow", "Allow", "Allow", "Deny", "Deny", "Pass", "Log"]))}
    given = draw(st.sampled_from(PROTOCOLS))   # a name, or its number
    protocol = PROTOCOL_NAMES.get(given, given) if isinstance(given, int) else given
    # Nets of one IP version per rule (the model refuses mixed ones); ICMPv6 goes with 6.
    family = 6 if protocol == "ICMPv6" else 4 if protocol == "ICMP" else \
        draw(st.sampled_from([4, 6]))
    if protocol is not None:
        rule["protocol"] = given
        if protocol in ICMP and draw(st.booleans()):
            rule["icmp"] = draw(st.sampled_from(ICMP[protocol]))
    elif rare(draw, 6):
        # An ICMP protocol of the rule's IP version: ipVersion may be set below.
        rule["notProtocol"] = draw(st.sampled_from(
            ["TCP", "UDP", "ICMP" if family == 4 else "ICMPv6"]))
    if protocol in (None, *ICMP) and rare(draw, 7):
        rule["notICMP"] = draw(st.sampled_from(ICMP[protocol or draw(st.sampled_from(
            sorted(ICMP)))]))
    if rare(draw, 7):
        rule["ipVersion"] = family
    for name in ("source", "destination"):
        side = draw(sides(protocol, family, name == "source"))
        if side:
            rule[name] = side
    return rule


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    tiers = ["default"]
    for name in TIERS[:draw(st.integers(0, len(TIERS)))]:
        spec: dict[str, Any] = {"defaultAction": draw(st.sampled_from(["Deny", "Pass"]))}
        order = draw(st.sampled_from([None, 10, 100, 2_000_000]))
        if order is not None:
            spec["order"] = order
        docs.append(doc("Tier", name, spec))
        tiers.append(name)
    for i in range(draw(st.integers(1, 4))):
        # At least one rule: a policy with none is a deny-all, which the simplest draws
        # (Hypothesis starts with them) would make of every policy.
        ingress = draw(st.lists(rules(), min_size=1, max_size=4))
        egress = draw(st.lists(rules(), max_size=4))
        spec = {"tier": draw(st.sampled_from(tiers)),
                "selector": "" if rare(draw, 6) else draw(selectors(1))}
        order = draw(st.sampled_from([None, 1, 5, 2.5, 5]))
        if order is not None:
            spec["order"] = order
        if ingress:
            spec["ingress"] = ingress
        if egress:
            spec["egress"] = egress
        if rare(draw, 3):  # explicit types: what the rules need, and maybe more
            types = {t for t, given_ in (("Ingress", ingress), ("Egress", egress)) if given_}
            if rare(draw, 2):
                types.add(draw(st.sampled_from(["Ingress", "Egress"])))
            spec["types"] = sorted(types) or ["Ingress"]
        docs.append(doc("GlobalNetworkPolicy", f"p{i}", spec))
        if rare(draw, 4):  # staged: computed by the agent, never enforced
            staged: dict[str, Any] = {"stagedAction": "Delete", "tier": spec["tier"]}
            if rare(draw, 2):
                staged = {"tier": spec["tier"], "selector": "all()",
                          "types": ["Ingress", "Egress"]}   # would deny everything
            docs.append(doc("StagedGlobalNetworkPolicy", f"p{i}", staged))
    profiles: list[list[str]] = [[DEFAULT_ALLOW_PROFILE], [DEFAULT_ALLOW_PROFILE], []]
    if rare(draw, 3):  # a profile of our own: rules and labels for its endpoints
        profile: dict[str, Any] = {"labelsToApply": draw(label_sets)}
        for direction in ("ingress", "egress"):
            if given_rules := draw(st.lists(rules(), max_size=2)):
                profile[direction] = given_rules
        docs.append(doc("Profile", "prof", profile))
        profiles += [["prof"], ["prof", DEFAULT_ALLOW_PROFILE], [DEFAULT_ALLOW_PROFILE, "prof"]]
    for i in range(draw(st.integers(0, 2))):
        family = draw(st.sampled_from([4, 6]))
        nets = draw(st.lists(st.sampled_from(NETS[family]), min_size=1, max_size=2,
                             unique=True))
        docs.append(doc("GlobalNetworkSet", f"ns{i}", {"nets": nets}, draw(label_sets)))
    for host in HOSTS:
        if rare(draw, 10):
            continue  # no host endpoint: nothing applies to this host
        spec = {"node": host, "expectedIPs": [V4[host], V6[host]]}
        iface = draw(st.sampled_from(["*", "eth0", None]))  # None: found by expectedIPs
        if iface is not None:
            spec["interfaceName"] = iface
        chosen = draw(st.sampled_from(profiles))
        if chosen:
            spec["profiles"] = chosen
        ports = [{"name": name, "protocol": proto, "port": port}
                 for name, options in NAMED.items()
                 for proto, port in [draw(st.sampled_from([("", 0), *options]))] if proto]
        if rare(draw, 3):
            ports += [{"name": DUAL, "protocol": proto, "port": 443} for proto in ("TCP", "UDP")]
        if ports:
            spec["ports"] = ports
        docs.append(doc("HostEndpoint", host, spec, draw(label_sets)))
    return docs


def all_flows() -> list[WireFlow]:
    out = []
    for src in HOSTS:
        for dst in HOSTS:
            if src == dst:
                continue
            for addr in (V4, V6):
                out.append(WireFlow(src, addr[src], dst, addr[dst], "ICMP", None))
                out += [WireFlow(src, addr[src], dst, addr[dst], proto, port)
                        for proto in ("TCP", "UDP") for port in PORTS]
    return out


ALL_FLOWS = all_flows()
flow_samples = st.lists(st.sampled_from(ALL_FLOWS), min_size=FLOWS, max_size=FLOWS,
                        unique=True)


def model_flow(f: WireFlow) -> Flow:
    """The flow as the evaluator sees it (an ICMP probe is an echo request, code 0; the
    source port is the kernel's ephemeral choice, never in a rule's source ports)."""
    return wire_flow(f.src_ip, f.dst_ip, f.proto, f.port)


def word(allowed: bool) -> str:
    return "allowed" if allowed else "denied"


# ---------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    need_root()
    with Testbed(unique_lab_name(), list(HOSTS), failsafe_defaults=False) as testbed:
        yield testbed


def test_generated_policy_sets_are_valid() -> None:
    """The strategies draw only what the model accepts (no kernel: runs everywhere)."""
    @settings(max_examples=20, deadline=None, derandomize=True, database=None)
    @given(policy_sets())
    def check(docs: list[dict[str, Any]]) -> None:
        Snapshot.build(parse_resource(d) for d in docs)

    check()


def test_wire_verdicts_equal_the_evaluator(bed: Testbed) -> None:
    verdicts: list[bool] = []
    decided: Counter[str] = Counter()

    @settings(max_examples=POLICY_SETS, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])
    @given(policy_sets(), flow_samples)
    def check(docs: list[dict[str, Any]], flows: list[WireFlow]) -> None:
        snapshot = Snapshot.build(parse_resource(d) for d in docs)
        evaluator = Evaluator(snapshot, Failsafes.off())
        answers = [evaluator.evaluate(model_flow(f), trace=False) for f in flows]
        model = [v.allowed for v in answers]
        decided.update(f"{d.direction.lower()} {d.decided_by} {d.action}"
                       for v in answers for d in (v.egress, v.ingress))
        bed.enforce(docs, f"diff-{len(verdicts)}")
        wire = wire_verdicts(bed, flows)
        differ = [i for i, (w, m) in enumerate(zip(wire, model, strict=True)) if w != m]
        if differ:  # a slow probe on a loaded machine is not a verdict: ask again, slowly
            again = wire_verdicts(bed, [flows[i] for i in differ], timeout=RETRY_TIMEOUT)
            for i, w in zip(differ, again, strict=True):
                wire[i] = w
            differ = [i for i in differ if wire[i] != model[i]]
        verdicts.extend(model)
        if differ:
            pytest.fail(mismatch_report(bed, docs, evaluator, flows, wire, differ))

    check()
    allowed, rules_decided = sum(verdicts), sum(n for k, n in decided.items() if " rule " in k)
    summary = (f"{len(verdicts)} flows, {allowed} allowed; direction verdicts by "
               f"{dict(sorted(decided.items()))}")
    print(summary)
    assert len(verdicts) >= MIN_FLOWS
    # Not a vacuous run: some flows get through and some do not, and rules decide many.
    assert 0.1 * len(verdicts) < allowed < 0.9 * len(verdicts), summary
    assert rules_decided > 0.1 * 2 * len(verdicts), summary


def mismatch_report(bed: Testbed, docs: list[dict[str, Any]], evaluator: Evaluator,
                    flows: list[WireFlow], wire: list[bool], differ: list[int]) -> str:
    out = [f"{len(differ)} of {len(flows)} flows differ between the wire and the evaluator",
           "policy set:", yaml.safe_dump_all(docs, sort_keys=False)]
    hosts: set[str] = set()
    for i in differ:
        f = flows[i]
        verdict = evaluator.evaluate(model_flow(f))
        out += [f"--- {f.src} -> {f.dst}: {f.proto} {f.src_ip} -> {f.dst_ip}"
                f"{'' if f.port is None else f' port {f.port}'}",
                f"wire: {word(wire[i])}, evaluator: {word(verdict.allowed)}",
                explain_text(evaluator, verdict)]
        hosts |= {f.src, f.dst}
    for host in sorted(hosts):
        out += [f"--- nft list table inet bulkhead in {host}:", bed.table(host) or "(none)"]
    return "\n".join(out)
