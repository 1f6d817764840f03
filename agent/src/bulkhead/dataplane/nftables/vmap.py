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
import itertools
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from bulkhead.dataplane.nftables.ruleset import Elements
from bulkhead.net import (
    BITS,
    AddressSet,
    Span,
    address_text,
    contains,
    intersection,
    merge,
    separated,
)
from bulkhead.policy.plan import NamedPortEntry, NamedPortKey, RulePlan, SidePlan
from bulkhead.selector import Selector

Interval = Span
_high = operator.itemgetter(1)              # an interval's last value (a bisect key)
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


@dataclass
class _Ctx:
    family: int
    selector_sets: Mapping[Selector, AddressSet]
    named_ports: Mapping[NamedPortKey, tuple[NamedPortEntry, ...]]


def _side_addresses(side: SidePlan, ctx: _Ctx) -> tuple[Interval, ...] | None:
    """The side's address constraint as sorted disjoint intervals, None when it has none."""
    result: tuple[Interval, ...] | None = None
    if side.nets:
        result = side.nets.spans(ctx.family)
    if side.selector:
        members = ctx.selector_sets[side.selector].spans(ctx.family)
        result = members if result is None else intersection(result, members)
    return result


def _side_boxes(side: SidePlan, which: str, ctx: _Ctx, protocol: int | None
                ) -> list[Box] | None:
    """Boxes for one side (fields `{which}addr`, `{which}port`, and proto for named
    ports); None if the side puts no constraint at all."""
    addr_field, port_field = f"{which}addr", f"{which}port"
    addresses = _side_addresses(side, ctx)
    base: Box = {}
    if addresses is not None:
        # The address set's own tuple (not a copy): `RunCompiler` knows it by identity.
        base[addr_field] = addresses  # type: ignore[assignment]
    if not (side.ports or side.named_ports):
        return [base] if base else None
    boxes: list[Box] = []
    if side.ports:
        boxes.append({**base, port_field: list(side.ports)})
    for name in side.named_ports:
        for entry in ctx.named_ports.get(side.port_key(name), ()):
            if entry.family != ctx.family:
                continue
            if protocol is not None and entry.protocol != protocol:
                continue
            ip = entry.address
            if addresses is not None and not contains(addresses, ip):
                continue
            boxes.append({addr_field: [(ip, ip)], "proto": [(entry.protocol, entry.protocol)],
                          port_field: [(entry.port, entry.port)]})
    return boxes


def rule_boxes(rule: RulePlan, family: int,
               selector_sets: Mapping[Selector, AddressSet],
               named_ports: Mapping[NamedPortKey, tuple[NamedPortEntry, ...]]) -> list[Box]:
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


# Cells as a tree: one field's disjoint segments in order, each with the cells of the
# next fields inside it; a verdict below the last field. Equal trees hold equal cells.
_Tree = Sequence[tuple[Interval, "_Tree | str"]]   # a tuple, or a long leaf's _Pieces


def _separated(intervals: Sequence[Interval]) -> bool:
    """Sorted, with a gap between each interval and the next."""
    return separated(intervals)


def _events(active: Sequence[int], lists: Sequence[Sequence[Interval]],
            lo: int | None = None, hi: int | None = None) -> dict[int, list[tuple[int, int]]]:
    """Where each box (index, with its interval list in the same order) starts covering
    (+1) and stops (-1), clipped to [lo, hi] when given."""
    events: dict[int, list[tuple[int, int]]] = {}
    for idx, intervals in zip(active, lists, strict=True):
        if lo is None or hi is None:
            chosen: Sequence[Interval] = intervals
        else:
            k = max(bisect.bisect_right(intervals, (lo, BIG)) - 1, 0)
            end = bisect.bisect_right(intervals, (hi, BIG))
            chosen = [(max(first, lo), min(last, hi)) for first, last in intervals[k:end]
                      if last >= lo]
        for first, last in chosen:
            events.setdefault(first, []).append((1, idx))
            events.setdefault(last + 1, []).append((-1, idx))
    return events


def _pieces(events: Mapping[int, Sequence[tuple[int, int]]],
            sub_of: Callable[[dict[int, int]], _Tree | str], point: bool
            ) -> list[tuple[Interval, _Tree | str]]:
    """A field's segments between the events, each with what the boxes covering it give
    (`sub_of`: a verdict, or the cells of the next fields; nothing: left out); in a field
    that is not all points, touching segments that give the same are joined."""
    covering: dict[int, int] = {}
    pieces: list[tuple[Interval, _Tree | str]] = []
    keys = sorted(events)
    for i, at in enumerate(keys):
        for delta, idx in events[at]:
            covering[idx] = covering.get(idx, 0) + delta
            if covering[idx] == 0:
                del covering[idx]
        if not covering or i + 1 == len(keys):
            continue
        segment = (at, keys[i + 1] - 1)
        sub = sub_of(covering)
        if not sub:
            continue   # no cells inside (a box with no interval in a later field)
        if (pieces and not point and pieces[-1][0][1] + 1 == segment[0]
                and pieces[-1][1] == sub):
            pieces[-1] = ((pieces[-1][0][0], segment[1]), sub)
        else:
            pieces.append((segment, sub))
    return pieces


