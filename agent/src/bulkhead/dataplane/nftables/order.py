"""Element changes in an order no packet that straddles them can turn into an accept.

A packet walks the rules of the ruleset generation it began in, but looks each set and
map up in the generation current at that lookup: a packet that straddles the commit of
an element change sees some sets as they were and later ones as they are. With one
transaction, `ip saddr @deny drop` looked up before the commit (not yet a member) and
`ip saddr @allow accept` after it (a member now) accept a packet that the old and the
new elements both deny. docs/dataplane.md, "Element changes in order".

So a change is cut in two transactions, an RCU grace period apart (no packet walks
through both commits): first every change that can only narrow what is accepted, then
every one that can only widen it. Whether an element narrows or widens comes from how
the table's rules use its set: `@s accept` (or `!= @s drop`) accepts more the more `s`
holds, `@s drop` (or `!= @s accept`) less; in a verdict map, an element that drops
ranks below anything, one that accepts above anything. Every state a straddling packet
can see between two commits is then a mix of two states, each no more permissive than
the old state (first commit) or the new one (second), so a packet that both deny is
denied (a mix of states of one rank is ranked as they are: each lookup is monotone).

What cannot be ranked is not split: a set used both ways or by a rule whose verdict is
neither accept nor drop (a Pass's `return`, a jump, a raw chain's `notrack` accept) and
a map element that moves between two verdicts of neither kind (`jump a` to `jump b`).
Such a map change gets a transaction of its own between the two when the map is
used by one rule of a base chain (`iifname vmap @ep_in`: a packet looks it up once, so
it sees it old or new, and nothing else changes in that commit); otherwise `order`
returns None and the applier replaces the table whole (`replace.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from bulkhead.dataplane.nftables.ruleset import Chain, Elements, NftSet, Ruleset, delta
from bulkhead.net import address_text, merge, parse_network

MORE, LESS, NEUTRAL, UNKNOWN = "+", "-", "0", "?"
ACCEPT, DROP = "accept", "drop"
# Statements a chain may hold without a condition and still be one plain verdict (the
# logged verdicts `l_` chains give, a profile's `accept`).
_STATEMENTS = frozenset({"counter", "name", "log", "prefix", "group", "level", '""'})
_QUOTED = re.compile(r'"[^"]*"')
_RAW = re.compile(r"priority (raw|-300)\b")
# Map changes of middle rank (each a transaction and a grace period of its own).
MOST_MIDDLE = 2


@dataclass(frozen=True)
class Uses:
    """How a table's rules use its sets and maps."""

    sets: Mapping[str, str]                 # set -> MORE, LESS, NEUTRAL or UNKNOWN
    maps: Mapping[str, bool]                # map -> looked up once per packet at most
    raw_maps: frozenset[str]                # maps a raw chain looks up: accept is no top
    finals: Mapping[str, str]               # chain -> the one verdict it always gives


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


def uses(ruleset: Ruleset) -> Uses:
    """How `ruleset`'s rules use each of its sets and maps."""
    finals = {name: v for name, c in ruleset.chains.items() if (v := _final(c)) is not None}
    # Chains a raw base chain reaches: `accept` there only ends the raw hook's walk.
    targets: dict[str, set[str]] = {}
    map_rules: dict[str, list[tuple[str, bool]]] = {}
    parsed: dict[str, list[list[str]]] = {}
    for name, chain in ruleset.chains.items():
        parsed[name] = [_tokens(r) for r in chain.rules]
        for words in parsed[name]:
            for i, word in enumerate(words):
                if word in ("jump", "goto") and i + 1 < len(words):
                    targets.setdefault(name, set()).add(words[i + 1])
                if word.startswith("@") and i and words[i - 1] == "vmap":
                    map_rules.setdefault(word[1:], []).append((name, chain.hook is not None))
    raw: set[str] = set()
    todo = [n for n, c in ruleset.chains.items() if c.hook and _RAW.search(c.hook)]
    while todo:
        name = todo.pop()
        if name in raw:
            continue
        raw.add(name)
        todo += targets.get(name, ())
        for words in parsed.get(name, ()):
            for i, word in enumerate(words):
                if word.startswith("@") and i and words[i - 1] == "vmap" and \
                        word[1:] in ruleset.sets:
                    todo += [t.split()[-1] for e in ruleset.sets[word[1:]].elements
                             if (t := e.partition(" : ")[2]).startswith(("jump ", "goto "))]
    sets: dict[str, set[str]] = {}
    for name, lines in parsed.items():
        for words in lines:
            verdict = _verdict(words, finals)
            has_map = "vmap" in words
            for i, word in enumerate(words):
                if not word.startswith("@") or (i and words[i - 1] == "vmap"):
                    continue
                negated = i > 0 and words[i - 1] == "!="
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
                sets.setdefault(word[1:], set()).add(kind)
    polarity = {}
    for name in (n for n, s in ruleset.sets.items() if s.map_to is None):
        kinds = sets.get(name, set()) - {NEUTRAL}
        polarity[name] = NEUTRAL if not kinds else kinds.pop() if len(kinds) == 1 else UNKNOWN
    once = {name: len(rules) == 1 and rules[0][1] for name, rules in map_rules.items()}
    raw_maps = frozenset(m for m, rules in map_rules.items() if any(c in raw for c, _ in rules))
    return Uses(polarity, once, raw_maps, finals)


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
    before, after = set(old.elements), set(new.elements)
    return frozenset(before - after), frozenset(after - before)


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


