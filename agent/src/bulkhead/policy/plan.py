"""Calculate what one node must enforce: its host endpoints, their interfaces, the
policies that apply to each per direction (in tier and policy order), and the address
sets the rules need (selectors resolved through every endpoint's labels and the network
sets, named ports resolved through every endpoint's `spec.ports`).

This is the agent's calculation stage (felix's calculation graph): pure data in, pure
data out, shared by every dataplane. It decides nothing about packets itself; the
dataplane renders the plan, and the reference evaluator (`bulkhead.policy.evaluate`)
gives the same verdicts from the same snapshot without using any of this module: the two
share only `bulkhead.policy.semantics`. A plan holds facts, not text to parse again:
addresses as integer spans per family (`bulkhead.net`), selectors parsed, `untracked` on
the policies that have doNotTrack.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bulkhead.model import (
    EGRESS,
    ENFORCE,
    INGRESS,
    EntityRule,
    GlobalNetworkPolicy,
    HostEndpoint,
    ICMPMatch,
    NamedPort,
    PortRange,
    Rule,
    Snapshot,
)
from bulkhead.model.checks import protocol_number
from bulkhead.model.snapshot import order_key
from bulkhead.net import NO_ADDRESSES, AddressSet, Span, merge, parse_network, parse_spans
from bulkhead.policy.failsafe import Failsafes
from bulkhead.policy.semantics import (
    effective_labels,
    enforcement_mode,
    icmp_criterion,
    rule_ip_version,
    selects,
    side_selectors,
    staged_view,
    untracked_ignored,
)
from bulkhead.selector import Selector
from bulkhead.selector.ast import Compare

DIRECTIONS = (INGRESS, EGRESS)


# ------------------------------------------------------------------------------ plans
@dataclass(frozen=True, slots=True)
class SidePlan:
    """A rule's source or destination: its nets as address spans, its selectors parsed
    (their addresses in NodePlan.selector_sets)."""

    nets: AddressSet = NO_ADDRESSES
    not_nets: AddressSet = NO_ADDRESSES
    selector: Selector | None = None
    not_selector: Selector | None = None
    ports: tuple[tuple[int, int], ...] = ()        # inclusive ranges
    named_ports: tuple[str, ...] = ()              # entries: NodePlan.named_ports[port_key]
    not_ports: tuple[tuple[int, int], ...] = ()
    not_named_ports: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()

    @property
    def needs_addresses(self) -> bool:
        """Whether the side looks at an address whose family a set must match."""
        return bool(self.selector or self.not_selector or self.named_ports
                    or self.not_named_ports or self.domains)

    def port_key(self, name: str) -> NamedPortKey:
        """Where the entries of the side's named port (or not-port) `name` are: only
        endpoints the side's selector matches count (felix filters a named port's IP set
        by the rule's positive selector: network sets have no ports)."""
        return (self.selector, name)


@dataclass(frozen=True, slots=True)
class RulePlan:
    action: str                    # Allow | Deny | Pass | Log
    where: str                     # "policy db-ingress ingress rule 0", for comments and logs
    owner: str = ""                # the policy or profile the rule belongs to
    index: int = 0                 # its place among the owner's rules for the direction
    ip_version: int | None = None
    protocol: int | None = None
    not_protocol: int | None = None
    icmp: tuple[int, int | None] | None = None       # (type, code)
    not_icmp: tuple[int, int | None] | None = None
    source: SidePlan = SidePlan()
    destination: SidePlan = SidePlan()
    direction: str = INGRESS


@dataclass(frozen=True, slots=True)
class TierPlan:
    name: str
    default_action: str            # Deny | Pass
    policies: tuple[str, ...]      # the policies of this tier that select the endpoint
    rules: tuple[RulePlan, ...]    # their rules, in policy order then rule order


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    """An untracked or pre-DNAT policy: its Allow or Deny is final, no match falls through.
    `untracked` (doNotTrack) policies are also enforced before connection tracking."""

    name: str
    rules: tuple[RulePlan, ...]
    untracked: bool = False
    tier: str = ""


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    name: str
    rules: tuple[RulePlan, ...]


