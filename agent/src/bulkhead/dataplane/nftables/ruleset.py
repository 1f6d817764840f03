"""A rendered nftables table as data: named sets and maps, and chains of rule lines.

Kept as data (not only text) so the applier can tell a change of set elements, which it
sends as element additions and deletions, from a change of structure, which replaces
the whole table in one transaction.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from bulkhead.policy.trace import Decision


class Elements(Sequence[str]):
    """A set's sorted element texts as an earlier list (`root`) with some texts taken out
    (`gone`) and some put in (`came`): the agent renders its table on every change, and
    a change that moves one element of a map of 200,000 would otherwise copy and compare
    the whole list twice (about 7 ms). The texts are written out only when read (a full
    apply, a listing); `delta` tells the applier what changed between two lists of one
    root without reading either.

    `gone` is part of `root`, `came` is not, and they share nothing. When they grow past
    a sixteenth of the root, the next patch starts from the written-out list."""

    __slots__ = ("_texts", "came", "gone", "root")

    def __init__(self, root: tuple[str, ...], gone: frozenset[str], came: frozenset[str]
                 ) -> None:
        self.root, self.gone, self.came = root, gone, came
        self._texts: tuple[str, ...] | None = None if gone or came else root

    @staticmethod
    def patched(elements: Sequence[str], gone: Iterable[str], came: Iterable[str]
                ) -> Elements:
        """`elements` without `gone` (texts it holds) and with `came` (texts it lacks)."""
        out, back = frozenset(gone), frozenset(came)
        out, back = out - back, back - out          # taken out and put back: stays
        # Only what is held can go, only what is not can come: a caller's slip would
        # otherwise become a wrong element batch.
        out = frozenset(t for t in out if _holds(elements, t))
        back = frozenset(t for t in back if not _holds(elements, t))
        if isinstance(elements, Elements) and \
                len(elements.gone) + len(elements.came) <= _most(elements.root):
            was_out, was_in = elements.gone, elements.came
            return Elements(elements.root, (was_out - back) | (out - was_in),
                            (was_in - out) | (back - was_out))
        root = elements.texts() if isinstance(elements, Elements) else tuple(elements)
        if len(out) + len(back) > _most(root):   # most of it: written out now
            return Elements(tuple(sorted(set(root).difference(out).union(back))),
                            frozenset(), frozenset())
        return Elements(root, out, back)

    def texts(self) -> tuple[str, ...]:
        """The sorted texts, written out once."""
        if self._texts is None:
            kept = [t for t in self.root if t not in self.gone] if self.gone else self.root
            self._texts = tuple(heapq.merge(kept, sorted(self.came)))
        return self._texts

    def __len__(self) -> int:
        return len(self.root) - len(self.gone) + len(self.came)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self.texts()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts())

    def __contains__(self, text: object) -> bool:
        return text in self.came or (text not in self.gone and text in self.texts())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Elements) and other.root is self.root:
            return other.gone == self.gone and other.came == self.came
        if isinstance(other, tuple | list):
            return len(self) == len(other) and self.texts() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.texts())

    def __repr__(self) -> str:
        return f"Elements({self.texts()!r})"


_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def timeout_text(ms: int) -> str:
    """`ms` milliseconds as nft writes a set element's timeout: days, hours, minutes,
    seconds and milliseconds (`1d3h46m40s`). nft refuses a single unit's number from about
    10^8 on (`100000000ms`, `2147483647s`: "value too large"), so a DNS answer's TTL of
    28 hours or more written in milliseconds failed a whole table's load."""
    ms = max(0, int(ms))
    parts: list[str] = []
    for unit, size in _UNITS:
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0ms"


def _holds(elements: Sequence[str], text: str) -> bool:
    """Whether sorted `elements` hold `text` (by bisection; a patch by its sets)."""
    if isinstance(elements, Elements):
        return text in elements.came or (text not in elements.gone
                                         and _holds(elements.root, text))
    at = bisect.bisect_left(elements, text)
    return at < len(elements) and elements[at] == text


