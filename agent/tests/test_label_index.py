"""The label index stays equal to a brute-force recomputation under any change sequence."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.selector import LabelIndex, parse

SELECTORS = ["app == 'db'", "zone != 'dmz'", "has(app)", "all()", "app in {'db', 'web'}",
             "!has(zone) || zone == 'trusted'"]


def test_matches_follow_labels_and_selectors() -> None:
    events: list[tuple[str, str, str]] = []
    index: LabelIndex[str, str] = LabelIndex(
        on_match=lambda s, e: events.append(("+", s, e)),
        on_unmatch=lambda s, e: events.append(("-", s, e)))
    index.update_endpoint("web", {"app": "web", "zone": "dmz"})
    index.update_endpoint("db", {"app": "db", "zone": "restricted"})
    index.add_selector("dbs", parse("app == 'db'"))
    assert index.members("dbs") == {"db"}
    assert events == [("+", "dbs", "db")]
    index.update_endpoint("web", {"app": "db"})
    assert index.members("dbs") == {"db", "web"}
    index.update_endpoint("web", {"app": "db"})  # no change, no event
    assert events[-1] == ("+", "dbs", "web") and len(events) == 2
    index.remove_endpoint("db")
    assert index.members("dbs") == {"web"}
    assert index.selectors_matching("web") == {"dbs"}
    index.remove_selector("dbs")
    assert index.members("dbs") == frozenset()
    assert events[-1] == ("-", "dbs", "web")


def test_replacing_a_selector_under_the_same_id() -> None:
    index: LabelIndex[str, int] = LabelIndex()
    index.update_endpoint(1, {"app": "db"})
    index.update_endpoint(2, {"app": "web"})
    index.add_selector("s", parse("app == 'db'"))
    index.add_selector("s", parse("app == 'web'"))
    assert index.members("s") == {2}
    assert index.selectors_matching(1) == frozenset()


OPS = st.lists(st.one_of(
    st.tuples(st.just("ep"), st.integers(0, 6),
              st.dictionaries(st.sampled_from(["app", "zone"]),
                              st.sampled_from(["db", "web", "dmz", "trusted"]), max_size=2)),
    st.tuples(st.just("rm-ep"), st.integers(0, 6), st.none()),
    st.tuples(st.just("sel"), st.integers(0, len(SELECTORS) - 1), st.none()),
    st.tuples(st.just("rm-sel"), st.integers(0, len(SELECTORS) - 1), st.none()),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_index_equals_brute_force(ops: list[tuple[str, int, dict[str, str] | None]]) -> None:
    index: LabelIndex[int, int] = LabelIndex()
    labels: dict[int, dict[str, str]] = {}
    selectors: set[int] = set()
    for op, n, value in ops:
        if op == "ep":
            assert value is not None
            index.update_endpoint(n, value)
            labels[n] = value
        elif op == "rm-ep":
            index.remove_endpoint(n)
            labels.pop(n, None)
        elif op == "sel":
            index.add_selector(n, parse(SELECTORS[n]))
            selectors.add(n)
        else:
            index.remove_selector(n)
            selectors.discard(n)
    for s in selectors:
        want = {e for e, lab in labels.items() if parse(SELECTORS[s]).matches(lab)}
        assert index.members(s) == want
    for e in labels:
        want_sel = {s for s in selectors if parse(SELECTORS[s]).matches(labels[e])}
        assert index.selectors_matching(e) == want_sel
