"""`Elements` (a sorted list kept as a patch of an earlier one) against plain sorted
tuples: every version reads as the texts it stands for, `delta` between two versions is
the set difference (or None when they share no root), and the element changes the
applier sends from patched lists are the ones whole lists give."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables.netlink import encode_units, in_kernel_order, set_changes
from bulkhead.dataplane.nftables.ruleset import Elements, NftSet, delta

TEXTS = st.sampled_from([f"198.18.{i // 256}.{i % 256}" for i in range(0, 600, 7)]
                        + ["0.0.0.0/8", "198.18.9.0/24"])


@settings(max_examples=300, deadline=None, database=None)
@given(st.sets(TEXTS, max_size=60),
       st.lists(st.tuples(st.sets(TEXTS, max_size=8), st.sets(TEXTS, max_size=8)),
                max_size=40))
def test_patched_lists_read_as_their_texts(start: set[str],
                                           steps: list[tuple[set[str], set[str]]]) -> None:
    versions: list[tuple[Sequence[str], set[str]]] = [(tuple(sorted(start)), set(start))]
    for gone, came in steps:
        elements, model = versions[-1]
        gone = gone & model                 # what the compiler takes out it had,
        came = came - model | (gone & came)  # what it puts in it lacked (or put back)
        versions.append((Elements.patched(elements, gone, came), (model - gone) | came))
    for elements, model in versions:
        texts = tuple(sorted(model))
        assert len(elements) == len(texts)
        assert tuple(elements) == texts
        assert elements == texts
        assert all((t in elements) == (t in model) for t in ("0.0.0.0/8", "198.18.0.7"))
    # Two versions that share a root: delta is exact; the next version of one always
    # shares it (or starts from its texts).
    for k, (a, was) in enumerate(versions):
        for m, (b, now) in enumerate(versions):
            got = delta(a, b)
            assert got is None or got == (frozenset(was - now), frozenset(now - was))
            if m == k + 1 and len(now ^ was) <= 64:
                assert got is not None


def test_a_small_change_to_a_big_list_is_a_patch_and_delta_knows_it() -> None:
    big = tuple(sorted(f"198.18.{i // 256}.{i % 256}" for i in range(20_000)))
    one = Elements.patched(big, ["198.18.0.5"], ["198.19.0.1"])
    two = Elements.patched(one, ["198.19.0.1"], ["198.19.0.2"])
    assert one.root is big and two.root is big and one._texts is None
    assert delta(one, two) == (frozenset({"198.19.0.1"}), frozenset({"198.19.0.2"}))
    assert delta(big, two) == (frozenset({"198.18.0.5"}), frozenset({"198.19.0.2"}))
    assert delta(big, tuple(list(big))) is None    # another list: compared as texts
    assert len(two) == 20_000 and two._texts is None


def test_set_changes_from_patched_lists_equal_those_from_whole_lists() -> None:
    texts = [f"198.18.{i // 256}.{i % 256}" for i in range(0, 3000, 3)]
    base = NftSet("s", "ipv4_addr", ("interval",), tuple(sorted(texts)))
    patched = Elements.patched(base.elements, texts[10:13], ["198.19.0.0/16", "0.0.0.0/8"])
    new = NftSet("s", "ipv4_addr", ("interval",), patched)
    whole = NftSet("s", "ipv4_addr", ("interval",), tuple(patched))
    for got in (set_changes([base], [new]), set_changes([base], [whole])):
        was, now = encode_units(base), encode_units(whole)
        assert [(c.delete, c.add) for c in got] == [
            (in_kernel_order(e for u in was - now for e in u),
             in_kernel_order(e for u in now - was for e in u))]


def test_a_patch_naming_texts_it_cannot_move_moves_only_what_it_can() -> None:
    """Taking out a text not held, or putting in one held, changes nothing: the
    applier's delta never names an element that is not in one of the two lists."""
    root = ("a", "b", "c")
    one = Elements.patched(root, ["zz", "a"], ["b", "d"])
    assert tuple(one) == ("b", "c", "d") and len(one) == 3
    two = Elements.patched(one, ["a", "d"], ["c", "e"])
    assert tuple(two) == ("b", "c", "e") and len(two) == 3
    assert delta(one, two) == (frozenset({"d"}), frozenset({"e"}))
    assert delta(root, two) == (frozenset({"a"}), frozenset({"e"}))
    assert Elements.patched(root, [], []) == root and Elements(root, frozenset(),
                                                                 frozenset()) != "abc"
