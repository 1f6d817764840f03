"""A verdict and its trace in words a person reads (`bulkhead explain`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bulkhead.policy.evaluate import DirectionVerdict, Evaluator, Verdict

# IPv6 neighbour discovery: router solicitation and advertisement, neighbour solicitation
# and advertisement, which the dataplanes accept before any policy (`dataplane.md`).
ND_TYPES = frozenset({133, 134, 135, 136})


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"


def _who(evaluator: Evaluator, ip: object) -> str:
    heps = evaluator.endpoints_at(ip)  # type: ignore[arg-type]
    if not heps:
        return f"{ip} (no host endpoint)"
    hep = heps[0]
    return f"{ip} = host endpoint {hep.name} on node {hep.node} " \
           f"({_labels(evaluator.endpoint_labels(hep))})"


def _direction_lines(v: DirectionVerdict, indent: str = "    ") -> list[str]:
    lines = [f"  {v.summary()}"]
    lines += [f"{indent}- {step.text}" for step in v.steps]
    lines += [f"{indent}* logged by {step.policy} rule {step.rule}" for step in v.logged]
    return lines


def explain_text(evaluator: Evaluator, verdict: Verdict, resolved: Sequence[str] = ()
                 ) -> str:
    """`resolved`: how the destination's names were learned, one phrase each (`resolved
    from api.example.com (TTL 30 s left)`), from the agent's DNS name cache."""
    flow = verdict.flow
    out = [f"flow {flow}",
           f"  from {_who(evaluator, flow.src)}",
           f"  to   {_who(evaluator, flow.dst)}"]
    out += [f"       {flow.dst} {phrase}" for phrase in resolved]
    out += [f"verdict: {'ALLOWED' if verdict.allowed else 'DENIED'} "
            "(needs the sender's egress and the receiver's ingress)"]
    if resolved:
        out.append(f"  {'allowed' if verdict.allowed else 'denied'}: {flow.dst} "
                   f"{resolved[0]}")
    if verdict.allowed and not verdict.policy_allowed:
        out.append("  observe mode: the policies deny it; enforce mode would block it")
    if flow.protocol == 58 and flow.icmp_type in ND_TYPES:
        out.append("  note: the agents' nftables tables and Windows Firewall accept IPv6 "
                   "neighbour discovery (ICMPv6 133-136) before any policy; this verdict "
                   "is the policies' (what HNS, which matches no ICMP type, enforces)")
    out += _direction_lines(verdict.egress)
    out += _direction_lines(verdict.ingress)
    if verdict.staged_egress is not verdict.egress or \
            verdict.staged_ingress is not verdict.ingress:
        word = "allow" if verdict.staged_allowed else "deny"
        change = "differs from" if verdict.staged_differs else "same as"
        out.append(f"staged: would {word} ({change} the enforced verdict)")
        for staged, enforced in ((verdict.staged_egress, verdict.egress),
                                 (verdict.staged_ingress, verdict.ingress)):
            if staged != enforced:
                out += _direction_lines(staged)
            else:
                out.append(f"  {staged.summary()} (unchanged)")
    return "\n".join(out)