def _level(active: tuple[int, ...], depth: int, spans: Sequence[Sequence[Sequence[Interval]]],
           cell_verdicts: Sequence[str], point: bool, last_depth: int,
           cut: Callable[[tuple[int, ...], int], _Tree]) -> _Tree:
    """The cells of the boxes `active` from field `depth` on: each segment of the field
    carries the boxes covering it, the first of them deciding at the end (`cut` gives
    the next field's)."""
    if len(active) == 1 and _separated(spans[active[0]][depth]):
        # One box whose intervals neither touch nor overlap: they are the segments.
        sub = cell_verdicts[active[0]] if depth == last_depth else cut(active, depth + 1)
        return tuple(zip(spans[active[0]][depth], itertools.repeat(sub))) if sub else ()
    return tuple(_pieces(
        _events(active, [spans[i][depth] for i in active]),
        lambda covering: (cell_verdicts[min(covering)] if depth == last_depth
                          else cut(tuple(sorted(covering)), depth + 1)),
        point))


def _points(intervals: Sequence[Interval]) -> bool:
    """Whether every interval is one value."""
    return all(lo == hi for lo, hi in intervals)


def _cut_tree(boxes: Sequence[tuple[Box, str]], family: int, verdicts: Mapping[str, str],
              distinct: bool = False
              ) -> tuple[tuple[str, ...], list[bool], _Tree | str | None]:
    """The fields the boxes use, whether each is all points, and the cells as a tree
    (first match wins, boxes in rule order); for boxes with no field, the first one's
    verdict for everything; for no boxes, None. `distinct`: a box with the same
    intervals as an earlier one (the same list objects, or equal short lists) is left
    out first: it never decides (the earlier one covers what it covers, and comes
    first), and a thousand rules that allow one address set to one port are one box."""
    used = tuple(f for f in FIELDS if any(f in b for b, _ in boxes))
    full = {**FULL, "daddr": ADDR_FULL[family], "saddr": ADDR_FULL[family]}
    spans = [[b.get(f, [full[f]]) for f in used] for b, _ in boxes]
    cell_verdicts = [verdicts[action] for _, action in boxes]
    # A field whose every interval is one value stays exact, so the map can be a hash.
    point = [all(_points(intervals) for intervals in {id(s[i]): s[i] for s in spans}.values())
             for i in range(len(used))]
    if distinct:
        seen: set[tuple[object, ...]] = set()
        kept = []
        for box, verdict in zip(spans, cell_verdicts, strict=True):
            key = tuple(id(x) if isinstance(x, tuple) and len(x) > BY_IDENTITY else tuple(x)
                        for x in box)
            if key not in seen:
                seen.add(key)
                kept.append((box, verdict))
        spans, cell_verdicts = [box for box, _ in kept], [verdict for _, verdict in kept]
    last_depth = len(used) - 1
    if not boxes:
        return used, point, None
    if not used:     # a box with no field at all: its verdict for everything
        return used, point, cell_verdicts[0]

    @cache
    def cut(active: tuple[int, ...], depth: int) -> _Tree:
        """The cells of the boxes `active` from field `depth` on: each segment of the
        field carries the boxes covering it, the first of them deciding at the end."""
        return _level(active, depth, spans, cell_verdicts, point[depth], last_depth,
                      cut)  # noqa: F821 (deleted below, once the tree is cut)

    tree = cut(tuple(range(len(spans))), 0)
    cut.cache_clear()
    del cut          # it names itself: no reference cycle left for the collector
    check_cells(tree, last_depth, cell_budget(spans))
    return used, point, tree


def compile_run(boxes: Sequence[tuple[Box, str]], family: int,
                verdicts: Mapping[str, str] = VERDICT) -> CompiledRun:
    """Disjoint cells, first match wins, from boxes in rule order. `verdicts` maps
    Allow, Deny and Pass to the nft verdicts the cells carry."""
    used, point, tree = _cut_tree(boxes, family, verdicts)
    cells: list[tuple[tuple[Interval, ...], str]] = []
    if isinstance(tree, str):
        cells.append(((), tree))
    elif tree is not None:
        _cells(tree, (), len(used) - 1, cells)
    # Only a field with an interval wider than one value can have a wider segment.
    wide = [i for i in range(len(used)) if not point[i]]
    interval = any(key[i][0] != key[i][1] for key, _ in cells for i in wide)
    return CompiledRun(used, tuple(cells), interval)


