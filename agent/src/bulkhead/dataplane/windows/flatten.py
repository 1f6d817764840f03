"""One endpoint's plan in one direction as a first-match list of boxes per IP family.

`flatten(plan, endpoint, direction)` gives, for families 4 and 6, a `Flat` list whose
first matching entry is the reference evaluator's decision (`bulkhead.policy.evaluate`)
for every packet of that family seen at the endpoint in that direction:

0. for IPv6, neighbour discovery (ICMPv6 types 133-136): Allow, before any policy, as
   the nftables dataplane does (`ND_BOX`; the evaluator does not model it);
1. failsafe ports (`plan.failsafes`): inbound ones on ingress match the local (the
   destination) port, outbound ones on egress the remote (the destination) port, and the
   peer's net when one is given: Allow;
2. the tiers in plan order, each tier's rules in order: an Allow or Deny rule gives its
   boxes that action; a Log rule decides nothing and is dropped (Windows has no log
   action); a Pass rule's boxes get the rest of the evaluation after its tier (the later
   tiers and the profiles) intersected with them, and then the tier's later rules go on;
   at the tier's end its defaultAction: Deny is an entry matching everything, Pass goes
   on to the next tier;
3. the profiles in the endpoint's order, each rule as in a tier (Pass: on to the next
   profile, as the evaluator does); no profile, or no profile rule matched: Deny.

A rule becomes a union of boxes: its protocol, notProtocol, ICMP and notICMP, nets and
notNets, selectors and notSelectors (their addresses from `plan.selector_sets`), ports
and named ports (`plan.named_ports`: address, protocol and port boxes) and notPorts;
each negation is the complement of spans in its field (so the union may grow, bounded by
`MAX_RULE_BOXES`). A packet is seen as the evaluator's `Flow`: the protocols in `PORTED`
always carry both ports, ICMP and ICMPv6 (1, 58) carry a type and a code, every other
protocol neither (`first_match`'s callers pass None there). The boxes kept are exact
under that reading: a box that restricts ports holds only ported protocols, one that
restricts ICMP only 1 and 58, so subtracting boxes never loses a packet without ports.

An endpoint in observe mode (`EndpointPlan.mode`) has nothing blocked: its list is one
Allow entry matching everything, what the evaluator's `Verdict.allowed` says (Windows has
no log of would-be denies yet). `policy_decision=True` gives the policy decision instead
(what enforce mode would do, the evaluator's `policy_allowed`).

Refused with `Unsupported` (never widened or narrowed): a rule with `domains`, or whose
destination selector selects network sets with `allowedEgressDomains` (no DNS-learned
address sets on Windows yet); doNotTrack and preDNAT policies with rules for the
direction (`DirectionPlan.early`: Windows has no stage before connection tracking or
before DNAT); a failsafe port of a protocol without ports; a rule whose boxes, or a list
whose entries, pass the bounds below (named in the error).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bulkhead.model import EGRESS, INGRESS, OBSERVE
from bulkhead.model.flowlog import PORTED
from bulkhead.net import NO_ADDRESSES, Span, difference, intersection, merge
from bulkhead.policy.failsafe import FailsafePort
from bulkhead.policy.plan import (
    DirectionPlan,
    EndpointPlan,
    NamedPortEntry,
    NodePlan,
    RulePlan,
    SidePlan,
)
from bulkhead.policy.semantics import icmp_protocol
from bulkhead.selector import Selector

from .flat import (
    ALL_ICMP,
    ALL_PORTS,
    ALL_PROTOCOLS,
    ALLOW,
    DENY,
    Box,
    Entry,
    Flat,
    Spans,
    Unsupported,
    all_addresses,
    icmp_span,
)

FAMILIES = (4, 6)
ICMP_PROTOCOLS: Spans = ((1, 1), (58, 58))
PORTED_PROTOCOLS: Spans = merge((p, p) for p in PORTED)
# Bounds (chosen, not measured): the boxes one rule may become (negations of named ports
# and of several fields multiply them), and the entries of one family's list (each Pass
# rule copies the rest of the evaluation once per box of the rule).
MAX_RULE_BOXES = 1_000
MAX_ENTRIES = 20_000


# ---------------------------------------------------------------------- span algebra
def effective(box: Box) -> Box | None:
    """The box with its protocols cut to those whose packets can be in it: a box that
    restricts ports holds only protocols that carry ports, one that restricts ICMP only
    ICMP and ICMPv6. None when nothing is left."""
    protocols = box.protocols
    if box.local_ports != ALL_PORTS or box.remote_ports != ALL_PORTS:
        protocols = intersection(protocols, PORTED_PROTOCOLS)
    if box.icmp != ALL_ICMP:
        protocols = intersection(protocols, ICMP_PROTOCOLS)
    if not protocols or box.empty:
        return None
    if protocols == box.protocols:
        return box
    return Box(box.family, protocols, box.local, box.remote, box.local_ports,
               box.remote_ports, box.icmp)


def subtract(a: Box, b: Box) -> list[Box]:
    """The packets of `a` not in `b`, as disjoint boxes (both `effective`). Protocols
    first: in the part of `a` that shares `b`'s protocols, every field `b` restricts is
    carried by every packet, so cutting field by field loses none."""
    common = a.intersect(b)
    if common is None:
        return [a]
    out: list[Box] = []
    fields = list(a.fields())
    cut = list(common.fields())
    for i in range(len(fields)):
        rest = difference(fields[i], cut[i])
        if rest:
            piece = effective(_box(a.family, [*cut[:i], rest, *fields[i + 1:]]))
            if piece is not None:
                out.append(piece)
        fields[i] = cut[i]
    return out


def _box(family: int, fields: Sequence[Spans]) -> Box:
    protocols, local, remote, local_ports, remote_ports, icmp = fields
    return Box(family, protocols, local, remote, local_ports, remote_ports, icmp)


def intersect_all(region: Sequence[Box], other: Sequence[Box]) -> list[Box]:
    out = []
    for a in region:
        for b in other:
            both = a.intersect(b)
            if both is not None and (kept := effective(both)) is not None:
                out.append(kept)
    return out


def subtract_all(region: Sequence[Box], other: Sequence[Box]) -> list[Box]:
    out = list(region)
    for b in other:
        out = [piece for a in out for piece in subtract(a, b)]
    return out


# ------------------------------------------------------------------------ rule boxes
def _field_box(family: int, local_side: bool, addresses: Spans | None = None,
               ports: Spans | None = None, protocols: Spans = ALL_PROTOCOLS) -> Box:
    """A box restricting one side's address and/or port (local or remote)."""
    everything = all_addresses(family)
    addr = everything if addresses is None else addresses
    port = ALL_PORTS if ports is None else ports
    if local_side:
        return Box(family, protocols, addr, everything, port, ALL_PORTS)
    return Box(family, protocols, everything, addr, ALL_PORTS, port)


