"""Calico's selector language: parse once, print canonically, evaluate compiled.

    >>> s = parse("app == 'db' && zone not in {'dmz'}")
    >>> str(s)
    '(app == "db" && zone not in {"dmz"})'
    >>> s.matches({"app": "db"})
    True
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping

from bulkhead.selector.ast import BoolOp, Compare, Node, Not
from bulkhead.selector.parser import SelectorError, parse_tree

__all__ = ["Selector", "SelectorError", "and_not", "parse"]


class Selector:
    """A parsed selector. Equal (and hashed) by its canonical string.

    `matches(labels)` is True if a resource with these labels is selected. It is the
    compiled expression itself (every node yields a bool), so a call costs what a
    hand-written predicate does.
    """

    __slots__ = ("__weakref__", "canonical", "matches", "tree")

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


# Parsed selectors by their text, the most recently used kept: at most CACHE_ENTRIES of
# them and CACHE_CHARS characters of text in all. A compiled selector costs about 24
# bytes per character of its text, and texts come from clients too (`?selector=`, at
# most 4,096 characters): bounded by count alone, 8,192 long ones held 800 MB.
CACHE_ENTRIES = 8192
CACHE_CHARS = 1 << 20
_CACHE: OrderedDict[str, Selector] = OrderedDict()
_CACHE_LOCK = threading.Lock()   # parse() runs in worker threads too (big applies)
_cached_chars = 0
# Different spellings of one selector share one compiled object while anything holds
# it (a snapshot, a plan, the cache above); no more than that is kept.
_INTERNED: weakref.WeakValueDictionary[str, Selector] = weakref.WeakValueDictionary()


def _parse_cached(text: str) -> Selector:
    global _cached_chars
    with _CACHE_LOCK:
        found = _CACHE.get(text)
        if found is not None:
            _CACHE.move_to_end(text)
            return found
    tree = parse_tree(text)
    canonical = tree.canonical()
    with _CACHE_LOCK:
        selector = _intern(tree, canonical)
        if text not in _CACHE:
            _CACHE[text] = selector
            _cached_chars += len(text)
            while _CACHE and (len(_CACHE) > CACHE_ENTRIES or _cached_chars > CACHE_CHARS):
                old, _ = _CACHE.popitem(last=False)
                _cached_chars -= len(old)
        return selector


def _intern(tree: Node, canonical: str) -> Selector:
    """The one compiled selector of this canonical form, made now if none is held (with
    _CACHE_LOCK held)."""
    selector = _INTERNED.get(canonical)
    if selector is None:
        selector = _INTERNED[canonical] = Selector(tree)
    return selector


def parse(text: str) -> Selector:
    """Parse selector text; raises SelectorError (a ValueError) with position and expectation."""
    if not isinstance(text, str):
        raise SelectorError(repr(text), 0, "selector text (a string)")
    return _parse_cached(text)


def and_not(positive: Selector, negated: Selector) -> Selector:
    """`(positive) && !(negated)` as one selector, built from the two trees (no text to
    parse again, so no length limit to meet twice); shared like parsed ones."""
    tree = BoolOp("&&", (positive.tree, Not(negated.tree)))
    canonical = tree.canonical()
    with _CACHE_LOCK:
        return _intern(tree, canonical)
