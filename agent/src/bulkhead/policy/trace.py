"""Decisions as flow logs name them: one `tier|policy|rule|action` step per decision.

The kernel side (a dataplane logs each decision a connection's first packet meets) and
the evaluator side (a trace of the reference evaluator) are written in the same steps, so
an enforced trace from the kernel and a staged trace computed in user space read alike
and compare. A trace lists every Pass that sent the flow on (a rule's, a tier's
defaultAction, a profile's) and ends with the final Allow or Deny.
"""

from __future__ import annotations

from dataclasses import dataclass

from bulkhead.model.flowlog import END_OF_TIER, FAILSAFE, NO_PROFILE, PROFILE, step
from bulkhead.policy.evaluate import ALLOW, DENY, PASS, DirectionVerdict

ENDPOINT = "endpoint"


@dataclass(frozen=True)
class Decision:
    """One place in a rendered table where a connection's fate is decided (or passed
    on): a rule of a policy or profile, a tier's defaultAction, the end of an endpoint's
    chain, the failsafe ports."""

    direction: str            # Ingress | Egress
    tier: str                 # the tier; "profile", "endpoint" or "failsafe" otherwise
    policy: str               # policy or profile name; END_OF_TIER, NO_PROFILE, FAILSAFE
    rule: int | None          # the rule's index, None where no rule decides
    action: str               # allow | deny | pass

    @property
    def step(self) -> str:
        return step(self.tier, self.policy, self.rule, self.action)

    @property
    def final(self) -> bool:
        return self.action != "pass"


def rule_decision(direction: str, tier: str, policy: str, rule: int, action: str) -> Decision:
    return Decision(direction, tier, policy, rule, action.lower())


def tier_end(direction: str, tier: str, action: str) -> Decision:
    return Decision(direction, tier, END_OF_TIER, None, action.lower())


def profile_rule(direction: str, profile: str, rule: int, action: str) -> Decision:
    return Decision(direction, PROFILE, profile, rule, action.lower())


def no_profile(direction: str) -> Decision:
    """Nothing allowed the connection: no profile, or none of its rules matched."""
    return Decision(direction, ENDPOINT, NO_PROFILE, None, "deny")


def failsafe(direction: str) -> Decision:
    return Decision(direction, FAILSAFE, FAILSAFE, None, "allow")


def verdict_steps(verdict: DirectionVerdict) -> tuple[str, ...]:
    """The evaluator's verdict on one endpoint and direction as flow-log steps. Needs a
    verdict evaluated with `trace=True` (the Pass steps are in its trace). No endpoint:
    no step (no table decided anything)."""
    d = verdict.direction
    out: list[str] = []
    for s in verdict.steps:
        if s.action != PASS:
            continue
        if s.what == "tier-default" and s.tier:
            out.append(tier_end(d, s.tier, PASS).step)
        elif s.what == "rule" and s.policy and s.rule is not None:
            if s.policy.startswith("profile "):
                out.append(profile_rule(d, s.policy.removeprefix("profile "), s.rule,
                                        PASS).step)
            elif s.tier:
                out.append(rule_decision(d, s.tier, s.policy, s.rule, PASS).step)
    by = verdict.decided_by
    if by == "no-endpoint":
        return ()
    if by == "failsafe":
        final = failsafe(d)
    elif by == "rule" and verdict.tier and verdict.policy and verdict.rule is not None:
        final = rule_decision(d, verdict.tier, verdict.policy, verdict.rule, verdict.action)
    elif by == "tier-default" and verdict.tier:
        final = tier_end(d, verdict.tier, DENY)
    elif by == "profile" and verdict.policy and verdict.rule is not None:
        final = profile_rule(d, verdict.policy.removeprefix("profile "), verdict.rule,
                             verdict.action)
    else:   # no profile, or no profile rule matched
        final = no_profile(d)
    assert final.action in (ALLOW.lower(), DENY.lower())
    return (*out, final.step)
