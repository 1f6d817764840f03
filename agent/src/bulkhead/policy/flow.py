"""A flow: the first packet of a connection, as the evaluator sees it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from bulkhead.model.checks import CANONICAL_PROTOCOL, PROTOCOL_NAMES
from bulkhead.model.flowlog import PORTED

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ICMP_ECHO_REQUEST = {4: 8, 6: 128}


def protocol_of(value: str | int) -> int:
    """A protocol number from a name (any case) or a number."""
    if isinstance(value, int):
        return value
    if value.isdigit():
        return int(value)
    try:
        return PROTOCOL_NAMES[value.upper()]
    except KeyError:
        raise ValueError(f"{value!r} is not a protocol (TCP, UDP, ICMP, ICMPv6, SCTP, "
                         "UDPLite or a number)") from None


def protocol_name(number: int) -> str:
    for key, num in PROTOCOL_NAMES.items():
        if num == number:
            return CANONICAL_PROTOCOL[key]
    return str(number)


@dataclass(frozen=True)
class Flow:
    """Source and destination address, protocol, and the port or ICMP type/code.

    `src_port` is None when unknown (the kernel picks it): a rule that matches on source
    ports then does not match, and one with source notPorts does. `dst_domains` are the
    names the destination address was resolved from, for `domains` rules.
    """

    src: IPAddress
    dst: IPAddress
    protocol: int
    dst_port: int | None = None
    src_port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    dst_domains: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def make(cls, src: str, dst: str, protocol: str | int, port: int | None = None, *,
             src_port: int | None = None, icmp_type: int | None = None,
             icmp_code: int | None = None, domains: frozenset[str] = frozenset()) -> Flow:
        """Build a flow from text; ICMP without a type is an echo request."""
        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        if s.version != d.version:
            raise ValueError(f"{src} and {dst} are not of the same IP version")
        number = protocol_of(protocol)
        if number in (1, 58):
            if icmp_type is None:
                icmp_type = ICMP_ECHO_REQUEST[s.version]
            port = None
        return cls(s, d, number, port, src_port, icmp_type, icmp_code,
                   frozenset(x.lower().rstrip(".") for x in domains))

    @property
    def version(self) -> int:
        return self.src.version

    @property
    def carries_ports(self) -> bool:
        return self.protocol in PORTED

    def __str__(self) -> str:
        proto = protocol_name(self.protocol)
        if self.protocol in (1, 58):
            what = f"{proto} type {self.icmp_type}" + (
                f" code {self.icmp_code}" if self.icmp_code is not None else "")
        else:
            what = f"{proto}/{self.dst_port}"
        return f"{self.src} -> {self.dst} {what}"
