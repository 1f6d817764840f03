"""Calico's selector language: parse once, print canonically, evaluate compiled.

    >>> s = parse("app == 'db' && zone not in {'dmz'}")
    >>> str(s)
    '(app == "db" && zone not in {"dmz"})'
    >>> s.matches({"app": "db"})
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

from bulkhead.selector.ast import Compare, Node
from bulkhead.selector.parser import SelectorError, parse_tree

__all__ = ["Selector", "SelectorError", "parse"]


class Selector:
    """A parsed selector. Equal (and hashed) by its canonical string.

    `matches(labels)` is True if a resource with these labels is selected. It is the
    compiled expression itself (every node yields a bool), so a call costs what a
    hand-written predicate does.
    """

    __slots__ = ("canonical", "matches", "tree")

    def __init__(self, tree: Node) -> None:
        self.tree = tree
        self.canonical = tree.canonical()
        self.matches: Callable[[Mapping[str, str]], bool]
        if isinstance(tree, Compare) and tree.op == "==":
            # The commonest selector, `key == "value"`: the expression `code()` gives,
            # as a closure (compiling one costs tens of microseconds, times 10,000).
            key, value = tree.key, tree.value
            self.matches = lambda L: L.get(key) == value
            return
        # The tree becomes one Python expression, compiled once: evaluation costs about
        # what a hand-written predicate does, not a walk over nodes per label set.
        source = f"lambda L: {tree.code()}"
        self.matches = eval(compile(source, "<selector>", "eval"), {"__builtins__": {}})

    @property
    def label_keys(self) -> frozenset[str]:
        """Label keys the selector reads."""
        return self.tree.label_keys()

    @property
    def selects_all(self) -> bool:
        return self.canonical in ("all()", "global()")

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"Selector({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and other.canonical == self.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)


@lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Selector:
    tree = parse_tree(text)
    return _by_canonical(tree.canonical(), tree)


_INTERNED: dict[str, Selector] = {}


def _by_canonical(canonical: str, tree: Node) -> Selector:
    # Different spellings of one selector share one compiled object.
    found = _INTERNED.get(canonical)
    if found is None:
        if len(_INTERNED) > 65536:
            _INTERNED.clear()
        found = _INTERNED[canonical] = Selector(tree)
    return found


def parse(text: str) -> Selector:
    """Parse selector text; raises SelectorError (a ValueError) with position and expectation."""
    if not isinstance(text, str):
        raise SelectorError(repr(text), 0, "selector text (a string)")
    return _parse_cached(text)
