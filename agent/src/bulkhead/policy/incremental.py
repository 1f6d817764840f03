"""The node's plan kept between changes: what felix's calculation graph does for the
changes that come by the thousand in a fleet — a host endpoint elsewhere gets other labels
or addresses, a GlobalNetworkSet gets other nets or labels.

`Calculator.calculate(snapshot, interfaces, changed)` answers the same plan as
`bulkhead.policy.plan.calculate` (a property test holds the two equal over random event
sequences), and says which selectors' address sets moved. It keeps each selector's
members (`plan.members_of`: who puts which spans in it) and every host endpoint's
effective labels, so a change of that kind costs:

- for each changed host endpoint or network set, one match of each selector in use
  (where it was a member, where it is one now);
- for each selector whose members changed, merging its members' spans anew (the work is
  that selector's size, not the fleet's);
- nothing for the rest: the endpoints' policy plans, named ports, domain sets and
  warnings are the previous plan's objects.

Anything else calculates the plan from scratch (`plan.calculation`): a policy, tier,
profile or staged policy changed; a host endpoint of this node changed (its policies may
have); a changed endpoint elsewhere has named ports the plan uses; a changed network set
has allowedEgressDomains (the domain sets follow them); the host's interfaces moved.
Those change the table's structure, which the dataplane replaces whole anyway.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

from bulkhead.model import ENFORCE, GlobalNetworkSet, HostEndpoint, Snapshot
from bulkhead.net import AddressSet, Span, merge
from bulkhead.policy.failsafe import Failsafes
from bulkhead.policy.plan import (
    Member,
    NodePlan,
    Spans,
    address_set,
    calculation,
    hep_spans,
)
from bulkhead.policy.semantics import effective_labels
from bulkhead.selector import Selector

Key = tuple[str, str]          # (kind, name), as the agent's desired state keys objects
Interfaces = Mapping[str, Sequence[str]]
HEP, NETSET = "HostEndpoint", "GlobalNetworkSet"
BIG = 1 << 129                 # past every address: a bisect key


class Calculator:
    """One node's plan, calculated again only where a change reaches (see the module).
    Not thread-safe: one caller at a time (the agent's enforcer thread)."""

    def __init__(self, node: str, failsafes: Failsafes | None = None,
                 default_mode: str = ENFORCE) -> None:
        self.node = node
        self.failsafes = failsafes if failsafes is not None else Failsafes()
        self.default_mode = default_mode
        self.plan: NodePlan | None = None
        self.full = 0                      # calculations from scratch
        self.incremental = 0               # changes folded into the kept plan
        self._snapshot: Snapshot | None = None
        self._interfaces: dict[str, list[str]] = {}
        self._labels: dict[str, Mapping[str, str]] = {}
        self._members: dict[Selector, dict[Member, Spans]] = {}
        # Per selector that moved once: every member span, sorted (duplicates kept), per
        # family, so the next change patches its set where it lands; and the changes of
        # the fold under way: (spans before, spans after) per member, None for none.
        self._sorted: dict[Selector, tuple[list[Span], list[Span]]] = {}
        self._deltas: dict[Selector, list[tuple[Spans | None, Spans | None]]] = {}

    def calculate(self, snapshot: Snapshot,
                  interfaces: Mapping[str, Sequence[str]] | Callable[[], Interfaces],
                  changed: Iterable[Key] | None = None
                  ) -> tuple[NodePlan, frozenset[Selector] | None]:
        """The plan for `snapshot`, and the selectors whose address sets differ from the
        last plan's (None: calculated from scratch, anything may differ). `changed`: the
        objects that changed since the last call (None: found by comparing snapshots).
        `interfaces`: the host's, or how to read them (then read only for a calculation
        from scratch: a change folded in keeps the interfaces the plan was made with; the
        agent's drift check reads them again)."""
        seen = None if callable(interfaces) else {k: list(v) for k, v in interfaces.items()}
        old = self._snapshot
        moved: frozenset[Selector] | None = None
        if old is not None and self.plan is not None and seen in (None, self._interfaces):
            keys = set(changed) if changed is not None else _changed(old, snapshot)
            try:
                moved = self._fold(old, snapshot, keys)
            except BaseException:
                self.reset()      # the kept state is half changed: from scratch next time
                raise
        if moved is None:
            if seen is None:
                assert callable(interfaces)
                seen = {k: list(v) for k, v in interfaces().items()}
            self._from_scratch(snapshot, seen)
        else:
            self.incremental += 1
        self._snapshot = snapshot
        assert self.plan is not None
        return self.plan, moved

    def reset(self) -> None:
        """Forget the kept plan: the next call calculates from scratch."""
        self.plan, self._snapshot = None, None
        self._labels, self._members = {}, {}
        self._sorted, self._deltas = {}, {}

    @property
    def interfaces(self) -> dict[str, list[str]]:
        """The host's interfaces the plan was made with."""
        return self._interfaces

    # -- from scratch -----------------------------------------------------------------
    def _from_scratch(self, snapshot: Snapshot, interfaces: dict[str, list[str]]) -> None:
        self._sorted, self._deltas = {}, {}
        plan, labels, members = calculation(
            snapshot, self.node, interfaces, self.failsafes, default_mode=self.default_mode)
        self.plan, self._labels, self._members = plan, labels, members
        self._interfaces = interfaces
        # Sorted now, so that even a selector's first change is patched where it lands.
        self._sorted = {sel: _sorted_spans(given) for sel, given in members.items()}
        self.full += 1

    # -- one change at a time ---------------------------------------------------------
    def _fold(self, old: Snapshot, new: Snapshot, keys: set[Key]
              ) -> frozenset[Selector] | None:
        """The kept plan brought to `new`, and the selectors that moved; None when the
        change needs a calculation from scratch (nothing kept was touched then)."""
        plan = self.plan
        assert plan is not None
        heps: list[tuple[str, HostEndpoint | None]] = []
        sets: list[tuple[str, GlobalNetworkSet | None]] = []
        for kind, name in keys:
            if kind == HEP:
                before, after = old.host_endpoints.get(name), new.host_endpoints.get(name)
                if any(h is not None and (h.node == self.node or
                                          (h.ports and plan.named_ports))
                       for h in (before, after)):
                    return None
                heps.append((name, after))
            elif kind == NETSET:
                was, now = old.network_sets.get(name), new.network_sets.get(name)
                if any(s is not None and s.allowed_egress_domains for s in (was, now)):
                    return None
                sets.append((name, now))
            else:
                return None
        moved: set[Selector] = set()
        for name, hep in heps:
            if hep is None:
                self._labels.pop(name, None)
                moved |= self._place(("hep", name), None, None)
                continue
            labels = self._labels[name] = effective_labels(new, hep)
            spans = hep_spans(hep) if hep.expected_ips else None
            moved |= self._place(("hep", name), labels, spans)
        for name, netset in sets:
            if netset is None or not netset.nets:
                moved |= self._place(("ns", name), None, None)
                continue
            moved |= self._place(("ns", name), netset.labels, netset.spans())
        if moved:
            selector_sets = dict(plan.selector_sets)
            moved_from: dict[Selector, tuple[AddressSet, tuple[tuple[int, int, int], ...]]] = {}
            for sel in moved:
                deltas = self._deltas.pop(sel, [])
                lists = self._sorted.get(sel)
                if lists is None:
                    # The first change of this selector: merged whole, kept sorted after.
                    selector_sets[sel] = address_set(self._members[sel])
                    self._sorted[sel] = _sorted_spans(self._members[sel])
                    continue
                if not deltas:
                    continue
                old_set = plan.selector_sets[sel]
                selector_sets[sel], regions = _patched(old_set, lists, deltas)
                moved_from[sel] = (old_set, regions)
            self.plan = replace(plan, selector_sets=selector_sets, moved_from=moved_from)
        elif plan.moved_from:
            self.plan = replace(plan, moved_from={})     # nothing moved this time
        self._deltas.clear()
        return frozenset(moved)

    def _place(self, member: Member, labels: Mapping[str, str] | None,
               spans: Spans | None) -> set[Selector]:
        """Put `member` (with `spans`) in the selectors its labels match, out of the
        others; the selectors whose members changed."""
        moved = set()
        for sel, members in self._members.items():
            had = members.get(member)
            wants = spans is not None and labels is not None and sel.matches(labels)
            if wants:
                assert spans is not None
                if had is None or had != spans:
                    members[member] = spans
                    moved.add(sel)
                    self._deltas.setdefault(sel, []).append((had, spans))
            elif had is not None:
                del members[member]
                moved.add(sel)
                self._deltas.setdefault(sel, []).append((had, None))
        return moved


def _sorted_spans(members: Mapping[Member, Spans]) -> tuple[list[Span], list[Span]]:
    v4: list[Span] = []
    v6: list[Span] = []
    for four, six in members.values():
        v4 += four
        v6 += six
    return sorted(v4), sorted(v6)


def _patched(before: AddressSet, lists: tuple[list[Span], list[Span]],
             deltas: Sequence[tuple[Spans | None, Spans | None]]
             ) -> tuple[AddressSet, tuple[tuple[int, int, int], ...]]:
    """`before` with the members' changes (`deltas`) applied where they land: the sorted
    member spans (`lists`, updated here) are merged again only between the first and the
    last address a change touches, widened to the merged spans there. The new set and
    the regions (family, first, last) outside which it is `before`."""
    out: list[tuple[Span, ...]] = []
    regions: list[Span] = []
    regions_out: list[tuple[int, int, int]] = []
    for f, family in enumerate((4, 6)):
        spans = lists[f]
        touched: list[Span] = []
        for had, now in deltas:
            # Only what differs (a network set with one net changed moves one span).
            before_spans = Counter(had[f] if had is not None else ())
            after_spans = Counter(now[f] if now is not None else ())
            for span in (before_spans - after_spans).elements():
                at = bisect.bisect_left(spans, span)
                if at < len(spans) and spans[at] == span:
                    del spans[at]
                touched.append(span)
            for span in (after_spans - before_spans).elements():
                bisect.insort(spans, span)
                touched.append(span)
        merged: tuple[Span, ...] | list[Span] = before.spans(family)
        if not touched:
            out.append(before.spans(family))
            continue
        merged = list(merged)
        # Each touched span, right to left: the merged spans that overlap or touch it,
        # merged[i:j], are merged again from the members' spans there.
        for lo, hi in sorted(touched, reverse=True):
            i = bisect.bisect_right(merged, (lo - 1, BIG)) - 1
            if i < 0 or merged[i][1] < lo - 1:
                i += 1
            j = bisect.bisect_right(merged, (hi + 1, BIG))
            first = min(lo, merged[i][0]) if i < j else lo
            last = max(hi, merged[j - 1][1]) if i < j else hi
            a = bisect.bisect_left(spans, (first, -1))
            b = bisect.bisect_right(spans, (last, BIG))
            merged[i:j] = merge(spans[a:b])
            regions.append((first, last))
        out.append(tuple(merged))
        regions_out += [(family, lo, hi) for lo, hi in merge(regions)]
        regions = []
    return AddressSet(out[0], out[1]), tuple(regions_out)


def _changed(old: Snapshot, new: Snapshot) -> set[Key]:
    """The objects that differ between two snapshots (by identity: the agent's desired
    state keeps an unchanged object's parsed resource)."""
    out: set[Key] = set()
    for kind, a, b in (("Tier", old.tiers, new.tiers),
                       ("GlobalNetworkPolicy", old.policies, new.policies),
                       ("StagedGlobalNetworkPolicy", old.staged, new.staged),
                       (HEP, old.host_endpoints, new.host_endpoints),
                       (NETSET, old.network_sets, new.network_sets),
                       ("Profile", old.profiles, new.profiles)):
        if a is b:
            continue
        out.update((kind, name) for name in a.keys() | b.keys()
                   if a.get(name) is not b.get(name))
    return out