def _port_boxes(plan: NodePlan, family: int, local_side: bool, side: SidePlan,
                numeric: Sequence[tuple[int, int]], names: Iterable[str]) -> list[Box]:
    """The packets whose port on one side is one of `numeric`, or is a named port of an
    endpoint at that side's address (for the named port's protocol) that the side's
    selector matches."""
    out: list[Box] = []
    if numeric:
        out.append(_field_box(family, local_side, ports=merge(numeric)))
    by_port: dict[tuple[int, int], list[Span]] = {}
    for name in names:
        entry: NamedPortEntry
        for entry in plan.named_ports.get(side.port_key(name), ()):
            if entry.family == family:
                by_port.setdefault((entry.protocol, entry.port), []).append(
                    (entry.address, entry.address))
    # Ports sharing protocol and addresses go in one box.
    by_addresses: dict[tuple[int, Spans], list[Span]] = {}
    for (protocol, port), spans in sorted(by_port.items()):
        by_addresses.setdefault((protocol, merge(spans)), []).append((port, port))
    for (protocol, addresses), ports in by_addresses.items():
        out.append(_field_box(family, local_side, addresses, merge(ports),
                              ((protocol, protocol),)))
    return [b for b in (effective(x) for x in out) if b is not None]


def _addresses(plan: NodePlan, selector: Selector, family: int) -> Spans:
    return plan.selector_sets.get(selector, NO_ADDRESSES).spans(family)


