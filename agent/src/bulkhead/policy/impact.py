"""Policy impact: what a proposed set of policies would decide about flows already seen,
judged from stored flow records (`bulkhead.model.flowlog.FlowRecord`), not from packets.

A record does not carry everything a packet did: ends are named (a host endpoint, a
GlobalNetworkSet, or an address), not addressed, and the source port, ICMP type and the
names the destination was resolved from are not kept. So every criterion is decided in
three values, True, False or unknown, with the proposed state standing in for what the
record leaves out:

- a host endpoint's addresses are its `expectedIPs` in the proposed state, its labels its
  effective labels there (own, then profiles' labelsToApply); a GlobalNetworkSet's
  addresses are its nets there; an address end is exactly that address. An end the
  proposed state does not hold keeps the labels the record logged, and its addresses
  are unknown;
- a selector holds when the end's own labels match it, or those of a network set (or
  host endpoint) certain to hold the address; it is unknown when only one that may hold
  it (overlapping, not covering, or the end's addresses unknown) would match;
- nets hold when every candidate address is inside them, fail when none is, and are
  unknown otherwise (a host endpoint with two addresses, a set that straddles a net);
- source ports, ICMP type and code (for ICMP flows), and domains are unknown.

Then the policies are walked in Calico's order (`bulkhead.policy.evaluate`) on the
endpoint that reported the record, in its direction: a rule whose match is unknown
branches (it matched, and it did not), and every outcome reachable is kept. When all
outcomes agree on the action, the record is decided; when they do not, it is undecided,
with the reasons, and never guessed. Failsafe ports are not policy: a record the
failsafes let through stays so (its enforced trace says it), and one they did not,
stays out of them. An endpoint in observe mode in the proposed state (its
`microseg.bulkhead.io/enforcement` label; without one, the agent's setting, which the
record shows by its trace's last step `endpoint|observe|-|allow`) blocks nothing: allow.

The reference evaluator (`Evaluator`) decides packets; this module decides records. A
property test checks that whenever a record built from a packet (as the agent builds
it) is decided here, the decision is the evaluator's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from bulkhead.model import (
    EGRESS,
    ENFORCE,
    ENFORCEMENT_LABEL,
    INGRESS,
    OBSERVE,
    EntityRule,
    GlobalNetworkPolicy,
    HostEndpoint,
    NamedPort,
    Resource,
    Rule,
    Snapshot,
    StagedGlobalNetworkPolicy,
)
from bulkhead.model.checks import protocol_number
from bulkhead.model.flowlog import FAILSAFE, OBSERVE_STEP, End, FlowRecord
from bulkhead.policy.semantics import (
    effective_labels,
    enforcement_mode,
    rule_ip_version,
    selects,
)
from bulkhead.policy.trace import failsafe, no_profile, profile_rule, rule_decision, tier_end
from bulkhead.selector import Selector

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Tri = bool | None                # True, False, or unknown
PORTED = (6, 17, 132, 136)
MAX_REASONS = 4


class NotFound(Exception):
    """A staged policy named to promote is not in the proposed state."""


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
        for name, hep in list(snapshot.host_endpoints.items()):
            if enforce.matches(effective_labels(snapshot, hep)):
                labels = {**hep.metadata.labels, ENFORCEMENT_LABEL: ENFORCE}
                snapshot.host_endpoints[name] = replace(
                    hep, metadata=replace(hep.metadata, labels=labels))
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
    `POST /v1/promote` would leave it: stagedAction Set puts the enforced policy in the
    place of the one of its tier and bare name, Delete removes that one. Staged policies
    not named stay staged (and out of force)."""
    chosen = [sp for sp in snapshot.staged.values() if names is None or sp.name in names]
    policies = dict(snapshot.policies)
    for sp in chosen:
        for name, p in list(policies.items()):
            if p.spec.tier == sp.spec.tier and p.bare_name == sp.bare_name:
                del policies[name]
        if sp.spec.staged_action != "Delete":
            new = sp.enforced()
            policies[new.name] = new
    staged = {n: sp for n, sp in snapshot.staged.items() if sp not in chosen}
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

    addresses: list[Network] | None            # candidates; None: unknown
    labels: list[Mapping[str, str]]             # certain to apply to the address
    maybe: list[Mapping[str, str]]              # may apply
    endpoints: list[HostEndpoint] | None        # host endpoints at the address; None: unknown
    name: str

    @property
    def versions(self) -> set[int]:
        if self.addresses is None:
            return {4, 6}
        return {n.version for n in self.addresses}


