"""Element batches over netlink: the encoding (pure), and equivalence with `nft -f` on a
real kernel, in network namespaces of the test's own."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables import Chain, NftSet, Ruleset, render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.dataplane.nftables.netlink import (
    NFT_SET_ELEM_INTERVAL_END,
    Change,
    Element,
    NftNetlink,
    Unsupported,
    _differing,
    encode_set,
    encode_units,
    in_kernel_order,
    set_changes,
)
from bulkhead.dataplane.nftables.vmap import (
    address_range,
    compile_run,
    element_text,
    field_type,
)
from bulkhead.netlink import NetlinkError
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import base, hep, snap

END = NFT_SET_ELEM_INTERVAL_END
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


# ------------------------------------------------------------------------- encoding
def test_interval_sets_get_start_and_end_elements_as_nft_sends_them() -> None:
    s = NftSet("s", "ipv4_addr", ("interval",),
               ("10.0.0.0/24", "10.0.1.0/25", "10.0.3.5", "255.255.255.0/24"))
    got = encode_set(s)
    assert got == {
        Element(bytes(4), END),                     # the gap below the first interval
        Element(bytes([10, 0, 0, 0])), Element(bytes([10, 0, 1, 0]), END),
        Element(bytes([10, 0, 1, 0])), Element(bytes([10, 0, 1, 128]), END),   # adjacent
        Element(bytes([10, 0, 3, 5])), Element(bytes([10, 0, 3, 6]), END),
        Element(bytes([255, 255, 255, 0])),         # runs to the top: no end element
    }


def test_a_protocol_map_starting_at_zero_has_no_leading_end() -> None:
    m = NftSet("m", "inet_proto", ("interval",), ("0-5 : accept", "6 : drop", "7-255 : return"),
               map_to="verdict")
    assert encode_set(m) == {
        Element(b"\x00", verdict=("accept", "")), Element(b"\x06", END),
        Element(b"\x06", verdict=("drop", "")), Element(b"\x07", END),
        Element(b"\x07", verdict=("return", ""))}


def test_concatenations_pad_each_field_to_four_bytes() -> None:
    m = NftSet("m", "inet_proto . inet_service . ipv4_addr", ("interval",),
               ("17 . 0-65535 . 198.18.0.0/31 : drop",), map_to="verdict")
    (e,) = encode_set(m)
    assert e.key == b"\x11\0\0\0" + b"\0\0\0\0" + bytes([198, 18, 0, 0])
    assert e.key_end == b"\x11\0\0\0" + b"\xff\xff\0\0" + bytes([198, 18, 0, 1])
    hashed = NftSet("n", "ipv6_addr . inet_proto . inet_service", (), ("2001:2::1 . 6 . 80",))
    (h,) = encode_set(hashed)
    assert h.key_end is None and len(h.key) == 16 + 4 + 4 and h.key[-4:] == b"\0P\0\0"


def test_interface_maps_and_verdicts() -> None:
    m = NftSet("ep", "ifname", (), ('"eth0" : jump e_1', '"eth1" : goto e_2'),
               map_to="verdict")
    assert encode_set(m) == {Element(b"eth0".ljust(16, b"\0"), verdict=("jump", "e_1")),
                             Element(b"eth1".ljust(16, b"\0"), verdict=("goto", "e_2"))}


@pytest.mark.parametrize("nft_set", [
    NftSet("a", "ether_addr", (), ("00:11:22:33:44:55",)),
    NftSet("b", "ipv4_addr", ("interval", "timeout"), ("10.0.0.1",)),
    NftSet("c", "ipv4_addr", (), ("10.0.0.0/24",)),          # a range without intervals
    NftSet("d", "ipv4_addr", ("interval",), ("10.0.0.0/24", "10.0.0.1")),   # overlap
    NftSet("e", "ifname", (), ('"eth*" : accept',), map_to="verdict"),
    NftSet("f", "inet_service", (), ("80 : 10.0.0.1",), map_to="ipv4_addr"),
    NftSet("g", "inet_proto", (), ("tcp",)),
])
def test_what_is_not_encoded_says_so(nft_set: NftSet) -> None:
    with pytest.raises(Unsupported):
        encode_set(nft_set)


def test_changes_are_only_the_elements_that_differ() -> None:
    old = NftSet("s", "ipv4_addr", ("interval",), ("10.0.0.0/24", "10.0.2.0/24"))
    new = NftSet("s", "ipv4_addr", ("interval",), ("10.0.0.0/24", "10.0.3.0/24"))
    (change,) = set_changes([old], [new])
    assert change.delete == (Element(bytes([10, 0, 2, 0])), Element(bytes([10, 0, 3, 0]), END))
    assert change.add == (Element(bytes([10, 0, 3, 0])), Element(bytes([10, 0, 4, 0]), END))
    assert set_changes([old], [old]) == []


# ------------------------------------------------------------------- on a real kernel
def _netns() -> str:
    name = f"bhnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


@pytest.fixture(scope="module")
def two_netns() -> Iterator[tuple[str, str]]:
    names = (_netns(), _netns())
    try:
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], check=False)


def nft(ns: str, *args: str, script: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=script, text=True,
                          capture_output=True, check=True).stdout


def listing(ns: str) -> str:
    return nft(ns, "list", "table", "inet", "t")


def unordered(text: str) -> str:
    """A listing with each set's elements sorted: a concatenated interval set lists its
    elements in the order they were added, which differs between ways of adding them."""
    def sort(m: re.Match[str]) -> str:
        items = sorted(item.strip() for item in m.group(1).split(","))
        return "elements = { " + ", ".join(items) + " }"
    return re.sub(r"elements = \{(.*?)\}", sort, text, flags=re.DOTALL)


TOPS = {"inet_proto": 255, "inet_service": 65535, "ipv4_addr": 2**32 - 1,
        "ipv6_addr": 2**128 - 1}


def reaches_top(set_type: str, key: str) -> bool:
    """Whether a field of an element key runs to the top of its type ("7-255")."""
    for typ, text in zip(set_type.split(" . "), key.split(" . "), strict=True):
        if typ not in TOPS:
            continue
        last = text.rpartition("-")[2]
        value = int(last) if typ in ("inet_proto", "inet_service") else \
            int(ipaddress.ip_network(last, strict=False).broadcast_address)
        if value == TOPS[typ]:
            return True
    return False


def element_keys(listing_text: str) -> dict[str, set[str]]:
    """Each set's element keys in a listing (verdicts left out)."""
    keys: dict[str, set[str]] = {}
    for name, body in re.findall(r"(?:set|map) (\S+) \{(.*?)\n\t\}", listing_text,
                                 flags=re.DOTALL):
        found = re.search(r"elements = \{(.*?)\}", body, flags=re.DOTALL)
        keys[name] = {e.split(" : ")[0].strip() for e in found.group(1).split(",")} \
            if found else set()
    return keys