def compile_texts(boxes: Sequence[tuple[Box, str]], family: int,
                  verdicts: Mapping[str, str] = VERDICT
                  ) -> tuple[tuple[str, ...], bool, tuple[str, ...]]:
    """`compile_run` as a map is written: (fields, interval, the sorted element texts of
    `element_text`); with no fields, the one verdict for everything (none for no boxes).
    The texts are written from the tree of cells (`tree_texts`), with no cell object
    per element: a run of a million addresses is written in a fraction of the time."""
    used, point, tree = _cut_tree(boxes, family, verdicts, distinct=True)
    if tree is None:
        return (), False, ()
    if isinstance(tree, str):
        return (), False, (tree,)
    texts, wide = tree_texts(tree, used, point, family)
    texts.sort()
    return used, wide > 0, tuple(texts)


NFT_TYPE = {"proto": "inet_proto", "dport": "inet_service", "sport": "inet_service"}
NFT_EXPR = {"proto": "meta l4proto", "dport": "th dport", "sport": "th sport"}


def field_type(name: str, family: int) -> str:
    return NFT_TYPE.get(name, f"ipv{family}_addr")


def field_expr(name: str, family: int) -> str:
    if name in NFT_EXPR:
        return NFT_EXPR[name]
    return f"{'ip' if family == 4 else 'ip6'} {name}"


def element_text(run: CompiledRun, family: int) -> list[str]:
    """Each cell as `field . field ... : verdict`. Cells come in tree order, so a run of
    them shares every field but the last: that head is written once per run of cells."""
    writers = [_address_writer(family) if name.endswith("addr") else _ValueTexts().__getitem__
               for name in run.fields]
    if not writers:
        return [f" : {verdict}" for _, verdict in run.cells]
    *head_writers, write_last = writers
    last = len(writers) - 1
    out: list[str] = []
    before: tuple[Interval, ...] | None = None
    head = ""
    for key, verdict in run.cells:
        if len(key) != len(writers):
            raise ValueError(f"a cell of {len(key)} fields in a map of {len(writers)}")
        prefix = key[:last]
        if prefix != before:
            before = prefix
            head = "".join([write(iv) + " . " for write, iv in zip(head_writers, prefix,
                                                                   strict=True)])
        out.append(f"{head}{write_last(key[last])} : {verdict}")
    return out


_OCTETS = tuple(str(i) for i in range(256))


def tree_texts(tree: _Tree, fields: Sequence[str], point: Sequence[bool], family: int
               ) -> tuple[list[str], int]:
    """The element texts of the cells of `tree` (whose fields are `fields`, `point`
    telling which of them are all points), in the tree's order, as `element_text`
    writes them; and how many of the cells are wider than one value in a field that is
    not all points. Each head (every field but the last) is written once per leaf; an
    IPv4 address in the last field as its /24's text, written once, and its last octet's
    with the verdict."""
    last = len(fields) - 1
    writers = [_address_writer(family) if name.endswith("addr") else _ValueTexts().__getitem__
               for name in fields]
    write_last = writers[last]
    by_octet = family == 4 and fields[last].endswith("addr")
    tails: dict[str, tuple[str, ...]] = {}     # per verdict: each last octet, then it
    out: list[str] = []
    wide = 0

    def leaf(pieces: _Tree, head: str, head_wide: bool) -> None:
        nonlocal wide
        prefixes: dict[int, str] = {}
        for (lo, hi), verdict in pieces:
            if not isinstance(verdict, str):
                continue
            if lo != hi or not by_octet:
                out.append(f"{head}{write_last((lo, hi))} : {verdict}")
                wide += head_wide or lo != hi      # (in a field of points, lo == hi)
                continue
            tail = tails.get(verdict)
            if tail is None:
                tail = tails[verdict] = tuple(f"{octet} : {verdict}" for octet in _OCTETS)
            top = lo >> 8
            prefix = prefixes.get(top)
            if prefix is None:
                text = address_text(lo, 4)          # (ValueError for what is no address)
                prefix = prefixes[top] = head + text[:text.rindex(".") + 1]
            out.append(prefix + tail[lo & 255])
            wide += head_wide

    def walk(tree: _Tree, depth: int, head: str, head_wide: bool) -> None:
        if depth == last:
            leaf(tree, head, head_wide)
            return
        write = writers[depth]
        for segment, sub in tree:
            if not isinstance(sub, str):
                walk(sub, depth + 1, f"{head}{write(segment)} . ",  # noqa: F821 (see below)
                     head_wide or (not point[depth] and segment[0] != segment[1]))

    walk(tree, 0, "", False)
    del walk         # it names itself: no reference cycle left holding `out`
    return out, wide


