"""The reference evaluator: Calico's policy semantics for host endpoints, in plain Python.

For a flow it decides the source endpoint's egress and the destination endpoint's
ingress, each with a trace (tier, policy, rule, action, why). Staged policies are
evaluated in a second view, where each StagedGlobalNetworkPolicy replaces (stagedAction
Set) or removes (Delete) the enforced policy of the same tier and name; that view gives
the staged verdict and never changes the enforced one.

Order on one endpoint and direction, as in DESIGN.md: failsafe ports; then untracked
(doNotTrack) and pre-DNAT (preDNAT, ingress only) policies, whose Allow or Deny is final
and whose no-match falls through; then each tier (order, nil last, ties by name) that has
a policy selecting the endpoint for the direction; in a tier, policies by order then name,
rules in order: Allow and Deny end evaluation, Pass goes to the next tier, Log records and
goes on; no match in a tier -> its defaultAction. After the tiers, the endpoint's
profiles; no profile, or no profile rule matched -> Deny.

Enforcement modes (docs/policy.md): an endpoint in observe mode (its
`microseg.bulkhead.io/enforcement` label, else the evaluator's `default_mode`) is decided
exactly as in enforce mode, with the same trace, but nothing is blocked there. So a
`DirectionVerdict` holds both:

- `action`, `decided_by`, `tier`, `policy`, `rule`, `steps`: the policy decision, what
  enforce mode would do (`policy_allowed`), and what flow logs name as the decision;
- `observed`: the endpoint is in observe mode (set on all its verdicts, failsafes too);
- `allowed` and `wire_action`: what happens to the packet, Allow when observed.

`Verdict.allowed` and `Verdict.staged_allowed` are what happens on the wire (the
conformance cases' expectations); `Verdict.policy_allowed` is the policy decision, which
for an observe endpoint says what enforcing it would block. The staged verdicts follow
the same rule: their `action` is the staged view's policy decision.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from bulkhead.model import (
    EGRESS,
    ENFORCE,
    INGRESS,
    OBSERVE,
    GlobalNetworkPolicy,
    HostEndpoint,
    Rule,
    Snapshot,
    Tier,
)
from bulkhead.policy.failsafe import Failsafes
from bulkhead.policy.flow import Flow, IPAddress
from bulkhead.policy.rules import CompiledRule, Context, Peer, compile_rules, domain_matches
from bulkhead.policy.semantics import (
    effective_labels,
    enforcement_mode,
    policy_layout,
    selects,
    staged_view,
    untracked_ignored,
)

ALLOW, DENY, PASS, LOG = "Allow", "Deny", "Pass", "Log"


@dataclass(frozen=True)
class Step:
    """One line of a trace."""

    what: str                # "failsafe", "tier", "policy", "rule", "tier-default", "profile"
    text: str
    tier: str | None = None
    policy: str | None = None
    rule: int | None = None
    action: str | None = None
    staged: bool = False


@dataclass(frozen=True)
class DirectionVerdict:
    """The fate of a flow on one endpoint in one direction."""

    direction: str                 # Ingress | Egress
    endpoint: str | None           # HostEndpoint name, None if the address is no endpoint
    action: str                    # Allow | Deny
    decided_by: str                # no-endpoint, failsafe, rule, tier-default, profile, ...
    tier: str | None = None
    policy: str | None = None
    rule: int | None = None
    staged: bool = False           # decided by a staged policy (staged view only)
    steps: tuple[Step, ...] = ()
    logged: tuple[Step, ...] = ()  # Log rules the flow passed through
    observed: bool = False         # the endpoint is in observe mode: nothing is blocked

    @property
    def policy_allowed(self) -> bool:
        """What the policies decide (what enforce mode does)."""
        return self.action == ALLOW

    @property
    def allowed(self) -> bool:
        """What happens to the packet: the policy decision, or Allow when observed."""
        return self.observed or self.action == ALLOW

    @property
    def wire_action(self) -> str:
        return ALLOW if self.allowed else DENY

    def summary(self) -> str:
        who = f"{self.direction.lower()} of {self.endpoint}" if self.endpoint else \
            f"{self.direction.lower()}: no host endpoint"
        if not self.observed:
            return f"{who}: {self._decision()}"
        if self.action == DENY:
            return f"{who}: observe mode: would {self._decision()}, allowed"
        return f"{who}: {self._decision()} (observe mode)"

    def _decision(self) -> str:
        if self.decided_by == "rule":
            kind = "staged policy" if self.staged else "policy"
            return (f"{self.action} by {kind} {self.policy} (tier {self.tier}) "
                    f"{self.direction.lower()} rule {self.rule}")
        if self.decided_by == "profile" and self.policy:
            return f"{self.action} by {self.policy} {self.direction.lower()} rule {self.rule}"
        if self.decided_by == "tier-default":
            return f"{self.action} by the default action of tier {self.tier}"
        return f"{self.action} ({self.steps[-1].text if self.steps else self.decided_by})"


@dataclass(frozen=True)
class Verdict:
    flow: Flow
    egress: DirectionVerdict
    ingress: DirectionVerdict
    staged_egress: DirectionVerdict
    staged_ingress: DirectionVerdict

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    @property
    def staged_allowed(self) -> bool:
        return self.staged_egress.allowed and self.staged_ingress.allowed

    @property
    def policy_allowed(self) -> bool:
        """Whether the policies allow it: what enforcing observe endpoints would do."""
        return self.egress.policy_allowed and self.ingress.policy_allowed

    @property
    def observed(self) -> bool:
        """An endpoint of the flow is in observe mode."""
        return self.egress.observed or self.ingress.observed

    @property
    def staged_differs(self) -> bool:
        return self.allowed != self.staged_allowed


@dataclass
class _View:
    """The policies in force in one view (enforced, or with staged changes applied)."""

    tiers: list[tuple[Tier, list[GlobalNetworkPolicy]]]
    untracked: list[GlobalNetworkPolicy]
    pre_dnat: list[GlobalNetworkPolicy]
    cache: dict[tuple[str, str], list[tuple[Tier, list[GlobalNetworkPolicy]]]] = field(
        default_factory=dict)


class Evaluator:
    """Evaluates flows against one snapshot. Build once, evaluate many flows."""

    def __init__(self, snapshot: Snapshot, failsafes: Failsafes | None = None,
                 default_mode: str = ENFORCE) -> None:
        """`default_mode`: the enforcement mode of endpoints without the label."""
        self.snapshot = snapshot
        self.failsafes = failsafes if failsafes is not None else Failsafes()
        self._by_ip: dict[IPAddress, list[HostEndpoint]] = {}
        self._labels: dict[str, Mapping[str, str]] = {}
        self._observed: set[str] = set()
        for hep in sorted(snapshot.host_endpoints.values(), key=lambda h: h.name):
            for ip in hep.expected_ips:
                self._by_ip.setdefault(ipaddress.ip_address(ip), []).append(hep)
            self._labels[hep.name] = effective_labels(snapshot, hep)
            if enforcement_mode(self._labels[hep.name], default_mode) == OBSERVE:
                self._observed.add(hep.name)
        self._sets = [(s, [ipaddress.ip_network(n) for n in s.nets])
                      for s in sorted(snapshot.network_sets.values(), key=lambda s: s.name)]
        self._rules: dict[tuple[int, str], tuple[tuple[Rule, ...], list[CompiledRule]]] = {}
        self._peers: dict[tuple[IPAddress, frozenset[str]], Peer] = {}
        self._enforced = self._view(list(snapshot.policies.values()))
        self._staged = self._view(staged_view(snapshot)) if snapshot.staged else None

    # -- setup ------------------------------------------------------------------------
    def _view(self, policies: list[GlobalNetworkPolicy]) -> _View:
        tiers, untracked, pre_dnat = policy_layout(self.snapshot, policies)
        return _View(tiers=tiers, untracked=untracked, pre_dnat=pre_dnat)

    def endpoint_labels(self, hep: HostEndpoint) -> Mapping[str, str]:
        """The endpoint's labels, with its profiles' labelsToApply under them."""
        return self._labels[hep.name]

    def endpoints_at(self, ip: IPAddress) -> list[HostEndpoint]:
        return self._by_ip.get(ip, [])

    def _compiled(self, rules: tuple[Rule, ...], direction: str) -> list[CompiledRule]:
        key = (id(rules), direction)
        found = self._rules.get(key)
        if found is None or found[0] is not rules:
            found = self._rules[key] = (rules, compile_rules(rules, direction))
        return found[1]

    def _peer(self, ip: IPAddress, domains: frozenset[str]) -> Peer:
        key = (ip, domains)
        peer = self._peers.get(key)
        if peer is None:
            heps = self._by_ip.get(ip, [])
            labels = [self._labels[h.name] for h in heps]
            names = [f"host endpoint {h.name}" for h in heps]
            by_name: list[Mapping[str, str]] = []
            by_name_names: list[str] = []
            for netset, nets in self._sets:
                if any(ip.version == n.version and ip in n for n in nets):
                    labels.append(netset.labels)
                    names.append(f"network set {netset.name}")
                elif domains and netset.allowed_egress_domains and \
                        domain_matches(netset.allowed_egress_domains, domains):
                    by_name.append(netset.labels)
                    by_name_names.append(f"network set {netset.name}")
            peer = self._peers[key] = Peer(heps, labels, names, by_name, by_name_names)
        return peer

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, flow: Flow, trace: bool = True) -> Verdict:
        """The enforced and staged verdicts for the flow; `trace=False` skips the words."""
        ctx = Context(flow, self._peer(flow.src, frozenset()),
                      self._peer(flow.dst, flow.dst_domains))
        src_hep = ctx.src.endpoints[0] if ctx.src.endpoints else None
        dst_hep = ctx.dst.endpoints[0] if ctx.dst.endpoints else None
        egress = self._direction(ctx, src_hep, EGRESS, self._enforced, trace)
        ingress = self._direction(ctx, dst_hep, INGRESS, self._enforced, trace)
        if self._staged is None:
            return Verdict(flow, egress, ingress, egress, ingress)
        s_egress = self._direction(ctx, src_hep, EGRESS, self._staged, trace)
        s_ingress = self._direction(ctx, dst_hep, INGRESS, self._staged, trace)
        return Verdict(flow, egress, ingress, s_egress, s_ingress)

    def _applicable(self, view: _View, hep: HostEndpoint, direction: str
                    ) -> list[tuple[Tier, list[GlobalNetworkPolicy]]]:
        key = (hep.name, direction)
        found = view.cache.get(key)
        if found is None:
            labels = self._labels[hep.name]
            found = []
            for tier, policies in view.tiers:
                selecting = [p for p in policies if selects(p, labels, direction)]
                if selecting:
                    found.append((tier, selecting))
            view.cache[key] = found
        return found

    def mode(self, hep: HostEndpoint) -> str:
        """The endpoint's enforcement mode (observe or enforce)."""
        return OBSERVE if hep.name in self._observed else ENFORCE

    def _direction(self, ctx: Context, hep: HostEndpoint | None, direction: str,
                   view: _View, trace: bool) -> DirectionVerdict:
        verdict = self._decide(ctx, hep, direction, view, trace)
        if hep is not None and hep.name in self._observed:
            return replace(verdict, observed=True)
        return verdict

    def _decide(self, ctx: Context, hep: HostEndpoint | None, direction: str,
                view: _View, trace: bool) -> DirectionVerdict:
        """The policy decision for one endpoint and direction."""
        steps: list[Step] = []
        logged: list[Step] = []
        if hep is None:
            return DirectionVerdict(direction, None, ALLOW, "no-endpoint", steps=(Step(
                "endpoint", "the address is no host endpoint, so no policy applies"),))
        flow = ctx.flow
        failsafes = self.failsafes.inbound if direction == INGRESS else self.failsafes.outbound
        peer_ip = flow.src if direction == INGRESS else flow.dst
        for fs in failsafes:
            if fs.matches(flow.protocol, flow.dst_port, peer_ip):
                step = Step("failsafe", f"failsafe port {fs} ({direction.lower()}) accepts it",
                            action=ALLOW)
                return DirectionVerdict(direction, hep.name, ALLOW, "failsafe", steps=(step,))
        labels = self._labels[hep.name]

        # Untracked, then pre-DNAT policies: a matching Allow or Deny is final; a Pass
        # skips the rest of its tier's policies of the same stage (felix walks each
        # stage's policies tier by tier, with no end-of-tier drop).
        early = [] if untracked_ignored(hep) else list(view.untracked)
        if trace and untracked_ignored(hep):
            names = [p.name for p in view.untracked if selects(p, labels, direction)]
            if names:
                steps.append(Step("policy", f"untracked policies {', '.join(names)} select "
                                  f"{hep.name}, but an endpoint on every interface "
                                  '(interfaceName "*") takes none, as in Calico'))
        if direction == INGRESS:
            early += view.pre_dnat
        left: tuple[bool, str] | None = None    # (stage, tier) a Pass left
        for policy in early:
            if not selects(policy, labels, direction):
                continue
            stage = "untracked" if policy.spec.do_not_track else "pre-DNAT"
            if (policy.spec.do_not_track, policy.spec.tier) == left:
                if trace:
                    steps.append(Step("policy", f"{stage} policy {policy.name} skipped: a "
                                      f"Pass left tier {policy.spec.tier}", policy.spec.tier,
                                      policy.name, staged=policy.staged))
                continue
            if trace:
                steps.append(Step("policy", f"{stage} policy {policy.name} selects {hep.name}",
                                  policy.spec.tier, policy.name, staged=policy.staged))
            outcome = self._rules_of(ctx, policy, direction, trace, steps, logged)
            if outcome is not None and outcome[0] in (ALLOW, DENY):
                return DirectionVerdict(direction, hep.name, outcome[0], "rule",
                                        policy.spec.tier, policy.name, outcome[1],
                                        policy.staged, tuple(steps), tuple(logged))
            if outcome is not None and outcome[0] == PASS:
                left = (policy.spec.do_not_track, policy.spec.tier)

        applicable = self._applicable(view, hep, direction)
        if trace and not applicable:
            steps.append(Step("tier", f"no policy in any tier selects {hep.name} for {direction}"))
        for tier, policies in applicable:
            if trace:
                steps.append(Step("tier", f"tier {tier.name}: {hep.name} is selected for "
                                  f"{direction} by {', '.join(p.name for p in policies)}",
                                  tier.name))
            passed = False
            for policy in policies:
                outcome = self._rules_of(ctx, policy, direction, trace, steps, logged)
                if outcome is None:
                    continue
                action, index = outcome
                if action == PASS:
                    passed = True
                    break
                return DirectionVerdict(direction, hep.name, action, "rule", tier.name,
                                        policy.name, index, policy.staged, tuple(steps),
                                        tuple(logged))
            if passed:
                continue
            if tier.default_action == PASS:
                if trace:
                    steps.append(Step("tier-default", f"no rule matched in tier {tier.name}; "
                                      "its defaultAction Pass goes to the next tier",
                                      tier.name, action=PASS))
                continue
            steps.append(Step("tier-default", f"no rule matched in tier {tier.name}; its "
                              "defaultAction is Deny", tier.name, action=DENY))
            return DirectionVerdict(direction, hep.name, DENY, "tier-default", tier.name,
                                    steps=tuple(steps), logged=tuple(logged))
        return self._profiles(ctx, hep, direction, trace, steps, logged)

    def _rules_of(self, ctx: Context, policy: GlobalNetworkPolicy, direction: str,
                  trace: bool, steps: list[Step], logged: list[Step]
                  ) -> tuple[str, int] | None:
        """The first Allow, Deny or Pass rule of the policy that matches, or None."""
        kind = "staged policy" if policy.staged else "policy"
        for index, compiled in enumerate(self._compiled(policy.spec.rules(direction), direction)):
            action = compiled.rule.action
            if not trace:
                if compiled.test(ctx):
                    if action != LOG:
                        return action, index
                    logged.append(Step("rule", "", policy.spec.tier, policy.name, index,
                                       LOG, policy.staged))
                continue
            hit, why = self._explain(ctx, compiled)
            step = Step("rule", f"{kind} {policy.name} {direction.lower()} rule {index} "
                        f"({action}): {'matches' if hit else 'no match'}: {why}",
                        policy.spec.tier, policy.name, index, action if hit else None,
                        policy.staged)
            steps.append(step)
            if hit and action == LOG:
                logged.append(step)
            elif hit:
                return action, index
        return None

    @staticmethod
    def _explain(ctx: Context, compiled: CompiledRule) -> tuple[bool, str]:
        held = []
        for c in compiled.criteria:
            if not c.test(ctx):
                return False, "not " + c.explain(ctx)
            held.append(c.explain(ctx))
        return True, "; ".join(held) if held else "the rule has no criteria"

    def _profiles(self, ctx: Context, hep: HostEndpoint, direction: str, trace: bool,
                  steps: list[Step], logged: list[Step]) -> DirectionVerdict:
        if not hep.profiles:
            steps.append(Step("profile", f"no policy decided and {hep.name} has no profile: "
                              "default Deny", action=DENY))
            return DirectionVerdict(direction, hep.name, DENY, "no-profile",
                                    steps=tuple(steps), logged=tuple(logged))
        for name in hep.profiles:
            profile = self.snapshot.profiles.get(name)
            if profile is None:
                if trace:
                    steps.append(Step("profile", f"profile {name} does not exist"))
                continue
            for index, compiled in enumerate(self._compiled(profile.rules(direction), direction)):
                rule = compiled.rule
                hit, why = self._explain(ctx, compiled) if trace else (compiled.test(ctx), "")
                step = Step("rule", f"profile {name} {direction.lower()} rule {index} "
                            f"({rule.action}): {'matches' if hit else 'no match'}: {why}",
                            policy=f"profile {name}", rule=index,
                            action=rule.action if hit else None)
                if trace:
                    steps.append(step)
                if hit and rule.action == LOG:
                    logged.append(step)
                elif hit and rule.action == PASS:
                    break  # no verdict from this profile: on to the next one (Felix)
                elif hit:
                    return DirectionVerdict(direction, hep.name, rule.action, "profile",
                                            None, f"profile {name}", index, False,
                                            tuple(steps), tuple(logged))
        steps.append(Step("profile", f"no rule of {hep.name}'s profiles matched: Deny",
                          action=DENY))
        return DirectionVerdict(direction, hep.name, DENY, "profile", steps=tuple(steps),
                                logged=tuple(logged))

