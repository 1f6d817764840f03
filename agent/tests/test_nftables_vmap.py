"""bulkhead.dataplane.nftables.vmap: runs of plain rules compiled into disjoint cells."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables.vmap import (
    CHUNK,
    VERDICT,
    Box,
    RunCompiler,
    _Pieces,
    _separated,
    compile_run,
    compile_texts,
    element_text,
)

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


def _spans(values: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted disjoint spans of single values and pairs, more than BY_IDENTITY of them."""
    return tuple((v, v + (v % 3 == 0)) for v in sorted(set(values)))


def _points(values: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple((v, v) for v in sorted(set(values)))


_values = st.lists(st.integers(0, 40).map(lambda v: 2 * v), min_size=10, max_size=30)
# Lists of single values and pairs, or of single values only (a map's field of all
# points is cut otherwise; a list replacing one of all points is read where it moved).
big = st.one_of(_values.map(_spans), _values.map(_points))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(big, min_size=2, max_size=4),
       st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["Allow", "Deny", "Pass"]),
                          st.sampled_from([None, [(6, 6)], [(6, 6), (17, 17)]]),
                          st.sampled_from([None, [(80, 80)], [(80, 90)], [(22, 22), (443, 443)]])),
                min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), big), max_size=6),
       st.sampled_from(["saddr", "daddr"]), st.sampled_from([1, 2, 3, CHUNK]))
def test_a_run_compiled_again_after_changes_is_compiled_from_scratch(
        pool: list[tuple[tuple[int, int], ...]], rules: list[tuple[int, str, Any, Any]],
        changes: list[tuple[int, int, tuple[tuple[int, int], ...]]], field: str,
        chunk: int) -> None:
    """The incremental compiler against `compile_run` over a sequence of changes: an
    address list replaced (a new object, as a selector's set is when it moves), a rule's
    verdict or list swapped; the same element texts, fields and interval flag each time,
    and a change that moves nothing cuts nothing again. Leaves longer than two chunks
    are kept in chunks (`_Pieces`): small chunks here, so the lists' leaves are."""
    compiler = RunCompiler(chunk)
    lists = list(pool)
    spec = [list(r) for r in rules]

    def boxes() -> list[tuple[Box, str]]:
        out = []
        for which, action, proto, ports in spec:
            box: Box = {field: lists[which % len(lists)]}  # type: ignore[dict-item]
            if proto is not None:
                box["proto"] = proto
            if ports is not None:
                box["dport"] = ports
            out.append((box, action))
        return out

    hints: dict[int, Any] = {}

    def check() -> None:
        want = compile_run(boxes(), 4)
        fields, interval, elements = compiler.compile(boxes(), 4, hints=hints)
        hints.clear()
        assert (fields, interval) == (want.fields, want.interval)
        assert elements == tuple(sorted(element_text(want, 4))) if fields else \
            elements == tuple(v for _, v in want.cells)

    check()
    cut = compiler.cut_again
    check()                                   # nothing changed: nothing cut again
    assert compiler.cut_again == cut
    for which, rule, replacement in changes:
        if rule % 2:
            before = lists[which % len(lists)]
            lists[which % len(lists)] = replacement
            # As the incremental calculator hints it: the range the two lists differ in.
            differ = set(before) ^ set(replacement)
            if differ and rule % 4 == 1:
                hints[id(replacement)] = (before, [(min(lo for lo, _ in differ),
                                                    max(hi for _, hi in differ))])
        else:
            spec[rule % len(spec)][0] = which
            spec[rule % len(spec)][1] = ("Allow", "Deny", "Pass")[rule % 3]
        check()


def test_the_same_box_objects_again_answer_as_compile_run_does() -> None:
    """RunCompiler answers the last answer for the same box objects, and only for them:
    another family, other verdicts or other actions on the same boxes are compiled."""
    first: Box = {"daddr": tuple((i, i) for i in range(0, 40, 2)),  # type: ignore[dict-item]
                  "dport": [(80, 80)]}
    second: Box = {"saddr": ((5, 9),)}  # type: ignore[dict-item]
    swapped = {**VERDICT, "Allow": "drop", "Deny": "accept"}
    steps: list[tuple[list[tuple[Box, str]], int, dict[str, str]]] = [
        ([(first, "Allow"), (second, "Deny")], 4, dict(VERDICT)),
        ([(first, "Allow"), (second, "Deny")], 4, dict(VERDICT)),
        ([(first, "Allow"), (second, "Deny")], 6, dict(VERDICT)),
        ([(first, "Deny"), (second, "Allow")], 6, dict(VERDICT)),
        ([(first, "Deny"), (second, "Allow")], 6, swapped),
        ([(second, "Allow")], 6, dict(VERDICT)), ([], 6, dict(VERDICT)),
        ([(second, "Allow")], 6, dict(VERDICT))]
    compiler = RunCompiler()
    for k, (boxes, family, verdicts) in enumerate(steps):
        cut = compiler.cut_again
        fields, interval, elements = compiler.compile(list(boxes), family, verdicts)
        want = compile_run(boxes, family, verdicts)
        assert (fields, interval) == (want.fields, want.interval), k
        assert tuple(elements) == (tuple(sorted(element_text(want, family))) if fields
                                   else tuple(v for _, v in want.cells[:1])), k
        if k == 1:
            assert compiler.cut_again == cut      # the same objects: nothing cut again