@dataclass(frozen=True, slots=True)
class DirectionPlan:
    early: tuple[PolicyPlan, ...] = ()
    tiers: tuple[TierPlan, ...] = ()
    profiles: tuple[ProfilePlan, ...] = ()   # none: Deny after the tiers


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    name: str
    interfaces: tuple[str, ...]    # ("*",) for every interface of the host
    ingress: DirectionPlan
    egress: DirectionPlan
    # observe: every Deny is logged as decided and the packet accepted (docs/policy.md)
    mode: str = ENFORCE

    def direction(self, direction: str) -> DirectionPlan:
        return self.ingress if direction == INGRESS else self.egress


@dataclass(frozen=True, order=True)
class NamedPortEntry:
    family: int                    # 4 or 6
    address: int                   # an expectedIP of an endpoint that has the port
    protocol: int
    port: int


# A named port, as a rule side uses it: the side's selector (None: every endpoint) and
# the port's name (`SidePlan.port_key`).
NamedPortKey = tuple[Selector | None, str]


@dataclass
class NodePlan:
    node: str
    endpoints: list[EndpointPlan]
    failsafes: Failsafes
    selector_sets: dict[Selector, AddressSet]
    named_ports: dict[NamedPortKey, tuple[NamedPortEntry, ...]]
    # What this node's plan leaves unenforced (a host endpoint with no interface here,
    # or whose interface another took): the agent's status reports them.
    warnings: list[str] = field(default_factory=list)
    # What the plan says of itself that leaves nothing unenforced Calico would enforce
    # (untracked policies on an endpoint on every interface): logged only.
    notes: list[str] = field(default_factory=list)
    # The destination selectors of egress Allow rules that select network sets with
    # allowedEgressDomains, and those domains (sorted): such a rule also allows the
    # addresses the names resolve to (felix's domain sets).
    domain_sets: dict[Selector, tuple[str, ...]] = field(default_factory=dict)
    # Set by the incremental calculator: for a selector whose set it patched, the set
    # before and the regions (family, first, last) outside which the two are the same,
    # so a dataplane can redo only those. Not part of what the plan says.
    moved_from: dict[Selector, tuple[AddressSet, tuple[tuple[int, int, int], ...]]] = \
        field(default_factory=dict, compare=False, repr=False)

    def domains_of(self, rule: RulePlan) -> tuple[str, ...]:
        """The domains whose addresses a rule's destination also matches: its own
        `domains`, or those of the network sets its selector selects (egress Allow)."""
        if rule.destination.domains:
            return rule.destination.domains
        if rule.destination.selector is not None and rule.action == "Allow" \
                and rule.direction == EGRESS:
            return self.domain_sets.get(rule.destination.selector, ())
        return ()


# ------------------------------------------------------------------------ calculation
def calculate(snapshot: Snapshot, node: str, interfaces: Mapping[str, Sequence[str]],
              failsafes: Failsafes | None = None, staged: bool = False,
              default_mode: str = ENFORCE) -> NodePlan:
    """The plan for `node` (see `calculation`)."""
    return calculation(snapshot, node, interfaces, failsafes, staged, default_mode)[0]


def calculation(snapshot: Snapshot, node: str, interfaces: Mapping[str, Sequence[str]],
                failsafes: Failsafes | None = None, staged: bool = False,
                default_mode: str = ENFORCE
                ) -> tuple[NodePlan, dict[str, Mapping[str, str]],
                           dict[Selector, dict[Member, Spans]]]:
    """The plan for `node`. `interfaces` maps the host's interface names to their
    addresses (used for endpoints that give expectedIPs but no interfaceName).
    `staged=True` plans the staged view (staged policies replacing or deleting the
    enforced ones of the same tier and name), for flow verdicts; it is never rendered.
    `default_mode`: the enforcement mode of endpoints without the enforcement label
    (the agent's `enforcement` setting). With the plan: every host endpoint's effective
    labels, and the members of each selector the plan uses (what the incremental
    calculator, `bulkhead.policy.incremental`, keeps up to date)."""
    policies = staged_view(snapshot) if staged else list(snapshot.policies.values())
    labels = {h.name: effective_labels(snapshot, h) for h in snapshot.host_endpoints.values()}
    plan = NodePlan(node, [], failsafes if failsafes is not None else Failsafes(), {}, {})
    claimed: dict[str, str] = {}
    for hep in sorted(snapshot.host_endpoints.values(), key=lambda h: h.name):
        if hep.node != node:
            continue
        ifaces = _interfaces(hep, interfaces, plan.warnings)
        if not ifaces:
            continue
        taken = [i for i in ifaces if i in claimed]
        for iface in taken:
            plan.warnings.append(f"HostEndpoint {hep.name}: interface {iface} already "
                                 f"belongs to HostEndpoint {claimed[iface]}; left to it")
        ifaces = tuple(i for i in ifaces if i not in claimed)
        if not ifaces:
            continue
        claimed.update(dict.fromkeys(ifaces, hep.name))
        ingress, egress = (_direction(snapshot, policies, hep, labels[hep.name], d,
                                      plan.notes) for d in DIRECTIONS)
        mode = enforcement_mode(labels[hep.name], default_mode)
        plan.endpoints.append(EndpointPlan(hep.name, ifaces, ingress, egress, mode))
    members = members_of(snapshot, labels, selectors_of(plan))
    _resolve_sets(snapshot, labels, plan, members)
    return plan, labels, members


