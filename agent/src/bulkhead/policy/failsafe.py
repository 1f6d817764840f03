"""Failsafe ports: accepted before any policy, so a bad policy cannot lock operators out.

The defaults are Felix's (FailsafeInboundHostPorts / FailsafeOutboundHostPorts) plus
bulkhead-server's port both ways. Inbound entries match the destination port of traffic
arriving at a host endpoint; outbound ones the destination port of traffic leaving it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bulkhead.defaults import SERVER_PORT
from bulkhead.policy.flow import IPAddress, protocol_of

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FailsafePort:
    protocol: int
    port: int
    net: Network | None = None  # the peer must be in it, when given

    @classmethod
    def parse(cls, text: str) -> FailsafePort:
        """`tcp:22`, `udp:68` or `tcp:198.18.0.0/15:22` (protocol, optional peer net, port)."""
        parts = text.split(":")
        try:
            if len(parts) == 2:
                return cls(protocol_of(parts[0]), _port(parts[1]))
            if len(parts) >= 3:
                net = ipaddress.ip_network(":".join(parts[1:-1]).strip("[]"), strict=False)
                return cls(protocol_of(parts[0]), _port(parts[-1]), net)
        except ValueError as e:
            raise ValueError(f"failsafe port {text!r}: {e}") from None
        raise ValueError(f"failsafe port {text!r}: expected protocol:port or protocol:net:port")

    def matches(self, protocol: int, port: int | None, peer: IPAddress) -> bool:
        if protocol != self.protocol or port != self.port:
            return False
        return self.net is None or (peer.version == self.net.version and peer in self.net)

    def __str__(self) -> str:
        proto = {6: "tcp", 17: "udp", 132: "sctp"}.get(self.protocol, str(self.protocol))
        return f"{proto}:{self.net}:{self.port}" if self.net else f"{proto}:{self.port}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port")
    return int(text)


def _ports(*specs: str) -> tuple[FailsafePort, ...]:
    return tuple(FailsafePort.parse(s) for s in specs)


DEFAULT_INBOUND = _ports("tcp:22", "udp:68", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                         "tcp:6443", "tcp:6666", "tcp:6667", f"tcp:{SERVER_PORT}")
DEFAULT_OUTBOUND = _ports("udp:53", "udp:67", "tcp:179", "tcp:2379", "tcp:2380", "tcp:5473",
                          "tcp:6443", "tcp:6666", "tcp:6667", f"tcp:{SERVER_PORT}")


@dataclass(frozen=True)
class Failsafes:
    inbound: tuple[FailsafePort, ...] = DEFAULT_INBOUND
    outbound: tuple[FailsafePort, ...] = DEFAULT_OUTBOUND

    @classmethod
    def off(cls) -> Failsafes:
        return cls((), ())
