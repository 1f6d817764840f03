"""Which endpoints each selector matches, kept up to date as either side changes.

Changing one endpoint costs one evaluation per selector, whatever the number of
endpoints; adding a selector costs one evaluation per endpoint. The agent builds IP sets
from the match events; the lookup plugin resolves selectors over an inventory with it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from bulkhead.selector import Selector

E = TypeVar("E", bound=Hashable)  # endpoint id
S = TypeVar("S", bound=Hashable)  # selector id

MatchCallback = Callable[[S, E], None]


class LabelIndex(Generic[S, E]):
    """Incremental selector x endpoint match table.

    `on_match(sel_id, ep_id)` and `on_unmatch(sel_id, ep_id)`, when given, are called for
    every pair that starts or stops matching, so a caller can keep IP sets in step.
    """

    def __init__(
        self,
        on_match: MatchCallback[S, E] | None = None,
        on_unmatch: MatchCallback[S, E] | None = None,
    ) -> None:
        self._labels: dict[E, Mapping[str, str]] = {}
        self._selectors: dict[S, Selector] = {}
        self._members: dict[S, set[E]] = {}
        self._matched_by: dict[E, set[S]] = {}
        self._on_match = on_match
        self._on_unmatch = on_unmatch

    # -- endpoints --------------------------------------------------------------------
    def update_endpoint(self, ep_id: E, labels: Mapping[str, str]) -> None:
        """Add an endpoint or change its labels."""
        labels = dict(labels)
        if self._labels.get(ep_id) == labels:
            return
        self._labels[ep_id] = labels
        old = self._matched_by.setdefault(ep_id, set())
        for sel_id, selector in self._selectors.items():
            now = selector.matches(labels)
            if now and sel_id not in old:
                self._link(sel_id, ep_id)
            elif not now and sel_id in old:
                self._unlink(sel_id, ep_id)

    def remove_endpoint(self, ep_id: E) -> None:
        if ep_id not in self._labels:
            return
        for sel_id in list(self._matched_by.get(ep_id, ())):
            self._unlink(sel_id, ep_id)
        del self._labels[ep_id]
        self._matched_by.pop(ep_id, None)

    # -- selectors --------------------------------------------------------------------
    def add_selector(self, sel_id: S, selector: Selector) -> None:
        """Start tracking a selector (replacing any selector held under the same id)."""
        current = self._selectors.get(sel_id)
        if current is not None:
            if current == selector:
                return
            self.remove_selector(sel_id)
        self._selectors[sel_id] = selector
        self._members[sel_id] = set()
        for ep_id, labels in self._labels.items():
            if selector.matches(labels):
                self._link(sel_id, ep_id)

    def remove_selector(self, sel_id: S) -> None:
        if sel_id not in self._selectors:
            return
        for ep_id in list(self._members[sel_id]):
            self._unlink(sel_id, ep_id)
        del self._selectors[sel_id]
        del self._members[sel_id]

    # -- queries ----------------------------------------------------------------------
    def members(self, sel_id: S) -> frozenset[E]:
        """Endpoints the selector matches now."""
        return frozenset(self._members.get(sel_id, ()))

    def selectors_matching(self, ep_id: E) -> frozenset[S]:
        return frozenset(self._matched_by.get(ep_id, ()))

    def labels(self, ep_id: E) -> Mapping[str, str] | None:
        return self._labels.get(ep_id)

    @property
    def endpoints(self) -> Iterable[E]:
        return self._labels.keys()

    @property
    def selectors(self) -> Mapping[S, Selector]:
        return self._selectors

    def __len__(self) -> int:
        return len(self._labels)

    # -- internals --------------------------------------------------------------------
    def _link(self, sel_id: S, ep_id: E) -> None:
        self._members[sel_id].add(ep_id)
        self._matched_by.setdefault(ep_id, set()).add(sel_id)
        if self._on_match:
            self._on_match(sel_id, ep_id)

    def _unlink(self, sel_id: S, ep_id: E) -> None:
        self._members[sel_id].discard(ep_id)
        self._matched_by[ep_id].discard(sel_id)
        if self._on_unmatch:
            self._on_unmatch(sel_id, ep_id)
