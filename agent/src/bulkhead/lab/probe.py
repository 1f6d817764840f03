"""Probe requests and results, shared by the lab controller and the host daemon.

A probe asks one lab host to open a connection and say what happened:

- ``open``: the connection was made (TCP handshake done, UDP echo or ICMP echo reply back);
- ``refused``: the packet reached the destination and nothing listens there (TCP RST,
  ICMP port unreachable, seen as ECONNREFUSED);
- ``blocked``: nothing came back within the timeout (dropped on the way, or by the
  sender's own egress rules).

Only the standard library is imported here: the host daemon loads this module in every
lab host, and its start-up time is part of every ``lab up``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

Proto = Literal["tcp", "udp", "icmp"]
Outcome = Literal["open", "refused", "blocked"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp", "icmp")
OUTCOMES: tuple[Outcome, ...] = ("open", "refused", "blocked")

DEFAULT_TIMEOUT = 1.0
MAX_TIMEOUT = 30.0
MIN_TIMEOUT = 0.01


def normalize_proto(proto: str) -> Proto:
    """'TCP', 'udp', 'ICMPv6', ... -> 'tcp' | 'udp' | 'icmp' (the family comes from the
    destination address)."""
    p = proto.strip().lower()
    if p in ("icmpv6", "icmp6", "ipv6-icmp"):
        p = "icmp"
    for known in PROTOS:
        if p == known:
            return known
    raise ValueError(f"unknown probe protocol {proto!r}: expected tcp, udp or icmp")


@dataclass(frozen=True)
class ProbeSpec:
    """One probe: from lab host `src` to address `dst` (or a lab host name, which
    `Lab.probe_many` resolves; `family` picks its IPv4 or IPv6 address)."""

    src: str
    dst: str
    proto: str = "tcp"
    port: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    src_ip: str | None = None
    family: Literal[4, 6] | None = None

    def checked(self, dst_ip: str) -> ProbeSpec:
        """This probe with `dst_ip` as destination, validated (ValueError if wrong)."""
        proto = normalize_proto(self.proto)
        ip = ipaddress.ip_address(dst_ip)
        if proto == "icmp":
            if self.port is not None:
                raise ValueError("an ICMP probe takes no port")
        elif self.port is None or not 1 <= self.port <= 65535:
            raise ValueError(f"a {proto} probe needs a port in 1-65535, got {self.port}")
        if not MIN_TIMEOUT <= self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"probe timeout {self.timeout} s is outside "
                             f"{MIN_TIMEOUT}-{MAX_TIMEOUT} s")
        src_ip = self.src_ip
        if src_ip is not None:
            sip = ipaddress.ip_address(src_ip)
            if sip.version != ip.version:
                raise ValueError(f"source {src_ip} and destination {dst_ip} differ in family")
            src_ip = str(sip)
        return ProbeSpec(self.src, str(ip), proto, self.port, float(self.timeout), src_ip,
                         self.family)

    def wire(self) -> dict[str, Any]:
        """The JSON the host daemon takes (call on a `checked` probe)."""
        return {"dst": self.dst, "proto": self.proto, "port": self.port,
                "timeout": self.timeout, "src_ip": self.src_ip}


@dataclass(frozen=True)
class ProbeResult:
    """What a probe saw. `elapsed` is in seconds; `detail` says why (e.g. 'RST',
    'timeout', 'ICMP port unreachable', 'EPERM on send')."""

    spec: ProbeSpec
    outcome: Outcome
    elapsed: float
    detail: str = ""

    @property
    def open(self) -> bool:
        return self.outcome == "open"

    def __str__(self) -> str:
        dst = f"[{self.spec.dst}]" if ":" in self.spec.dst and self.spec.port else self.spec.dst
        port = f":{self.spec.port}" if self.spec.port is not None else ""
        via = f" (from {self.spec.src_ip})" if self.spec.src_ip else ""
        detail = f"{self.detail}, " if self.detail else ""
        return (f"{self.spec.src}{via} -> {dst}{port} {self.spec.proto}: "
                f"{self.outcome} ({detail}{self.elapsed * 1000:.1f} ms)")