def _texts_one_by_one(run: Any, family: int) -> list[str]:
    """Each cell written field by field: what element_text's shared heads must equal."""
    from bulkhead.dataplane.nftables.vmap import address_range
    out = []
    for key, verdict in run.cells:
        parts = [address_range(lo, hi, family) if name.endswith("addr")
                 else (str(lo) if lo == hi else f"{lo}-{hi}")
                 for name, (lo, hi) in zip(run.fields, key, strict=True)]
        out.append(f"{' . '.join(parts)} : {verdict}")
    return out


wide = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)).map(
    lambda t: (t[0], t[0] + t[1])), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(
    st.fixed_dictionaries({}, optional={"proto": wide, "dport": wide, "sport": wide,
                                        "daddr": wide, "saddr": wide}),
    st.sampled_from(["Allow", "Deny", "Pass"])), min_size=1, max_size=5),
    st.sampled_from([4, 6]))
def test_element_text_writes_each_cell_as_its_fields_one_by_one(
        rules: list[tuple[Box, str]], family: int) -> None:
    run = compile_run(rules, family)
    assert element_text(run, family) == _texts_one_by_one(run, family)


# Address lists as an address set gives them (sorted, disjoint; single addresses and
# ranges), around /24 and /16 boundaries and the ends of the space, in either family.
def _address_lists(family: int) -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    top = 2**32 if family == 4 else 2**128
    starts = st.sampled_from([0, 0xC612_40FE, 0xC612_FFF0, 0x0A00_0000, top - 300])
    return st.tuples(starts, st.lists(st.tuples(st.integers(0, 290), st.integers(0, 3)),
                                      min_size=1, max_size=40)).map(
        lambda t: tuple(sorted({(t[0] + o, min(top - 1, t[0] + o + w * (o % 2)))
                                for o, w in t[1]})))


def _disjoint(spans: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if not out or lo > out[-1][1]:
            out.append((lo, hi))
    return tuple(out)


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[tuple[Box, str]], int]:
    family = draw(st.sampled_from([4, 6]))
    field = draw(st.sampled_from(["saddr", "daddr"]))
    lists = draw(st.lists(_address_lists(family).map(_disjoint), min_size=1, max_size=3))
    run: list[tuple[Box, str]] = []
    for _ in range(draw(st.integers(1, 5))):
        box: Box = {field: draw(st.sampled_from(lists))}  # type: ignore[dict-item]
        extra = draw(st.sampled_from([None, "proto", "dport", "sport"]))
        if extra is not None:
            box[extra] = draw(st.sampled_from([[(6, 6)], [(80, 80), (443, 443)],
                                               [(1000, 1999)], [(6, 6), (17, 17)]]))
        run.append((box, draw(st.sampled_from(["Allow", "Deny", "Pass"]))))
    return run, family


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_runs())
def test_compiled_texts_are_the_cells_written_one_by_one(
        drawn: tuple[list[tuple[Box, str]], int]) -> None:
    """compile_texts (from scratch, written from the tree) and a RunCompiler's first
    compile give what compile_run's cells give written field by field, sorted."""
    rules, family = drawn
    run = compile_run(rules, family)
    want = (run.fields, run.interval, tuple(sorted(_texts_one_by_one(run, family))))
    assert compile_texts(rules, family) == want
    fields, interval, elements = RunCompiler().compile(rules, family)
    assert (fields, interval, tuple(elements)) == want


def test_compiled_texts_of_no_box_or_no_field() -> None:
    assert compile_texts([], 4) == ((), False, ())
    assert compile_texts([({}, "Deny"), ({}, "Allow")], 6) == ((), False, ("drop",))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)).map(
    lambda t: (min(t), max(t))), max_size=6).map(sorted))
def test_separated_is_a_gap_between_each_interval_and_the_next(
        intervals: list[tuple[int, int]]) -> None:
    assert _separated(intervals) == all(a[1] + 1 < b[0]
                                        for a, b in itertools.pairwise(intervals))


_piece_starts = st.lists(st.integers(0, 200), max_size=60).map(lambda v: sorted(set(v)))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(_piece_starts, st.integers(1, 5), st.integers(-5, 205), st.integers(0, 20),
       st.lists(st.integers(0, 200), max_size=5), st.integers(0, 3))