class _ValueTexts(dict[Interval, str]):
    """A protocol or port range as element text, each written once (they repeat from
    cell to cell)."""

    def __missing__(self, interval: Interval) -> str:
        lo, hi = interval
        text = self[interval] = str(lo) if lo == hi else f"{lo}-{hi}"
        return text


def _address_writer(family: int) -> Callable[[Interval], str]:
    return lambda iv: address_text(iv[0], family) if iv[0] == iv[1] else \
        address_range(*iv, family)


def address_range(lo: int, hi: int, family: int) -> str:
    """An address, a CIDR when the range is exactly one, else `first-last`."""
    if lo == hi:
        return address_text(lo, family)
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        return f"{address_text(lo, family)}/{BITS[family] - size.bit_length() + 1}"
    return f"{address_text(lo, family)}-{address_text(hi, family)}"


# Spans longer than this are memoized by identity (an address set's spans, the same
# object while the set is unchanged); shorter ones (protocols, ports) by content.
BY_IDENTITY = 8
_EVERYTHING = {4: {**{f: (v,) for f, v in FULL.items()}, "daddr": (ADDR_FULL[4],),
                   "saddr": (ADDR_FULL[4],)},
               6: {**{f: (v,) for f, v in FULL.items()}, "daddr": (ADDR_FULL[6],),
                   "saddr": (ADDR_FULL[6],)}}
Cell = tuple[tuple[Interval, ...], str]
# An interval list's id -> (the list it replaced, the ranges outside which both agree).
Hints = Mapping[int, tuple[Sequence[Interval], Sequence[Interval]]]
# A leaf of the tree with what it was made of: each box's intervals and verdict.
_Leaf = tuple[tuple[Sequence[Interval], ...], tuple[str, ...], "_Tree"]
BIG = 1 << 129                  # past every value: a bisect key

# A run's map may hold at most this many times the intervals its boxes are made of (and
# at least MIN_CELL_BUDGET cells): nested ranges in several fields cut each other into a
# number of cells that grows as the product of the rules (160 rules of a port range, a
# source port range and a net each: 2.7 million cells, seconds of CPU and hundreds of
# MiB), while the same rules one nft rule each cost their own intervals. Past it the run
# is not compiled (TooManyCells) and its rules are rendered one by one.
CELLS_PER_INTERVAL = 16
MIN_CELL_BUDGET = 65_536


class TooManyCells(Exception):
    """A run whose map would hold more cells than its budget."""

    def __init__(self, cells: int, budget: int) -> None:
        super().__init__(f"a verdict map of {cells:,} cells, over its budget of {budget:,}")
        self.cells, self.budget = cells, budget


def cell_budget(spans: Sequence[Sequence[Sequence[Interval]]]) -> int:
    """The most cells a run's map may hold: CELLS_PER_INTERVAL per interval of its boxes
    (`spans`: each box's interval lists), at least MIN_CELL_BUDGET."""
    return max(MIN_CELL_BUDGET, CELLS_PER_INTERVAL * sum(len(x) for box in spans for x in box))


def _cells_under(node: _Tree, depth: int, last_depth: int, counted: dict[int, int]) -> int:
    """The cells `node` (a subtree at field `depth`) stands for, shared subtrees counted
    once each in `counted` (by id). A module function: a closure naming itself would be
    a reference cycle, left to the cycle collector (test_nftables_vmap)."""
    if depth == last_depth:
        return len(node)
    known = counted.get(id(node))
    if known is None:
        known = sum(1 if isinstance(sub, str) else
                    _cells_under(sub, depth + 1, last_depth, counted) for _, sub in node)
        counted[id(node)] = known
    return known


def check_cells(tree: _Tree | str | None, last_depth: int, budget: int) -> None:
    """Raise TooManyCells when the tree of cells (subtrees shared: a DAG, which stays
    small while the cells it stands for multiply) holds more than `budget` cells, before
    any of them is written out."""
    if tree is None or isinstance(tree, str):
        return
    cells = _cells_under(tree, 0, last_depth, {})
    if cells > budget:
        raise TooManyCells(cells, budget)


def _meeting(spans: Sequence[Interval], regions: Sequence[Interval]) -> Iterator[Interval]:
    """The intervals of sorted, disjoint `spans` that meet one of `regions`."""
    for lo, hi in regions:
        at = bisect.bisect_left(spans, lo, key=_high)
        while at < len(spans) and spans[at][0] <= hi:
            yield spans[at]
            at += 1




