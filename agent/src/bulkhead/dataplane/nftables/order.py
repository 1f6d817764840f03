"""Element changes in an order no packet that straddles them can turn into an accept.

A packet walks the rules of the ruleset generation it began in, but looks each set and
map up in the generation current at that lookup: a packet that straddles the commit of
an element change sees some sets as they were and later ones as they are. With one
transaction, `ip saddr @deny drop` looked up before the commit (not yet a member) and
`ip saddr @allow accept` after it (a member now) accept a packet that the old and the
new elements both deny. docs/dataplane.md, "Element changes in order".

A change stays one transaction where that is safe: when one packet looks up one changed
set once at most (a set's elements change at one moment, so the packet sees it old or
new and nothing else changed), or when every change a packet can meet narrows what is
accepted, or every one widens it. Otherwise it is cut, an RCU grace period between
commits (no packet walks through two): first every change that can only narrow, last
every one that can only widen. Whether an element narrows or widens comes from how the
table's rules use its set: `@s accept` (or `!= @s drop`) accepts more the more `s`
holds, `@s drop` (or `!= @s accept`) less; in a verdict map, an element that drops
ranks below anything, one that accepts above anything. Interval sets and maps are cut
into the pieces their old and new changed elements are made of, so the narrowed state
holds no overlapping element. Every state a straddling packet can see between two
commits is then a mix of two states, each no more permissive than the old state (first
commit) or the new one (last), so a packet that both deny is denied (each lookup is
monotone in the ranking).

What cannot be ranked is not split: a set used both ways or by a rule whose verdict is
neither accept nor drop (a Pass's `return`, a jump, anything in a raw chain, where
accept only ends the raw hook's walk) and a map element that moves between two
outcomes of neither kind (`jump a` to `jump b`). Such changes go in one commit of their
own between the two, if one packet looks all of them up once at most, together
(counted over the chains a walk can enter from each hook's base chains: `iifname vmap
@ep_in` once, a tier chain's set once per endpoint chain that jumps to it): a packet
then sees at most one of them, old or new, with everything else at the narrowed state,
which is below both the old state and (with them new) the new one. Otherwise `order`
returns None and the applier replaces the table whole (`replace.py`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from bulkhead.dataplane.nftables.netlink import Unsupported, _differing, _field_range
from bulkhead.dataplane.nftables.ruleset import Chain, Elements, NftSet, Ruleset, delta
from bulkhead.net import address_text, intersection, merge, parse_network

MORE, LESS, NEUTRAL, UNKNOWN = "+", "-", "0", "?"
ACCEPT, DROP = "accept", "drop"
# Statements a chain may hold without a condition and still be one plain verdict (the
# logged verdicts `l_` chains give, a profile's `accept`).
_STATEMENTS = frozenset({"counter", "name", "log", "prefix", "group", "snaplen", "level",
                         '""'})
_QUOTED = re.compile(r'"[^"]*"')
_RAW = re.compile(r"priority (raw|-300)\b")
_HOOK = re.compile(r"\bhook (\w+)")
# The hooks one packet can pass, in the families of an inet table: a packet's lookups are
# counted over the base chains of each such path.
PATHS = (("prerouting", "input"), ("prerouting", "forward", "postrouting"),
         ("output", "postrouting"))
# Commits of changes that cannot be ranked: one. (Two would make a state between them
# that is neither below the old one nor below the new one: a host's element moved from
# one map to another, taken out of the first in one commit and put in the second in the
# next, is in neither between them.)
MOST_MIDDLE = 1


@dataclass(frozen=True)
class Uses:
    """How a table's rules use its sets and maps."""

    sets: Mapping[str, str]                 # set -> MORE, LESS, NEUTRAL or UNKNOWN
    # set or map -> path (an entry of PATHS, or a hook of none) -> how many times one
    # packet can look it up on that path, at most (2: twice or more)
    lookups: Mapping[str, Mapping[tuple[str, ...], int]]
    targets: Mapping[str, frozenset[str]]   # map -> the chains its elements jump to
    raw_maps: frozenset[str]                # maps a raw chain looks up: accept is no top
    finals: Mapping[str, str]               # chain -> the one verdict it always gives

    def single(self, kinds: Mapping[str, set[str]]) -> bool:
        """Whether changes of these kinds (per set: LESS for a part that narrows, MORE
        for one that widens, UNKNOWN) are safe in one commit: on every path, one packet
        looks up one changed set once at most, or every change it can meet narrows, or
        every one widens (a mix of old and new then lies between them)."""
        totals: dict[tuple[str, ...], int] = {}
        met: dict[tuple[str, ...], set[str]] = {}
        for name, kind in kinds.items():
            if not kind:
                continue
            for path, count in self.lookups.get(name, {}).items():
                if count:
                    totals[path] = totals.get(path, 0) + count
                    met.setdefault(path, set()).update(kind)
        return all(totals[path] <= 1 or met[path] in ({LESS}, {MORE}) for path in totals)

    def once(self, names: Iterable[str]) -> bool:
        """Whether one packet looks these sets and maps up once at most, all together."""
        totals: dict[tuple[str, ...], int] = {}
        for name in names:
            for path, count in self.lookups.get(name, {}).items():
                totals[path] = totals.get(path, 0) + count
        return all(count <= 1 for count in totals.values())


