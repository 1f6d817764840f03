"""Compile a run of plain rules into one verdict map: one lookup instead of a rule each.

A plain rule matches on protocol, ports, and addresses (nets, selectors, named ports) and
ends in Allow, Deny or Pass; no negation, no ICMP type, no Log. A run of such rules, in
order, is a first-match decision over a key space of up to five fields (protocol,
destination port, source port, destination address, source address). Each rule is a
union of boxes in that space; the boxes are cut into disjoint cells, each carrying the
verdict of the first rule that covers it, and the cells become the map's elements (the
kernel needs disjoint elements). A packet in no cell falls through to the next rule.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

from bulkhead.policy.plan import NamedPortEntry, RulePlan, SidePlan

Interval = tuple[int, int]
Box = dict[str, list[Interval]]            # a missing field matches anything

FIELDS = ("proto", "dport", "sport", "daddr", "saddr")   # key order in the map
FULL = {"proto": (0, 255), "dport": (0, 65535), "sport": (0, 65535)}
ADDR_FULL = {4: (0, 2**32 - 1), 6: (0, 2**128 - 1)}
VERDICT = {"Allow": "accept", "Deny": "drop", "Pass": "return"}


def is_plain(rule: RulePlan) -> bool:
    sides = (rule.source, rule.destination)
    return (rule.action in VERDICT and rule.not_protocol is None and rule.icmp is None
            and rule.not_icmp is None
            and not any(s.not_nets or s.not_selector or s.not_ports or s.not_named_ports
                        or s.domains for s in sides))


@lru_cache(maxsize=512)
def _intervals(cidrs: tuple[str, ...], family: int) -> tuple[Interval, ...]:
    """The addresses of `cidrs` (those of `family`) as sorted, merged intervals. Cached:
    a selector's set is the same for every rule that names it."""
    raw = []
    for text in cidrs:
        if (":" in text) != (family == 6):
            continue
        net = ipaddress.ip_network(text, strict=False)
        raw.append((int(net.network_address), int(net.broadcast_address)))
    merged: list[Interval] = []
    for lo, hi in sorted(raw):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _intersection(a: Sequence[Interval], b: Sequence[Interval]) -> tuple[Interval, ...]:
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def _contains(intervals: Sequence[Interval], value: int) -> bool:
    at = bisect.bisect_right(intervals, (value, 2**128)) - 1
    return at >= 0 and intervals[at][0] <= value <= intervals[at][1]


@dataclass
class _Ctx:
    family: int
    selector_sets: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]
    named_ports: Mapping[str, tuple[NamedPortEntry, ...]]


def _side_addresses(side: SidePlan, ctx: _Ctx) -> tuple[Interval, ...] | None:
    """The side's address constraint as sorted disjoint intervals, None when it has none."""
    result: tuple[Interval, ...] | None = None
    if side.nets:
        result = _intervals(tuple(side.nets), ctx.family)
    if side.selector:
        v4, v6 = ctx.selector_sets[side.selector]
        members = _intervals(v4 if ctx.family == 4 else v6, ctx.family)
        result = members if result is None else _intersection(result, members)
    return result


def _side_boxes(side: SidePlan, which: str, ctx: _Ctx, protocol: int | None
                ) -> list[Box] | None:
    """Boxes for one side (fields `{which}addr`, `{which}port`, and proto for named
    ports); None if the side puts no constraint at all."""
    addr_field, port_field = f"{which}addr", f"{which}port"
    addresses = _side_addresses(side, ctx)
    base: Box = {}
    if addresses is not None:
        base[addr_field] = list(addresses)
    if not (side.ports or side.named_ports):
        return [base] if base else None
    boxes: list[Box] = []
    if side.ports:
        boxes.append({**base, port_field: list(side.ports)})
    for name in side.named_ports:
        for entry in ctx.named_ports.get(name, ()):
            if (":" in entry.address) != (ctx.family == 6):
                continue
            if protocol is not None and entry.protocol != protocol:
                continue
            ip = int(ipaddress.ip_address(entry.address))
            if addresses is not None and not _contains(addresses, ip):
                continue
            boxes.append({addr_field: [(ip, ip)], "proto": [(entry.protocol, entry.protocol)],
                          port_field: [(entry.port, entry.port)]})
    return boxes


def rule_boxes(rule: RulePlan, family: int,
               selector_sets: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]],
               named_ports: Mapping[str, tuple[NamedPortEntry, ...]]) -> list[Box]:
    """The rule's match in one IP family as a union of boxes ([] = matches nothing)."""
    if rule.ip_version not in (None, family):
        return []
    ctx = _Ctx(family, selector_sets, named_ports)
    boxes: list[Box] = [{}]
    if rule.protocol is not None:
        boxes = [{"proto": [(rule.protocol, rule.protocol)]}]
    for which, side in (("s", rule.source), ("d", rule.destination)):
        side_boxes = _side_boxes(side, which, ctx, rule.protocol)
        if side_boxes is None:
            continue
        combined = []
        for b in boxes:
            for s in side_boxes:
                merged = _intersect(b, s)
                if merged is not None:
                    combined.append(merged)
        boxes = combined
    return boxes


