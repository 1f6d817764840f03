"""One endpoint's policy in one direction as a first-match list of boxes.

A `Box` is a set of packets seen at a host endpoint: every field is a tuple of sorted,
disjoint, non-adjacent inclusive spans (`bulkhead.net.Span`), so intersecting and
subtracting boxes is the same arithmetic on each field. Fields are from the endpoint's
side: `local` is the endpoint's own address (the destination of an ingress packet, the
source of an egress one), `remote` the peer's. A box is of one address family.

An `Entry` is a box with its action, and a `Flat` list is read first match wins; the
last entry of a flattened list matches every packet of its family, so the list decides
every packet (the backends rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from bulkhead.net import BITS, Span, intersection

Spans = tuple[Span, ...]

ALLOW, DENY = "Allow", "Deny"
ALL_PROTOCOLS: Spans = ((0, 255),)
ALL_PORTS: Spans = ((0, 65535),)
# ICMP type and code as one number: type * 256 + code; a type without a code is 256 wide.
ALL_ICMP: Spans = ((0, 0xFFFF),)


def all_addresses(family: int) -> Spans:
    return ((0, (1 << BITS[family]) - 1),)


def icmp_span(icmp_type: int, code: int | None) -> Span:
    """The ICMP field's span for a type and an optional code."""
    if code is None:
        return (icmp_type << 8, (icmp_type << 8) | 0xFF)
    return ((icmp_type << 8) | code, (icmp_type << 8) | code)


@dataclass(frozen=True, slots=True)
class Box:
    """The packets of `family` whose every field lies in the field's spans. `ports`
    fields hold for packets without ports (ICMP, ...) only when they are all ports;
    `icmp` holds for non-ICMP packets only when it is all of ICMP."""

    family: int
    protocols: Spans
    local: Spans
    remote: Spans
    local_ports: Spans = ALL_PORTS
    remote_ports: Spans = ALL_PORTS
    icmp: Spans = ALL_ICMP

    @classmethod
    def everything(cls, family: int) -> Box:
        return cls(family, ALL_PROTOCOLS, all_addresses(family), all_addresses(family))

    def fields(self) -> tuple[Spans, ...]:
        return (self.protocols, self.local, self.remote, self.local_ports,
                self.remote_ports, self.icmp)

    @property
    def empty(self) -> bool:
        return not all(self.fields())

    def intersect(self, other: Box) -> Box | None:
        """The packets in both boxes, None when there are none."""
        if self.family != other.family:
            return None
        fields = [intersection(a, b) for a, b in zip(self.fields(), other.fields(), strict=True)]
        if not all(fields):
            return None
        return Box(self.family, *fields)

    def matches(self, protocol: int, local: int, remote: int, local_port: int | None,
                remote_port: int | None, icmp: int | None) -> bool:
        """Whether one packet of the box's family is in it (`icmp`: type * 256 + code,
        None for a packet that is not ICMP; ports None for a packet without ports)."""
        def within(spans: Spans, value: int | None, whole: Spans) -> bool:
            if value is None:
                return spans == whole
            return any(lo <= value <= hi for lo, hi in spans)

        return (within(self.protocols, protocol, ALL_PROTOCOLS)
                and within(self.local, local, ())
                and within(self.remote, remote, ())
                and within(self.local_ports, local_port, ALL_PORTS)
                and within(self.remote_ports, remote_port, ALL_PORTS)
                and within(self.icmp, icmp, ALL_ICMP))


@dataclass(frozen=True, slots=True)
class Entry:
    action: str            # Allow | Deny
    box: Box
    where: str             # the rule it comes from ("policy db ingress rule 2",
                           # "failsafe tcp:22", "tier default default", "no profile")


Flat = tuple[Entry, ...]


class Unsupported(ValueError):
    """A rule the backend cannot enforce exactly. `where` names the policy and rule (as
    `RulePlan.where`), `field` the rule's field, `why` what the backend lacks."""

    def __init__(self, where: str, field: str, why: str) -> None:
        super().__init__(f"{where}: {field}: {why}")
        self.where, self.field, self.why = where, field, why


def first_match(flat: Flat, protocol: int, local: int, remote: int, local_port: int | None,
                remote_port: int | None, icmp: int | None) -> Entry:
    """The entry that decides one packet (arguments as `Box.matches`): the first whose
    box holds it. Raises ValueError when none does (a list that does not end with an
    entry matching everything)."""
    for entry in flat:
        if entry.box.matches(protocol, local, remote, local_port, remote_port, icmp):
            return entry
    raise ValueError("no entry of the list matches the packet: a flattened list ends "
                     "with an entry matching every packet of its family")
