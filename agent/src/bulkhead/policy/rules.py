"""One rule compiled to a list of criteria, each a fast test plus words for the trace."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bulkhead.model import (
    EGRESS,
    INGRESS,
    EndpointPort,
    EntityRule,
    HostEndpoint,
    ICMPMatch,
    NamedPort,
    Rule,
)
from bulkhead.model.checks import protocol_number
from bulkhead.policy.flow import Flow, protocol_name
from bulkhead.policy.semantics import (
    icmp_criterion,
    icmp_protocol,
    rule_ip_version,
    side_selectors,
)
from bulkhead.selector import Selector


@dataclass
class Peer:
    """What stands at one address of a flow: host endpoints and network sets."""

    endpoints: Sequence[HostEndpoint]
    labels: Sequence[Mapping[str, str]]  # of those endpoints (in order), then network sets
    names: Sequence[str]                 # for the trace: "hep web", "set corp-nets"
    # Network sets that hold the address only through allowedEgressDomains (a name the
    # flow's destination was resolved from): they count only for the destination selector
    # of an egress Allow rule, as in Calico Enterprise.
    domain_labels: Sequence[Mapping[str, str]] = ()
    domain_names: Sequence[str] = ()


@dataclass
class Context:
    flow: Flow
    src: Peer
    dst: Peer


Test = Callable[[Context], bool]
Explain = Callable[[Context], str]


@dataclass(frozen=True)
class Criterion:
    test: Test
    explain: Explain  # says what was checked; called only when tracing


def _nets(cidrs: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def _in_nets(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
             nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in nets)


def _selected(selector: Selector, peer: Peer) -> bool:
    return any(selector.matches(labels) for labels in peer.labels)


def _selected_with_domains(selector: Selector, peer: Peer) -> bool:
    return _selected(selector, peer) or any(selector.matches(labels)
                                            for labels in peer.domain_labels)


def _peer_words(peer: Peer, domains: bool = False) -> str:
    names = [*peer.names, *(f"{n} (by name)" for n in peer.domain_names)] if domains \
        else list(peer.names)
    return ", ".join(names) if names else "no endpoint or network set"


def _port_matches(ports: Sequence[object], port: int | None, protocol: int, peer: Peer,
                  selector: Selector | None) -> bool:
    """A named port counts only on an endpoint at the address that the side's (positive)
    selector matches: felix's named-port IP sets hold the endpoints the selector matches
    that have the port (network sets have none). Peer labels list the endpoints first."""
    if port is None:
        return False
    for p in ports:
        if isinstance(p, NamedPort):
            if any(_named(ep.ports, p.name, protocol, port)
                   and (selector is None or selector.matches(labels))
                   for ep, labels in zip(peer.endpoints, peer.labels, strict=False)):
                return True
        elif port in p:  # type: ignore[operator]
            return True
    return False


def _named(ports: Sequence[EndpointPort], name: str, protocol: int, port: int) -> bool:
    return any(ep.name == name and protocol_number(ep.protocol) == protocol and ep.port == port
               for ep in ports)


def _icmp_matches(icmp: ICMPMatch, flow: Flow) -> bool:
    if icmp.type is not None and flow.icmp_type != icmp.type:
        return False
    return icmp.code is None or flow.icmp_code == icmp.code


def domain_matches(patterns: Sequence[str], names: frozenset[str]) -> bool:
    """Whether any name matches any pattern (all lowercase). A '*' label stands for one or
    more whole labels at its place, as in Calico Enterprise: *.example.com matches
    a.b.example.com, not example.com; www.*.com matches www.a.b.com, not www.com."""
    for pattern in patterns:
        if "*" not in pattern:
            if pattern in names:
                return True
            continue
        head, _, tail = pattern.partition("*")   # "www." and ".com", or "" and ".x.y"
        for n in names:
            if len(n) > len(head) + len(tail) and n.startswith(head) and n.endswith(tail):
                return True
    return False


def _fmt_ports(ports: Sequence[object]) -> str:
    return "[" + ", ".join(str(p) for p in ports) + "]"


def _entity_criteria(side: str, entity: EntityRule, domain_sets: bool = False
                     ) -> list[Criterion]:
    """`domain_sets`: the destination of an egress Allow rule, whose selector also takes
    the network sets the destination's names match."""
    out: list[Criterion] = []
    is_src = side == "source"

    def ip(ctx: Context) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ctx.flow.src if is_src else ctx.flow.dst

    def peer(ctx: Context) -> Peer:
        return ctx.src if is_src else ctx.dst

    if entity.nets:
        nets = _nets(entity.nets)
        out.append(Criterion(
            lambda c: _in_nets(ip(c), nets),
            lambda c: f"{side} {ip(c)} in nets {list(entity.nets)}"))
    if entity.not_nets:
        not_nets = _nets(entity.not_nets)
        out.append(Criterion(
            lambda c: not _in_nets(ip(c), not_nets),
            lambda c: f"{side} {ip(c)} outside notNets {list(entity.not_nets)}"))
    positive, negative = side_selectors(entity)   # both: one (semantics)
    if positive is not None:
        sel = positive
        selects = _selected_with_domains if domain_sets else _selected
        out.append(Criterion(
            lambda c: selects(sel, peer(c)),
            lambda c: f"{side} selector {sel} selects {_peer_words(peer(c), domain_sets)}"))
    if negative is not None:
        nsel = negative
        out.append(Criterion(
            lambda c: not _selected(nsel, peer(c)),
            lambda c: f"{side} notSelector {nsel} leaves out {_peer_words(peer(c))}"))
    if entity.ports:
        ports = entity.ports
        out.append(Criterion(
            lambda c: _port_matches(ports, _flow_port(c.flow, is_src), c.flow.protocol,
                                    peer(c), positive),
            lambda c: f"{side} port {_flow_port(c.flow, is_src)} in ports {_fmt_ports(ports)}"))
    if entity.not_ports:
        not_ports = entity.not_ports
        out.append(Criterion(
            lambda c: not _port_matches(not_ports, _flow_port(c.flow, is_src),
                                        c.flow.protocol, peer(c), positive),
            lambda c: f"{side} port {_flow_port(c.flow, is_src)} outside notPorts "
                      f"{_fmt_ports(not_ports)}"))
    if entity.domains:
        domains = entity.domains
        out.append(Criterion(
            lambda c: domain_matches(domains, c.flow.dst_domains),
            lambda c: f"destination name {sorted(c.flow.dst_domains) or '(none known)'} in "
                      f"domains {list(domains)}"))
    return out