def _interfaces(hep: HostEndpoint, interfaces: Mapping[str, Sequence[str]],
                warnings: list[str]) -> tuple[str, ...]:
    if hep.interface_name == "*":
        return ("*",)
    if hep.interface_name:
        return (hep.interface_name,)
    wanted = {ipaddress.ip_address(ip) for ip in hep.expected_ips}
    found = tuple(sorted(name for name, addrs in interfaces.items()
                         if name != "lo" and wanted & {_ip(a) for a in addrs}))
    if not found:
        warnings.append(f"HostEndpoint {hep.name}: no interface of this host has any of "
                        f"its expectedIPs {list(hep.expected_ips)}; not enforced")
    return found


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_interface(text).ip


MAX_UNCOVERED = 4   # addresses named per endpoint; the rest counted


def uncovered(snapshot: Snapshot, plan: NodePlan,
              interfaces: Mapping[str, Sequence[str]]) -> list[str]:
    """Warnings for the addresses an enforced endpoint's interfaces hold that are not in
    its expectedIPs (loopback, link-local and multicast aside). Its table enforces their
    traffic, since an endpoint is its interfaces, but whatever finds endpoints by address
    does not count them as its: other hosts' selector sets, `bulkhead explain`, the
    preview and staged verdicts (a dual-stack host whose expectedIPs give only IPv4)."""
    out = []
    # A `*` endpoint's table holds only the interfaces no other endpoint of the node has:
    # those decide their own traffic (the nftables dispatch), by their own expectedIPs.
    owned = {n for e in plan.endpoints if e.interfaces != ("*",) for n in e.interfaces}
    for endpoint in plan.endpoints:
        hep = snapshot.host_endpoints.get(endpoint.name)
        if hep is None:
            continue
        names = [n for n in interfaces if n != "lo" and n not in owned] \
            if endpoint.interfaces == ("*",) \
            else [n for n in endpoint.interfaces if n in interfaces]
        expected = {ipaddress.ip_address(ip) for ip in hep.expected_ips}
        found = sorted({ip for n in names for ip in map(_ip, interfaces[n])
                        if not (ip.is_loopback or ip.is_link_local or ip.is_multicast)
                        and ip not in expected}, key=lambda ip: (ip.version, ip))
        if found:
            shown = ", ".join(map(str, found[:MAX_UNCOVERED])) + (
                f" and {len(found) - MAX_UNCOVERED} more" if len(found) > MAX_UNCOVERED
                else "")
            out.append(f"HostEndpoint {hep.name}: its interfaces hold {shown}, not in its "
                       f"expectedIPs: the table enforces their traffic as this endpoint's, "
                       f"but other hosts' selectors, explain, the preview and staged "
                       f"verdicts take them for no endpoint; list the host's own in "
                       f"expectedIPs (not one many hosts share, as a container bridge's)")
    return out