Piece = tuple[Interval, "_Tree | str"]
CHUNK = 256                     # pieces per chunk of a long leaf (see _Pieces)


class _Pieces(Sequence[Piece]):
    """A leaf of the tree (the last field's pieces, in order) kept as a list of chunks.

    A label change moves one address of a leaf that can hold 100,000 pieces. As one
    tuple, the leaf would be copied whole to patch it, and every piece of it touched
    (its reference count) by the copy and again when the old one is freed: with a
    large heap those are cache misses, and they made a label change slower the more
    host endpoints there were. Patched, a `_Pieces` shares every chunk but the few
    around the change with the leaf it came from. It reads as the tuple of its pieces
    would: iteration, length, indexing, equality with any sequence of the same pieces.
    """

    __slots__ = ("_chunks", "_firsts", "_len")

    def __init__(self, chunks: list[tuple[Piece, ...]]) -> None:
        self._chunks = [c for c in chunks if c]
        self._firsts = [c[0][0][0] for c in self._chunks]   # each chunk's first value
        self._len = sum(map(len, self._chunks))

    @classmethod
    def _spliced(cls, old: _Pieces, start: int, stop: int, redone: list[tuple[Piece, ...]]
                 ) -> _Pieces:
        """`old` with its chunks [start, stop) replaced by `redone` (none empty). The
        chunk list, the chunks' first values and the length are spliced, not gathered
        again from every chunk: a leaf of 100,000 pieces has 400 chunks, and reading
        each one's first piece cost a label change more the bigger the fleet."""
        out = cls.__new__(cls)
        out._chunks = [*old._chunks[:start], *redone, *old._chunks[stop:]]
        out._firsts = [*old._firsts[:start], *(c[0][0][0] for c in redone),
                       *old._firsts[stop:]]
        out._len = old._len - sum(map(len, old._chunks[start:stop])) + \
            sum(map(len, redone))
        return out

    @classmethod
    def of(cls, pieces: Sequence[Piece], size: int) -> _Pieces:
        if isinstance(pieces, _Pieces):
            return pieces
        return cls([tuple(pieces[i:i + size]) for i in range(0, len(pieces), size)])

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Piece]:
        return itertools.chain.from_iterable(self._chunks)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        for chunk in self._chunks:
            if index < len(chunk):
                return chunk[index]
            index -= len(chunk)
        raise IndexError(index)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Sequence) or isinstance(other, str) or \
                len(other) != self._len:
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def patched(self, lo: int, hi: int, patch: Callable[[list[Piece], int, int], None],
                size: int) -> _Pieces:
        """A copy with `patch(pieces, lo, hi)` applied to a flat list of the pieces
        around [lo, hi]: at least two pieces before the last one starting at or before
        `lo` and the first one starting after `hi` + 1 (where there are such), so a patch
        that reads and rewrites those neighbours sees them. Only the chunks that list
        came from are made again."""
        chunks, firsts = self._chunks, self._firsts
        if not chunks:
            flat: list[Piece] = []
            patch(flat, lo, hi)
            return _Pieces([tuple(flat[i:i + size]) for i in range(0, len(flat), size)])
        # The chunk of the last piece starting at or before `lo`, and the one before it
        # (the piece before that one may be its last); the chunk of the first piece
        # starting after `hi` + 1, which may be the one after the chunk of the last
        # piece starting at or before it.
        start = max(bisect.bisect_right(firsts, lo) - 2, 0)
        stop = min(bisect.bisect_right(firsts, hi + 1) + 1, len(chunks))
        flat = list(itertools.chain.from_iterable(chunks[start:stop]))
        patch(flat, lo, hi)
        redone = [tuple(flat[i:i + size]) for i in range(0, len(flat), size)]
        return _Pieces._spliced(self, start, stop, redone)