def test_reaches_top_and_element_keys() -> None:
    assert reaches_top("inet_proto", "7-255") and not reaches_top("inet_proto", "7-254")
    assert reaches_top("ipv4_addr . inet_service", "10.0.0.1 . 1-65535")
    assert reaches_top("ipv4_addr", "255.255.255.0/24") and not reaches_top("ifname", '"x"')
    assert element_keys("\tmap p {\n\t\ttype inet_proto : verdict\n\t\telements = "
                        "{ 1 : accept, 255 : drop }\n\t}\n\tset e {\n\t\ttype ifname\n\t}") \
        == {"p": {"1", "255"}, "e": set()}


def _intervals(top: int, count: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Disjoint (possibly adjacent) inclusive intervals, near 0, near `top`, in between."""
    anchors = [0, top // 2, top - 40]
    point = st.tuples(st.sampled_from(anchors), st.integers(0, 40)).map(lambda t: t[0] + t[1])
    spans = st.lists(st.tuples(point, st.integers(0, 9)), max_size=count)

    def disjoint(raw: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for lo, width in sorted(raw):
            hi = min(lo + width, top)
            if out and lo <= out[-1][1]:
                continue
            out.append((lo, hi))
        return out
    return spans.map(disjoint)


@st.composite
def tables(draw: st.DrawFn) -> dict[str, NftSet]:
    """One of each kind of set the renderer writes, with random elements."""
    sets: dict[str, NftSet] = {}
    for version in (4, 6):
        top = 2 ** (32 if version == 4 else 128) - 1
        ivs = draw(_intervals(top, 6))
        sets[f"s{version}"] = NftSet(f"s{version}", f"ipv{version}_addr", ("interval",),
                                     tuple(address_range(lo, hi, version) for lo, hi in ivs))
        # A verdict map the way the renderer compiles a run of rules.
        field = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)).map(
            lambda t: (t[0], t[0] + t[1])), min_size=1, max_size=2)
        boxes = draw(st.lists(st.tuples(
            st.fixed_dictionaries({"proto": field.map(lambda iv: [(a + 4, b + 4) for a, b in iv]),
                                   "dport": field, "saddr": field}),
            st.sampled_from(["Allow", "Deny", "Pass"])), min_size=1, max_size=4))
        run = compile_run(boxes, version)
        sets[f"m{version}"] = NftSet(
            f"m{version}", " . ".join(field_type(f, version) for f in run.fields),
            ("interval",), tuple(element_text(run, version)), map_to="verdict")
        hosts = draw(st.sets(st.integers(1, 30), max_size=5))
        prefix = "198.18.0." if version == 4 else "2001:2::"
        sets[f"np{version}"] = NftSet(
            f"np{version}", f"ipv{version}_addr . inet_proto . inet_service",
            elements=tuple(f"{prefix}{h} . {6 + 11 * (h % 2)} . {1000 + h}" for h in hosts))
    protos = draw(_intervals(255, 4))
    sets["p"] = NftSet("p", "inet_proto", ("interval",), tuple(
        f"{lo}-{hi} : accept" if lo != hi else f"{lo} : drop" for lo, hi in protos),
        map_to="verdict")
    ports = draw(st.sets(st.integers(1, 65535), max_size=4))
    sets["fs"] = NftSet("fs", "inet_proto . inet_service",
                        elements=tuple(f"6 . {p}" for p in sorted(ports)))
    ifaces = draw(st.dictionaries(st.sampled_from(["eth0", "eth1", "veth-a", "ens3"]),
                                  st.sampled_from(["jump c1", "jump c2", "goto c1", "drop"]),
                                  max_size=3))
    sets["ep"] = NftSet("ep", "ifname", map_to="verdict",
                        elements=tuple(f'"{i}" : {v}' for i, v in sorted(ifaces.items())))
    # Sorted as text, as the renderer writes them (NftSet's contract).
    return {name: replace(s, elements=tuple(sorted(s.elements))) for name, s in sets.items()}


def _ruleset(sets: dict[str, NftSet]) -> Ruleset:
    rs = Ruleset("t", sets=dict(sets))
    rs.chains = {"c1": Chain("c1", ()), "c2": Chain("c2", ())}
    return rs


@given(st.lists(st.sets(st.integers(0, 40)), min_size=2, max_size=2), st.integers(1, 5))
def test_trimming_common_runs_keeps_every_difference(pair: list[set[int]], chunk: int) -> None:
    old, new = (tuple(f"e{i:02d}" for i in sorted(s)) for s in pair)
    a, b = _differing(old, new, chunk)
    assert set(a) - set(b) == set(old) - set(new) and set(b) - set(a) == set(new) - set(old)
    assert len(a) <= len(old) and len(b) <= len(new)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tables(), tables())
def test_changes_from_the_changed_texts_equal_those_from_whole_sets(
        old: dict[str, NftSet], new: dict[str, NftSet]) -> None:
    """set_changes encodes only the texts that changed; the result is what comparing the
    two whole encodings gives."""
    got = {c.set_name: c for c in set_changes(old.values(), new.values())}
    for name, s in new.items():
        was, now = encode_units(old[name]), encode_units(s)
        delete = in_kernel_order(e for u in was - now for e in u)
        add = in_kernel_order(e for u in now - was for e in u)
        change = got.get(name, Change(name))
        assert (change.delete, change.add) == (delete, add)


@root
# No shrinking: every step is a kernel round trip, and shrinking takes minutes.
@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(tables(), min_size=2, max_size=3))
def test_netlink_changes_list_as_nft_f_does(two_netns: tuple[str, str],
                                            states: list[dict[str, NftSet]]) -> None:
    """The same element changes sent as a netlink batch in one namespace and by `nft -f`
    in the other (an element script, then the new table loaded whole) hold the same
    elements, so the next change starts from the elements `nft` would have made.
    Several changes in a row, so a batch also starts from a batch's result."""
    via_netlink, via_nft = two_netns
    first = _ruleset(states[0])
    for ns in two_netns:
        nft(ns, "-f", "-", script=first.script())
    previous = first
    for state in states[1:]:
        current = _ruleset(state)
        with NftNetlink(via_netlink) as nl:
            nl.apply("t", set_changes(previous.sets.values(), current.sets.values()))
        script = current.element_script(previous)
        if script:
            nft(via_nft, "-f", "-", script=script)
        by_elements = unordered(listing(via_nft))
        nft(via_nft, "-f", "-", script=current.script())
        whole = unordered(listing(via_nft))
        got = unordered(listing(via_netlink))
        assert got == whole
        # Where nft's own two ways disagree, its element script is the one at fault:
        # nft 1.0.6 sends an empty deletion for an interval that reaches the field's top
        # (`delete element ... { 255 }` from an inet_proto interval map leaves it there).
        # That is the only difference allowed: elements left over, each reaching the top,
        # in a set the script deleted from.
        if by_elements != whole:
            drop = r"\s*elements = \{.*?\}"
            assert re.sub(drop, "", by_elements, flags=re.DOTALL) == \
                re.sub(drop, "", whole, flags=re.DOTALL)
            deleted_from = set(re.findall(r"^delete element inet t (\S+) ", script, re.M))
            have, want = element_keys(by_elements), element_keys(whole)
            for name, keys in have.items():
                assert keys >= want[name], (name, want[name] - keys)
                left = keys - want[name]
                assert not left or name in deleted_from, (name, left)
                assert all(reaches_top(current.sets[name].type, k) for k in left), (name, left)
        previous = current


@root
def test_a_batch_is_all_or_nothing(two_netns: tuple[str, str]) -> None:
    ns = two_netns[0]
    sets = {"s": NftSet("s", "ipv4_addr", ("interval",), ("198.18.0.1",)),
            "n": NftSet("n", "ipv4_addr . inet_proto . inet_service", (), ("198.18.0.1 . 6 . 80",))}
    rs = _ruleset(sets)
    nft(ns, "-f", "-", script=rs.script())
    before = listing(ns)
    good = Change("s", add=in_kernel_order(
        encode_set(NftSet("x", "ipv4_addr", ("interval",), ("198.18.0.9",)))
        - encode_set(sets["s"])))
    missing = Change("n", delete=tuple(encode_set(
        NftSet("x", "ipv4_addr . inet_proto . inet_service", (), ("198.18.0.2 . 6 . 80",)))))
    with NftNetlink(ns) as nl, pytest.raises(NetlinkError, match=r"No such file.*set n"):
        nl.apply("t", [good, missing])
    assert listing(ns) == before
    with NftNetlink(ns) as nl:
        generation = nl.generation()
        with pytest.raises(NetlinkError, match="generation"):
            nl.apply("t", [good], generation - 1)
        assert listing(ns) == before
        assert nl.apply("t", [good], generation) == 1
        assert nl.generation() == generation + 1
    assert "198.18.0.9" in listing(ns)


@root
def test_the_applier_sends_label_changes_over_netlink(two_netns: tuple[str, str]) -> None:
    ns = two_netns[0]
    web2 = hep("web2", "n3", "198.18.0.13", {"app": "web"})
    applier = NftApplier(netns=ns)
    first = render(calculate(snap(*base(), web2), "n1", {}, Failsafes.off()))
    assert applier.apply(first).via == "nft"
    with NftNetlink(ns) as nl:
        shape = nl.fingerprint("bulkhead")
        assert shape is not None and nl.fingerprint("nosuchtable") is None
    moved = render(calculate(snap(*base({"app": "cache"}), web2), "n1", {}, Failsafes.off()))
    result = applier.apply(moved)
    assert (result.full, result.changed, result.via) == (False, True, "netlink")
    with NftNetlink(ns) as nl:
        assert nl.fingerprint("bulkhead") == shape   # elements are not part of it
        nft(ns, "add", "rule", "inet", "bulkhead", "input", "accept")
        assert nl.fingerprint("bulkhead") != shape
    assert applier.drifted() == "table inet bulkhead was changed outside the agent"
    assert applier.apply(moved).full
    assert applier.drifted() is None
    assert "198.18.0.11" not in nft(ns, "list", "table", "inet", "bulkhead")
    assert applier.diff(moved) == ""
    assert applier.apply(first).via == "netlink"
    # An element removed by hand: the next batch's delete fails (nothing of it applies),
    # and the table is replaced whole instead.
    name, element = next((n, e) for n, s in first.sets.items() for e in s.elements
                         if "198.18.0.11" in e)
    # In the kernel, the set's name has the suffix of the last full apply (replace.py).
    name = next(n for n in applier.kernel_table().sets if n.startswith(name + "_g"))
    nft(ns, "delete", "element", "inet", "bulkhead", name, "{ " + element.split(" : ")[0] + " }")
    again = applier.apply(moved)
    assert again.full and again.via == "nft"
    assert applier.diff(moved) == ""


@root
def test_with_netlink_off_elements_go_through_nft(two_netns: tuple[str, str]) -> None:
    ns = two_netns[1]
    applier = NftApplier(netns=ns, netlink=False)
    applier.apply(render(calculate(snap(*base()), "n1", {}, Failsafes.off())))
    moved = render(calculate(snap(*base({"app": "cache"})), "n1", {}, Failsafes.off()))
    assert applier.apply(moved).via == "nft"
    assert applier.diff(moved) == ""
    assert applier.generation() is None


@root
def test_a_batch_of_many_messages_gets_all_its_answers(two_netns: tuple[str, str]) -> None:
    """Every message of a batch is answered; 1,500 answers overflow a socket's default
    receive buffer (ENOBUFS, and the applier would fall back to `nft -f`): the buffer is
    sized to the batch."""
    ns = two_netns[0]
    count = 1500
    sets = {f"s{i}": NftSet(f"s{i}", "ipv4_addr", ("interval",), ("198.18.0.1",))
            for i in range(count)}
    nft(ns, "-f", "-", script=_ruleset(sets).script())
    grown = NftSet("x", "ipv4_addr", ("interval",), ("198.18.0.1", "198.18.1.7"))
    added = in_kernel_order(encode_set(grown) - encode_set(sets["s0"]))
    with NftNetlink(ns) as nl:
        assert nl.apply("t", [Change(name, add=added) for name in sets]) == count
    assert listing(ns).count("198.18.1.7") == count