def _direction(snapshot: Snapshot, policies: Sequence[GlobalNetworkPolicy], hep: HostEndpoint,
               labels: Mapping[str, str], direction: str,
               notes: list[str] | None = None) -> DirectionPlan:
    def applies(p: GlobalNetworkPolicy) -> bool:
        return selects(p, labels, direction)

    if untracked_ignored(hep):
        ignored = sorted(p.name for p in policies if p.spec.do_not_track and applies(p))
        if ignored and notes is not None:
            notes.append(f'HostEndpoint {hep.name}: interfaceName "*" takes no untracked '
                            f"(doNotTrack) policy, as in Calico; {direction.lower()} "
                            f"policies {', '.join(ignored[:5])}"
                            f"{', ...' if len(ignored) > 5 else ''} left out")

    tiers = snapshot.ordered_tiers()
    rank = {t.name: i for i, t in enumerate(tiers)}

    def early_key(p: GlobalNetworkPolicy) -> tuple[int, tuple[int, float, str]]:
        return (rank[p.spec.tier], order_key(p.spec.order, p.name))

    untracked = sorted((p for p in policies if p.spec.do_not_track and applies(p)
                        and not untracked_ignored(hep)), key=early_key)
    pre_dnat = sorted((p for p in policies if p.spec.pre_dnat and applies(p)), key=early_key)
    early = untracked + (pre_dnat if direction == INGRESS else [])
    tier_plans = []
    for tier in tiers:
        members = sorted((p for p in policies if p.spec.tier == tier.name and applies(p)
                          and not (p.spec.do_not_track or p.spec.pre_dnat)),
                         key=lambda p: order_key(p.spec.order, p.name))
        if not members:
            continue
        rules = tuple(r for p in members for r in _rules(p, direction))
        tier_plans.append(TierPlan(tier.name, tier.default_action,
                                   tuple(p.name for p in members), rules))
    profiles = []
    for name in hep.profiles:
        profile = snapshot.profiles.get(name)
        if profile is not None:
            where = f"profile {name} {direction.lower()}"
            profiles.append(ProfilePlan(name, tuple(
                rule_plan(r, f"{where} rule {i}", name, i, direction)
                for i, r in enumerate(profile.rules(direction)))))
    return DirectionPlan(
        early=tuple(PolicyPlan(p.name, tuple(_rules(p, direction)), p.spec.do_not_track,
                               p.spec.tier) for p in early),
        tiers=tuple(tier_plans), profiles=tuple(profiles))


def _rules(policy: GlobalNetworkPolicy, direction: str) -> Iterable[RulePlan]:
    kind = "staged policy" if policy.staged else "policy"
    for i, rule in enumerate(policy.spec.rules(direction)):
        yield rule_plan(rule, f"{kind} {policy.name} {direction.lower()} rule {i}",
                        policy.name, i, direction)


def rule_plan(rule: Rule, where: str, owner: str = "", index: int = 0,
              direction: str = INGRESS) -> RulePlan:
    def icmp(m: ICMPMatch | None) -> tuple[int, int | None] | None:
        criterion = icmp_criterion(m)   # with a type, or none (semantics)
        if criterion is None or criterion.type is None:
            return None
        return (criterion.type, criterion.code)

    return RulePlan(
        action=rule.action, where=where, owner=owner, index=index,
        ip_version=rule_ip_version(rule),
        protocol=None if rule.protocol is None else protocol_number(rule.protocol),
        not_protocol=None if rule.not_protocol is None else protocol_number(rule.not_protocol),
        icmp=icmp(rule.icmp), not_icmp=icmp(rule.not_icmp),
        source=_side(rule.source), destination=_side(rule.destination),
        direction=direction)


def _side(entity: EntityRule) -> SidePlan:
    def split(ports: Sequence[object]) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...]]:
        numeric = tuple((p.first, p.last) for p in ports if isinstance(p, PortRange))
        named = tuple(sorted({p.name for p in ports if isinstance(p, NamedPort)}))
        return numeric, named

    ports, named = split(entity.ports)
    not_ports, not_named = split(entity.not_ports)
    selector, not_selector = side_selectors(entity)
    return SidePlan(
        nets=AddressSet.of(entity.nets), not_nets=AddressSet.of(entity.not_nets),
        selector=selector, not_selector=not_selector,
        ports=ports, named_ports=named, not_ports=not_ports, not_named_ports=not_named,
        domains=entity.domains)


def _all_rules(plan: NodePlan) -> Iterable[RulePlan]:
    for ep in plan.endpoints:
        for d in DIRECTIONS:
            dp = ep.direction(d)
            for p in dp.early:
                yield from p.rules
            for t in dp.tiers:
                yield from t.rules
            for pr in dp.profiles:
                yield from pr.rules


# Who puts addresses in a selector's set: ("hep", name) or ("ns", name) -> its IPv4 and
# IPv6 spans (the endpoint's expectedIPs, the set's nets), as parsed.
Member = tuple[str, str]
Spans = tuple[Sequence[Span], Sequence[Span]]


def selectors_of(plan: NodePlan) -> set[Selector]:
    """The selectors (and notSelectors) the plan's rules use."""
    return {s for rule in _all_rules(plan) for side in (rule.source, rule.destination)
            for s in (side.selector, side.not_selector) if s}


