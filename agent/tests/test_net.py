"""`bulkhead.net`: addresses as integer spans per family, checked against `ipaddress` and
netaddr (which the plan and the renderer used before)."""

from __future__ import annotations

import ipaddress
import itertools

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.net import (
    AddressSet,
    address_text,
    cidr_blocks,
    contains,
    intersection,
    merge,
    parse_network,
    parse_spans,
    separated,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("198.18.0.1", (4, 0xC6120001, 0xC6120001)),
    ("198.18.0.0/15", (4, 0xC6120000, 0xC613FFFF)),
    ("198.18.0.7/24", (4, 0xC6120000, 0xC61200FF)),      # host bits cleared
    ("0.0.0.0/0", (4, 0, 2**32 - 1)),
    ("2001:2::/48", (6, 0x20010002 << 96, (0x20010002 << 96) | (2**80 - 1))),
    ("::ffff:1.2.3.4", (6, 0xFFFF01020304, 0xFFFF01020304)),
])
def test_parse_network(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_network(text) == expected


def test_a_single_address_is_one_int_and_spans_are_tuples() -> None:
    """What a plan keeps per endpoint, small: a single address's span holds one int
    twice, the spans of a family are a tuple (smaller than a list; an empty one is
    shared)."""
    for text in ("198.18.8.1", "2001:2::1"):
        _, first, last = parse_network(text)
        assert first is last
    v4, v6 = parse_spans(["198.18.8.1", "198.18.0.0/24"])
    assert v4 == ((0xC6120801, 0xC6120801), (0xC6120000, 0xC61200FF)) and v6 == ()
    assert type(v4) is tuple and type(v6) is tuple


@pytest.mark.parametrize("bad", ["", "1.2.3", "01.2.3.4", "1.2.3.256", "1.2.3.4/33",
                                 "1.2.3.4/+8", "1.2.3.4/08", "1.2.3.4/", "::/129", "fe80::1%eth0",
                                 "web"])
def test_parse_network_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_network(bad)


def test_address_text_is_what_nft_and_netaddr_write() -> None:
    for text in ("::", "::1", "1::", "1:0:0:1::1", "1::1:1:0:0:1", "::ffff:1.2.3.4",
                 "::1.2.3.4", "2001:db8::", "1:0:1:1:1:1:1:1"):
        value = int(ipaddress.IPv6Address(text))
        assert address_text(value, 6) == str(netaddr.IPAddress(value, 6)) == text
    assert address_text(0xC6120001, 4) == "198.18.0.1"
    with pytest.raises(ValueError):
        address_text(2**32, 4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 6))))
def test_merge_gives_the_same_addresses_as_sorted_separated_spans(
        given_spans: list[tuple[int, int]]) -> None:
    spans = [(lo, lo + width) for lo, width in given_spans]
    merged = merge(spans)
    covered = {v for lo, hi in spans for v in range(lo, hi + 1)}
    assert {v for lo, hi in merged for v in range(lo, hi + 1)} == covered
    # Sorted, and neither overlapping nor touching: two spans have a gap between them.
    assert all(lo <= hi for lo, hi in merged)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(merged))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 2)), max_size=8))
def test_separated_spans_are_merged_as_they_are(given_spans: list[tuple[int, int]]) -> None:
    """`separated` is "a gap between each span and the next"; such spans are what
    merge answers (sorted), the same span objects."""
    spans = sorted((lo, lo + width) for lo, width in given_spans)
    assert separated(spans) == all(a[1] + 1 < b[0] for a, b in itertools.pairwise(spans))
    if separated(spans):
        assert all(a is b for a, b in zip(merge(reversed(spans)), spans, strict=True))


def test_spans() -> None:
    assert merge([(5, 9), (1, 2), (3, 3), (11, 12)]) == ((1, 3), (5, 9), (11, 12))
    assert intersection(((1, 5), (8, 20)), ((4, 9), (15, 30))) == ((4, 5), (8, 9), (15, 20))
    assert [contains(((1, 5), (8, 20)), v) for v in (0, 1, 6, 20, 21)] == [
        False, True, False, True, False]
    assert list(cidr_blocks((0, 2**32 - 1), 4)) == [(0, 0)]
    assert list(cidr_blocks((1, 6), 4)) == [(1, 32), (2, 31), (4, 31), (6, 32)]


def test_an_address_set_keeps_families_apart() -> None:
    s = AddressSet.of(["198.18.0.1", "198.18.0.0/31", "2001:2::/127", "2001:2::2"])
    assert s.v4 == ((0xC6120000, 0xC6120001),) and len(s.v6) == 1
    assert list(s.texts(4)) == ["198.18.0.0/31"]
    assert list(s.texts(6)) == ["2001:2::/127", "2001:2::2"]
    assert not AddressSet.of([]) and AddressSet.union([s, AddressSet.of(["10.0.0.0/8"])]).v4[0] \
        == (0x0A000000, 0x0AFFFFFF)


v4_nets = st.tuples(st.integers(0, 2**32 - 1), st.integers(16, 32)).map(
    lambda t: f"{ipaddress.IPv4Address(t[0])}/{t[1]}")
v6_nets = st.tuples(st.integers(0, 2**128 - 1), st.integers(100, 128)).map(
    lambda t: f"{ipaddress.IPv6Address(t[0])}/{t[1]}")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(v4_nets, v6_nets), max_size=12))
def test_the_cidrs_of_a_set_are_netaddrs(texts: list[str]) -> None:
    """The fewest CIDRs, in order, written as netaddr writes them: what the renderer
    wrote when it went through `netaddr.IPSet(...).iter_cidrs()`."""
    s = AddressSet.of(texts)
    want = [c for c in netaddr.IPSet(texts).iter_cidrs()]
    got = [*s.texts(4), *s.texts(6)]
    assert got == [str(c.ip) if c.size == 1 else str(c.cidr) for c in want]