class RunCompiler:
    """`compile_run` for one run compiled again and again (the agent renders its table on
    every change): what it answers is what `compile_run` would, as element texts, but a
    subtree of cells whose boxes did not change is not cut again, and the elements are
    the last ones with the cells that changed taken out and put in. A label change that
    moves one address in a map of 100,000 elements costs that address's part of the tree,
    not the map.

    Subtrees are memoized by the boxes they are made of: each box's verdict and its
    intervals from that field on, big interval lists (an address set's spans) by identity.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        self._chunk = chunk                     # a longer leaf is kept in chunks (_Pieces)
        self._memo: dict[tuple[object, ...], _Tree] = {}
        self._refs: dict[int, object] = {}      # what the identities in the keys are of
        self._root: _Tree | None = None
        self._shape: tuple[object, ...] | None = None
        self._elements: Sequence[str] = ()
        self._wide = 0                          # cells wider than one value in a field
        self._points: dict[int, tuple[object, bool]] = {}
        # The last compile's leaves (the last field's segments) by the boxes they are of.
        self._leaves: dict[tuple[int, ...], _Leaf] = {}
        self.cut_again = 0                      # subtrees cut (not taken from the memo)
        # The last compile's boxes and answer: the same box objects again, the same answer.
        self._last: tuple[int, tuple[tuple[Box, str], ...], dict[str, str],
                          tuple[tuple[str, ...], bool, Sequence[str]]] | None = None
        self.patched = 0                        # leaves cut again only where they moved

    def compile(self, boxes: Sequence[tuple[Box, str]], family: int,
                verdicts: Mapping[str, str] = VERDICT, hints: Hints | None = None
                ) -> tuple[tuple[str, ...], bool, Sequence[str]]:
        """(fields, interval, sorted element texts) of the run, as `compile_run` and
        `element_text` give them. `hints`: for an interval list that replaced another
        (by its id), the one it replaced and the ranges outside which the two are the
        same; a leaf of the tree made of such lists is cut again only in those ranges."""
        last = self._last
        if last is not None and last[0] == family and len(last[1]) == len(boxes) and \
                last[2] == verdicts and \
                all(a[0] is b[0] and a[1] == b[1] for a, b in zip(last[1], boxes, strict=True)):
            return last[3]      # the same box objects: nothing moved (their lists are theirs)
        self._last = None
        used = tuple(f for f in FIELDS if any(f in b for b, _ in boxes))
        cell_verdicts = [verdicts[action] for _, action in boxes]
        if not boxes or not used:
            # Nothing, or one verdict for everything (its one "element" is the verdict).
            self._forget()
            return (), False, tuple(cell_verdicts[:1])
        everything = _EVERYTHING[family]
        spans: list[list[Sequence[Interval]]] = [[b.get(f, everything[f]) for f in used]
                                                 for b, _ in boxes]
        point = tuple(all(self._point(s[i], hints) for s in spans) for i in range(len(used)))
        shape = (family, used, point)
        if shape != self._shape:
            # Other fields, or a field that became (or stopped being) all points: what
            # was cut before is grouped otherwise now. Start again.
            self._forget()
        try:
            answer = self._compile(boxes, family, cell_verdicts, used, spans, point, shape,
                                   hints)
        except BaseException:
            self._forget()       # half done: nothing kept may be trusted
            raise
        # The boxes are kept with the answer, so their ids stay theirs.
        self._last = (family, tuple(boxes), dict(verdicts), answer)
        return answer

    def _forget(self) -> None:
        self._last = None
        self._memo, self._refs, self._root, self._leaves = {}, {}, None, {}
        self._shape, self._elements, self._wide = None, (), 0

    def _compile(self, boxes: Sequence[tuple[Box, str]], family: int,
                 cell_verdicts: list[str], used: tuple[str, ...],
                 spans: list[list[Sequence[Interval]]], point: tuple[bool, ...],
                 shape: tuple[object, ...], hints: Hints | None
                 ) -> tuple[tuple[str, ...], bool, Sequence[str]]:
        refs: dict[int, object] = {}

        def key_of(x: Sequence[Interval]) -> object:
            if isinstance(x, tuple) and len(x) > BY_IDENTITY:
                refs[id(x)] = x
                return id(x)
            return tuple(x)

        keys = [[key_of(s) for s in box] for box in spans]
        last_depth = len(used) - 1
        old: dict[tuple[object, ...], _Tree] = self._memo
        new: dict[tuple[object, ...], _Tree] = {}
        leaves: dict[tuple[int, ...], _Leaf] = {}
        patches: dict[int, tuple[_Tree, list[tuple[Interval, _Tree | str]],
                                 list[tuple[Interval, _Tree | str]]]] = {}

        itself: list[Callable[[tuple[int, ...], int], _Tree]] = []

        def cut(active: tuple[int, ...], depth: int) -> _Tree:
            # A box with the same intervals as an earlier one from here on never decides
            # (the earlier one covers all it covers, and comes first): left out.
            tails: set[tuple[object, ...]] = set()
            kept = []
            for i in active:
                tail = tuple(keys[i][depth:])
                if tail not in tails:
                    tails.add(tail)
                    kept.append(i)
            active = tuple(kept)
            key = (depth, *((cell_verdicts[i], *keys[i][depth:]) for i in active))
            found = new.get(key)
            if found is not None:
                return found
            found = old.get(key)
            if found is None and depth == last_depth and hints:
                found = self._patch(active, spans, cell_verdicts, depth, point[depth], hints,
                                    patches)
            if found is None:
                found = self._cut(active, depth, spans, cell_verdicts, point, last_depth,
                                  itself[0])
            new[key] = found
            if depth == last_depth:
                leaves[active] = (tuple(spans[i][depth] for i in active),
                                  tuple(cell_verdicts[i] for i in active), found)
            return found

        # `cut` calls itself through `itself`, emptied once it is done: a function that
        # names itself in its closure is a reference cycle, and left to the cycle
        # collector it would keep the last memo and leaves (all of the map's pieces)
        # alive until a collection, which then walks and frees them inside a later change.
        itself.append(cut)
        root = cut(tuple(range(len(boxes))), 0)
        itself.clear()
        budget = cell_budget(spans)
        elements: Sequence[str]
        if self._root is None:
            # From scratch: every cell written from the tree, sorted once. (As an
            # `Elements`, as the next patches of it are: the applier reads the changes
            # between two of one root from their patches.) The cells are counted on the
            # tree first; a patch below counts them by the cells it moves.
            check_cells(root, last_depth, budget)
            texts, wide_cells = tree_texts(root, used, point, family)
            texts.sort()
            elements = Elements(tuple(texts), frozenset(), frozenset())
        else:
            removed: list[Cell] = []
            added: list[Cell] = []
            _diff(self._root, root, (), last_depth, removed, added, patches)
            cells = len(self._elements) - len(removed) + len(added)
            if cells > budget:
                raise TooManyCells(cells, budget)
            wide = [i for i in range(len(used)) if not point[i]]

            def is_wide(cell: Cell) -> bool:
                return any(cell[0][i][0] != cell[0][i][1] for i in wide)

            elements = self._elements
            if removed or added:
                elements = Elements.patched(
                    elements, element_text(CompiledRun(used, tuple(removed), False), family),
                    element_text(CompiledRun(used, tuple(added), False), family))
            wide_cells = self._wide + sum(map(is_wide, added)) - sum(map(is_wide, removed))
        # Kept only now that everything is computed.
        self._wide = wide_cells
        self._memo, self._refs, self._root, self._leaves = new, refs, root, leaves
        self._shape, self._elements = shape, elements
        return used, self._wide > 0, elements

    def _point(self, spans: Sequence[Interval], hints: Hints | None = None) -> bool:
        """Whether every interval is one value (kept per big list, by identity). A big
        list that replaced one of all points is read only in the ranges it changed in."""
        if isinstance(spans, tuple) and len(spans) > BY_IDENTITY:
            kept = self._points.get(id(spans))
            if kept is not None and kept[0] is spans:
                return kept[1]
            hint = hints.get(id(spans)) if hints else None
            was = self._points.get(id(hint[0])) if hint is not None else None
            if hint is not None and was is not None and was[0] is hint[0] and was[1]:
                value = all(lo == hi for lo, hi in _meeting(spans, hint[1]))
            else:
                value = all(lo == hi for lo, hi in spans)
            if len(self._points) > 4096:
                self._points.clear()
            self._points[id(spans)] = (spans, value)
            return value
        return all(lo == hi for lo, hi in spans)

    def _patch(self, active: tuple[int, ...], spans: list[list[Sequence[Interval]]],
               cell_verdicts: list[str], depth: int, point: bool, hints: Hints,
               patches: dict[int, tuple[_Tree, list[tuple[Interval, _Tree | str]],
                                        list[tuple[Interval, _Tree | str]]]]
               ) -> _Tree | None:
        """The leaf of boxes `active` cut again only in the ranges their hinted interval
        lists changed in, from the last compile's leaf of the same boxes; None when there
        is none, or a list changed without a hint. The pieces taken out and put in go to
        `patches` (by the new leaf's id) for the diff."""
        last = self._leaves.get(active)
        if last is None or last[1] != tuple(cell_verdicts[i] for i in active):
            return None
        ranges: list[Interval] = []
        for k, i in enumerate(active):
            now = spans[i][depth]
            if now is last[0][k]:
                continue
            hint = hints.get(id(now))
            if hint is None or hint[0] is not last[0][k]:
                return None
            ranges += hint[1]
        gone: list[tuple[Interval, _Tree | str]] = []
        came: set[tuple[Interval, _Tree | str]] = set()   # put in by this patch, and kept
        chunk = self._chunk

        def redo(pieces: list[Piece], rlo: int, rhi: int) -> None:
            # The pieces that meet or touch [rlo, rhi]: pieces[a:b], redone whole.
            a = bisect.bisect_right(pieces, ((rlo, BIG),))
            if a > 0 and pieces[a - 1][0][1] >= rlo - 1:
                a -= 1
            b = bisect.bisect_right(pieces, ((rhi + 1, BIG),))
            lo = min(rlo, pieces[a][0][0]) if a < b else rlo
            hi = max(rhi, pieces[b - 1][0][1]) if a < b else rhi
            fresh = _sweep(active, [spans[i][depth] for i in active],
                           [cell_verdicts[i] for i in active], lo, hi, point)
            # Pieces beside the range that now touch one of the same verdict join it.
            if not point and fresh and a > 0 and pieces[a - 1][0][1] + 1 == fresh[0][0][0] \
                    and pieces[a - 1][1] == fresh[0][1]:
                a -= 1
                fresh[0] = ((pieces[a][0][0], fresh[0][0][1]), fresh[0][1])
            if not point and fresh and b < len(pieces) and \
                    fresh[-1][0][1] + 1 == pieces[b][0][0] and pieces[b][1] == fresh[-1][1]:
                fresh[-1] = ((fresh[-1][0][0], pieces[b][0][1]), fresh[-1][1])
                b += 1
            for piece in pieces[a:b]:
                if piece in came:          # put in for a range to the right, redone here
                    came.discard(piece)
                else:
                    gone.append(piece)
            came.update(fresh)
            pieces[a:b] = fresh

        leaf = _Pieces.of(last[2], chunk)
        for rlo, rhi in reversed(merge(ranges)):
            leaf = leaf.patched(rlo, rhi, redo, chunk)
        self.patched += 1
        patches[id(leaf)] = (last[2], gone, list(came))
        return leaf

    def _cut(self, active: tuple[int, ...], depth: int, spans: list[list[Sequence[Interval]]],
             cell_verdicts: list[str], point: tuple[bool, ...], last_depth: int,
             cut: Callable[[tuple[int, ...], int], _Tree]) -> _Tree:
        """`compile_run`'s cut, one level: subtrees below come from `cut` (memoized)."""
        self.cut_again += 1
        tree = _level(active, depth, spans, cell_verdicts, point[depth], last_depth, cut)
        if depth == last_depth and len(tree) > 2 * self._chunk:
            return _Pieces.of(tree, self._chunk)   # patched later in place of the chunk
        return tree


def _sweep(active: Sequence[int], lists: Sequence[Sequence[Interval]], verdicts: Sequence[str],
           lo: int, hi: int, point: bool) -> list[tuple[Interval, _Tree | str]]:
    """The last field's pieces within [lo, hi] of boxes `active` (their interval lists
    and verdicts in the same order): the first box covering a segment decides it."""
    verdict_of = dict(zip(active, verdicts, strict=True))
    return _pieces(_events(active, lists, lo, hi),
                   lambda covering: verdict_of[min(covering)], point)


def _cells(tree: _Tree, prefix: tuple[Interval, ...], last_depth: int,
           out: list[Cell]) -> None:
    """Every cell of `tree` (whose first field is number len(prefix))."""
    if len(prefix) == last_depth:
        out.extend(((*prefix, segment), verdict) for segment, verdict in tree
                   if isinstance(verdict, str))
        return
    for segment, sub in tree:
        if not isinstance(sub, str):
            _cells(sub, (*prefix, segment), last_depth, out)


def _diff(old: _Tree, new: _Tree, prefix: tuple[Interval, ...], last_depth: int,
          removed: list[Cell], added: list[Cell],
          patches: Mapping[int, tuple[_Tree, list[tuple[Interval, _Tree | str]],
                                      list[tuple[Interval, _Tree | str]]]] | None = None
          ) -> None:
    """The cells only in `old` and those only in `new`; a subtree that is the same
    object in both is skipped whole, and a leaf patched from `old` gives its pieces taken
    out and put in."""
    if old is new:
        return
    patch = patches.get(id(new)) if patches else None
    if patch is not None and patch[0] is old:
        removed.extend(((*prefix, seg), v) for seg, v in patch[1] if isinstance(v, str))
        added.extend(((*prefix, seg), v) for seg, v in patch[2] if isinstance(v, str))
        return
    before, after = dict(old), dict(new)
    if len(prefix) == last_depth:
        removed.extend(((*prefix, seg), v) for seg, v in old if after.get(seg) != v
                       and isinstance(v, str))
        added.extend(((*prefix, seg), v) for seg, v in new if before.get(seg) != v
                     and isinstance(v, str))
        return
    for segment, sub in old:
        other = after.get(segment)
        if isinstance(sub, str):
            continue
        if other is None or isinstance(other, str):
            _cells(sub, (*prefix, segment), last_depth, removed)
        else:
            _diff(sub, other, (*prefix, segment), last_depth, removed, added, patches)
    for segment, sub in new:
        if segment not in before and not isinstance(sub, str):
            _cells(sub, (*prefix, segment), last_depth, added)
