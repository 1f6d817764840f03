"""The selector language: grammar, canonical form, errors, and compiled evaluation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.selector import SelectorError, parse
from bulkhead.selector.ast import All, BoolOp, Compare, Has, InSet, Node, Not
from bulkhead.selector.parser import MAX_DEPTH, parse_tree

LABELS = {"app": "db", "zone": "restricted", "tier": "backend-v2", "example.com/team": "ops"}


@pytest.mark.parametrize(("text", "expected"), [
    ("", True),
    ("all()", True),
    ("global()", True),
    ("app == 'db'", True),
    ('app == "web"', False),
    ("app != 'web'", True),
    ("missing != 'x'", True),              # != is true when the label is absent
    ("app in {'db', 'cache'}", True),
    ("app in {}", False),
    ("app not in {'db'}", False),
    ("missing not in {'x', 'y'}", True),   # not in is true when the label is absent
    ("has(app)", True),
    ("!has(app)", False),
    ("has(missing)", False),
    ("!has(missing)", True),
    ("tier contains 'end'", True),
    ("tier contains 'front'", False),
    ("missing contains ''", False),
    ("tier starts with 'back'", True),
    ("tier startswith 'back'", True),
    ("tier ends with '-v2'", True),
    ("tier endswith 'v1'", False),
    ("app == 'db' && zone == 'restricted'", True),
    ("app == 'db' && zone == 'dmz'", False),
    ("app == 'web' || zone == 'restricted'", True),
    ("!(app == 'db')", False),
    ("!app == 'db'", False),
    ("!!has(app)", True),
    ("app == 'web' || app == 'db' && zone == 'dmz'", False),   # && binds tighter than ||
    ("(app == 'web' || app == 'db') && zone == 'restricted'", True),
    ("example.com/team == 'ops'", True),
    ("  app   ==   'db'  ", True),
    ("has( app )", True),
    ("all() && app == 'db'", True),
])
def test_grammar(text: str, expected: bool) -> None:
    assert parse(text).matches(LABELS) is expected
    assert parse_tree(text).evaluate(LABELS) is expected


@pytest.mark.parametrize(("text", "canonical"), [
    ("", "all()"),
    ("app=='db'", 'app == "db"'),
    ("app != \"db\"", 'app != "db"'),
    ("a in {'z', 'y', 'z'}", 'a in {"y", "z"}'),
    ("a not in {}", "a not in {}"),
    ("!(has(b) || !has(a))", "!(has(b) || !has(a))"),
    ("a == 'x' && b == 'y' && has(c)", '(a == "x" && b == "y" && has(c))'),
    ("a startswith 'p'", 'a starts with "p"'),
    ("a endswith 'p'", 'a ends with "p"'),
    ("a contains 'say \"hi\"'", "a contains 'say \"hi\"'"),
    ("global()", "global()"),
    ("!!has(a)", "has(a)"),                 # Calico folds a run of ! by parity
    ("!!!has(a)", "!has(a)"),
    ("a notin {'x',}", 'a not in {"x"}'),  # notin and a trailing comma, as Calico accepts
    ("(a == 'b' && c == 'd') && e == 'f'", '((a == "b" && c == "d") && e == "f")'),
])
def test_canonical(text: str, canonical: str) -> None:
    assert str(parse(text)) == canonical
    assert str(parse(canonical)) == canonical


def test_equal_selectors_share_one_object() -> None:
    a, b = parse("app=='db'"), parse('app == "db"')
    assert a == b and hash(a) == hash(b) and a is b
    assert parse("x in {'b','a'}") is parse('x in {"a", "b"}')


@pytest.mark.parametrize(("text", "position", "expected"), [
    ("app ==", 6, "a quoted string"),
    ("app = 'db'", 4, "an operator"),
    ("(app == 'db'", 12, "')'"),
    ("has(app", 7, "')'"),
    ("&& app == 'x'", 0, "a label key"),
    ("app in {'a'", 11, "',' or '}'"),
    ("app == 'db' extra", 12, "'&&', '||' or end of selector"),
    ("app == 'unterminated", 20, "closing '"),
    ("app in 'a'", 7, "'{'"),
])
def test_errors_name_position_and_expectation(text: str, position: int, expected: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse(text)
    assert err.value.position == position
    assert expected in err.value.expected
    assert f"at position {position}" in str(err.value)
    assert isinstance(err.value, ValueError)


# libcalico-go/lib/selector/parser/parser_test.go, `var badSelectors`: every one refused.
CALICO_BAD_SELECTORS = [
    "b == b", "b contains b", "b starts with b", "b ends with b", "'b1' == b", "b", "a b",
    "!", 'foo == "bar" &', 'foo == "bar" |', "foo != ||", 'foo in {"", ||', 'foo in ""',
    '"FOO', "\"FOO'", "'FOO", "(", '(a == "foo"', ")", "()", "%", 'a == "b" && %',
    'a == "b" || %', "a ", "has(foo) &&",
]


@pytest.mark.parametrize("text", CALICO_BAD_SELECTORS)
def test_calico_bad_selectors_are_refused(text: str) -> None:
    with pytest.raises(SelectorError):
        parse(text)


@pytest.mark.parametrize(("text", "position", "expected"), [
    # tokenizer.go trimWhitespace skips ' ' and '\t' only: a newline is no separator
    ("app == 'db'\n", 11, "only spaces and tabs may separate tokens"),
    ("app == 'db' &&\nhas(zone)", 14, "only spaces and tabs may separate tokens"),
    ("\n", 0, "only spaces and tabs"),
    # tokenizer.go: strings.CutPrefix(input, "has(") / "all(" / "global(": no space before (
    ("has (app)", 4, "an operator after the label key"),
    ("all ()", 4, "an operator after the label key"),
])
def test_calico_tokenizer_rules(text: str, position: int, expected: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse(text)
    assert err.value.position == position and expected in err.value.expected


@pytest.mark.parametrize("text", [
    "\tapp == 'db'\t&&\thas( app )",   # tabs separate tokens, as spaces do (tokenizer.go)
    "tier starts\twith 'back'",          # cutMultiWordPrefixCheckBreak trims between words
    "app == 'a\nb' || all( )",          # a newline inside a string is just a character
])
def test_calico_tokenizer_accepts(text: str) -> None:
    assert parse(text).matches(LABELS)


def test_nesting_is_bounded() -> None:
    deep = "(" * (MAX_DEPTH + 1) + "a == 'b'" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(SelectorError, match="levels of nesting"):
        parse(deep)
    ok = "(" * (MAX_DEPTH - 1) + "a == 'b'" + ")" * (MAX_DEPTH - 1)
    assert parse(ok).matches({"a": "b"})


def test_label_keys_are_at_most_512_characters() -> None:
    assert parse("k" * 512 + " == 'v'").matches({"k" * 512: "v"})
    with pytest.raises(SelectorError, match="at most 512 characters"):
        parse("k" * 513 + " == 'v'")


def test_non_string_is_a_selector_error() -> None:
    with pytest.raises(SelectorError):
        parse(42)  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------
KEYS = st.sampled_from(["a", "b", "c", "x.y/z", "k-1"])
VALUES = st.sampled_from(["", "v", "w", "vw", "x\"y", "v w"])


def _leaf() -> st.SearchStrategy[Node]:
    return st.one_of(
        st.just(All()),
        KEYS.map(Has),
        st.builds(Compare, KEYS, st.sampled_from(Compare.OPS), VALUES),
        st.builds(lambda k, vs, n: InSet(k, tuple(sorted(set(vs))), n), KEYS,
                  st.lists(VALUES, max_size=3), st.booleans()),
    )


TREES: st.SearchStrategy[Node] = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        inner.map(Not),
        st.builds(lambda ops, o: BoolOp(o, tuple(ops)), st.lists(inner, min_size=2, max_size=3),
                  st.sampled_from(["&&", "||"])),
    ),
    max_leaves=12,
)
LABEL_SETS = st.dictionaries(KEYS, VALUES, max_size=5)


@settings(max_examples=400, deadline=None)
@given(TREES, st.lists(LABEL_SETS, min_size=1, max_size=5))
def test_canonical_text_round_trips(tree: Node, label_sets: list[dict[str, str]]) -> None:
    selector = parse(tree.canonical())
    again = parse(str(selector))
    assert str(again) == str(selector)
    for labels in label_sets:
        assert again.matches(labels) == selector.matches(labels) == tree.evaluate(labels)


@settings(max_examples=400, deadline=None)
@given(TREES, LABEL_SETS)
def test_compiled_agrees_with_naive_walk(tree: Node, labels: dict[str, str]) -> None:
    assert parse(tree.canonical()).matches(labels) == tree.evaluate(labels)


SELECTOR_ALPHABET = st.sampled_from(
    [*"abc ()!&|=\"'{},._/-", "has(", "all()", "in", "not", "contains", "starts with",
     "global()", "==", "!=", "&&", "||"])


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(SELECTOR_ALPHABET, max_size=25).map("".join)))
def test_parser_raises_only_selector_error(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorError:
        return
    assert str(parse(str(selector))) == str(selector)


def test_parsed_selectors_kept_are_bounded_by_their_text() -> None:
    """Selectors come from clients too (`?selector=`, up to 4,096 characters), and a
    compiled one costs about 24 bytes per character: the cache keeps at most CACHE_CHARS
    characters of them (a count alone let 8,192 long ones hold 800 MB), and the intern
    table only what something else still holds."""
    import gc
    import tracemalloc

    import bulkhead.selector as sel

    def long_one(i: int) -> str:
        return " || ".join(f"k{j} == 'v{i}-{j}'" for j in range(200))   # about 4,000 chars

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1500):
            sel.parse(long_one(i))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sel._cached_chars <= sel.CACHE_CHARS
    assert len(sel._CACHE) < 1500
    assert sum(len(c) > 3000 for c in list(sel._INTERNED.keys())) <= len(sel._CACHE)
    # 1,500 of them held would be about 140 MiB; the bound keeps about 1 MiB of text.
    assert kept < 64 * 2**20, kept
    # What is still cached is still shared: the same text, the same object.
    last = long_one(1499)
    assert sel.parse(last) is sel.parse(last)