def _intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]
               ) -> list[tuple[int, int]]:
    out = []
    for lo, hi in merge(a):
        for lo2, hi2 in merge(b):
            if max(lo, lo2) <= min(hi, hi2):
                out.append((max(lo, lo2), min(hi, hi2)))
    return out


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
        mid = {f: _intersect(a[f], b[f]) for f in (4, 6)}
    else:
        mid = {f: [*a[f], *b[f]] for f in (4, 6)}
    texts = frozenset(_span_texts(mid))
    return gone - texts, texts - gone


def _key(text: str) -> tuple[str, str | None]:
    key, colon, verdict = text.partition(" : ")
    return key.strip(), verdict.strip() if colon else None


def order(last: Ruleset, new: Ruleset, how: Uses) -> list[Ruleset] | None:
    """The states to commit one after the other, an RCU grace period apart, to go from
    `last`'s elements to `new`'s (same structure): [new] when one transaction is safe,
    [narrowed, (maps of middle rank,) new] when not; None when the change cannot be
    ordered (replace the table instead)."""
    first: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
    middle: list[tuple[str, frozenset[str], frozenset[str]]] = []
    narrows = widens = False
    for name, s in new.sets.items():
        before = last.sets[name]
        if before.elements is s.elements:
            continue
        gone, came = _texts(before, s)
        if not gone and not came:
            continue
        if s.map_to is None:
            polarity = how.sets.get(name, UNKNOWN)
            if polarity == UNKNOWN:
                return None
            out, into = _plain(before, gone, came, polarity)
            first[name] = (out, into)
            narrows = narrows or bool(out or into)
            widens = widens or (out, into) != (gone, came)
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
            elif at_most(a, b):        # widens: second
                widens = True
            else:
                mid_out.update(t for t in (was_text,) if t)
                mid_in.update(t for t in (now_text,) if t)
        if out_texts or in_texts:
            first[name] = (frozenset(out_texts), frozenset(in_texts))
            narrows = True
        if mid_out or mid_in:
            if not how.maps.get(name, False):
                return None
            middle.append((name, frozenset(mid_out), frozenset(mid_in)))
        if len(out_texts) + len(mid_out) < len(gone) or \
                len(in_texts) + len(mid_in) < len(came):
            widens = True
    if len(middle) > MOST_MIDDLE:
        return None
    steps = int(narrows) + len(middle) + int(widens)
    if steps <= 1:
        return [new]
    states: list[Ruleset] = []
    state = last
    if first:
        state = _patched(state, first)
        states.append(state)
    for name, out, into in middle:
        state = _patched(state, {name: (out, into)})
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
    """What both say (a set ranked one way by one and another way by the other: UNKNOWN),
    for a change of the maps a raw chain looks up, which changes what raw chains reach."""
    return Uses({n: p if b.sets.get(n) == p else UNKNOWN for n, p in a.sets.items()},
                {n: o and b.maps.get(n, False) for n, o in a.maps.items()},
                a.raw_maps | b.raw_maps,
                {n: v for n, v in a.finals.items() if b.finals.get(n) == v})


__all__ = ["Uses", "at_most", "joined", "order", "rank", "uses"]
