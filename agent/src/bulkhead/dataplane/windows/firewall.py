"""Windows Firewall rules for one endpoint and direction, compiled from a first-match list
(docs/windows/firewall.md).

Windows Firewall has no rule order: a packet that matches any Block rule is blocked, else
one that matches any Allow rule is allowed, else the profile's default action decides
(Block, which the agent sets). A first-match list (`flat.Flat`) is compiled into such an
unordered set exactly, by set arithmetic on boxes:

- the packets whose first match is an Allow entry are the union, over Allow entries, of
  the entry's box minus the boxes of every *earlier Deny* entry (a packet in that region
  matches the Allow and no Deny before it, so its first match is this Allow or an earlier
  Allow; and a packet whose first match is an Allow is in that Allow's region);
- symmetrically the packets whose first match is a Deny are the union, over Deny entries,
  of the box minus every *earlier Allow* entry's box.

`blocks` chooses what is written: "none" writes only the Allow regions and leaves every
denied packet to the default action; "explicit" writes Block rules for the region of each
Deny entry but the last (the list's catch-all), and "all" (the default) for every Deny
entry, so that no Allow rule of anyone else on the host (Windows' built-in rules, an
admin's) can open what a policy denies. When Deny regions are blocked, an Allow entry's
rules are its whole box: the part of it an earlier Deny decides is blocked anyway (Block
beats Allow), and a Block rule never covers a packet the list allows.

What Windows Firewall cannot say is refused with `Unsupported`, naming the entry's
`where` and the field: ports with a protocol other than TCP and UDP (the cmdlets take
ports only with those two), and more rules than `max_rules`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import product, zip_longest

from bulkhead.dataplane.windows.flat import (
    ALL_ICMP,
    ALL_PORTS,
    ALL_PROTOCOLS,
    ALLOW,
    DENY,
    Box,
    Flat,
    Spans,
    Unsupported,
    all_addresses,
)
from bulkhead.dataplane.windows.rules import INBOUND, OUTBOUND, FirewallRule
from bulkhead.model.flowlog import PORTED
from bulkhead.net import BITS, address_text, cidr_blocks, difference, intersection, merge

BLOCK = "Block"
BLOCKS = ("all", "explicit", "none")

# Addresses, ports or ICMP types in one rule's list. Microsoft documents no limit for a
# Windows Firewall rule's address list; Calico's Windows dataplane splits HNS ACL lists at
# 4,000 entries ("Microsoft recommended limiting the number of entries per rule to a few
# thousand", felix/dataplane/windows/policysets/policysets.go). 1,000 is a conservative
# choice below that, the figure commonly cited for Windows Firewall, not a measured one.
CHUNK = 1000
# Rules per endpoint and direction: a bound, not a Windows limit. Blocking everything a
# list denies costs about one rule per IP protocol no Allow names (about 260 rules).
MAX_RULES = 2000

# The protocols whose packets carry ports (as `policy.flow.Flow.carries_ports` says), and
# the two that carry an ICMP type and code (as `Flow.make` says, in either family).
ICMP_PROTOCOLS = frozenset({1, 58})
# Windows Firewall takes -LocalPort and -RemotePort only with TCP and UDP.
PORT_PROTOCOLS = frozenset({6, 17})

# Ports and ICMP are compared with "absent" (a packet of a protocol without ports or ICMP
# fields) as one more value past the real ones: a `Box` field matches an absent value only
# when it holds every real value, and with absent as a value that rule is a plain set, so
# subtracting boxes field by field stays exact.
_ABSENT = 0x10000
_REAL: Spans = ((0, 0xFFFF),)
_EVERY: Spans = ((0, _ABSENT),)

_DIRECTIONS = {"Ingress": INBOUND, "Egress": OUTBOUND, INBOUND: INBOUND, OUTBOUND: OUTBOUND}
# The Calico field a Flat field comes from, per direction, for error messages.
_PORT_FIELDS = {INBOUND: ("destination.ports", "source.ports"),
                OUTBOUND: ("source.ports", "destination.ports")}

# protocols, local, remote, local ports, remote ports, icmp; ports and icmp extended.
_XBox = tuple[Spans, Spans, Spans, Spans, Spans, Spans]
_CHEAP_FIRST = (0, 3, 4, 5, 1, 2)


def windows_direction(direction: str) -> str:
    """Inbound or Outbound for a direction given as Calico's or Windows' word."""
    try:
        return _DIRECTIONS[direction]
    except KeyError:
        raise ValueError(f"direction {direction!r} is not Ingress, Egress, Inbound or "
                         "Outbound") from None


def compile(flat: Mapping[int, Flat], direction: str, name: str,
            interface_alias: str | None = None, max_rules: int = MAX_RULES, *,
            blocks: str = "all") -> list[FirewallRule]:
    """Windows Firewall rules that decide every packet of `direction` as the first-match
    lists `flat` (per address family, keys 4 and 6) decide it, given the profile's default
    action Block. Rules are named `<name>-<n>` from 1 and carry `interface_alias`.
    `blocks` is "all", "explicit" or "none" (see the module's docstring). Raises
    `Unsupported` for what Windows Firewall cannot express or past `max_rules` rules."""
    wf_direction = windows_direction(direction)
    if blocks not in BLOCKS:
        raise ValueError(f"blocks {blocks!r} is not one of {', '.join(BLOCKS)}")
    if max_rules < 1:
        raise ValueError(f"max_rules {max_rules} is not positive")
    wheres: list[str] = []
    shapes: list[_Shape] = []
    for family in sorted(flat):
        if family not in BITS:
            raise ValueError(f"address family {family} is not 4 or 6")
        for index, action, region in _regions(flat[family], family, blocks, 8 * max_rules):
            source = len(wheres)
            wheres.append(flat[family][index].where)
            for piece in region:       # at most 256 shapes a piece
                shapes.extend(_shapes(piece, family, action, source, wheres[source],
                                      wf_direction))
                if len(shapes) > 64 * max_rules:
                    raise Unsupported(wheres[source], "rule count",
                                      f"more than {64 * max_rules} rules before merging "
                                      f"(max_rules {max_rules})")
    rules = _rules(_merge(shapes))
    if len(rules) > max_rules:
        past = rules[max_rules]
        raise Unsupported(wheres[min(past.sources)], "rule count",
                          f"the list compiles to {len(rules)} Windows Firewall rules, more "
                          f"than max_rules {max_rules}; the rule past the bound comes from "
                          "here")
    return [FirewallRule(
        name=f"{name}-{n}", direction=wf_direction, action=r.action, protocol=r.protocol,
        local_addresses=r.local, remote_addresses=r.remote, local_ports=r.local_ports,
        remote_ports=r.remote_ports, icmp_types=r.icmp, interface_alias=interface_alias,
        description=_description(wheres[s] for s in sorted(r.sources)))
        for n, r in enumerate(rules, 1)]


# --- regions: set arithmetic on extended boxes -------------------------------------------

def _extend(box: Box) -> _XBox:
    def ext(spans: Spans) -> Spans:
        return _EVERY if spans == _REAL else spans
    return (box.protocols, box.local, box.remote, ext(box.local_ports),
            ext(box.remote_ports), ext(box.icmp))


def subtract(x: _XBox, y: _XBox) -> list[_XBox]:
    """`x` minus `y` as disjoint boxes: at most one per field (the values of field i that
    `y` lacks, with the fields before i narrowed to `y`'s). Protocols come first, so what
    another protocol keeps stays one piece."""
    common: list[Spans] = [(), (), (), (), (), ()]
    for i in _CHEAP_FIRST:             # the short fields first: most pairs miss there
        a, b = x[i], y[i]
        if a[-1][1] < b[0][0] or b[-1][1] < a[0][0]:
            return [x]
        common[i] = a if a == b else intersection(a, b)
        if not common[i]:
            return [x]
    pieces: list[_XBox] = []
    for i in range(6):
        rest = difference(x[i], y[i])
        if rest:
            pieces.append((*common[:i], rest, *x[i + 1:]))  # type: ignore[arg-type]
    return pieces


def _regions(flat: Flat, family: int, blocks: str, limit: int
             ) -> Iterator[tuple[int, str, list[_XBox]]]:
    """(entry index, Allow or Block, the boxes its rules cover) for each entry with rules."""
    boxes = [_extend(e.box) for e in flat]
    for entry in flat:
        if entry.box.family != family:
            raise ValueError(f"{entry.where}: a family {entry.box.family} box in the "
                             f"family {family} list")
        if entry.action not in (ALLOW, DENY):
            raise ValueError(f"{entry.where}: action {entry.action!r} is not Allow or Deny")
    for i, entry in enumerate(flat):
        if entry.box.empty:            # matches no packet: no rules, nothing to subtract
            continue
        if entry.action == ALLOW:
            if blocks != "none":       # earlier Deny regions are blocked: the whole box
                yield i, ALLOW, [boxes[i]]
                continue
            other = DENY
        else:
            if blocks == "none" or (blocks == "explicit" and i == len(flat) - 1):
                continue
            other = ALLOW
        pieces = [boxes[i]]
        for j in range(i):
            if flat[j].action == other and not flat[j].box.empty:
                pieces = [p for q in pieces for p in subtract(q, boxes[j])]
                if len(pieces) > limit:
                    raise Unsupported(entry.where, "rule count",
                                      f"more than {limit} boxes after subtracting the "
                                      f"earlier {other} rules")
        if pieces:
            yield i, ALLOW if entry.action == ALLOW else BLOCK, pieces


# --- shapes: one protocol, real ports and ICMP, one family's addresses ------------------

@dataclass(frozen=True, slots=True)
class _Shape:
    action: str
    family: int
    protocol: int | None           # None: every protocol
    local: Spans
    remote: Spans
    local_ports: Spans             # ALL_PORTS: unrestricted
    remote_ports: Spans
    icmp: Spans                    # ALL_ICMP: unrestricted
    sources: frozenset[int]


def _shapes(x: _XBox, family: int, action: str, source: int, where: str, direction: str
            ) -> Iterator[_Shape]:
    """The piece `x` as single-protocol shapes (or one for every protocol)."""
    protocols, local, remote, lports, rports, icmp = x
    src = frozenset({source})
    if protocols == ALL_PROTOCOLS and lports == rports == icmp == _EVERY:
        yield _Shape(action, family, None, local, remote, ALL_PORTS, ALL_PORTS, ALL_ICMP, src)
        return
    for lo, hi in protocols:
        for p in range(lo, hi + 1):
            if p in PORTED:
                lp, rp = intersection(lports, _REAL), intersection(rports, _REAL)
                if not (lp and rp and _absent_in(icmp)):
                    continue
                if p not in PORT_PROTOCOLS:
                    for field, spans in zip(_PORT_FIELDS[direction], (lp, rp), strict=True):
                        if spans != ALL_PORTS:
                            raise Unsupported(where, field, f"Windows Firewall takes ports "
                                              f"only with TCP and UDP, not protocol {p}")
                yield _Shape(action, family, p, local, remote, lp, rp, ALL_ICMP, src)
            elif p in ICMP_PROTOCOLS:
                types = intersection(icmp, _REAL)
                if types and _absent_in(lports) and _absent_in(rports):
                    yield _Shape(action, family, p, local, remote, ALL_PORTS, ALL_PORTS,
                                 types, src)
            elif _absent_in(lports) and _absent_in(rports) and _absent_in(icmp):
                yield _Shape(action, family, p, local, remote, ALL_PORTS, ALL_PORTS,
                             ALL_ICMP, src)


def _absent_in(spans: Spans) -> bool:
    return bool(spans) and spans[-1][1] == _ABSENT


def _merge(shapes: Iterable[_Shape]) -> list[_Shape]:
    """Fewer shapes covering the same packets: equal ones joined; ones that differ in one
    list joined into one with the union of that list; all 256 protocols with nothing else
    restricted into one shape for every protocol."""
    current = _join(shapes, None)
    for field in ("remote", "local", "remote_ports", "local_ports", "icmp"):
        current = _join(current, field)
    groups: dict[tuple[object, ...], list[_Shape]] = defaultdict(list)
    for s in current:
        if s.protocol is not None and s.local_ports == ALL_PORTS \
                and s.remote_ports == ALL_PORTS and s.icmp == ALL_ICMP:
            groups[(s.action, s.family, s.local, s.remote)].append(s)
    for group in groups.values():
        if len(group) == 256:
            first = group[0]
            every = _Shape(first.action, first.family, None, first.local, first.remote,
                           ALL_PORTS, ALL_PORTS, ALL_ICMP,
                           frozenset().union(*(s.sources for s in group)))
            gone = set(group)
            current = [s for s in current if s not in gone] + [every]
    return _join(current, None)


def _join(shapes: Iterable[_Shape], field: str | None) -> list[_Shape]:
    """Shapes equal but for `field` (None: equal but for sources) as one, in first-seen
    order."""
    fields = ("action", "family", "protocol", "local", "remote", "local_ports",
              "remote_ports", "icmp")
    keyed = [f for f in fields if f != field]
    groups: dict[tuple[object, ...], list[_Shape]] = {}
    for s in shapes:
        groups.setdefault(tuple(getattr(s, f) for f in keyed), []).append(s)
    out = []
    for group in groups.values():
        first = group[0]
        values = dict(zip(fields, (getattr(first, f) for f in fields), strict=True))
        if field is not None and len(group) > 1:
            values[field] = merge(span for s in group for span in getattr(s, field))
        out.append(_Shape(**values, sources=frozenset().union(*(s.sources for s in group))))
    return out


# --- rules: text, families paired, lists chunked -----------------------------------------

@dataclass(frozen=True, slots=True)
class _Rule:
    action: str
    protocol: int | None
    local: tuple[str, ...]
    remote: tuple[str, ...]
    local_ports: tuple[str, ...]
    remote_ports: tuple[str, ...]
    icmp: tuple[str, ...]
    sources: frozenset[int]


def _rules(shapes: list[_Shape]) -> list[_Rule]:
    """Rules for the shapes: an IPv4 shape and an IPv6 shape with the same protocol,
    ports and ICMP share one rule (a Windows Firewall address list may hold both
    families, and a rule with no addresses matches both), lists cut into CHUNK entries.
    In the order of the list entry each rule first comes from."""
    pairs: dict[tuple[str, int | None, Spans, Spans, Spans], dict[int, list[_Shape]]] = \
        defaultdict(lambda: {4: [], 6: []})
    for s in shapes:
        pairs[(s.action, s.protocol, s.local_ports, s.remote_ports, s.icmp)][s.family] \
            .append(s)
    out: list[_Rule] = []
    for (action, protocol, lports, rports, icmp), by_family in pairs.items():
        for family in (4, 6):          # family-wide shapes first, to pair with each other
            by_family[family].sort(key=lambda s: (not _whole(s), min(s.sources)))
        for v4, v6 in zip_longest(by_family[4], by_family[6]):
            members = [s for s in (v4, v6) if s is not None]
            local, remote = _addresses(members)
            sources = frozenset().union(*(s.sources for s in members))
            lists = [_chunks(local), _chunks(remote),
                     _chunks(tuple(_port_texts(lports))), _chunks(tuple(_port_texts(rports))),
                     _chunks(tuple(_icmp_texts(icmp)))]
            for lo, re, lp, rp, ic in product(*lists):
                out.append(_Rule(action, protocol, lo, re, lp, rp, ic, sources))
    out.sort(key=lambda r: min(r.sources))
    return out


def _whole(s: _Shape) -> bool:
    every = all_addresses(s.family)
    return s.local == every and s.remote == every


def _addresses(members: list[_Shape]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The local and remote address lists of a rule for one shape per family. A list is
    left empty (Any) only where every family's shape holds all its addresses; a rule for
    one family names addresses on at least one side, so it never matches the other."""
    sides: list[tuple[str, ...]] = []
    for side in ("local", "remote"):
        if all(getattr(s, side) == all_addresses(s.family) for s in members):
            sides.append(())
        else:
            sides.append(tuple(t for s in members
                               for t in address_texts(getattr(s, side), s.family)))
    local, remote = sides
    if len(members) == 1 and not local and not remote:
        remote = tuple(address_texts(all_addresses(members[0].family), members[0].family))
    return local, remote


def address_texts(spans: Spans, family: int) -> Iterator[str]:
    """Each span as one Windows Firewall address: `a`, `a/len` when it is one CIDR block,
    else `first-last`. All the family's addresses are written as its two halves
    (`0.0.0.0/1`, `128.0.0.0/1`): whether Windows reads `0.0.0.0/0` as Any, matching the
    other family too, is not documented."""
    bits = BITS[family]
    if spans == all_addresses(family):
        half = 1 << (bits - 1)
        yield f"{address_text(0, family)}/1"
        yield f"{address_text(half, family)}/1"
        return
    for lo, hi in spans:
        if lo == hi:
            yield address_text(lo, family)
            continue
        blocks = list(cidr_blocks((lo, hi), family))
        if len(blocks) == 1:
            yield f"{address_text(lo, family)}/{blocks[0][1]}"
        else:
            yield f"{address_text(lo, family)}-{address_text(hi, family)}"


def _port_texts(spans: Spans) -> Iterator[str]:
    if spans == ALL_PORTS:
        return
    for lo, hi in spans:
        yield str(lo) if lo == hi else f"{lo}-{hi}"


def _icmp_texts(spans: Spans) -> Iterator[str]:
    """ICMP types (`8`) where every code of the type is in the spans, else `type:code`."""
    if spans == ALL_ICMP:
        return
    for lo, hi in spans:
        value = lo
        while value <= hi:
            icmp_type, code = value >> 8, value & 0xFF
            if code == 0 and value + 0xFF <= hi:
                yield str(icmp_type)
                value += 0x100
            else:
                yield f"{icmp_type}:{code}"
                value += 1


def _chunks(texts: tuple[str, ...]) -> list[tuple[str, ...]]:
    if not texts:
        return [()]
    return [texts[i:i + CHUNK] for i in range(0, len(texts), CHUNK)]


def _description(wheres: Iterable[str]) -> str:
    """The list entries a rule comes from, at most three named."""
    names = list(dict.fromkeys(wheres))
    text = "; ".join(names[:3])
    if len(names) > 3:
        text += f"; and {len(names) - 3} more"
    return text