@dataclass
class _Ctx:
    record: FlowRecord
    src: _EndView
    dst: _EndView
    why: list[str] = field(default_factory=list)

    def unknown(self, reason: str) -> None:
        if reason not in self.why:
            self.why.append(reason)


def _and(values: Sequence[Tri]) -> Tri:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _not(value: Tri) -> Tri:
    return None if value is None else not value


class Impact:
    """Judges records against one proposed state: its enforced policies (staged ones are
    not in force: promote them into the snapshot first), host endpoints, network sets,
    profiles and tiers. Build once, judge many records."""

    def __init__(self, proposed: Snapshot) -> None:
        self.snapshot = proposed
        self._labels = {h.name: effective_labels(proposed, h)
                        for h in proposed.host_endpoints.values()}
        self._hep_nets = {h.name: [_net(ip) for ip in h.expected_ips]
                          for h in proposed.host_endpoints.values()}
        self._sets = [(s, [ipaddress.ip_network(n, strict=False) for n in s.nets])
                      for s in sorted(proposed.network_sets.values(), key=lambda s: s.name)]
        policies = [p for p in proposed.policies.values()]
        normal = [p for p in policies if not (p.spec.do_not_track or p.spec.pre_dnat)]
        tiers = proposed.ordered_tiers()
        rank = {t.name: i for i, t in enumerate(tiers)}
        self._tiers = [(t, sorted((p for p in normal if p.spec.tier == t.name),
                                  key=lambda p: _order(p))) for t in tiers]
        self._untracked = sorted((p for p in policies if p.spec.do_not_track),
                                 key=lambda p: (rank[p.spec.tier], _order(p)))
        self._pre_dnat = sorted((p for p in policies if p.spec.pre_dnat),
                                key=lambda p: (rank[p.spec.tier], _order(p)))
        self._views: dict[tuple[str, str, str, frozenset[tuple[str, str]]], _EndView] = {}

    # -- ends -------------------------------------------------------------------------
    def _view(self, end: End) -> _EndView:
        key = (end.type, end.name, end.scope, frozenset(end.labels.items()))
        found = self._views.get(key)
        if found is None:
            found = self._views[key] = self._make_view(end)
            if len(self._views) > 50_000:
                self._views.clear()
        return found

    def _make_view(self, end: End) -> _EndView:
        if end.type == "net":
            try:
                ip = ipaddress.ip_address(end.name)
            except ValueError:
                return _EndView(None, [], [dict(end.labels)], None, end.name)
            net = _net(str(ip))
            heps = [h for h in self._sorted_heps() if net in self._hep_nets[h.name]]
            labels: list[Mapping[str, str]] = [self._labels[h.name] for h in heps]
            labels += [s.labels for s, nets in self._sets if _covered([net], nets)]
            return _EndView([net], labels, [], heps, end.name)
        if end.type == "hep":
            hep = self.snapshot.host_endpoints.get(end.name)
            if hep is None:
                return _EndView(None, [dict(end.labels)], [s.labels for s, _ in self._sets],
                                None, end.name)
            nets = self._hep_nets[hep.name] or None
            certain: list[Mapping[str, str]] = [self._labels[hep.name]]
            maybe: list[Mapping[str, str]] = []
            for s, snets in self._sets:
                if nets is None:
                    maybe.append(s.labels)
                elif _covered(nets, snets):
                    certain.append(s.labels)
                elif _overlaps(nets, snets):
                    maybe.append(s.labels)
            return _EndView(nets, certain, maybe, [hep], end.name)
        # a GlobalNetworkSet
        found = next((s for s, _ in self._sets if s.name == end.name), None)
        if found is None:
            every = [s.labels for s, _ in self._sets] + list(self._labels.values())
            return _EndView(None, [dict(end.labels)], every, None, end.name)
        mine = [n for s, nets in self._sets if s is found for n in nets]
        certain = [found.labels]
        maybe = []
        for s, snets in self._sets:
            if s is found:
                continue
            if _covered(mine, snets):
                certain.append(s.labels)
            elif _overlaps(mine, snets):
                maybe.append(s.labels)
        inside = [h for h in self._sorted_heps() if _overlaps(self._hep_nets[h.name], mine)]
        maybe += [self._labels[h.name] for h in inside]
        # The address may be one of those endpoints': their named ports may apply.
        return _EndView(mine or None, certain, maybe, None if inside else [], end.name)

    def _sorted_heps(self) -> list[HostEndpoint]:
        return sorted(self.snapshot.host_endpoints.values(), key=lambda h: h.name)

    # -- criteria ---------------------------------------------------------------------
    def _rule(self, ctx: _Ctx, rule: Rule) -> Tri:
        r = ctx.record
        values: list[Tri] = []
        version = rule_ip_version(rule)
        if version is not None:
            possible = ctx.src.versions & ctx.dst.versions
            if possible == {version}:
                values.append(True)
            elif version not in possible:
                values.append(False)
            else:
                ctx.unknown("the IP version (no address of an end is known)")
                values.append(None)
        if rule.protocol is not None:
            values.append(r.proto == protocol_number(rule.protocol))
        if rule.not_protocol is not None:
            values.append(r.proto != protocol_number(rule.not_protocol))
        if rule.icmp is not None:
            values.append(self._icmp(ctx, rule.icmp.type, rule.icmp.code))
        if rule.not_icmp is not None:
            values.append(_not(self._icmp(ctx, rule.not_icmp.type, rule.not_icmp.code)))
        if False in values:
            return False
        values += self._side(ctx, rule.source, ctx.src, "source")
        values += self._side(ctx, rule.destination, ctx.dst, "destination")
        return _and(values)

    def _icmp(self, ctx: _Ctx, type_: int | None, code: int | None) -> Tri:
        if ctx.record.proto not in (1, 58):
            return type_ is None and code is None
        if type_ is None and code is None:
            return True
        ctx.unknown("the ICMP type and code (flow records do not keep them)")
        return None

    def _side(self, ctx: _Ctx, entity: EntityRule, end: _EndView, side: str) -> list[Tri]:
        out: list[Tri] = []
        if entity.nets:
            out.append(self._nets(ctx, end, entity.nets, side))
        if entity.not_nets:
            out.append(_not(self._nets(ctx, end, entity.not_nets, side)))
        if entity.selector is not None:
            out.append(self._selected(ctx, end, entity.selector.matches, side))
        if entity.not_selector is not None:
            out.append(_not(self._selected(ctx, end, entity.not_selector.matches, side)))
        if entity.ports:
            out.append(self._ports(ctx, end, entity.ports, side))
        if entity.not_ports:
            out.append(_not(self._ports(ctx, end, entity.not_ports, side)))
        if entity.domains:
            ctx.unknown("the destination's domain names (flow records do not keep them)")
            out.append(None)
        return out

    def _nets(self, ctx: _Ctx, end: _EndView, cidrs: Sequence[str], side: str) -> Tri:
        if end.addresses is None:
            ctx.unknown(f"the {side} address ({end.name}: no address known)")
            return None
        nets = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        if _covered(end.addresses, nets):
            return True
        if not _overlaps(end.addresses, nets):
            return False
        ctx.unknown(f"the {side} address ({end.name}: some of its addresses are in "
                    f"{list(cidrs)}, some not)")
        return None

    def _selected(self, ctx: _Ctx, end: _EndView, matches: Callable[[Mapping[str, str]], bool],
                  side: str) -> Tri:
        if any(matches(labels) for labels in end.labels):
            return True
        if any(matches(labels) for labels in end.maybe):
            ctx.unknown(f"the {side} address ({end.name}): whether a network set or host "
                        "endpoint a selector matches holds it")
            return None
        return False

    def _ports(self, ctx: _Ctx, end: _EndView, ports: Sequence[object], side: str) -> Tri:
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
                         and ep.port == r.dst_port for h in end.endpoints for ep in h.ports):
                    return True
            elif r.dst_port in p:  # type: ignore[operator]
                return True
        if unknown:
            ctx.unknown(f"the named ports at {end.name} (its host endpoint is not known)")
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
        # The agent's own setting, for an endpoint without the label: what the record
        # shows (an observing endpoint's records end with the observe step).
        setting = OBSERVE if OBSERVE_STEP in record.enforced_trace else ENFORCE
        if enforcement_mode(self._labels[hep.name], setting) == OBSERVE:
            return Judgement("allow", (OBSERVE_STEP,))
        ctx = _Ctx(record, self._view(record.src), self._view(record.dst))
        outcomes = self._walk(ctx, hep, direction)
        actions = {a for a, _ in outcomes}
        steps = tuple(sorted({s for _, s in outcomes}))
        if len(actions) == 1:
            return Judgement(actions.pop(), steps)
        return Judgement(None, steps, tuple(ctx.why[:MAX_REASONS]))

    def _walk(self, ctx: _Ctx, hep: HostEndpoint, direction: str) -> frozenset[tuple[str, str]]:
        """Every (action, deciding step) the policies can reach for the record: the
        program is laid out flat, then its outcomes computed from the end backwards, so
        an unknown match costs a union, not a second walk."""
        labels = self._labels[hep.name]
        program: list[_Item] = []
        early = list(self._untracked) + (list(self._pre_dnat) if direction == INGRESS else [])
        for policy in early:
            if selects(policy, labels, direction):
                start = len(program)
                rules = policy.spec.rules(direction)
                for i, rule in enumerate(rules):
                    program.append(_Item(rule, rule_decision(direction, policy.spec.tier,
                                                             policy.name, i, rule.action).step,
                                         pass_to=start + len(rules)))
        for tier, policies in self._tiers:
            selecting = [p for p in policies if selects(p, labels, direction)]
            if not selecting:
                continue
            items: list[_Item] = []
            for policy in selecting:
                for i, rule in enumerate(policy.spec.rules(direction)):
                    items.append(_Item(rule, rule_decision(direction, tier.name, policy.name,
                                                           i, rule.action).step))
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

        outcomes: list[frozenset[tuple[str, str]]] = [frozenset()] * len(program)
        for index in range(len(program) - 1, -1, -1):
            item = program[index]
            if item.rule is None:
                outcomes[index] = frozenset({("deny", item.step)})
                continue
            action = item.rule.action
            after = outcomes[index + 1]
            match = self._rule(ctx, item.rule)
            if match is False or action == "Log":
                outcomes[index] = after
                continue
            if action == "Pass":
                hit = outcomes[item.pass_to]
            else:
                hit = frozenset({(action.lower(), item.step)})
            outcomes[index] = hit if match else hit | after
        return outcomes[0]


@dataclass
class _Item:
    """One place of the flat program: a rule (None: a final Deny, at a tier's end or
    after the profiles), its step, and where a Pass goes (an untracked or pre-DNAT
    policy's Pass: on to the next such policy, as the evaluator has it)."""

    rule: Rule | None
    step: str
    pass_to: int = 0


def _order(p: GlobalNetworkPolicy) -> tuple[int, float, str]:
    from bulkhead.model.snapshot import order_key
    return order_key(p.spec.order, p.name)


def _net(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)


def _covered(candidates: Sequence[Network], nets: Sequence[Network]) -> bool:
    """Every candidate network lies inside one of `nets`."""
    return bool(candidates) and all(
        any(c.version == n.version and c.subnet_of(n) for n in nets)  # type: ignore[arg-type]
        for c in candidates)


def _overlaps(candidates: Sequence[Network], nets: Sequence[Network]) -> bool:
    return any(c.version == n.version and c.overlaps(n) for c in candidates for n in nets)