def hep_spans(hep: HostEndpoint) -> Spans:
    return parse_spans(hep.expected_ips)


def members_of(snapshot: Snapshot, labels: Mapping[str, Mapping[str, str]],
               selectors: Iterable[Selector]) -> dict[Selector, dict[Member, Spans]]:
    """Each selector's members and the spans each gives (an endpoint's addresses parsed
    once; a network set's nets are read with it, `GlobalNetworkSet.spans`)."""
    members: dict[Selector, dict[Member, Spans]] = {s: {} for s in selectors}
    if not members:
        return members
    matching_of = _matcher(members)
    for hep in snapshot.host_endpoints.values():
        if not hep.expected_ips:
            continue
        matching = matching_of(labels[hep.name])
        if matching:
            spans = hep_spans(hep)
            for sel in matching:
                members[sel][("hep", hep.name)] = spans
    for netset in snapshot.network_sets.values():
        matching = matching_of(netset.labels) if netset.nets else []
        if matching:
            spans = netset.spans()
            for sel in matching:
                members[sel][("ns", netset.name)] = spans
    return members


def _matcher(selectors: Iterable[Selector]
             ) -> Callable[[Mapping[str, str]], list[Selector]]:
    """The selectors that match a label set, in the order given. A selector that is one
    `key == "value"` matches exactly the label sets holding that pair, so those are
    looked up by the pairs a label set holds; only the others are evaluated (with 1,000
    such selectors and 1,000 network sets, a million evaluations become a few thousand
    lookups)."""
    order = {sel: i for i, sel in enumerate(selectors)}
    by_pair: dict[tuple[str, str], list[Selector]] = {}
    others: list[Selector] = []
    for sel in order:
        tree = sel.tree
        if isinstance(tree, Compare) and tree.op == "==":
            by_pair.setdefault((tree.key, tree.value), []).append(sel)
        else:
            others.append(sel)

    def matching(labels: Mapping[str, str]) -> list[Selector]:
        found = [sel for pair in labels.items() for sel in by_pair.get(pair, ())]
        found += [sel for sel in others if sel.matches(labels)]
        if len(found) > 1:
            found.sort(key=order.__getitem__)
        return found

    return matching


def address_set(members: Mapping[Member, Spans]) -> AddressSet:
    """The addresses the members give, merged."""
    v4: list[Span] = []
    v6: list[Span] = []
    for four, six in members.values():
        v4 += four
        v6 += six
    return AddressSet(merge(v4), merge(v6))


def _resolve_sets(snapshot: Snapshot, labels: Mapping[str, Mapping[str, str]],
                  plan: NodePlan, members: dict[Selector, dict[Member, Spans]] | None = None
                  ) -> None:
    """Fill the plan's selector sets and named-port entries for the rules it holds. Every
    address is parsed once, and each selector's members merged once. `members`: the
    selectors' members, if already known (the incremental calculator keeps them)."""
    if members is None:
        members = members_of(snapshot, labels, selectors_of(plan))
    port_keys: set[NamedPortKey] = set()
    for rule in _all_rules(plan):
        for side in (rule.source, rule.destination):
            port_keys.update(side.port_key(n) for n in (*side.named_ports,
                                                        *side.not_named_ports))
    heps = sorted(snapshot.host_endpoints.values(), key=lambda h: h.name)
    addresses = {h.name: [parse_network(ip) for ip in h.expected_ips] for h in heps
                 if h.ports}
    for sel, given in members.items():
        plan.selector_sets[sel] = address_set(given)
    domain_selectors = {r.destination.selector for r in _all_rules(plan)
                        if r.direction == EGRESS and r.action == "Allow"
                        and r.destination.selector is not None}
    for sel in domain_selectors:
        domains = sorted({d for netset in snapshot.network_sets.values()
                          if netset.allowed_egress_domains and sel.matches(netset.labels)
                          for d in netset.allowed_egress_domains})
        if domains:
            plan.domain_sets[sel] = tuple(domains)
    for key in sorted(port_keys, key=lambda k: (str(k[0] or ""), k[1])):
        selector, name = key
        plan.named_ports[key] = tuple(sorted({
            NamedPortEntry(family, first, protocol_number(port.protocol), port.port)
            for hep in heps for port in hep.ports if port.name == name
            if selector is None or selector.matches(labels[hep.name])
            for family, first, _ in addresses[hep.name]}))