def _most(root: Sequence[str]) -> int:
    """How many texts a patch of `root` may name before the next starts from the whole."""
    return max(64, len(root) // 16)


def delta(old: Sequence[str], new: Sequence[str]
          ) -> tuple[frozenset[str], frozenset[str]] | None:
    """(texts only in `old`, texts only in `new`) when both are patches of one root (or
    one is the other's root), read from their patches; None otherwise."""
    if old is new:
        return frozenset(), frozenset()
    a = old if isinstance(old, Elements) else None
    b = new if isinstance(new, Elements) else None
    if b is not None and a is not None and a.root is b.root:
        pass
    elif b is not None and (old is b.root or (a is not None and a._texts is b.root)):
        a = Elements(b.root, frozenset(), frozenset())
    elif a is not None and (new is a.root or (b is not None and b._texts is a.root)):
        b = Elements(a.root, frozenset(), frozenset())
    else:
        return None
    assert a is not None and b is not None
    # A text the patches do not name is in both or in neither.
    named = a.gone | a.came | b.gone | b.came
    in_root = a.gone | b.gone

    def holds(e: Elements, text: str) -> bool:
        return text in e.came or (text in in_root and text not in e.gone)

    only_old = frozenset(t for t in named if holds(a, t) and not holds(b, t))
    only_new = frozenset(t for t in named if holds(b, t) and not holds(a, t))
    return only_old, only_new


@dataclass(frozen=True)
class NftSet:
    name: str
    type: str                         # "ipv4_addr", "ipv4_addr . inet_proto . inet_service"
    flags: tuple[str, ...] = ()       # ("interval",)
    elements: Sequence[str] = ()      # element text, sorted, as rendered (or Elements)
    map_to: str | None = None         # "verdict" for a verdict map

    def declaration(self, with_elements: bool = True) -> str:
        kind = "map" if self.map_to else "set"
        typ = f"{self.type} : {self.map_to}" if self.map_to else self.type
        lines = [f"\t{kind} {self.name} {{", f"\t\ttype {typ}"]
        if self.flags:
            lines.append(f"\t\tflags {', '.join(self.flags)}")
        if with_elements and self.elements:
            lines.append("\t\telements = { " + ",\n\t\t\t     ".join(self.elements) + " }")
        lines.append("\t}")
        return "\n".join(lines)

    @property
    def shape(self) -> tuple[str, str, tuple[str, ...], str | None]:
        return (self.name, self.type, self.flags, self.map_to)


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[str, ...]
    hook: str | None = None           # "type filter hook input priority filter; policy accept;"

    def declaration(self) -> str:
        lines = [f"\tchain {self.name} {{"]
        if self.hook:
            lines.append(f"\t\t{self.hook}")
        lines += [f"\t\t{r}" for r in self.rules]
        lines.append("\t}")
        return "\n".join(lines)


@dataclass
class Ruleset:
    table: str
    sets: dict[str, NftSet] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)   # the plan's: unenforced endpoints
    notes: list[str] = field(default_factory=list)      # the plan's notes: logged only
    # Flow logs: each NFLOG prefix the table logs with, and the decision it names; each
    # named counter and the prefix of the decision it counts.
    decisions: dict[str, Decision] = field(default_factory=dict)
    counters: dict[str, str] = field(default_factory=dict)
    # Domain sets (flags timeout, never rendered with elements): each set's name and the
    # domain patterns whose resolved addresses it holds (filled from DNS answers).
    domain_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def family_table(self) -> str:
        return f"inet {self.table}"

    def body(self, with_elements: bool = True, empty: Collection[str] = ()) -> str:
        """The table as `nft list table` shows it (declarations, sets first); the sets
        named in `empty` without their elements."""
        parts = [f"\tcounter {name} {{\n\t}}" for name in sorted(self.counters)]
        parts += [s.declaration(with_elements and s.name not in empty)
                  for s in sorted(self.sets.values(), key=lambda s: s.name)]
        parts += [c.declaration() for c in self.chains.values()]
        return f"table {self.family_table} {{\n" + "\n".join(parts) + "\n}\n"

    def script(self, timed: Mapping[str, Sequence[str]] | None = None,
               empty: Collection[str] = (), replace: bool = True) -> str:
        """An `nft -f` script that replaces the table in one transaction: the kernel holds
        the old table or the new one, never a mix (creating it first makes the delete
        valid when there is no table yet). `timed`: elements for sets with timeouts
        (set name -> `ADDRESS timeout Nms` texts), added in the same transaction.
        `empty`: sets declared without their elements (`load.py` sends those itself).
        `replace=False`: the table's body only, added to what is there (`replace.py`
        clears the way first)."""
        adds = [f"add element {self.family_table} {name} {{ {', '.join(elements)} }}\n"
                for name, elements in sorted((timed or {}).items())
                if elements and name in self.sets]
        head = f"table {self.family_table}\ndelete table {self.family_table}\n" \
            if replace else ""
        return head + self.body(empty=empty) + "".join(adds)

    def structure(self) -> str:
        """Everything but set elements: equal structures differ only in elements."""
        return self.body(with_elements=False)

    def same_structure(self, other: Ruleset) -> bool:
        """`structure() == other.structure()`, without writing either out (cheap with
        100,000 elements)."""
        return (self.table == other.table
                and sorted(self.counters) == sorted(other.counters)
                and list(self.chains.items()) == list(other.chains.items())
                and sorted(s.shape for s in self.sets.values())
                == sorted(s.shape for s in other.sets.values()))

    def same(self, other: Ruleset) -> bool:
        """`body() == other.body()`, without writing either out."""
        return self.same_structure(other) and all(
            s.elements is other.sets[name].elements or s.elements == other.sets[name].elements
            for name, s in self.sets.items())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body().encode()).hexdigest()[:16]

    def element_changes(self, old: Ruleset) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(additions, deletions) as (set name, element) pairs, from `old` to this one.
        Only meaningful when both have the same structure."""
        added: list[tuple[str, str]] = []
        removed: list[tuple[str, str]] = []
        for name, new in self.sets.items():
            before = set(old.sets[name].elements)
            after = set(new.elements)
            added += [(name, e) for e in new.elements if e not in before]
            removed += [(name, e) for e in old.sets[name].elements if e not in after]
        return added, removed

    def element_script(self, old: Ruleset) -> str:
        """An `nft -f` script that turns `old`'s elements into these, in one transaction.
        Deletions go first, so an interval that grew never overlaps its old self."""
        added, removed = self.element_changes(old)
        # A map element is deleted by its key alone.
        lines = [f"delete element {self.family_table} {s} {{ {e.split(' : ')[0]} }}"
                 for s, e in removed]
        lines += [f"add element {self.family_table} {s} {{ {e} }}" for s, e in added]
        return "\n".join(lines) + ("\n" if lines else "")

    def counts(self) -> dict[str, int]:
        return {
            "chains": len(self.chains),
            "rules": sum(len(c.rules) for c in self.chains.values()),
            "sets": len(self.sets),
            "elements": sum(len(s.elements) for s in self.sets.values()),
        }