def _flow_port(flow: Flow, source: bool) -> int | None:
    return flow.src_port if source else flow.dst_port


def all_of(tests: Sequence[Test]) -> Test:
    """One test that holds when every test holds, with no loop per call."""
    if not tests:
        return lambda c: True
    combined = tests[0]
    for nxt in tests[1:]:
        combined = (lambda a, b: lambda c: a(c) and b(c))(combined, nxt)
    return combined


@dataclass(frozen=True)
class CompiledRule:
    rule: Rule
    criteria: list[Criterion]
    test: Test  # all criteria at once, for evaluation without a trace


def compile_rules(rules: Sequence[Rule], direction: str = INGRESS) -> list[CompiledRule]:
    out = []
    for rule in rules:
        criteria = compile_rule(rule, direction)
        out.append(CompiledRule(rule, criteria, all_of([c.test for c in criteria])))
    return out


def compile_rule(rule: Rule, direction: str = INGRESS) -> list[Criterion]:
    """The rule's criteria in the order the trace reports them (`direction`: whose rules,
    Ingress or Egress)."""
    out: list[Criterion] = []
    # A rule with IPv4 nets (or ICMP) is an IPv4 rule, as Calico renders it.
    v = rule_ip_version(rule)
    if v is not None:
        out.append(Criterion(lambda c: c.flow.version == v,
                             lambda c: f"ipVersion {c.flow.version} is {v}"))
    if rule.protocol is not None:
        num, name = protocol_number(rule.protocol), rule.protocol
        out.append(Criterion(lambda c: c.flow.protocol == num,
                             lambda c: f"protocol {protocol_name(c.flow.protocol)} is {name}"))
    if rule.not_protocol is not None:
        nnum, nname = protocol_number(rule.not_protocol), rule.not_protocol
        out.append(Criterion(lambda c: c.flow.protocol != nnum,
                             lambda c: f"protocol {protocol_name(c.flow.protocol)} is not "
                                       f"{nname}"))
    if rule.icmp is not None:
        icmp = rule.icmp
        out.append(Criterion(lambda c: _icmp_matches(icmp, c.flow),
                             lambda c: f"ICMP type/code {c.flow.icmp_type}/{c.flow.icmp_code}"
                                       f" matches icmp {icmp.dump()}"))
    nicmp = icmp_criterion(rule.not_icmp)
    if nicmp is not None:
        # Only ICMP messages of the flow's family (semantics): TCP and UDP never match.
        out.append(Criterion(lambda c: c.flow.protocol == icmp_protocol(c.flow.version)
                             and not _icmp_matches(nicmp, c.flow),
                             lambda c: f"protocol {protocol_name(c.flow.protocol)} is "
                                       f"{protocol_name(icmp_protocol(c.flow.version))}, "
                                       f"type/code {c.flow.icmp_type}/{c.flow.icmp_code} "
                                       f"outside notICMP {nicmp.dump()}"))
    out.extend(_entity_criteria("source", rule.source))
    out.extend(_entity_criteria("destination", rule.destination,
                                domain_sets=direction == EGRESS and rule.action == "Allow"))
    return out