def _tokens(rule: str) -> list[str]:
    words = _QUOTED.sub('""', rule).split()
    return words[:words.index("comment")] if "comment" in words else words


def _final(chain: Chain) -> str | None:
    """The verdict a chain always gives, if it is one rule of statements and a verdict."""
    if len(chain.rules) != 1:
        return None
    words = _tokens(chain.rules[0])
    if not words or words[-1] not in (ACCEPT, DROP):
        return None
    rest = words[:-1]
    if all(w in _STATEMENTS or w.isdigit() for w in rest):
        return words[-1]
    return None


def _verdict(words: Sequence[str], finals: Mapping[str, str]) -> str | None:
    """A rule's verdict: accept, drop, another verdict's text, or None (it continues)."""
    for i in range(len(words) - 1, -1, -1):
        word = words[i]
        if word in (ACCEPT, DROP, "reject", "return", "continue"):
            return DROP if word == "reject" else word
        if word in ("jump", "goto") and i + 1 < len(words):
            return finals.get(words[i + 1], f"{word} {words[i + 1]}")
    return None


def _jump_targets(texts: Iterable[str]) -> set[str]:
    """The chains elements jump or go to (a substring test first: a map of 100,000
    elements of accept and drop is passed over in C)."""
    return {t.split()[-1] for e in texts if " : jump " in e or " : goto " in e
            if (t := e.partition(" : ")[2].strip()).startswith(("jump ", "goto "))}


