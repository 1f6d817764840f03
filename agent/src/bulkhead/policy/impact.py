"""Policy impact: what a proposed set of policies would decide about flows already seen,
judged from stored flow records (`bulkhead.model.flowlog.FlowRecord`), not from packets.

A record does not carry everything a packet did: ends are named (a host endpoint, a
GlobalNetworkSet, or an address), not addressed, and the source port and ICMP type are
not kept. So every criterion is decided in three values, True, False or unknown, with
the proposed state standing in for what the record leaves out:

- a host endpoint's addresses are its `expectedIPs` in the proposed state, its labels its
  effective labels there (own, then profiles' labelsToApply); a GlobalNetworkSet's
  addresses are its nets there; an address end is exactly that address, held by the
  host endpoints and sets that hold it in the proposed state;
- an end the proposed state does not hold, or holds at other addresses than the store
  does now (given `current`), is unknown: no address, and any labels (those the record
  logged, any set's, any host endpoint's) may be its;
- a selector holds when labels certain to be at the address match it (the end's own,
  another host endpoint's at all of its addresses, a set's that covers them); it is
  unknown when only labels that may be there would match (a set that overlaps without
  covering, a host endpoint sharing some of the addresses);
- nets hold when every candidate address of the flow's IP version is inside them, fail
  when none is, and are unknown otherwise (a set that straddles a net);
- source ports, and ICMP type and code (for ICMP flows), are unknown;
- `domains`, and an egress Allow destination selector's network sets taken by their
  allowedEgressDomains, are decided from the names the record gives its destination
  (`dst_domains`, from the agent's DNS name cache); unknown when the record does not
  give them, or gives a full list (MAX_DOMAINS: it may have been cut) that matches not.

Then the policies are walked in Calico's order (`bulkhead.policy.evaluate`) on the
endpoint that reported the record, in its direction: a rule whose match is unknown
branches (it matched, and it did not), and every outcome reachable is kept, with the
reasons met on the way. When all outcomes agree on the action, the record is decided;
when they do not, it is undecided, with the reasons, and never guessed. Failsafe ports
are not policy: a record the failsafes let through stays so (its enforced trace says
it), and one they did not, stays out of them. An endpoint in observe mode in the
proposed state (its `microseg.bulkhead.io/enforcement` label; without one, the agent's
setting, which the record shows by its trace's last step `endpoint|observe|-|allow`)
blocks nothing: allow. A reporting endpoint that shares an address with another one is
undecided (which one's policies applied depends on the address).

The reference evaluator (`Evaluator`) decides packets; this module decides records. A
property test checks that whenever a record built from a packet (as the agent builds
it) is decided here, the decision is the evaluator's.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bulkhead.model import (
    EGRESS,
    ENFORCE,
    ENFORCEMENT_LABEL,
    INGRESS,
    OBSERVE,
    EntityRule,
    GlobalNetworkSet,
    HostEndpoint,
    NamedPort,
    Resource,
    Rule,
    Snapshot,
    StagedGlobalNetworkPolicy,
)
from bulkhead.model.checks import protocol_number
from bulkhead.model.flowlog import (
    FAILSAFE,
    MAX_DOMAINS,
    OBSERVE_STEP,
    PORTED,
    End,
    FlowRecord,
)
from bulkhead.net import FAMILIES, AddressSet
from bulkhead.policy.rules import domain_matches
from bulkhead.policy.semantics import (
    effective_labels,
    enforcement_mode,
    icmp_criterion,
    policy_layout,
    rule_ip_version,
    selects,
    side_selectors,
    untracked_ignored,
)
from bulkhead.policy.trace import failsafe, no_profile, profile_rule, rule_decision, tier_end
from bulkhead.selector import Selector

Tri = bool | None                # True, False, or unknown
Labels = Mapping[str, str]
MAX_REASONS = 4
MAX_VIEWS = 50_000               # ends' views kept; more: the cache starts again
BIG = 1 << 129                   # past every address: a bisect key


class NotFound(Exception):
    """A staged policy named to promote is not in the proposed state."""


class PromotionConflict(ValueError):
    """The staged policies named cannot all be promoted (as `POST /v1/promote` refuses)."""


def proposed_state(current: Sequence[Resource], manifests: Sequence[Resource],
                   promote: tuple[str, ...] | str | None, enforce: Selector | None = None
                   ) -> tuple[Snapshot, list[str]]:
    """The state to judge flows against, and the staged policies promoted into it: the
    store's resources with the manifests over them (same kind and name: the manifest's),
    the host endpoints `enforce` selects (by their effective labels) labelled to enforce
    mode, then the staged policies named (`all`; `none`; by default the manifests' staged
    policies when there are manifests, else every staged policy in the store)."""
    merged = {r.key: r for r in current}
    merged.update({r.key: r for r in manifests})
    snapshot = Snapshot.build(merged.values())
    if enforce is not None:
        heps = dict(snapshot.host_endpoints)
        for name, hep in heps.items():
            if enforce.matches(effective_labels(snapshot, hep)):
                labels = {**hep.metadata.labels, ENFORCEMENT_LABEL: ENFORCE}
                heps[name] = replace(hep, metadata=replace(hep.metadata, labels=labels))
        snapshot = replace(snapshot, host_endpoints=heps)
    if promote is None:
        promote = tuple(r.name for r in manifests
                        if isinstance(r, StagedGlobalNetworkPolicy)) if manifests else "all"
    if promote == "none":
        names: list[str] = []
    elif promote == "all":
        names = sorted(snapshot.staged)
    else:
        names = list(promote)
        missing = [n for n in names if n not in snapshot.staged]
        if missing:
            raise NotFound(f"StagedGlobalNetworkPolicy {missing[0]} not found (in the store "
                           "or the manifests); nothing was previewed")
    return promoted(snapshot, names), names


def promoted(snapshot: Snapshot, names: Sequence[str] | None = None) -> Snapshot:
    """The state after promoting the staged policies `names` (all of them: None), as
    `POST /v1/promote` leaves it and as the staged view (`semantics.staged_view`) sees
    it: stagedAction Set puts the enforced policy in the place of the one of its tier and
    bare name, Delete removes that one. Staged policies not named stay staged (and out of
    force). PromotionConflict where promote refuses: two staged policies standing for
    one policy (both named, or one named and the other staged), or a promoted name held
    by a policy of another tier."""
    wanted = None if names is None else set(names)
    chosen = [sp for sp in snapshot.staged.values() if wanted is None or sp.name in wanted]
    policies = dict(snapshot.policies)
    # The policies by tier and bare name, once: thousands of staged policies against
    # thousands of policies cost their sum, not their product (a viewer's preview).
    held: dict[tuple[str, str], list[str]] = {}
    for name, p in policies.items():
        held.setdefault((p.spec.tier, p.bare_name), []).append(name)
    standing: dict[tuple[str, str], list[str]] = {}
    for name, sp in snapshot.staged.items():
        standing.setdefault((sp.spec.tier, sp.bare_name), []).append(name)
    paired: dict[tuple[str, str], str] = {}
    for sp in sorted(chosen, key=lambda sp: sp.name):
        key = (sp.spec.tier, sp.bare_name)
        rivals = [n for n in standing[key] if wanted is not None and n not in wanted]
        if rivals:
            raise PromotionConflict(
                f"StagedGlobalNetworkPolicy {rivals[0]} stands for the policy "
                f"{sp.bare_name} of tier {sp.spec.tier} too, and the staged view shows "
                f"only one of them; delete one, then promote {sp.name}")
        if key in paired:
            raise PromotionConflict(
                f"StagedGlobalNetworkPolicy {paired[key]} and {sp.name} both stand for the "
                f"policy {sp.bare_name} of tier {sp.spec.tier}; promote one of them")
        paired[key] = sp.name
        for name in held.get(key, ()):
            del policies[name]
    for sp in chosen:
        if sp.spec.staged_action == "Delete":
            continue
        new = sp.enforced()
        other = policies.get(new.name)
        if other is not None:
            raise PromotionConflict(
                f"GlobalNetworkPolicy {new.name} is in tier {other.spec.tier}; promoting "
                f"StagedGlobalNetworkPolicy {sp.name} of tier {sp.spec.tier} would replace "
                "it")
        policies[new.name] = new
    promoted_names = {sp.name for sp in chosen}
    staged = {n: sp for n, sp in snapshot.staged.items() if n not in promoted_names}
    return replace(snapshot, policies=policies, staged=staged)


@dataclass(frozen=True)
class Judgement:
    """What the proposed policies decide about one record: `action` allow or deny, or
    None (undecided: the outcomes differ, `why` says which stored fields are missing).
    `steps` are the deciding steps (`tier|policy|rule|action`) of the outcomes."""

    action: str | None
    steps: tuple[str, ...]
    why: tuple[str, ...] = ()

    @property
    def decided(self) -> bool:
        return self.action is not None


@dataclass
class _EndView:
    """One end of a record as the proposed state sees it."""

    addresses: AddressSet | None                # candidates; None: unknown
    labels: list[Labels]                        # certain to apply to the address
    maybe: list[Labels]                         # may apply
    endpoints: list[HostEndpoint] | None        # host endpoints at the address; None: unknown
    name: str

    @property
    def versions(self) -> set[int]:
        if self.addresses is None:
            return set(FAMILIES)
        return {f for f in FAMILIES if self.addresses.spans(f)}


@dataclass
class _Ctx:
    record: FlowRecord
    src: _EndView
    dst: _EndView
    why: list[str] = field(default_factory=list)

    @property
    def versions(self) -> set[int]:
        """The IP versions the flow may have: those both ends may have."""
        return self.src.versions & self.dst.versions

    def unknown(self, reason: str) -> None:
        if reason not in self.why:
            self.why.append(reason)


@dataclass
class _Item:
    """One place of the flat program: a rule (None: a final Deny, at a tier's end or
    after the profiles), its step, and where a Pass goes (an untracked or pre-DNAT
    policy's Pass: past the rest of its tier's policies of that stage, as the evaluator
    has it)."""

    rule: Rule | None
    step: str
    pass_to: int = 0


def _and(values: Sequence[Tri]) -> Tri:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _or(a: Tri, b: Tri) -> Tri:
    if a is True or b is True:
        return True
    return None if a is None or b is None else False


def _not(value: Tri) -> Tri:
    return None if value is None else not value


def _covered(inner: AddressSet, outer: AddressSet, families: set[int]) -> bool:
    """Every address of `inner` of `families` is in `outer` (and there is one)."""
    some = False
    for f in families:
        spans = outer.spans(f)
        for lo, hi in inner.spans(f):
            some = True
            at = bisect.bisect_right(spans, (lo, BIG)) - 1
            if at < 0 or spans[at][1] < hi:
                return False
    return some


def _overlaps(a: AddressSet, b: AddressSet, families: set[int]) -> bool:
    """Some address of `families` is in both: each span of the one with fewer looked up
    in the other (a host endpoint's one or two addresses against a set of thousands)."""
    for f in families:
        small, large = sorted((a.spans(f), b.spans(f)), key=len)
        for lo, hi in small:
            at = bisect.bisect_right(large, (hi, BIG)) - 1
            if at >= 0 and large[at][1] >= lo:
                return True
    return False


class Impact:
    """Judges records against one proposed state: its enforced policies (staged ones are
    not in force: promote them into the snapshot first), host endpoints, network sets,
    profiles and tiers. `current`, the store as it is, tells which ends the proposed
    state moves (those are unknown). Build once, judge many records."""

    def __init__(self, proposed: Snapshot, current: Snapshot | None = None) -> None:
        self.snapshot = proposed
        heps = sorted(proposed.host_endpoints.values(), key=lambda h: h.name)
        self._heps = heps
        self._labels = {h.name: effective_labels(proposed, h) for h in heps}
        self._hep_addresses = {h.name: AddressSet.of(h.expected_ips) for h in heps}
        self._sets = [(s, AddressSet.of(s.nets)) for s in
                      sorted(proposed.network_sets.values(), key=lambda s: s.name)]
        self._moved: set[tuple[str, str]] = set()
        if current is not None:
            for h in heps:
                now = current.host_endpoints.get(h.name)
                if now is None or set(now.expected_ips) != set(h.expected_ips):
                    self._moved.add(("hep", h.name))
            for s, _ in self._sets:
                was = current.network_sets.get(s.name)
                if was is None or set(was.nets) != set(s.nets):
                    self._moved.add(("ns", s.name))
        self._at: dict[AddressSet, list[HostEndpoint]] = {}
        for h in heps:
            for ip in h.expected_ips:
                self._at.setdefault(AddressSet.of([ip]), []).append(h)
        self._tiers, self._untracked, self._pre_dnat = policy_layout(
            proposed, list(proposed.policies.values()))
        self._programs: dict[tuple[str, str], list[_Item]] = {}
        self._views: dict[tuple[str, str, str, frozenset[tuple[str, str]]], _EndView] = {}
        self._nets: dict[tuple[str, ...], AddressSet] = {}
        # An egress Allow selector -> the allowedEgressDomains of the sets it takes.
        self._egress_domains: dict[Selector, tuple[str, ...]] = {}

    # -- ends -------------------------------------------------------------------------
    def labels_of(self, end: End) -> Mapping[str, str]:
        """The end's labels as the proposed state has them (a host endpoint's
        effective labels, a network set's labels); the record's own only for an end the
        state does not hold (an address, or one gone): an agent says what labels it saw,
        the store says what they are."""
        if end.type == "hep" and end.name in self._labels:
            return self._labels[end.name]
        if end.type == "ns":
            found = self.snapshot.network_sets.get(end.name)
            if found is not None:
                return found.labels
        return end.labels

    def _view(self, end: End) -> _EndView:
        key = (end.type, end.name, end.scope, frozenset(end.labels.items()))
        found = self._views.get(key)
        if found is None:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            found = self._views[key] = self._make_view(end)
        return found

    def _unknown_end(self, end: End) -> _EndView:
        """An end the proposed state does not place: any address, any labels."""
        every: list[Labels] = [dict(end.labels), *(s.labels for s, _ in self._sets),
                               *self._labels.values()]
        return _EndView(None, [], every, None, end.name)

    def _make_view(self, end: End) -> _EndView:
        if end.type == "net":
            address = AddressSet.of([end.name])
            at = self._at.get(address, [])
            labels: list[Labels] = [self._labels[h.name] for h in at]
            labels += [s.labels for s, nets in self._sets if _covered(address, nets,
                                                                       set(FAMILIES))]
            return _EndView(address, labels, [], list(at), end.name)
        if end.type == "hep":
            hep = self.snapshot.host_endpoints.get(end.name)
            if hep is None or ("hep", end.name) in self._moved or not hep.expected_ips:
                return self._unknown_end(end)
            return self._hep_view(hep)
        netset = self.snapshot.network_sets.get(end.name)
        if netset is None or ("ns", end.name) in self._moved or not netset.nets:
            return self._unknown_end(end)
        return self._set_view(netset)

    def _hep_view(self, hep: HostEndpoint) -> _EndView:
        mine = self._hep_addresses[hep.name]
        certain: list[Labels] = [self._labels[hep.name]]
        maybe: list[Labels] = []
        endpoints: list[HostEndpoint] | None = [hep]
        for other in self._sharing(hep):
            if _covered(mine, self._hep_addresses[other.name], set(FAMILIES)):
                certain.append(self._labels[other.name])
                if endpoints is not None:
                    endpoints.append(other)
            else:
                maybe.append(self._labels[other.name])
                endpoints = None
        for s, nets in self._sets:
            if _covered(mine, nets, set(FAMILIES)):
                certain.append(s.labels)
            elif _overlaps(mine, nets, set(FAMILIES)):
                maybe.append(s.labels)
        return _EndView(mine, certain, maybe, endpoints, hep.name)

    def _set_view(self, netset: GlobalNetworkSet) -> _EndView:
        mine = next(nets for s, nets in self._sets if s is netset)
        certain: list[Labels] = [netset.labels]
        maybe: list[Labels] = []
        for s, nets in self._sets:
            if s is netset:
                continue
            if _covered(mine, nets, set(FAMILIES)):
                certain.append(s.labels)
            elif _overlaps(mine, nets, set(FAMILIES)):
                maybe.append(s.labels)
        inside = [h for h in self._heps
                  if _overlaps(self._hep_addresses[h.name], mine, set(FAMILIES))]
        maybe += [self._labels[h.name] for h in inside]
        # The address may be one of those endpoints': their named ports may apply.
        return _EndView(mine, certain, maybe, None if inside else [], netset.name)

    def _sharing(self, hep: HostEndpoint) -> list[HostEndpoint]:
        """Other host endpoints with an address of `hep`."""
        out: dict[str, HostEndpoint] = {}
        for ip in hep.expected_ips:
            for other in self._at.get(AddressSet.of([ip]), []):
                if other.name != hep.name:
                    out[other.name] = other
        return list(out.values())

    # -- criteria ---------------------------------------------------------------------
    def _rule(self, ctx: _Ctx, rule: Rule) -> Tri:
        r = ctx.record
        values: list[Tri] = []
        version = rule_ip_version(rule)
        if version is not None:
            possible = ctx.versions
            if possible == {version}:
                values.append(True)
            elif version not in possible:
                values.append(False)
            else:
                placed = ctx.src.addresses is not None and ctx.dst.addresses is not None
                ctx.unknown("the IP version (records do not keep it, and both ends have "
                            "IPv4 and IPv6 addresses)" if placed else
                            "the IP version (records do not keep it, and an end is not "
                            "placed by the proposed state)")
                values.append(None)
        if rule.protocol is not None:
            values.append(r.proto == protocol_number(rule.protocol))
        if rule.not_protocol is not None:
            values.append(r.proto != protocol_number(rule.not_protocol))
        if rule.icmp is not None:
            values.append(self._icmp(ctx, rule.icmp.type, rule.icmp.code))
        not_icmp = icmp_criterion(rule.not_icmp)
        if not_icmp is not None:
            # Only ICMP messages (semantics): a record of TCP or UDP never matches.
            values.append(False if r.proto not in (1, 58)
                          else _not(self._icmp(ctx, not_icmp.type, not_icmp.code)))
        if False in values:
            return False
        values += self._side(ctx, rule.source, ctx.src, "source")
        # An egress Allow rule's destination selector also takes the network sets whose
        # allowedEgressDomains the destination's names match.
        by_name = r.reporter == "src" and rule.action == "Allow"
        values += self._side(ctx, rule.destination, ctx.dst, "destination", by_name)
        return _and(values)

    def _icmp(self, ctx: _Ctx, type_: int | None, code: int | None) -> Tri:
        if ctx.record.proto not in (1, 58):
            return type_ is None and code is None
        if type_ is None and code is None:
            return True
        ctx.unknown("the ICMP type and code (flow records do not keep them)")
        return None

    def _side(self, ctx: _Ctx, entity: EntityRule, end: _EndView, side: str,
              by_name: bool = False) -> list[Tri]:
        out: list[Tri] = []
        if entity.nets:
            out.append(self._in_nets(ctx, end, entity.nets, side))
        if entity.not_nets:
            out.append(_not(self._in_nets(ctx, end, entity.not_nets, side)))
        positive, negative = side_selectors(entity)   # both: one (semantics)
        if positive is not None:
            selected = self._selected(ctx, end, positive.matches, side)
            if by_name and selected is not True:
                selected = _or(selected, self._by_name(ctx, positive))
            out.append(selected)
        if negative is not None:
            out.append(_not(self._selected(ctx, end, negative.matches, side)))
        if entity.ports:
            out.append(self._ports(ctx, end, entity.ports, side, positive))
        if entity.not_ports:
            out.append(_not(self._ports(ctx, end, entity.not_ports, side, positive)))
        if entity.domains:
            out.append(self._named(ctx, entity.domains))
        return out

    def _named(self, ctx: _Ctx, patterns: Sequence[str]) -> Tri:
        """Whether the names the record gives its destination match `patterns` (Calico's
        wildcards): unknown when the record does not say them, or when the list it has is
        full (it may have been cut short) and matches nothing."""
        names = ctx.record.dst_domains
        if names is None or ctx.record.reporter != "src":
            ctx.unknown("the destination's domain names (the reporting agent did not say "
                        "them: it does not snoop DNS, or predates the field)")
            return None
        if domain_matches(patterns, frozenset(names)):
            return True
        if len(names) >= MAX_DOMAINS:
            ctx.unknown(f"the destination's domain names (the record keeps only the first "
                        f"{MAX_DOMAINS})")
            return None
        return False

    def _by_name(self, ctx: _Ctx, selector: Selector) -> Tri:
        """Whether a network set the selector matches allows the destination by name."""
        patterns = self._egress_domains.get(selector)
        if patterns is None:
            patterns = self._egress_domains[selector] = tuple(sorted({
                p for s, _ in self._sets if s.allowed_egress_domains
                and selector.matches(s.labels) for p in s.allowed_egress_domains}))
        return self._named(ctx, patterns) if patterns else False

    def _in_nets(self, ctx: _Ctx, end: _EndView, cidrs: Sequence[str], side: str) -> Tri:
        if end.addresses is None:
            ctx.unknown(f"the {side} address ({end.name}: not placed by the proposed state)")
            return None
        nets = self._nets.get(tuple(cidrs))
        if nets is None:
            nets = self._nets[tuple(cidrs)] = AddressSet.of(cidrs)
        versions = ctx.versions
        if _covered(end.addresses, nets, versions):
            return True
        if not _overlaps(end.addresses, nets, versions):
            return False
        ctx.unknown(f"the {side} address ({end.name}: some of its addresses are in "
                    f"{list(cidrs)[:4]}, some not)")
        return None

    def _selected(self, ctx: _Ctx, end: _EndView, matches: Callable[[Labels], bool],
                  side: str) -> Tri:
        if any(matches(labels) for labels in end.labels):
            return True
        if any(matches(labels) for labels in end.maybe):
            ctx.unknown(f"the {side} address ({end.name}): whether a network set or host "
                        "endpoint a selector matches holds it")
            return None
        return False

    def _ports(self, ctx: _Ctx, end: _EndView, ports: Sequence[object], side: str,
               selector: Selector | None) -> Tri:
        """A named port counts only on an endpoint the side's selector matches (rules)."""
        r = ctx.record
        if r.proto not in PORTED:
            return False
        if side == "source":
            ctx.unknown("the source port (flow records do not keep it)")
            return None
        unknown = False
        for p in ports:
            if isinstance(p, NamedPort):
                if end.endpoints is None:
                    unknown = True
                elif any(ep.name == p.name and protocol_number(ep.protocol) == r.proto
                         and ep.port == r.dst_port
                         and (selector is None or selector.matches(self._labels[h.name]))
                         for h in end.endpoints for ep in h.ports):
                    return True
            elif r.dst_port in p:  # type: ignore[operator]
                return True
        if unknown:
            ctx.unknown(f"the named ports at {end.name} (which host endpoint holds the "
                        "address is not known)")
            return None
        return False

    # -- the walk ---------------------------------------------------------------------
    def judge(self, record: FlowRecord) -> Judgement:
        """What the proposed policies decide about the record on the endpoint that
        reported it, in its direction."""
        direction = INGRESS if record.reporter == "dst" else EGRESS
        local = record.dst if direction == INGRESS else record.src
        if any(s.split("|")[:2] == [FAILSAFE, FAILSAFE] for s in record.enforced_trace):
            return Judgement("allow", (failsafe(direction).step,))
        if local.type != "hep":
            return Judgement(None, (), (f"the reporting end {local.name} is no host endpoint",))
        hep = self.snapshot.host_endpoints.get(local.name)
        if hep is None:
            return Judgement(None, (), (f"host endpoint {local.name} is not in the proposed "
                                        "state",))
        if ("hep", hep.name) in self._moved:
            return Judgement(None, (), (f"host endpoint {hep.name} has other addresses in "
                                        "the proposed state",))
        sharing = self._sharing(hep)
        if sharing:
            return Judgement(None, (), (f"host endpoint {hep.name} shares an address with "
                                        f"{sharing[0].name}: whose policies applied depends "
                                        "on the address",))
        # The agent's own setting, for an endpoint without the label: what the record
        # shows (an observing endpoint's records end with the observe step).
        setting = OBSERVE if OBSERVE_STEP in record.enforced_trace else ENFORCE
        if enforcement_mode(self._labels[hep.name], setting) == OBSERVE:
            return Judgement("allow", (OBSERVE_STEP,))
        ctx = _Ctx(record, self._view(record.src), self._view(record.dst))
        outcomes, why = self._walk(ctx, hep, direction)
        actions = {a for a, _ in outcomes}
        steps = tuple(sorted({s for _, s in outcomes}))
        if len(actions) == 1:
            return Judgement(actions.pop(), steps)
        return Judgement(None, steps, tuple(why[:MAX_REASONS]))

    def _program(self, hep: HostEndpoint, direction: str) -> list[_Item]:
        """The endpoint's policies in one direction laid out flat, as the evaluator walks
        them: untracked and pre-DNAT policies, tiers with their ends, profiles, the final
        Deny. The same for every record of the endpoint: kept."""
        found = self._programs.get((hep.name, direction))
        if found is not None:
            return found
        labels = self._labels[hep.name]
        program: list[_Item] = []
        early = ([] if untracked_ignored(hep) else self._untracked) + \
            (self._pre_dnat if direction == INGRESS else [])
        group: list[_Item] = []
        group_key: tuple[bool, str] | None = None
        for policy in early:
            if not selects(policy, labels, direction):
                continue
            # A Pass skips the rest of its tier's policies of the same stage.
            key = (policy.spec.do_not_track, policy.spec.tier)
            if key != group_key:
                group, group_key = [], key
            for i, rule in enumerate(policy.spec.rules(direction)):
                item = _Item(rule, rule_decision(direction, policy.spec.tier, policy.name,
                                                 i, rule.action).step)
                group.append(item)
                program.append(item)
            for item in group:
                item.pass_to = len(program)
        for tier, policies in self._tiers:
            selecting = [p for p in policies if selects(p, labels, direction)]
            if not selecting:
                continue
            items = [_Item(rule, rule_decision(direction, tier.name, p.name, i,
                                               rule.action).step)
                     for p in selecting for i, rule in enumerate(p.spec.rules(direction))]
            end = len(program) + len(items) + (1 if tier.default_action != "Pass" else 0)
            for item in items:
                item.pass_to = end
            program += items
            if tier.default_action != "Pass":
                program.append(_Item(None, tier_end(direction, tier.name, "Deny").step))
        for name in hep.profiles:
            profile = self.snapshot.profiles.get(name)
            if profile is None:
                continue
            rules = profile.rules(direction)
            start = len(program)
            for i, rule in enumerate(rules):
                program.append(_Item(rule, profile_rule(direction, name, i, rule.action).step,
                                     pass_to=start + len(rules)))
        program.append(_Item(None, no_profile(direction).step))
        self._programs[(hep.name, direction)] = program
        return program

    def _walk(self, ctx: _Ctx, hep: HostEndpoint, direction: str
              ) -> tuple[frozenset[tuple[str, str]], list[str]]:
        """Every (action, deciding step) the policies can reach for the record, and the
        reasons of the unknown matches on the way there: outcomes are computed from the
        program's end backwards, so an unknown match costs a union, not a second walk."""
        program = self._program(hep, direction)
        outcomes: list[frozenset[tuple[str, str]]] = [frozenset()] * len(program)
        reasons: list[tuple[str, ...]] = [()] * len(program)
        for index in range(len(program) - 1, -1, -1):
            item = program[index]
            if item.rule is None:
                outcomes[index] = frozenset({("deny", item.step)})
                continue
            action = item.rule.action
            ctx.why = []
            match = self._rule(ctx, item.rule)
            if match is False or action == "Log":
                outcomes[index], reasons[index] = outcomes[index + 1], reasons[index + 1]
                continue
            if action == "Pass":
                hit, hit_why = outcomes[item.pass_to], reasons[item.pass_to]
            else:
                hit, hit_why = frozenset({(action.lower(), item.step)}), ()
            if match:
                outcomes[index], reasons[index] = hit, hit_why
            else:
                outcomes[index] = hit | outcomes[index + 1]
                reasons[index] = tuple(dict.fromkeys(
                    (*ctx.why, *hit_why, *reasons[index + 1])))[:MAX_REASONS]
        return outcomes[0], list(reasons[0])
