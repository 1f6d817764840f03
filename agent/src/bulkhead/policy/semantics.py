"""What the calculation (`plan`) and the reference evaluator (`evaluate`) must agree on,
written once from Calico's documented semantics and tested on its own
(tests/test_semantics.py), so that neither side stands on the other.

- An endpoint's labels: its own, then each profile's `labelsToApply` in the order the
  profiles are listed; a key takes the first value found (Felix's label index looks up
  the endpoint's labels, then its parents in order: felix/labelindex/endpoint_data.go).
- Which policies select an endpoint in a direction: `types` decides. The model gives an
  omitted `types` its default when the resource is read (libcalico-go's client does it
  before storing: Egress if only egress rules, both if both, else Ingress), so every
  policy here has its types; rules of a direction `types` leaves out never apply.
- The staged view: each staged policy replaces (stagedAction Set) or removes (Delete)
  the enforced policies of the same tier and name (either spelling, `p` or `t1.p`); the
  other enforced policies stay, each of its own.
- A host endpoint with `interfaceName: "*"` takes no untracked (doNotTrack) policy:
  felix ignores them there, with a warning (felix/dataplane/linux/endpoint_mgr.go,
  "DoNotTrack policy is not supported for a HEP with `interfaceName: *`"); its pre-DNAT
  and normal policies apply.
- A rule side's `selector` and `notSelector` together are one selector, `(selector) &&
  !(notSelector)`, each endpoint and network set judged on its own labels: felix folds
  the negation into the positive selector when there is one
  (felix/calc/rule_scanner.go, combineMatchesIfPossible), so an endpoint the selector
  takes is not left out because a network set holding its address matches the
  notSelector. Alone, a notSelector leaves out every address something it matches holds.
- An endpoint's enforcement mode: the `microseg.bulkhead.io/enforcement` label of its
  effective labels (observe or enforce), else the agent's default. Observe changes what
  happens to a packet (nothing is blocked), never which policy decides.
- The IP version a rule is limited to: `ipVersion`, else that of its nets (Felix renders
  a rule with IPv4 nets into the IPv4 ruleset only), else that of an ICMP protocol.
- A rule's `icmp` and `notICMP` are criteria only with a type: felix builds its ICMP match
  from the type (`if in.NotICMPType != nil`), so `notICMP: {}` is no criterion and
  `icmp: {}` matches every message of the rule's protocol.
- A `notICMP` with a type matches only ICMP messages of the packet's own family (ICMP in
  IPv4, ICMPv6 in IPv6) other than that type (and code), never TCP or UDP: felix renders
  it as `icmp type != N` in its IPv4 table and `icmpv6 type != N` in its IPv6 one
  (felix/rules/policy.go, `NotICMPType`), matches that carry the ICMP protocol with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bulkhead.model import (
    ENFORCE,
    ENFORCEMENT_LABEL,
    ENFORCEMENT_MODES,
    EntityRule,
    GlobalNetworkPolicy,
    HostEndpoint,
    ICMPMatch,
    Rule,
    Snapshot,
    Tier,
)
from bulkhead.model.checks import protocol_number
from bulkhead.model.snapshot import order_key
from bulkhead.selector import Selector, and_not


def effective_labels(snapshot: Snapshot, hep: HostEndpoint) -> Mapping[str, str]:
    """The endpoint's labels, then its profiles' labelsToApply: the first value of a
    key wins. A profile that does not exist adds nothing. (The endpoint's own mapping
    when no profile adds a label: not a copy per endpoint. Read, never written.)"""
    merged: dict[str, str] | None = None
    for name in hep.profiles:
        profile = snapshot.profiles.get(name)
        if profile is None:
            continue
        for key, value in profile.labels_to_apply.items():
            if key not in hep.labels and (merged is None or key not in merged):
                if merged is None:
                    merged = dict(hep.labels)
                merged[key] = value
    return hep.labels if merged is None else merged


def enforcement_mode(labels: Mapping[str, str], default: str = ENFORCE) -> str:
    """`observe` or `enforce`: the endpoint's enforcement label (its effective labels,
    see `effective_labels`) if it holds a mode, else `default` (the agent's setting).
    The model refuses any other value of the label; one that got past it anyway is
    ignored here."""
    value = labels.get(ENFORCEMENT_LABEL)
    return value if value in ENFORCEMENT_MODES else default


def selects(policy: GlobalNetworkPolicy, labels: Mapping[str, str], direction: str) -> bool:
    """Whether the policy applies to an endpoint with these labels in `direction`."""
    return direction in policy.spec.types and policy.spec.selector.matches(labels)


def staged_view(snapshot: Snapshot) -> list[GlobalNetworkPolicy]:
    """The enforced policies with the staged ones applied (Set replaces, Delete removes).
    A staged policy stands for every enforced policy of its tier and bare name (`p` and
    `t1.p` in tier t1, which may both be stored), as promote deletes them all; an
    enforced policy no staged policy stands for stays, whatever other policy shares its
    bare name. (Two staged policies for one policy, which promote refuses: the last.)"""
    standing: dict[tuple[str, str], GlobalNetworkPolicy] = {}
    for sp in snapshot.staged.values():
        standing[(sp.spec.tier, sp.bare_name)] = sp
    view = [p for p in snapshot.policies.values()
            if (p.spec.tier, p.bare_name) not in standing]
    return view + [sp for sp in standing.values() if sp.spec.staged_action != "Delete"]


def policy_order(policy: GlobalNetworkPolicy) -> tuple[int, float, str]:
    """Calico's order of policies in a tier: by order, unset last, ties by name."""
    return order_key(policy.spec.order, policy.name)


def policy_layout(snapshot: Snapshot, policies: Sequence[GlobalNetworkPolicy]
                  ) -> tuple[list[tuple[Tier, list[GlobalNetworkPolicy]]],
                             list[GlobalNetworkPolicy], list[GlobalNetworkPolicy]]:
    """`policies` in the order they are evaluated: per tier (tier order) the normal ones
    in policy order; then the untracked (doNotTrack) and the pre-DNAT ones apart, each
    in tier order, then policy order (they are evaluated before the tiers)."""
    tiers = snapshot.ordered_tiers()
    rank = {t.name: i for i, t in enumerate(tiers)}
    normal = [p for p in policies if not (p.spec.do_not_track or p.spec.pre_dnat)]
    layout = [(t, sorted((p for p in normal if p.spec.tier == t.name), key=policy_order))
              for t in tiers]

    def early(p: GlobalNetworkPolicy) -> tuple[int, tuple[int, float, str]]:
        return (rank[p.spec.tier], policy_order(p))

    return (layout, sorted((p for p in policies if p.spec.do_not_track), key=early),
            sorted((p for p in policies if p.spec.pre_dnat), key=early))


def rule_ip_version(rule: Rule) -> int | None:
    """The IP version a rule is limited to: `ipVersion`, else that of its nets, else that
    of an ICMP protocol (ICMP is IPv4's, ICMPv6 IPv6's); None when it applies to both."""
    if rule.ip_version is not None:
        return rule.ip_version
    for side in (rule.source, rule.destination):
        for net in (*side.nets, *side.not_nets):
            return 6 if ":" in net else 4
    if rule.protocol is not None:
        number = protocol_number(rule.protocol)
        if number == 1:
            return 4
        if number == 58:
            return 6
    return None


def side_selectors(entity: EntityRule) -> tuple[Selector | None, Selector | None]:
    """A rule side's (selector, notSelector) as they match: with both, one selector
    `(selector) && !(notSelector)` and no notSelector (see the module's docstring)."""
    if entity.selector is not None and entity.not_selector is not None:
        return and_not(entity.selector, entity.not_selector), None
    return entity.selector, entity.not_selector


def untracked_ignored(hep: HostEndpoint) -> bool:
    """Whether the endpoint takes no untracked policy: one on every interface ("*")."""
    return hep.interface_name == "*"


def icmp_protocol(version: int) -> int:
    """The ICMP protocol of an IP version: 1 (ICMP) for IPv4, 58 (ICMPv6) for IPv6."""
    return 1 if version == 4 else 58


def icmp_criterion(match: ICMPMatch | None) -> ICMPMatch | None:
    """A rule's `icmp` or `notICMP` as a criterion: None when it has none (no type)."""
    return match if match is not None and match.type is not None else None
