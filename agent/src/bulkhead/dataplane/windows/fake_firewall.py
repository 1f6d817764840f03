"""A fake of Windows Firewall's verdict, for tests here, where no Windows runs.

It is a fake: it evaluates `FirewallRule` values as Microsoft documents the precedence of
Windows Firewall rules, and nothing else of the firewall (no profiles, programs,
services, edge traversal, IPsec, stateful replies, per-rule enabling). Precedence, from
the protocol specification's FW_RULE_ACTION ("Allow-bypass rules take precedence over
block rules, and block rules take precedence over allow rules",
https://learn.microsoft.com/en-us/openspecs/windows_protocols/ms-fasp/702e3c23-c9d8-43db-8380-b4c670dd7f7d):
a packet matching any Block rule is blocked, else one matching any Allow rule is allowed,
else the profile's default action decides, which the agent sets to Block. Bulkhead writes
no allow-bypass rules (they need IPsec authentication).

It reads each rule's text itself (addresses as INetFwRule::RemoteAddresses documents
them: `a`, `a/len`, `first-last`,
https://learn.microsoft.com/en-us/windows/win32/api/netfw/nf-netfw-inetfwrule-get_remoteaddresses;
ports `80` and `1000-2000`; ICMP `type` or `type:code`), with `ipaddress`, not with the
compiler's helpers, so a test through it checks that the text the compiler writes means
what the compiler meant. Empty lists and protocol None mean Any; an address list holds
addresses of either family, and a packet matches it only by an address of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bulkhead.dataplane.windows.rules import INBOUND, OUTBOUND, FirewallRule

_DIRECTIONS = {"Ingress": INBOUND, "Egress": OUTBOUND, INBOUND: INBOUND, OUTBOUND: OUTBOUND}

Range = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Parsed:
    rule: FirewallRule
    local: dict[int, list[Range]] | None      # family -> ranges; None: Any
    remote: dict[int, list[Range]] | None
    local_ports: list[Range] | None
    remote_ports: list[Range] | None
    icmp: list[Range] | None                  # type * 256 + code ranges


def _addresses(texts: Sequence[str], rule: str) -> dict[int, list[Range]] | None:
    if not texts:
        return None
    out: dict[int, list[Range]] = {4: [], 6: []}
    for text in texts:
        if "-" in text:
            first_text, last_text = text.split("-")
            try:
                first, last = (ipaddress.ip_address(first_text),
                               ipaddress.ip_address(last_text))
            except ValueError as e:
                raise ValueError(f"rule {rule}: address range {text!r}: {e}") from None
            if first.version != last.version or int(first) > int(last):
                raise ValueError(f"rule {rule}: address range {text!r} is not first-last")
            out[first.version].append((int(first), int(last)))
        else:
            try:
                net = ipaddress.ip_network(text, strict=True)   # host bits set: an error
            except ValueError as e:
                raise ValueError(f"rule {rule}: address {text!r}: {e}") from None
            out[net.version].append((int(net.network_address), int(net.broadcast_address)))
    return out


def _numbers(texts: Sequence[str], rule: str, field: str, top: int) -> list[Range] | None:
    if not texts:
        return None
    out = []
    for text in texts:
        lo_text, dash, hi_text = text.partition("-")
        if not (lo_text.isdigit() and (hi_text.isdigit() or not dash)):
            raise ValueError(f"rule {rule}: {field} {text!r} is not a number or range")
        lo, hi = int(lo_text), int(hi_text or lo_text)
        if not 0 <= lo <= hi <= top:
            raise ValueError(f"rule {rule}: {field} {text!r} is not within 0-{top}")
        out.append((lo, hi))
    return out


def _icmp(texts: Sequence[str], rule: str) -> list[Range] | None:
    if not texts:
        return None
    out = []
    for text in texts:
        type_text, colon, code_text = text.partition(":")
        if not (type_text.isdigit() and 0 <= int(type_text) <= 255):
            raise ValueError(f"rule {rule}: ICMP type {text!r} is not 0-255")
        icmp_type = int(type_text)
        if colon:
            if not (code_text.isdigit() and 0 <= int(code_text) <= 255):
                raise ValueError(f"rule {rule}: ICMP code {text!r} is not 0-255")
            code = int(code_text)
            out.append((icmp_type << 8 | code, icmp_type << 8 | code))
        else:
            out.append((icmp_type << 8, icmp_type << 8 | 0xFF))
    return out


def _parse(rule: FirewallRule) -> _Parsed:
    if rule.direction not in (INBOUND, OUTBOUND) or rule.action not in ("Allow", "Block"):
        raise ValueError(f"rule {rule.name}: direction {rule.direction!r} or action "
                         f"{rule.action!r} is not valid")
    if (rule.local_ports or rule.remote_ports) and rule.protocol not in (6, 17):
        raise ValueError(f"rule {rule.name}: ports are taken only with TCP and UDP")
    if rule.icmp_types and rule.protocol not in (1, 58):
        raise ValueError(f"rule {rule.name}: ICMP types are taken only with ICMPv4/ICMPv6")
    if rule.protocol is not None and not 0 <= rule.protocol <= 255:
        raise ValueError(f"rule {rule.name}: protocol {rule.protocol} is not 0-255")
    return _Parsed(rule, _addresses(rule.local_addresses, rule.name),
                   _addresses(rule.remote_addresses, rule.name),
                   _numbers(rule.local_ports, rule.name, "local port", 65535),
                   _numbers(rule.remote_ports, rule.name, "remote port", 65535),
                   _icmp(rule.icmp_types, rule.name))


def _within(ranges: Iterable[Range], value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


class FakeFirewall:
    """Windows Firewall's verdict over `rules`, with the default action Block (a fake)."""

    def __init__(self, rules: Iterable[FirewallRule]) -> None:
        self.rules = [_parse(r) for r in rules]

    def allows(self, direction: str, family: int, protocol: int, local: int | str,
               remote: int | str, local_port: int | None, remote_port: int | None,
               icmp: int | None, interface: str | None = None) -> bool:
        """Whether a packet passes. `local` is the host's own address (the destination
        inbound), as an int or text; ports None for a packet without ports; `icmp` is
        type * 256 + code, None for a packet that is not ICMP; `interface` the alias of
        the packet's interface (a rule with an alias matches only packets on it)."""
        wf_direction = _DIRECTIONS[direction]
        local_int, remote_int = (int(ipaddress.ip_address(a)) if isinstance(a, str) else a
                                 for a in (local, remote))
        verdicts = {p.rule.action for p in self.rules if p.rule.direction == wf_direction
                    and self._matches(p, family, protocol, local_int, remote_int,
                                      local_port, remote_port, icmp, interface)}
        return "Block" not in verdicts and "Allow" in verdicts

    @staticmethod
    def _matches(p: _Parsed, family: int, protocol: int, local: int, remote: int,
                 local_port: int | None, remote_port: int | None, icmp: int | None,
                 interface: str | None) -> bool:
        rule = p.rule
        if rule.interface_alias is not None and rule.interface_alias != interface:
            return False
        if rule.protocol is not None and rule.protocol != protocol:
            return False
        for ranges, address in ((p.local, local), (p.remote, remote)):
            if ranges is not None and not _within(ranges[family], address):
                return False
        for port_ranges, port in ((p.local_ports, local_port), (p.remote_ports, remote_port)):
            if port_ranges is not None and (port is None or not _within(port_ranges, port)):
                return False
        return p.icmp is None or (icmp is not None and _within(p.icmp, icmp))