def _side(plan: NodePlan, region: list[Box], side: SidePlan, family: int,
          local_side: bool) -> list[Box]:
    everything = all_addresses(family)
    if side.nets:
        region = intersect_all(region, [_field_box(family, local_side,
                                                   side.nets.spans(family))])
    if side.not_nets:
        region = intersect_all(region, [_field_box(
            family, local_side, difference(everything, side.not_nets.spans(family)))])
    if side.selector is not None:
        region = intersect_all(region, [_field_box(
            family, local_side, _addresses(plan, side.selector, family))])
    if side.not_selector is not None:
        region = intersect_all(region, [_field_box(family, local_side, difference(
            everything, _addresses(plan, side.not_selector, family)))])
    if side.ports or side.named_ports:
        region = intersect_all(region, _port_boxes(plan, family, local_side, side,
                                                   side.ports, side.named_ports))
    if side.not_ports or side.not_named_ports:
        region = subtract_all(region, _port_boxes(plan, family, local_side, side,
                                                  side.not_ports, side.not_named_ports))
    return region


def rule_boxes(plan: NodePlan, rule: RulePlan, family: int, direction: str) -> list[Box]:
    """The packets of `family` the rule matches at an endpoint in `direction`, as boxes
    (the evaluator's `compile_rule`, as sets)."""
    if rule.ip_version is not None and rule.ip_version != family:
        return []
    protocols = ALL_PROTOCOLS
    if rule.protocol is not None:
        protocols = ((rule.protocol, rule.protocol),)
    if rule.not_protocol is not None:
        protocols = difference(protocols, ((rule.not_protocol, rule.not_protocol),))
    everything = all_addresses(family)
    icmp = ALL_ICMP
    if rule.icmp is not None and rule.icmp[0] is not None:
        icmp = (icmp_span(rule.icmp[0], rule.icmp[1]),)
    start = effective(Box(family, protocols, everything, everything, icmp=icmp))
    region = [] if start is None else [start]
    if rule.not_icmp is not None:   # always with a type (rule_plan)
        # Only ICMP messages of this family, other than the type (and code): semantics.
        own = ((icmp_protocol(family),) * 2,)
        region = subtract_all(intersect_all(region, [Box(family, own, everything, everything)]),
                              [Box(family, own, everything, everything,
                                   icmp=(icmp_span(rule.not_icmp[0], rule.not_icmp[1]),))])
    # Ingress: the destination is the endpoint (local); egress: the source is.
    region = _side(plan, region, rule.source, family, local_side=direction == EGRESS)
    region = _side(plan, region, rule.destination, family, local_side=direction == INGRESS)
    if len(region) > MAX_RULE_BOXES:
        raise Unsupported(rule.where, "rule", f"its matches become {len(region)} boxes in "
                          f"IPv{family}, more than {MAX_RULE_BOXES} (negated named ports "
                          "or fields multiply them)")
    return region


