"""A fake of HNS ACL evaluation on one endpoint: a test double, since HNS runs only on
Windows. It decides a packet from `AclRule` values the way the HNS documentation and
Calico's Windows dataplane describe it, nothing more:

- an endpoint with no ACL at all allows everything; with any ACL (of either direction),
  a packet that no ACL of its direction matches is blocked;
- rules are read by priority, lower first; the first priority with a matching rule
  decides. Two matching rules of one priority with different actions: Block (HNS's own
  tie-break is not documented; Calico never writes such a pair, nor does `hns.compile`);
- a rule matches when its protocol is empty (any) or the packet's number, every address
  list is empty or holds the packet's address (CIDRs of the packet's family), and every
  port list is empty or holds the packet's port; a rule with ports matches only TCP and
  UDP packets. HNS ACLs have no ICMP field: `icmp` is ignored, and so is `interface`
  (ACLs are set per endpoint).

Rules are checked when given: what HNS would not take (the address "Any", a protocol
list, a port out of range, ports without protocol 6 or 17, a priority HCN cannot send:
0 is omitted from its JSON, more than 65535 is no uint16, a rule type other than Switch
or Host) is a ValueError naming the rule and field, as `hns_json.policy_setting` refuses
it, so a test through the fake cannot pass with rules that could not be sent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bulkhead.model import EGRESS, INGRESS
from bulkhead.net import parse_network

from .rules import AclRule

_DIRECTIONS = {INGRESS: "In", EGRESS: "Out", "In": "In", "Out": "Out"}


@dataclass(frozen=True)
class _Rule:
    priority: int
    allow: bool
    protocol: int | None
    local: tuple[tuple[int, int, int], ...]    # (family, first, last)
    remote: tuple[tuple[int, int, int], ...]
    local_ports: tuple[tuple[int, int], ...]
    remote_ports: tuple[tuple[int, int], ...]


def _addresses(rule: AclRule, field: str, texts: tuple[str, ...]
               ) -> tuple[tuple[int, int, int], ...]:
    out = []
    for text in texts:
        try:
            out.append(parse_network(text))
        except ValueError as e:
            raise ValueError(f"ACL {rule.id}: {field}: {e}") from None
    return tuple(out)


def _ports(rule: AclRule, field: str, texts: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for text in texts:
        lo, _, hi = text.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)):
            raise ValueError(f"ACL {rule.id}: {field}: {text!r} is not a port or a-b range")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last <= 65535:
            raise ValueError(f"ACL {rule.id}: {field}: {text!r} is not within 0-65535")
        out.append((first, last))
    return tuple(out)


def _parse(rule: AclRule) -> _Rule:
    if rule.action not in ("Allow", "Block"):
        raise ValueError(f"ACL {rule.id}: action: {rule.action!r} is not Allow or Block")
    if not 1 <= rule.priority <= 65535:
        raise ValueError(f"ACL {rule.id}: priority: {rule.priority} is not 1-65535")
    if rule.rule_type not in ("Switch", "Host"):
        raise ValueError(f"ACL {rule.id}: rule type: {rule.rule_type!r} is not Switch or Host")
    if (rule.local_ports or rule.remote_ports) and rule.protocols not in ("6", "17"):
        raise ValueError(f"ACL {rule.id}: ports: only with protocol 6 (TCP) or 17 (UDP)")
    protocol = None
    if rule.protocols:
        if not rule.protocols.isdigit() or int(rule.protocols) > 255:
            raise ValueError(f"ACL {rule.id}: protocols: {rule.protocols!r} is not one "
                             "protocol number 0-255")
        protocol = int(rule.protocols)
    return _Rule(rule.priority, rule.action == "Allow", protocol,
                 _addresses(rule, "local_addresses", rule.local_addresses),
                 _addresses(rule, "remote_addresses", rule.remote_addresses),
                 _ports(rule, "local_ports", rule.local_ports),
                 _ports(rule, "remote_ports", rule.remote_ports))


def _holds(spans: tuple[tuple[int, int], ...], value: int | None) -> bool:
    return not spans or (value is not None and any(lo <= value <= hi for lo, hi in spans))


def _within(nets: tuple[tuple[int, int, int], ...], family: int, address: int) -> bool:
    return not nets or any(f == family and lo <= address <= hi for f, lo, hi in nets)


class FakeHns:
    """The ACLs of one endpoint (see the module's docstring: a fake, not HNS)."""

    def __init__(self, rules: Iterable[AclRule]) -> None:
        self.by_direction: dict[str, list[_Rule]] = {"In": [], "Out": []}
        self.any = False
        for rule in rules:
            if rule.direction not in ("In", "Out"):
                raise ValueError(f"ACL {rule.id}: direction: {rule.direction!r} is not In "
                                 "or Out")
            self.by_direction[rule.direction].append(_parse(rule))
            self.any = True
        for listed in self.by_direction.values():
            listed.sort(key=lambda r: r.priority)

    def allows(self, direction: str, family: int, protocol: int, local: int, remote: int,
               local_port: int | None, remote_port: int | None, icmp: int | None,
               interface: str | None = None) -> bool:
        """Whether the endpoint lets the packet through in `direction` (Ingress/Egress or
        In/Out); local is the endpoint's side, as in `flat.Box.matches`."""
        if not self.any:
            return True
        decided: int | None = None
        allow = True
        for rule in self.by_direction[_DIRECTIONS[direction]]:
            if decided is not None and rule.priority != decided:
                break
            if rule.protocol is not None and rule.protocol != protocol:
                continue
            if (rule.local_ports or rule.remote_ports) and protocol not in (6, 17):
                continue
            if not (_within(rule.local, family, local) and _within(rule.remote, family, remote)
                    and _holds(rule.local_ports, local_port)
                    and _holds(rule.remote_ports, remote_port)):
                continue
            decided = rule.priority
            allow = allow and rule.allow
        return decided is not None and allow
