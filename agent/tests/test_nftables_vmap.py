"""bulkhead.dataplane.nftables.vmap: runs of plain rules compiled into disjoint cells."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables.vmap import Box, compile_run

intervals = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4)).map(
    lambda t: (t[0], t[0] + t[1])), min_size=1, max_size=2)
boxes = st.lists(st.tuples(
    st.fixed_dictionaries({}, optional={"proto": intervals, "dport": intervals,
                                        "saddr": intervals}),
    st.sampled_from(["Allow", "Deny", "Pass"])), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(boxes)
def test_compiled_cells_give_the_first_matching_rule(rules: list[tuple[Box, str]]) -> None:
    verdict = {"Allow": "accept", "Deny": "drop", "Pass": "return"}
    run = compile_run(rules, 4)
    for point in itertools.product(range(18), repeat=3):
        where = dict(zip(("proto", "dport", "saddr"), point, strict=True))
        expected = next((verdict[a] for b, a in rules
                         if all(any(lo <= where[f] <= hi for lo, hi in iv)
                                for f, iv in b.items())), None)
        got = [v for key, v in run.cells
               if all(lo <= where[f] <= hi for f, (lo, hi) in zip(run.fields, key, strict=True))]
        assert len(got) <= 1  # cells are disjoint
        assert (got[0] if got else None) == expected