def _intersect(a: Box, b: Box) -> Box | None:
    out = dict(a)
    for key, intervals in b.items():
        if key not in out:
            out[key] = intervals
            continue
        both = [(max(x[0], y[0]), min(x[1], y[1])) for x in out[key] for y in intervals
                if max(x[0], y[0]) <= min(x[1], y[1])]
        if not both:
            return None
        out[key] = both
    return out if all(out.values()) else None


@dataclass(frozen=True)
class CompiledRun:
    fields: tuple[str, ...]                  # key fields in order
    cells: tuple[tuple[tuple[Interval, ...], str], ...]   # (interval per field, verdict)
    interval: bool                           # some cell spans more than one value


def compile_run(boxes: Sequence[tuple[Box, str]], family: int,
                verdicts: Mapping[str, str] = VERDICT) -> CompiledRun:
    """Disjoint cells, first match wins, from boxes in rule order. `verdicts` maps
    Allow, Deny and Pass to the nft verdicts the cells carry."""
    used = tuple(f for f in FIELDS if any(f in b for b, _ in boxes))
    full = {**FULL, "daddr": ADDR_FULL[family], "saddr": ADDR_FULL[family]}
    spans = [[b.get(f, [full[f]]) for f in used] for b, _ in boxes]
    cell_verdicts = [verdicts[action] for _, action in boxes]
    # A field whose every interval is one value stays exact, so the map can be a hash.
    point = [all(lo == hi for s in spans for lo, hi in s[i]) for i in range(len(used))]

    @cache
    def cut(active: tuple[int, ...], depth: int
            ) -> tuple[tuple[tuple[Interval, ...], str], ...]:
        if depth == len(used):
            return (((), cell_verdicts[active[0]]),)
        events: dict[int, list[tuple[int, int]]] = {}
        for idx in active:
            for lo, hi in spans[idx][depth]:
                events.setdefault(lo, []).append((1, idx))
                events.setdefault(hi + 1, []).append((-1, idx))
        covering: dict[int, int] = {}
        pieces: list[tuple[Interval, tuple[tuple[tuple[Interval, ...], str], ...]]] = []
        keys = sorted(events)
        for i, at in enumerate(keys):
            for delta, idx in events[at]:
                covering[idx] = covering.get(idx, 0) + delta
                if covering[idx] == 0:
                    del covering[idx]
            if not covering or i + 1 == len(keys):
                continue
            segment = (at, keys[i + 1] - 1)
            sub = cut(tuple(sorted(covering)), depth + 1)
            last = pieces[-1] if pieces else None
            if (last is not None and not point[depth] and last[0][1] + 1 == segment[0]
                    and last[1] == sub):
                pieces[-1] = ((last[0][0], segment[1]), sub)
            else:
                pieces.append((segment, sub))
        return tuple(((seg, *rest), verdict) for seg, sub in pieces for rest, verdict in sub)

    cells = cut(tuple(range(len(boxes))), 0) if boxes else ()
    interval = any(lo != hi for key, _ in cells for lo, hi in key)
    cut.cache_clear()
    return CompiledRun(used, cells, interval)


NFT_TYPE = {"proto": "inet_proto", "dport": "inet_service", "sport": "inet_service"}
NFT_EXPR = {"proto": "meta l4proto", "dport": "th dport", "sport": "th sport"}


def field_type(name: str, family: int) -> str:
    return NFT_TYPE.get(name, f"ipv{family}_addr")


def field_expr(name: str, family: int) -> str:
    if name in NFT_EXPR:
        return NFT_EXPR[name]
    return f"{'ip' if family == 4 else 'ip6'} {name}"


def element_text(run: CompiledRun, family: int) -> list[str]:
    out = []
    for key, verdict in run.cells:
        parts = []
        for name, (lo, hi) in zip(run.fields, key, strict=True):
            if name.endswith("addr"):
                parts.append(address_range(lo, hi, family))
            else:
                parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
        out.append(f"{' . '.join(parts)} : {verdict}")
    return out


def address_range(lo: int, hi: int, family: int) -> str:
    """An address, a CIDR when the range is exactly one, else `first-last`."""
    address = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(address(lo))
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        bits = 32 if family == 4 else 128
        return f"{address(lo)}/{bits - size.bit_length() + 1}"
    return f"{address(lo)}-{address(hi)}"
