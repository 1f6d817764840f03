"""A rendered nftables table as data: named sets and maps, and chains of rule lines.

Kept as data (not only text) so the applier can tell a change of set elements, which it
sends as element additions and deletions, from a change of structure, which replaces
the whole table in one transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bulkhead.policy.trace import Decision


@dataclass(frozen=True)
class NftSet:
    name: str
    type: str                         # "ipv4_addr", "ipv4_addr . inet_proto . inet_service"
    flags: tuple[str, ...] = ()       # ("interval",)
    elements: tuple[str, ...] = ()    # element text, sorted, as rendered
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
    warnings: list[str] = field(default_factory=list)
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

    def body(self, with_elements: bool = True) -> str:
        """The table as `nft list table` shows it (declarations, sets first)."""
        parts = [f"\tcounter {name} {{\n\t}}" for name in sorted(self.counters)]
        parts += [s.declaration(with_elements) for s in sorted(self.sets.values(),
                                                               key=lambda s: s.name)]
        parts += [c.declaration() for c in self.chains.values()]
        return f"table {self.family_table} {{\n" + "\n".join(parts) + "\n}\n"

    def script(self, timed: Mapping[str, Sequence[str]] | None = None) -> str:
        """An `nft -f` script that replaces the table in one transaction: the kernel holds
        the old table or the new one, never a mix (creating it first makes the delete
        valid when there is no table yet). `timed`: elements for sets with timeouts
        (set name -> `ADDRESS timeout Nms` texts), added in the same transaction."""
        adds = [f"add element {self.family_table} {name} {{ {', '.join(elements)} }}\n"
                for name, elements in sorted((timed or {}).items())
                if elements and name in self.sets]
        return (f"table {self.family_table}\ndelete table {self.family_table}\n"
                + self.body() + "".join(adds))

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
            s.elements == other.sets[name].elements for name, s in self.sets.items())

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