# --------------------------------------------------------------------------- refusals
def _refuse(plan: NodePlan, endpoint: EndpointPlan, direction: str) -> None:
    """Raise Unsupported for what the Windows dataplanes cannot enforce exactly."""
    dp = endpoint.direction(direction)
    for early in dp.early:
        if early.rules:
            field, stage = ("doNotTrack", "untracked (before connection tracking)") \
                if early.untracked else ("preDNAT", "pre-DNAT")
            raise Unsupported(f"policy {early.name}", field,
                              f"Windows has no {stage} stage; the policy selects "
                              f"{endpoint.name} for {direction}")
    for rule in _rules(dp):
        if rule.destination.domains:
            raise Unsupported(rule.where, "destination.domains",
                              "Windows has no address sets learned from DNS answers yet")
        domains = plan.domains_of(rule)
        if domains:
            raise Unsupported(rule.where, "destination.selector",
                              f"selects network sets with allowedEgressDomains "
                              f"({', '.join(domains[:3])}{', ...' if len(domains) > 3 else ''}"
                              "); Windows has no address sets learned from DNS answers yet")
    _refuse_failsafes(plan, direction)


def _refuse_failsafes(plan: NodePlan, direction: str) -> None:
    failsafes = plan.failsafes.inbound if direction == INGRESS else plan.failsafes.outbound
    for fs in failsafes:
        if fs.protocol not in PORTED:
            raise Unsupported(f"failsafe {fs}", "protocol",
                              f"protocol {fs.protocol} carries no ports")


def _rules(dp: DirectionPlan) -> Iterable[RulePlan]:
    for tier in dp.tiers:
        yield from tier.rules
    for profile in dp.profiles:
        yield from profile.rules


# ---------------------------------------------------------------------------- flatten
def _failsafe_box(fs: FailsafePort, family: int, direction: str) -> Box | None:
    everything = all_addresses(family)
    remote = everything
    if fs.net is not None:
        if fs.net.version != family:
            return None
        remote = ((int(fs.net.network_address), int(fs.net.broadcast_address)),)
    port = ((fs.port, fs.port),)
    protocols = ((fs.protocol, fs.protocol),)
    if direction == INGRESS:   # the destination port is the endpoint's own
        return Box(family, protocols, everything, remote, local_ports=port)
    return Box(family, protocols, everything, remote, remote_ports=port)


class _Builder:
    """Builds one family's list, from the last stage back (a Pass copies what follows)."""

    def __init__(self, plan: NodePlan, family: int, direction: str,
                 neighbour_discovery: bool = True) -> None:
        self.plan, self.family, self.direction = plan, family, direction
        self.neighbour_discovery = neighbour_discovery
        self.everything = Box.everything(family)

    def block(self, rules: Sequence[RulePlan], passed: list[Entry], after: list[Entry]
              ) -> list[Entry]:
        """The entries of `rules` in order, then `after`. A Pass rule's boxes get
        `passed` (what follows Pass) intersected with them."""
        out: list[Entry] = []
        for rule in rules:
            if rule.action not in (ALLOW, DENY, "Pass"):
                continue   # Log: records and goes on; nothing to enforce
            boxes = rule_boxes(self.plan, rule, self.family, self.direction)
            for box in boxes:
                if rule.action == "Pass":
                    for entry in passed:
                        both = box.intersect(entry.box)
                        if both is not None and (kept := effective(both)) is not None:
                            out.append(Entry(entry.action, kept,
                                             f"{entry.where} (after Pass by {rule.where})"))
                            if kept == box:
                                break   # the rest of `passed` is not reached in this box
                else:
                    out.append(Entry(rule.action, box, rule.where))
                self._bound(out, rule.where)
                if box == self.everything:
                    return out   # nothing after it is reached
        out += after
        self._bound(out, "the rules after these")
        return out

    def _bound(self, entries: list[Entry], where: str) -> None:
        if len(entries) > MAX_ENTRIES:
            raise Unsupported(where, "rules", f"the IPv{self.family} {self.direction} list "
                              f"passes {MAX_ENTRIES} entries (each Pass rule copies what "
                              "follows it once per box)")

    def flat(self, dp: DirectionPlan) -> Flat:
        if dp.profiles:
            rest = [Entry(DENY, self.everything, "no rule of the endpoint's profiles matched")]
        else:
            rest = [Entry(DENY, self.everything, "no profile: default Deny")]
        for profile in reversed(dp.profiles):
            rest = self.block(profile.rules, rest, rest)
        for tier in reversed(dp.tiers):
            if tier.default_action == "Pass":
                after = rest
            else:
                after = [Entry(DENY, self.everything,
                               f"tier {tier.name} default action Deny")]
            rest = self.block(tier.rules, rest, after)
        failsafes = self.plan.failsafes.inbound if self.direction == INGRESS \
            else self.plan.failsafes.outbound
        head = [Entry(ALLOW, box, f"failsafe {fs}") for fs in failsafes
                if (box := _failsafe_box(fs, self.family, self.direction)) is not None]
        if self.family == 6 and self.neighbour_discovery:
            head.insert(0, Entry(ALLOW, ND_BOX, "IPv6 neighbour discovery"))
        return _reachable(head + rest, self.everything)


