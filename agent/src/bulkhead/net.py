"""Addresses as integer spans per IP family, shared by policy and the dataplanes.

Text is read once, where it enters (`parse_network`, `AddressSet.of`), and written once,
where a dataplane needs it (`address_text`, `AddressSet.cidrs`); in between, an address
set is sorted, merged spans of integers per family, so no stage parses what another has
printed. Addresses are written as `inet_ntop` writes them (and `nft`, and netaddr): IPv6
compressed as RFC 5952 says, with IPv4-mapped addresses in dotted form.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

Span = tuple[int, int]           # the first and the last address, inclusive
FAMILIES = (4, 6)
BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def parse_network(text: str) -> tuple[int, int, int]:
    """(family, first, last) of an address or CIDR. Host bits are allowed and cleared, as
    `ipaddress.ip_network(text, strict=False)` clears them. Raises ValueError for
    anything else (short IPv4 forms, leading zeros, a prefix that is not plain decimal)."""
    address, slash, prefix = text.partition("/")
    family = 6 if ":" in address else 4
    try:
        packed = socket.inet_pton(_AF[family], address)
    except OSError:
        raise ValueError(f"{text!r} is not an IP address or network") from None
    bits = BITS[family]
    if slash:
        if not (prefix.isascii() and prefix.isdigit() and prefix == str(int(prefix))
                and int(prefix) <= bits):
            raise ValueError(f"{text!r}: the prefix length is not 0-{bits}")
        length = int(prefix)
    else:
        length = bits
    host = (1 << (bits - length)) - 1
    first = int.from_bytes(packed, "big") & ~host
    # A single address is one int, first and last (kept by the thousand in plans).
    return family, first, first | host if host else first


def parse_spans(texts: Iterable[str]) -> tuple[tuple[Span, ...], tuple[Span, ...]]:
    """The IPv4 and the IPv6 spans of the addresses and CIDRs in `texts`, as given (not
    sorted or merged: for callers that merge several lists once). Tuples: a plan keeps
    these per endpoint, and a tuple is smaller than a list (an empty one is shared)."""
    spans: dict[int, list[Span]] = {4: [], 6: []}
    for text in texts:
        family, first, last = parse_network(text)
        spans[family].append((first, last))
    return tuple(spans[4]), tuple(spans[6])


def address_text(value: int, family: int) -> str:
    """The address `value` of `family` as text."""
    if family == 4:
        if not 0 <= value < 1 << 32:
            raise ValueError(f"{value} is not an IPv4 address")
        return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def separated(spans: Iterable[Span]) -> bool:
    """Whether each span begins at least two past the end of the one before (sorted,
    disjoint, not adjacent: what `merge` leaves as it is)."""
    ends = iter(spans)
    first = next(ends, None)
    if first is None:
        return True
    last = first[1]
    for lo, hi in ends:
        if lo - last < 2:
            return False
        last = hi
    return True


def merge(spans: Iterable[Span]) -> tuple[Span, ...]:
    """Sorted spans, overlapping or adjacent ones joined."""
    ordered = sorted(spans)
    if separated(ordered):       # the common case (a network set's addresses): as they are
        return tuple(ordered)
    merged: list[Span] = []
    for span in ordered:
        # A span that joins none is kept as given (no new tuple per span).
        if merged and span[0] <= merged[-1][1] + 1:
            if span[1] > merged[-1][1]:
                merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return tuple(merged)


def intersection(a: Sequence[Span], b: Sequence[Span]) -> tuple[Span, ...]:
    """The values in both, for sorted disjoint spans; each span of the shorter list is
    looked up in the longer one (a complement of many addresses meets short lists)."""
    if len(a) > len(b):
        a, b = b, a
    out: list[Span] = []
    for lo, hi in a:
        k = bisect.bisect_left(b, (lo,))
        if k and b[k - 1][1] >= lo:
            k -= 1
        while k < len(b) and b[k][0] <= hi:
            out.append((max(lo, b[k][0]), min(hi, b[k][1])))
            k += 1
    return tuple(out)


def difference(a: Sequence[Span], b: Sequence[Span]) -> tuple[Span, ...]:
    """The values of `a` not in `b`, for sorted disjoint spans. The spans of `a` between
    two of `b` are found by bisection and copied as they are (a complement of many
    addresses loses a few at a time)."""
    out: list[Span] = []
    n, i = len(a), 0
    if not n:
        return ()
    head = a[0]                        # a[i], or what is left of it
    for lo, hi in b:
        if head[1] < lo:               # a's spans before this one of b: as they are
            out.append(head)
            k = bisect.bisect_left(a, lo, lo=i + 1, key=_last)
            out.extend(a[i + 1:k])
            i = k
            if i == n:
                break
            head = a[i]
        while head[0] <= hi:
            if head[0] < lo:
                out.append((head[0], lo - 1))
            if head[1] > hi:
                head = (hi + 1, head[1])
                break
            i += 1
            if i == n:
                break
            head = a[i]
        if i == n:
            break
    if i < n:
        out.append(head)
        out.extend(a[i + 1:])
    return tuple(out)


def _last(span: Span) -> int:
    return span[1]


def contains(spans: Sequence[Span], value: int) -> bool:
    """Whether `value` is in the sorted disjoint spans."""
    at = bisect.bisect_right(spans, (value, 1 << 128)) - 1
    return at >= 0 and spans[at][0] <= value <= spans[at][1]


def cidr_blocks(span: Span, family: int) -> Iterator[tuple[int, int]]:
    """(first address, prefix length) of the fewest CIDRs that cover `span`, in order."""
    lo, hi = span
    bits = BITS[family]
    while lo <= hi:
        # The largest aligned block that starts at lo and ends by hi.
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        yield lo, bits + 1 - size.bit_length()
        lo += size


@dataclass(frozen=True, slots=True)
class AddressSet:
    """Addresses of both families, each as sorted, disjoint, non-adjacent spans."""

    v4: tuple[Span, ...] = ()
    v6: tuple[Span, ...] = ()

    @classmethod
    def of(cls, texts: Iterable[str]) -> AddressSet:
        """The addresses and CIDRs in `texts` (see `parse_network`), merged."""
        v4, v6 = parse_spans(texts)
        return cls(merge(v4), merge(v6))

    @classmethod
    def union(cls, sets: Iterable[AddressSet]) -> AddressSet:
        v4: list[Span] = []
        v6: list[Span] = []
        for s in sets:
            v4 += s.v4
            v6 += s.v6
        return cls(merge(v4), merge(v6))

    def spans(self, family: int) -> tuple[Span, ...]:
        return self.v4 if family == 4 else self.v6

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)

    def cidrs(self, family: int) -> Iterator[tuple[int, int]]:
        """(first address, prefix length) of the fewest CIDRs that cover the family's
        addresses, in ascending order."""
        for span in self.spans(family):
            yield from cidr_blocks(span, family)

    def texts(self, family: int) -> Iterator[str]:
        """The CIDRs of `cidrs(family)` as text, a single address without its prefix."""
        bits = BITS[family]
        for first, length in self.cidrs(family):
            text = address_text(first, family)
            yield text if length == bits else f"{text}/{length}"


NO_ADDRESSES = AddressSet()