def uses(ruleset: Ruleset) -> Uses:
    """How `ruleset`'s rules use each of its sets and maps."""
    finals = {name: v for name, c in ruleset.chains.items() if (v := _final(c)) is not None}
    parsed = {name: [_tokens(r) for r in chain.rules] for name, chain in ruleset.chains.items()}
    map_names = {w[1:] for lines in parsed.values() for words in lines
                 for i, w in enumerate(words) if w.startswith("@") and i
                 and words[i - 1] == "vmap" and w[1:] in ruleset.sets}
    targets = {m: frozenset(_jump_targets(ruleset.sets[m].elements)) for m in map_names}
    # Where each chain goes: a rule's jump or goto, and every chain a map it looks up
    # jumps to (one lookup, one of them).
    edges: dict[str, list[str]] = {}
    for name, lines in parsed.items():
        out = edges.setdefault(name, [])
        for words in lines:
            for i, word in enumerate(words):
                if word in ("jump", "goto") and i + 1 < len(words):
                    out.append(words[i + 1])
                elif word.startswith("@") and i and words[i - 1] == "vmap":
                    out += sorted(targets.get(word[1:], ()))
    bases = {n: (h.group(1) if (h := _HOOK.search(c.hook or "")) else "")
             for n, c in ruleset.chains.items() if c.hook}
    # Per base chain, how many times one walk can enter each chain (2: twice or more).
    entered: dict[str, dict[str, int]] = {b: _entries(b, edges) for b in bases}
    raw = {c for b, counts in entered.items()
           if _RAW.search(ruleset.chains[b].hook or "") for c in counts}
    lookups: dict[str, dict[tuple[str, ...], int]] = {}
    sets: dict[str, set[str]] = {}
    for name, lines in parsed.items():
        for words in lines:
            verdict = _verdict(words, finals)
            has_map = "vmap" in words
            for i, word in enumerate(words):
                if not word.startswith("@"):
                    continue
                looked = word[1:]
                for base, counts in entered.items():
                    if name in counts:
                        for path in _paths(bases[base]):
                            per = lookups.setdefault(looked, {})
                            per[path] = min(2, per.get(path, 0) + counts[name])
                if i and words[i - 1] == "vmap":
                    continue
                negated = words[i - 1] == "!=" if i else False
                if has_map or name in raw:
                    kind = UNKNOWN
                elif verdict is None:
                    kind = NEUTRAL
                elif verdict == ACCEPT:
                    kind = LESS if negated else MORE
                elif verdict == DROP:
                    kind = MORE if negated else LESS
                else:
                    kind = UNKNOWN
                sets.setdefault(looked, set()).add(kind)
    polarity = {}
    for name in (n for n, s in ruleset.sets.items() if s.map_to is None):
        kinds = sets.get(name, set()) - {NEUTRAL}
        polarity[name] = NEUTRAL if not kinds else kinds.pop() if len(kinds) == 1 else UNKNOWN
    raw_maps = frozenset(m for m in map_names
                         if any(f"@{m}" in words for c in raw for words in parsed.get(c, ())))
    return Uses(polarity, lookups, targets, raw_maps, finals)


def _paths(hook: str) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = [p for p in PATHS if hook in p]
    return found or [(hook,)]