# IPv6 neighbour discovery (ICMPv6 router solicitation and advertisement, neighbour
# solicitation and advertisement: types 133-136, RFC 4861) is accepted before any policy,
# as the nftables table does: without it a host endpoint's IPv6 stops working, and the
# rules here end in an explicit Block of everything (`firewall.BLOCKS`), which would
# override Windows' own Core Networking rules for it. The reference evaluator decides
# policy only and does not model it (nor does the nftables dataplane's differential test).
ND_BOX = Box(6, ((58, 58),), ((0, (1 << 128) - 1),), ((0, (1 << 128) - 1),),
             icmp=((133 << 8, (136 << 8) | 0xFF),))


def _reachable(entries: list[Entry], everything: Box) -> Flat:
    """The entries up to the first that matches everything (none after it is reached)."""
    for i, entry in enumerate(entries):
        if entry.box == everything:
            return tuple(entries[:i + 1])
    raise AssertionError("a flattened list ends with an entry matching everything")


def failsafe_flat(plan: NodePlan, direction: str) -> dict[int, Flat]:
    """The failsafe ports alone, per family: their Allows, then a Deny of everything.
    What holds on every interface of the host whatever its endpoints, as the nftables
    table accepts them before any endpoint's chain (for Windows Firewall, whose profile
    defaults block every interface). Raises Unsupported as `flatten` does for them."""
    if direction not in (INGRESS, EGRESS):
        raise ValueError(f"direction {direction!r}: expected {INGRESS} or {EGRESS}")
    _refuse_failsafes(plan, direction)
    failsafes = plan.failsafes.inbound if direction == INGRESS else plan.failsafes.outbound
    out: dict[int, Flat] = {}
    for family in FAMILIES:
        head = [Entry(ALLOW, box, f"failsafe {fs}") for fs in failsafes
                if (box := _failsafe_box(fs, family, direction)) is not None]
        out[family] = (*head, Entry(DENY, Box.everything(family), "not a failsafe port"))
    return out


def flatten(plan: NodePlan, endpoint: EndpointPlan, direction: str, *,
            policy_decision: bool = False, neighbour_discovery: bool = True
            ) -> dict[int, Flat]:
    """The first-match list of each family (4, 6) for `endpoint` in `direction`
    (Ingress or Egress). Observe mode: one Allow matching everything, unless
    `policy_decision`. `neighbour_discovery=False` leaves out the IPv6 neighbour
    discovery head (for HNS, which cannot match ICMP types). Raises Unsupported (see the
    module's docstring)."""
    if direction not in (INGRESS, EGRESS):
        raise ValueError(f"direction {direction!r}: expected {INGRESS} or {EGRESS}")
    if endpoint.mode == OBSERVE and not policy_decision:
        return {f: (Entry(ALLOW, Box.everything(f),
                          f"observe mode: nothing is blocked on {endpoint.name}"),)
                for f in FAMILIES}
    _refuse(plan, endpoint, direction)
    dp = endpoint.direction(direction)
    return {f: _Builder(plan, f, direction, neighbour_discovery).flat(dp) for f in FAMILIES}