def test_pieces_patched_read_as_the_same_patch_of_one_tuple(
        starts: list[int], size: int, lo: int, width: int, fresh_starts: list[int],
        drop: int) -> None:
    """`_Pieces` against a tuple of the same pieces: reading (length, iteration, indexing,
    equality both ways) and a patch of the pieces around [lo, hi] that takes out the
    piece before the last one starting at or before lo (its neighbour) and those up to
    the first one starting after hi + 1 (and that one), and puts new pieces in; the
    chunks the patch did not reach are the old leaf's own objects."""
    pieces = tuple(((s, s), "accept" if s % 3 else "drop") for s in starts)
    leaf = _Pieces.of(pieces, size)
    assert len(leaf) == len(pieces) and tuple(leaf) == pieces
    assert leaf == pieces and pieces == leaf and leaf == list(pieces)
    assert [leaf[i] for i in range(-len(pieces), len(pieces))] == [*pieces, *pieces]
    hi = lo + width

    def patch(flat: list[Any], p_lo: int, p_hi: int) -> None:
        # The same window rule _patch relies on: from two pieces before the first one
        # starting after lo to the first one starting after hi + 1.
        a = max(sum(1 for p in flat if p[0][0] <= p_lo) - min(drop, 2), 0)
        b = sum(1 for p in flat if p[0][0] <= p_hi + 1)
        if drop % 2 and b < len(flat):
            b += 1             # and the first piece after, when there is one
        new = [((s, s), "accept") for s in sorted(set(fresh_starts)) if p_lo <= s <= p_hi]
        flat[a:b] = new

    want = list(pieces)
    patch(want, lo, hi)
    got = leaf.patched(lo, hi, patch, size)
    assert tuple(got) == tuple(want)
    assert len(got) == len(want)
    # Spliced, not gathered again: the same chunk starts, length and no empty chunk as
    # a leaf built from the patched chunks.
    assert all(got._chunks)
    assert got._firsts == [c[0][0][0] for c in got._chunks]
    assert got._len == sum(map(len, got._chunks))
    assert [got[i] for i in range(len(want))] == want
    # Made again: the chunks with a piece starting in [lo, hi + 1], and at most one more
    # before them and two around their ends.
    shared = {id(c) for c in got._chunks}
    touched = sum(1 for c in leaf._chunks if any(lo <= p[0][0] <= hi + 1 for p in c))
    assert sum(id(c) not in shared for c in leaf._chunks) <= touched + 3


def test_a_compile_again_leaves_no_reference_cycle() -> None:
    """The incremental compiler's garbage is freed by reference counts: a cycle would
    keep the last memo and leaves (the whole map's pieces) until the cycle collector
    runs, and that collection walks them inside some later change."""
    import gc

    spans = tuple((2 * v, 2 * v) for v in range(40))
    moved = spans[1:]
    compiler = RunCompiler(chunk=4)
    boxes: list[tuple[Any, str]] = [({"saddr": spans, "dport": [(80, 80)]}, "Allow")]
    gc.collect()
    gc.disable()
    try:
        compiler.compile(boxes, 4)
        for replacement, before in ((moved, spans), (spans, moved)):
            boxes = [({"saddr": replacement, "dport": [(80, 80)]}, "Allow")]
            compiler.compile(boxes, 4, hints={id(replacement): (before, [(0, 0)])})
        assert compiler.patched == 2
        assert gc.collect() == 0
    finally:
        gc.enable()


def nested_run(n: int) -> list[tuple[Box, str]]:
    """n rules whose port ranges nest in two fields and whose nets differ: their cells
    multiply as n^3 (the rules one by one cost 4n intervals)."""
    return [({"proto": [(6, 6)], "dport": [(1000 + i, 60000 - i)],
              "sport": [(1000 + i, 60000 - i)],
              "daddr": [(0x0A000000 + 256 * i, 0x0A000000 + 256 * i + 255)]},
             "Allow" if i % 2 else "Deny") for i in range(n)]


def test_a_run_whose_cells_multiply_past_its_budget_is_refused() -> None:
    """40 such rules make about 42,700 cells (under the floor of 65,536); 100 would make about
    a million: refused before a cell is written, by both compilers; the incremental one
    then compiles the next run from scratch."""
    import pytest

    from bulkhead.dataplane.nftables.vmap import MIN_CELL_BUDGET, TooManyCells
    _, _, texts = compile_texts(nested_run(40), 4)
    assert 40_000 < len(texts) < MIN_CELL_BUDGET
    with pytest.raises(TooManyCells) as err:
        compile_texts(nested_run(100), 4)
    assert err.value.cells > 10 * MIN_CELL_BUDGET and err.value.budget == MIN_CELL_BUDGET
    compiler = RunCompiler()
    assert compiler.compile(nested_run(40), 4)[2] == texts
    with pytest.raises(TooManyCells):
        compiler.compile(nested_run(100), 4)
    assert compiler.compile(nested_run(40), 4)[2] == texts
    # Compiled again over a run of the same fields (a patch of the last one's cells, not
    # a tree written whole): counted by the cells the patch moves, refused alike.
    compiler = RunCompiler()
    compiler.compile(nested_run(3), 4)
    with pytest.raises(TooManyCells):
        compiler.compile(nested_run(60), 4)
    assert compiler.compile(nested_run(40), 4)[2] == texts
    # A big address set is its own measure: 100,000 addresses in one box compile.
    many = tuple((2 * v, 2 * v) for v in range(100_000))
    assert len(compile_texts([({"saddr": many, "dport": [(80, 80)]}, "Allow")], 4)[2]) \
        == 100_000
