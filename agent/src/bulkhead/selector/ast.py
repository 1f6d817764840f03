"""Selector syntax tree: canonical text (Calico's form), Python source, and a naive walk.

Every node can print itself three ways: `canonical()` is the text Calico prints for it
(equal selectors share one string, and so one IP-set name); `code()` is a Python
expression over a label mapping `L`, which `Selector` compiles once; `evaluate()` walks
the tree and exists only as the slow, obviously-correct oracle the tests compare with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def quote(value: str) -> str:
    """Quote a string as Calico does: double quotes unless the value holds one."""
    return f"'{value}'" if '"' in value else f'"{value}"'


class Node:
    """A selector expression."""

    def canonical(self) -> str:
        raise NotImplementedError

    def code(self) -> str:
        raise NotImplementedError

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        raise NotImplementedError

    def label_keys(self) -> frozenset[str]:
        """The label keys this expression reads (empty for all())."""
        return frozenset()


@dataclass(frozen=True)
class All(Node):
    def canonical(self) -> str:
        return "all()"

    def code(self) -> str:
        return "True"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return True


@dataclass(frozen=True)
class Global(Node):
    """`global()`: true for non-namespaced resources, which every host endpoint is."""

    def canonical(self) -> str:
        return "global()"

    def code(self) -> str:
        return "True"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return True


@dataclass(frozen=True)
class Has(Node):
    key: str

    def canonical(self) -> str:
        return f"has({self.key})"

    def code(self) -> str:
        return f"({self.key!r} in L)"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def label_keys(self) -> frozenset[str]:
        return frozenset({self.key})


@dataclass(frozen=True)
class Compare(Node):
    """`key == value`, `key != value`, `key contains v`, `starts with`, `ends with`."""

    key: str
    op: str  # one of OPS
    value: str

    OPS = ("==", "!=", "contains", "starts with", "ends with")

    def canonical(self) -> str:
        return f"{self.key} {self.op} {quote(self.value)}"

    def code(self) -> str:
        k, v = repr(self.key), repr(self.value)
        if self.op == "==":
            return f"(L.get({k}) == {v})"
        if self.op == "!=":
            return f"(L.get({k}) != {v})"
        method = {"contains": "__contains__", "starts with": "startswith",
                  "ends with": "endswith"}[self.op]
        return f"((_x := L.get({k})) is not None and _x.{method}({v}))"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        if self.op == "!=":
            return labels.get(self.key) != self.value
        if self.key not in labels:
            return False
        actual = labels[self.key]
        if self.op == "==":
            return actual == self.value
        if self.op == "contains":
            return self.value in actual
        if self.op == "starts with":
            return actual.startswith(self.value)
        return actual.endswith(self.value)

    def label_keys(self) -> frozenset[str]:
        return frozenset({self.key})


@dataclass(frozen=True)
class InSet(Node):
    """`key in {...}` or, with `negated`, `key not in {...}` (true when key is absent)."""

    key: str
    values: tuple[str, ...]  # sorted, without duplicates
    negated: bool = False

    def canonical(self) -> str:
        op = "not in" if self.negated else "in"
        return f"{self.key} {op} {{{', '.join(quote(v) for v in self.values)}}}"

    def code(self) -> str:
        # `x in {"a", "b"}` compiles to a constant frozenset lookup.
        members = "{" + ", ".join(repr(v) for v in self.values) + "}" if self.values else "()"
        op = "not in" if self.negated else "in"
        return f"(L.get({self.key!r}) {op} {members})"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        inside = self.key in labels and labels[self.key] in self.values
        return not inside if self.negated else inside

    def label_keys(self) -> frozenset[str]:
        return frozenset({self.key})


@dataclass(frozen=True)
class Not(Node):
    operand: Node

    def canonical(self) -> str:
        return "!" + self.operand.canonical()

    def code(self) -> str:
        return f"(not {self.operand.code()})"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.evaluate(labels)

    def label_keys(self) -> frozenset[str]:
        return self.operand.label_keys()


@dataclass(frozen=True)
class BoolOp(Node):
    """`a && b && ...` or `a || b || ...`, as written (Calico does not flatten groups)."""

    op: str  # "&&" or "||"
    operands: tuple[Node, ...]

    def canonical(self) -> str:
        return "(" + f" {self.op} ".join(o.canonical() for o in self.operands) + ")"

    def code(self) -> str:
        joiner = " and " if self.op == "&&" else " or "
        return "(" + joiner.join(o.code() for o in self.operands) + ")"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        if self.op == "&&":
            return all(o.evaluate(labels) for o in self.operands)
        return any(o.evaluate(labels) for o in self.operands)

    def label_keys(self) -> frozenset[str]:
        keys: frozenset[str] = frozenset()
        for o in self.operands:
            keys |= o.label_keys()
        return keys