def _entries(base: str, edges: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """How many times one walk from `base` can enter each chain it reaches (2: twice or
    more; a loop, which the kernel refuses, counts as twice)."""
    order: list[str] = []
    state: dict[str, int] = {}
    looped = False
    stack: list[tuple[str, int]] = [(base, 0)]
    while stack:
        name, at = stack.pop()
        if at == 0:
            if state.get(name) == 2:
                continue
            if state.get(name) == 1:
                looped = True
                continue
            state[name] = 1
        nexts = edges.get(name, ())
        if at < len(nexts):
            stack.append((name, at + 1))
            if state.get(nexts[at]) != 2:
                stack.append((nexts[at], 0))
        else:
            state[name] = 2
            order.append(name)
    counts = {name: 0 for name in order}
    counts[base] = 1
    for name in reversed(order):        # a chain before every chain it goes to
        for nxt in edges.get(name, ()):
            counts[nxt] = min(2, counts[nxt] + counts[name])
    if looped:
        counts = {name: 2 for name in counts}
    return counts


# ------------------------------------------------------------------------ ranking
def rank(verdict: str | None, raw: bool = False) -> int | str:
    """A lookup's outcome ranked: 0 drops, 2 accepts, anything else (no element: the
    rule after the lookup; a jump; a return) is its own text, ranked between."""
    if verdict == DROP:
        return 0
    if verdict == ACCEPT and not raw:
        return 2
    return verdict or ""


def at_most(a: int | str, b: int | str) -> bool:
    """Whether outcome `a` accepts no more than `b` does, whatever follows."""
    return a == b or a == 0 or b == 2


# ------------------------------------------------------------------------ the order
def _texts(old: NftSet, new: NftSet) -> tuple[frozenset[str], frozenset[str]]:
    """(texts only in old, texts only in new)."""
    known = delta(old.elements, new.elements)
    if known is not None:
        return known
    if old.elements == new.elements:
        return frozenset(), frozenset()
    # As `set_changes` does: the runs both lists begin and end with compared in C.
    before, after = _differing(tuple(old.elements), tuple(new.elements))
    return frozenset(before) - frozenset(after), frozenset(after) - frozenset(before)


def _spans(texts: Iterable[str]) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for text in texts:
        first, dash, last = text.partition("-")
        family, lo, hi = parse_network(first.strip())
        if dash:
            hi = parse_network(last.strip())[2]
        out[family].append((lo, hi))
    return out


def _span_texts(spans: Mapping[int, Sequence[tuple[int, int]]]) -> list[str]:
    out = []
    for family, items in spans.items():
        for lo, hi in merge(items):
            out.append(address_text(lo, family) if lo == hi else
                       f"{address_text(lo, family)}-{address_text(hi, family)}")
    return out


def _address_intervals(nft_set: NftSet) -> bool:
    return "interval" in nft_set.flags and nft_set.type.strip() in ("ipv4_addr", "ipv6_addr")


def _plain(old: NftSet, gone: frozenset[str], came: frozenset[str], polarity: str
           ) -> tuple[frozenset[str], frozenset[str]]:
    """(texts out, texts in) of a plain set's first, narrowing step: for a set that
    accepts more the more it holds, what both lists hold; for one that accepts less,
    what either holds; for an address interval set, as merged spans (so that no added
    interval overlaps one still there)."""
    if polarity == NEUTRAL:
        return gone, came
    if not _address_intervals(old):
        return (gone, frozenset()) if polarity == MORE else (frozenset(), came)
    a, b = _spans(gone), _spans(came)
    if polarity == MORE:
        mid = {f: intersection(merge(a[f]), merge(b[f])) for f in (4, 6)}
    else:
        mid = {f: (*a[f], *b[f]) for f in (4, 6)}
    texts = frozenset(_span_texts(mid))
    return gone - texts, texts - gone


def _key(text: str) -> tuple[str, str | None]:
    key, colon, verdict = text.partition(" : ")
    return key.strip(), verdict.strip() if colon else None


_RANGED = ("ipv4_addr", "ipv6_addr", "inet_proto", "inet_service")
MOST_CELLS = 4096   # pieces of a changed region of an interval map; more: not ordered


def _field_text(typ: str, lo: int, hi: int) -> str:
    if typ in ("ipv4_addr", "ipv6_addr"):
        family = 4 if typ == "ipv4_addr" else 6
        a = address_text(lo, family)
        return a if lo == hi else f"{a}-{address_text(hi, family)}"
    return str(lo) if lo == hi else f"{lo}-{hi}"


Box = tuple[tuple[int, int], ...]


def _box(types: Sequence[str], key: str) -> Box:
    fields = [f.strip() for f in key.split(" . ")]
    if len(fields) != len(types):
        raise ValueError(f"{key!r} has not {len(types)} fields")
    return tuple(_field_range(t, f) for t, f in zip(types, fields, strict=True))


def _cells(nft_set: NftSet, gone: frozenset[str], came: frozenset[str], how: Uses,
           polarity: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """The changed region of an interval map or concatenated interval set cut into the
    pieces every old and new element is made of, each piece given its old and its new
    outcome: (the texts of the region once narrowed, once its pieces that cannot be
    ranked are new too); None if a type is not known or the pieces are too many."""
    types = [t.strip() for t in nft_set.type.split(" . ")]
    if any(t not in _RANGED for t in types):
        return None
    try:
        olds = [(_box(types, k), v) for k, v in map(_key, gone)]
        news = [(_box(types, k), v) for k, v in map(_key, came)]
    except (ValueError, Unsupported):
        return None
    if len(olds) > MOST_CELLS or len(news) > MOST_CELLS:
        return None    # each box of one state is a cell of its own at least
    cuts: list[list[int]] = []
    for i in range(len(types)):
        points = sorted({b[i][0] for b, _ in olds + news} | {b[i][1] + 1 for b, _ in olds + news})
        cuts.append(points)
    cells: dict[Box, list[str | None]] = {}
    for which, boxes in enumerate((olds, news)):
        for box, value in boxes:
            # Each field's spans between the cut points inside the box (found by
            # bisection), their product counted before it is made.
            per_field = [[(a, b - 1) for a, b in itertools.pairwise(
                cuts[i][bisect.bisect_left(cuts[i], lo):bisect.bisect_right(cuts[i], hi + 1)])]
                for i, (lo, hi) in enumerate(box)]
            if math.prod(map(len, per_field)) > MOST_CELLS:
                return None
            pieces: list[Box] = list(itertools.product(*per_field))
            for piece in pieces:
                cells.setdefault(piece, [None, None])[which] = value if nft_set.map_to \
                    else "member"
            if len(cells) > MOST_CELLS:
                return None
    raw = nft_set.name in how.raw_maps

    def ranked(value: str | None) -> int | str:
        if nft_set.map_to:
            return rank(_resolve(value, how), raw)
        member = value is not None
        return (2 if member else 0) if polarity == MORE else (0 if member else 2)

    def text(piece: Box, value: str | None) -> str | None:
        if value is None:
            return None
        key = " . ".join(_field_text(t, lo, hi) for t, (lo, hi) in zip(types, piece,
                                                                        strict=True))
        return f"{key} : {value}" if nft_set.map_to else key

    narrowed: set[str] = set()
    unranked: set[str] = set()
    for piece, (was, now) in cells.items():
        a, b = ranked(was), ranked(now)
        first = now if at_most(b, a) else was
        later = now if not at_most(b, a) and not at_most(a, b) else first
        if (t := text(piece, first)) is not None:
            narrowed.add(t)
        if (t := text(piece, later)) is not None:
            unranked.add(t)
    return frozenset(narrowed), frozenset(unranked)


def order(last: Ruleset, new: Ruleset, how: Uses) -> list[Ruleset] | None:
    """The states to commit one after the other, an RCU grace period apart, to go from
    `last`'s elements to `new`'s (same structure): [new] when one transaction is safe,
    [narrowed, (maps of middle rank,) new] when not; None when the change cannot be
    ordered (replace the table instead)."""
    changes: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    for name, s in new.sets.items():
        if last.sets[name].elements is not s.elements:
            gone, came = _texts(last.sets[name], s)
            if gone or came:
                changes[name] = (gone, came)
    if how.once(changes):
        # One packet looks up one changed set at most, once: it sees it old or new (a
        # set's elements change at one moment), the rest unchanged. The common case: a
        # label or network set change lands in one verdict map.
        return [new]
    first: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    middle: list[tuple[str, frozenset[str], frozenset[str]]] = []
    kinds: dict[str, set[str]] = {name: set() for name in changes}
    for name, (gone, came) in changes.items():
        before, s = last.sets[name], new.sets[name]
        kind = kinds[name]
        if s.map_to is None:
            polarity = how.sets.get(name, UNKNOWN)
            if polarity == UNKNOWN:
                middle.append((name, gone, came))
                kind.add(UNKNOWN)
                continue
            if "interval" in s.flags and not _address_intervals(s) and \
                    polarity != NEUTRAL:
                cut = _cells(before, gone, came, how, polarity)
                if cut is None:
                    return None
                narrowed, _ = cut
                out, into = gone - narrowed, narrowed - gone
            else:
                out, into = _plain(before, gone, came, polarity)
            first[name] = (out, into)
            if polarity != NEUTRAL:
                kind.update([LESS] if out or into else [])
                kind.update([MORE] if (out, into) != (gone, came) else [])
            continue
        if "interval" in s.flags:
            cut = _cells(before, gone, came, how, UNKNOWN)
            if cut is None:
                return None
            narrowed, unranked = cut
            if narrowed != gone:
                first[name] = (gone - narrowed, narrowed - gone)
                kind.add(LESS)
            if unranked != narrowed:
                middle.append((name, narrowed - unranked, unranked - narrowed))
                kind.add(UNKNOWN)
            if unranked != came:
                kind.add(MORE)
            continue
        raw = name in how.raw_maps
        old_by_key = {k: v for k, v in map(_key, gone)}
        new_by_key = {k: v for k, v in map(_key, came)}
        out_texts: set[str] = set()
        in_texts: set[str] = set()
        mid_out: set[str] = set()
        mid_in: set[str] = set()
        for key in old_by_key.keys() | new_by_key.keys():
            was, now = old_by_key.get(key), new_by_key.get(key)
            a = rank(_resolve(was, how), raw)
            b = rank(_resolve(now, how), raw)
            was_text = None if was is None else f"{key} : {was}"
            now_text = None if now is None else f"{key} : {now}"
            if at_most(b, a):          # narrows (or the same outcome): first
                out_texts.update(t for t in (was_text,) if t)
                in_texts.update(t for t in (now_text,) if t)
            elif at_most(a, b):        # widens: last
                kind.add(MORE)
            else:
                mid_out.update(t for t in (was_text,) if t)
                mid_in.update(t for t in (now_text,) if t)
        if out_texts or in_texts:
            first[name] = (frozenset(out_texts), frozenset(in_texts))
            kind.add(LESS)
        if mid_out or mid_in:
            middle.append((name, frozenset(mid_out), frozenset(mid_in)))
            kind.add(UNKNOWN)
    # Changes that cannot be ranked: in one commit of their own, if one packet looks them
    # up once at most, all together (it then sees one of them, old or new, and nothing
    # else changes in that commit).
    commits: list[list[tuple[str, frozenset[str], frozenset[str]]]] = []
    for item in middle:
        if not how.once([item[0]]):
            return None
        for commit in commits:
            if how.once([c[0] for c in commit] + [item[0]]):
                commit.append(item)
                break
        else:
            commits.append([item])
    if len(commits) > MOST_MIDDLE:
        return None
    if how.single(kinds):
        return [new]
    states: list[Ruleset] = []
    state = last
    if first:
        state = _patched(state, first)
        states.append(state)
    for commit in commits:
        state = _patched(state, {name: (out, into) for name, out, into in commit})
        states.append(state)
    if not states or not state.same(new):
        states.append(new)
    return states


def _resolve(verdict: str | None, how: Uses) -> str | None:
    if verdict is not None and verdict.startswith(("jump ", "goto ")):
        return how.finals.get(verdict.split()[-1], verdict)
    return verdict


def _patched(ruleset: Ruleset, changes: Mapping[str, tuple[frozenset[str], frozenset[str]]]
             ) -> Ruleset:
    sets = dict(ruleset.sets)
    for name, (out, into) in changes.items():
        s = sets[name]
        sets[name] = replace(s, elements=Elements.patched(s.elements, out, into))
    return replace(ruleset, sets=sets)


def joined(a: Uses, b: Uses) -> Uses:
    """What both say, the more careful where they differ (a set ranked one way by one and
    another way by the other: UNKNOWN; the larger count of lookups), for a change that
    gives a map jumps to chains it did not jump to, which changes what a packet reaches."""
    lookups = {n: {p: max(a.lookups.get(n, {}).get(p, 0), b.lookups.get(n, {}).get(p, 0))
                   for p in {*a.lookups.get(n, {}), *b.lookups.get(n, {})}}
               for n in {*a.lookups, *b.lookups}}
    return Uses({n: p if b.sets.get(n) == p else UNKNOWN for n, p in a.sets.items()},
                lookups, {n: a.targets.get(n, frozenset()) | b.targets.get(n, frozenset())
                          for n in {*a.targets, *b.targets}},
                a.raw_maps | b.raw_maps,
                {n: v for n, v in a.finals.items() if b.finals.get(n) == v})


def new_targets(how: Uses, last: Ruleset, new: Ruleset) -> bool:
    """Whether `new` gives a map a jump to a chain it did not jump to in `how`'s table."""
    for name, known in how.targets.items():
        if name in new.sets and name in last.sets and \
                new.sets[name].elements is not last.sets[name].elements:
            came = _texts(last.sets[name], new.sets[name])[1]
            if not _jump_targets(came) <= known:
                return True
    return False


__all__ = ["Uses", "at_most", "joined", "new_targets", "order", "rank", "uses"]
