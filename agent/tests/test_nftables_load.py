"""A whole table loaded as one netlink batch (`load.py`): its elements encoded as the
netlink encoder encodes them, the kernel holding what `nft -f` of the same script makes,
enforcing the same, and `nft -f` taking over whenever the batch fails."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables import Chain, NftSet, Ruleset, render
from bulkhead.dataplane.nftables import load as load_module
from bulkhead.dataplane.nftables.apply import NftApplier, NftError
from bulkhead.dataplane.nftables.load import (
    BIG_SET,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_POLICY,
    StagingError,
    _attributes,
    _recreate,
    element_attrs,
    load,
    staging,
)
from bulkhead.dataplane.nftables.netlink import (
    MESSAGE_BYTES,
    NftNetlink,
    Unsupported,
    _element_attr,
    encode_set,
)
from bulkhead.dataplane.nftables.render import FlowLogging
from bulkhead.dataplane.nftables.ruleset import Elements
from bulkhead.netlink import NetlinkError, NetlinkSocket
from bulkhead.netlink import attr as _attr
from bulkhead.netlink import string as _string
from bulkhead.policy import Failsafes
from bulkhead.policy.failsafe import FailsafePort
from bulkhead.policy.plan import calculate
from tests.nftfixture import UNTRACKED_DB, base, gnp, hep, snap
from tests.test_netlink import _ruleset, tables, unordered
from tests.test_notrack import CLIENT, SERVER, pair, run

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
__all__ = ["pair"]   # the fixture, used by name


# ----------------------------------------------------------------------- encoding
def split(pieces: list[bytes]) -> list[bytes]:
    """The element attributes in `pieces`, each piece checked to hold whole ones."""
    out = []
    for piece in pieces:
        assert 0 < len(piece) <= MESSAGE_BYTES
        elements = list(_attributes(piece))
        assert sum(len(raw) for _, raw in elements) == len(piece)
        out += [raw for _, raw in elements]
    return out


VERDICTS = ["accept", "drop", "return", "jump c1", "goto c2"]


@st.composite
def big_sets(draw: st.DrawFn) -> NftSet:
    """A set or verdict map without intervals whose last field is an address."""
    version = draw(st.sampled_from([4, 6]))
    address = st.integers(0, 2 ** (32 if version == 4 else 128) - 1).map(
        lambda n: str(ipaddress.IPv6Address(n) if version == 6 else ipaddress.IPv4Address(n)))
    leading = draw(st.sampled_from([[], ["inet_proto"], ["inet_proto", "inet_service"],
                                    ["inet_service"], ["ifname"]]))
    value = {"inet_proto": st.sampled_from(["6", "17", "0", "255"]),
             "inet_service": st.sampled_from(["0", "80", "6000", "65535"]),
             "ifname": st.sampled_from(['"eth0"', '"veth-a"'])}
    is_map = draw(st.booleans())
    keys = draw(st.lists(st.tuples(*(value[t] for t in leading), address), min_size=1,
                         max_size=60, unique=True))
    texts = []
    for key in keys:
        text = " . ".join(key)
        texts.append(f"{text} : {draw(st.sampled_from(VERDICTS))}" if is_map else text)
    typ = " . ".join([*leading, f"ipv{version}_addr"])
    return NftSet("s", typ, elements=tuple(sorted(texts)),
                  map_to="verdict" if is_map else None)


@settings(max_examples=300, deadline=None)
@given(big_sets(), st.randoms())
def test_whole_set_encoding_equals_the_element_encoder(nft_set: NftSet,
                                                       rnd: random.Random) -> None:
    """`element_attrs` (runs cut in C) gives the bytes `encode_set` + `_element_attr`
    give one element at a time, sorted or not, and as a patched list."""
    expected = sorted(_element_attr(e) for e in encode_set(nft_set))
    assert sorted(split(element_attrs(nft_set))) == expected
    shuffled = list(nft_set.elements)
    rnd.shuffle(shuffled)
    assert sorted(split(element_attrs(NftSet(nft_set.name, nft_set.type,
                                             elements=tuple(shuffled),
                                             map_to=nft_set.map_to)))) == expected
    patched = Elements.patched(nft_set.elements[1:], [], nft_set.elements[:1])
    assert sorted(split(element_attrs(NftSet(nft_set.name, nft_set.type, elements=patched,
                                             map_to=nft_set.map_to)))) == expected


def test_a_big_run_is_cut_into_messages_of_whole_elements() -> None:
    texts = tuple(sorted(f"6 . 80 . {ipaddress.IPv4Address(0xC6120000 + i)} : accept"
                         for i in range(5000)))
    nft_set = NftSet("m", "inet_proto . inet_service . ipv4_addr", elements=texts,
                     map_to="verdict")
    pieces = element_attrs(nft_set)
    assert len(pieces) > 1
    assert len(split(pieces)) == 5000


@pytest.mark.parametrize("nft_set", [
    NftSet("i", "ipv4_addr", ("interval",), ("10.0.0.0/8",)),
    NftSet("a", "ipv4_addr", elements=("10.0.0.0/8",)),
    NftSet("b", "ipv4_addr", elements=("10.1.2",)),           # inet_aton would take it
    NftSet("c", "ipv4_addr", elements=("2001:2::1",)),
    NftSet("d", "ipv6_addr", elements=("10.0.0.1",)),
    NftSet("e", "inet_proto . ipv4_addr", elements=("6 . 10.0.0.1 . 7",)),
    NftSet("f", "inet_proto . ipv4_addr", elements=("6 . 10.0.0.1 : accept",)),
    NftSet("g", "inet_proto . ipv4_addr", elements=("6 . 10.0.0.1",), map_to="verdict"),
    NftSet("h", "inet_proto . ipv4_addr", elements=("300 . 10.0.0.1",)),
    NftSet("j", "inet_service", elements=("80",)),
    NftSet("k", "inet_proto . ipv4_addr", elements=("6 . 10.0.0.1 : jump",),
           map_to="verdict"),
    NftSet("l", "ipv4_addr . inet_proto", elements=("10.0.0.1 . 6",)),
    NftSet("m", "ipv4_addr", elements=("10.0.0.1", "10.0.0.2 . 6")),
    NftSet("n", "inet_proto . ipv4_addr", elements=("6 . 10.0.0.1", "6 . 6 . 10.0.0.1")),
])
def test_what_is_not_a_plain_element_is_not_encoded(nft_set: NftSet) -> None:
    with pytest.raises(Unsupported):
        element_attrs(nft_set)


# ------------------------------------------------------------------- on a real kernel
def nft(ns: str, *args: str, script: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=script, text=True,
                          capture_output=True, check=True).stdout


def in_ns(ns: str) -> tuple[str, ...]:
    return ("ip", "netns", "exec", ns, "nft")


@pytest.fixture
def netns2(netns: str) -> Iterator[tuple[str, str]]:
    other = netns + "-b"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        yield netns, other
    finally:
        subprocess.run(["ip", "netns", "delete", other], check=False)


def rulesets() -> dict[str, tuple[list[dict[str, Any]], FlowLogging | None]]:
    """Tables with a big map (`big_store`) and beside it what else the renderer writes:
    selector sets, failsafe sets, untracked raw chains, flow-log counters and logs,
    interval maps, an IPv6 map."""
    web = gnp("web", {"selector": "app == 'db'", "order": 5, "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
         "destination": {"ports": [5432]}},
        {"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
         "destination": {"notPorts": [22]}}]})
    common = [*big_store(), hep("web", "n2", "198.18.0.11", {"app": "web"}), web]
    listed = gnp("listed", {"selector": "app == 'db'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "source": {"nets": [
            f"198.18.{i // 256}.{i % 256}/32" for i in range(0, 600, 3)]},
         "destination": {"ports": [443, 8443]}},
        {"action": "Deny", "protocol": "UDP", "source": {"nets": ["2001:2::1/128",
                                                                  "2001:2::5/128"]}}]})
    return {"plain": (common, None), "untracked": ([*common, UNTRACKED_DB], None),
            "flows": (common, FlowLogging()), "listed": ([*common, listed], None)}


@root
@pytest.mark.parametrize("name", ["plain", "untracked", "flows", "listed"])
def test_a_netlink_load_lists_as_nft_f_does(netns2: tuple[str, str], name: str) -> None:
    """Only the big map encoded here, or every set it can encode: the table a netlink
    load makes lists (text, and JSON without handles) as the one `nft -f` makes."""
    docs, flow_logs = rulesets()[name]
    ruleset = render(calculate(snap(*docs), "n1", {}, Failsafes()), flow_logs=flow_logs)
    assert flow_logs is None or ruleset.counters
    fast, slow = netns2
    for at_least in (BIG_SET, 1):
        with NftNetlink(fast) as nl:
            assert load(nl, ruleset, in_ns(fast), at_least=at_least) > 0
        assert "bulkhead_load" not in nft(fast, "list", "tables")
        nft(slow, "-f", "-", script=ruleset.script())
        assert unordered(nft(fast, "list", "table", "inet", "bulkhead")) == \
            unordered(nft(slow, "list", "table", "inet", "bulkhead"))
        assert normalized_json(fast) == normalized_json(slow)


def normalized_json(ns: str) -> list[str]:
    """The table as `nft -j` lists it, without handles, each set's elements sorted."""
    out = []
    for item in json.loads(nft(ns, "-j", "list", "table", "inet", "bulkhead"))["nftables"]:
        for kind, value in item.items():
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "handle"}
                if "elem" in value:
                    value["elem"] = sorted(json.dumps(e, sort_keys=True) for e in value["elem"])
            out.append(json.dumps({kind: value}, sort_keys=True))
    return sorted(out)


@root
@settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(tables(), big_sets())
def test_random_sets_load_as_nft_f_loads_them(netns2: tuple[str, str],
                                              sets: dict[str, NftSet], big: NftSet) -> None:
    """The element test's random sets of every kind the renderer writes (intervals,
    concatenations, interface maps: copied from the scratch namespace) and a map or set
    encoded here, over an earlier table."""
    ruleset = _ruleset({**sets, "z": dataclasses.replace(big, name="z")})
    # A base chain of policy drop (staged with policy accept, given its own back).
    ruleset.chains["in"] = Chain("in", ("jump c1", "udp dport 9 accept"),
                                 "type filter hook input priority 10; policy drop;")
    fast, slow = netns2
    with NftNetlink(fast) as nl:
        load(nl, ruleset, in_ns(fast), at_least=1)
    assert "t_load" not in nft(fast, "list", "tables")
    nft(slow, "-f", "-", script=ruleset.script())
    assert unordered(nft(fast, "list", "table", "inet", "t")) == \
        unordered(nft(slow, "list", "table", "inet", "t"))


def big_store(extra: int = 0) -> list[dict[str, Any]]:
    """db (198.18.7.2) allows TCP 5001 from a network set of 2,000 addresses that holds
    the client (198.18.7.1), TCP 5003 from one that does not, and nothing on 5002."""
    def netset(name: str, first: int, count: int) -> dict[str, Any]:
        nets = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.7.1")) + i * 2))
                for i in range(first, first + count)]
        return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                "metadata": {"name": name, "labels": {"list": name}}, "spec": {"nets": nets}}
    return [hep("db", "n1", "198.18.7.2", {"app": "db"}), netset("with", 0, 2000 + extra),
            netset("without", 3000, 2000),
            gnp("big", {"selector": "app == 'db'", "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"selector": "list == 'with'"},
                 "destination": {"ports": [5001]}},
                {"action": "Allow", "protocol": "TCP",
                 "source": {"selector": "list == 'without'"},
                 "destination": {"ports": [5003]}}]})]


@root
def test_a_netlink_load_enforces_as_nft_f_does(pair: tuple[str, str]) -> None:
    client, server = pair
    ruleset = render(calculate(snap(*big_store()), "n1", {}, Failsafes.off()))
    assert max(len(s.elements) for s in ruleset.sets.values()) >= 4000
    outcomes = {}
    for netlink in (True, False):
        applier = NftApplier(netns=server, netlink=netlink)
        applier.remove()
        result = applier.apply(ruleset)
        assert result.full and result.via == ("netlink" if netlink else "nft")
        assert not result.fallback
        assert applier.diff(ruleset) == ""
        listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c",
                                     SERVER], stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
            outcomes[netlink] = {port: run(client, sys.executable, "-c", CLIENT,
                                           str(port)).strip() for port in (5001, 5002, 5003)}
        finally:
            listener.kill()
            listener.wait()
        # The element path still works on a table loaded either way.
        moved = render(calculate(snap(*big_store(extra=3)), "n1", {}, Failsafes.off()))
        step = applier.apply(moved)
        assert not step.full and step.via == ("netlink" if netlink else "nft")
        assert applier.drifted() is None
    assert outcomes[True] == outcomes[False] == {5001: "hi", 5002: "blocked",
                                                 5003: "blocked"}


@root
def test_a_refused_batch_applies_nothing_and_nft_takes_over(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    applier = NftApplier(netns=netns)
    first = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    applier.apply(first)
    before = nft(netns, "list", "table", "inet", "bulkhead")
    ruleset = render(calculate(snap(*big_store()), "n1", {}, Failsafes.off()))
    # Rules without their chain: the kernel refuses those messages, last in the batch
    # (after the table was deleted and made again, and the elements were added).
    kept = dict(load_module.KEPT)
    kept[NFT_MSG_NEWRULE] = kept[NFT_MSG_NEWRULE] - {2}
    monkeypatch.setattr(load_module, "KEPT", kept)
    skipped = dict(load_module.SKIPPED)
    skipped[NFT_MSG_NEWRULE] = skipped[NFT_MSG_NEWRULE] | {2}
    monkeypatch.setattr(load_module, "SKIPPED", skipped)
    with NftNetlink(netns) as nl, pytest.raises(NetlinkError):
        load(nl, ruleset, in_ns(netns))
    assert nft(netns, "list", "table", "inet", "bulkhead") == before
    assert "bulkhead_load" not in nft(netns, "list", "tables")
    assert applier.drifted() is None
    # The applier falls back to nft -f for the whole table, and says why.
    result = NftApplier(netns=netns).apply(ruleset)
    assert result.full and result.via == "nft"
    assert result.fallback.startswith("netlink load: the kernel refused the batch")
    assert NftApplier(netns=netns).diff(ruleset) == ""


@root
def test_an_attribute_not_known_is_not_copied(netns: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    skipped = dict(load_module.SKIPPED)
    skipped[NFT_MSG_NEWCHAIN] = skipped[NFT_MSG_NEWCHAIN] - {2}      # the chain's handle
    monkeypatch.setattr(load_module, "SKIPPED", skipped)
    ruleset = render(calculate(snap(*big_store()), "n1", {}, Failsafes.off()))
    with NftNetlink(netns) as nl, pytest.raises(Unsupported, match="attribute 2"):
        load(nl, ruleset, in_ns(netns))
    assert "bulkhead" not in nft(netns, "list", "tables")


@root
def test_a_ruleset_nft_refuses_leaves_the_old_table(netns: str) -> None:
    applier = NftApplier(netns=netns)
    good = render(calculate(snap(*big_store()), "n1", {}, Failsafes.off()))
    assert applier.apply(good).via == "netlink"
    before = nft(netns, "list", "table", "inet", "bulkhead")
    bad = render(calculate(snap(*big_store(extra=1)), "n1", {}, Failsafes.off()))
    bad.chains["input"] = dataclasses.replace(
        bad.chains["input"], rules=(*bad.chains["input"].rules, "ip saddr @no_such_set accept"))
    with NftNetlink(netns) as nl, pytest.raises(StagingError, match="no_such_set"):
        load(nl, bad, in_ns(netns))
    with pytest.raises(NftError, match="no_such_set"):
        applier.apply(bad)
    assert nft(netns, "list", "table", "inet", "bulkhead") == before
    assert applier.drifted() is None


def test_element_attrs_header_layout() -> None:
    """The cut around the address sits where `_element_attr` puts the key's value."""
    (piece,) = element_attrs(NftSet("m", "inet_proto . ipv4_addr",
                                    elements=("6 . 198.18.0.1 : accept",), map_to="verdict"))
    length, kind = struct.unpack_from("=HH", piece)
    assert length == len(piece) and kind & 0x3FFF == 1
    assert piece[12:20] == bytes([6, 0, 0, 0, 198, 18, 0, 1])


def test_the_staging_table_has_no_rules_on_its_hooks() -> None:
    ruleset = Ruleset("bulkhead", sets={"big": NftSet("big", "ipv4_addr",
                                                       elements=("198.18.0.1",))},
                      chains={"c": Chain("c", ("accept",)),
                              "input": Chain("input", ("jump c",), "type filter hook input "
                                             "priority filter; policy drop;"),
                              "output": Chain("output", ("jump c",), "type filter hook "
                                              "output priority 0;")})
    staged, policies = staging(ruleset, frozenset({"big"}))
    assert staged.table == "bulkhead_load" and policies == {"input": 0, "output": 1}
    assert staged.sets["big"].elements == ()
    assert staged.chains["input"] == Chain(
        "input", (), "type filter hook input priority filter; policy accept;")
    assert staged.chains["output"].rules == () and \
        staged.chains["output"].hook.endswith("policy accept;")
    assert staged.chains["input__load"] == Chain("input__load", ("jump c",))
    assert staged.chains["c"] == ruleset.chains["c"]
    for hook in ("type filter hook input priority 0; policy queue;",
                 "type filter hook input priority 0; policy drop; policy accept;"):
        odd = Ruleset("t", chains={"input": Chain("input", (), hook)})
        with pytest.raises(Unsupported):
            staging(odd, frozenset())


@root
def test_a_staging_table_left_behind_goes_with_the_next_full_apply(netns: str) -> None:
    """An agent killed mid-load leaves `inet bulkhead_load` (no rules on its hooks):
    the next full apply through `nft -f`, and the table's removal, delete it."""
    leftover = "table inet bulkhead_load {\n chain input {\n type filter hook input " \
               "priority 0; policy accept;\n }\n}\n"
    nft(netns, "-f", "-", script=leftover)
    applier = NftApplier(netns=netns)
    assert applier.apply(render(calculate(snap(*base()), "n1", {}, Failsafes.off()))).via \
        == "nft"
    assert nft(netns, "list", "tables").split() == ["table", "inet", "bulkhead"]
    nft(netns, "-f", "-", script=leftover)
    applier.remove()
    assert nft(netns, "list", "tables").strip() == ""


# ----------------------------------------------------------------------- odd answers
class _Answers:
    """A netlink socket that answers each dump request with one chain of table t, in a
    datagram of its own, then NLMSG_DONE; the first `interrupted` dumps flagged
    NLM_F_DUMP_INTR."""

    def __init__(self, interrupted: int) -> None:
        self.interrupted = interrupted
        self.queue: list[bytes] = []

    def setsockopt(self, *args: object) -> None:
        pass

    def send(self, data: bytes) -> int:
        seq = struct.unpack_from("=I", data, 8)[0]
        flags = 0x2 | (0x10 if self.interrupted > 0 else 0)
        self.interrupted -= 1
        body = bytes(4) + struct.pack("=HH", 6, 1) + b"t\0\0\0"
        self.queue.append(struct.pack("=IHHII", 16 + len(body), (10 << 8) | 3, flags, seq, 0)
                          + body)
        self.queue.append(struct.pack("=IHHII", 20, 3, flags, seq, 0) + bytes(4))
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.queue.pop(0)

    def close(self) -> None:
        pass


def _fake_netlink(interrupted: int) -> NftNetlink:
    nl = NftNetlink.__new__(NftNetlink)
    NetlinkSocket.__init__(nl)
    nl.sock = _Answers(interrupted)  # type: ignore[assignment]
    nl._receive_room = 0
    nl.interrupted = False
    return nl


def test_a_dump_the_kernel_flags_as_interrupted_is_refused() -> None:
    # A dump that met a change of the ruleset (NLM_F_DUMP_INTR) may miss a rule: the
    # copy of the staging table would then enforce less than the script says.
    assert len(list(_fake_netlink(0).dump(3))) == 1
    nl = _fake_netlink(1)
    with pytest.raises(NetlinkError, match="changed while it was read"):
        list(nl.dump(3))
    assert nl.sock.queue == []          # read to its end: nothing left for the next request
    assert len(list(nl.dump(3))) == 1


def test_the_drift_fingerprint_reads_an_interrupted_dump_again() -> None:
    # The DNS writer commits every second: an interrupted dump is not drift.
    expected = _fake_netlink(0).fingerprint("t")
    assert expected is not None
    assert _fake_netlink(2).fingerprint("t") == expected
    with pytest.raises(NetlinkError):
        _fake_netlink(3).fingerprint("t")


@root
def test_an_odd_answer_the_reader_trips_on_falls_back_to_nft(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer the copy cannot read (a short attribute: struct.error; a name that is
    not UTF-8: UnicodeDecodeError) is a failed load like any other: nft -f loads the
    table, the reason is reported, and no staging table stays."""
    def odd(*args: object, **kwargs: object) -> list[tuple[int, int, bytes]]:
        raise struct.error("unpack_from requires a buffer of at least 4 bytes")

    monkeypatch.setattr(load_module, "copied_table", odd)
    ruleset = render(calculate(snap(*big_store()), "n1", {}, Failsafes.off()))
    result = NftApplier(netns=netns).apply(ruleset)
    assert result.full and result.via == "nft"
    assert "unpack_from requires" in result.fallback
    assert NftApplier(netns=netns).diff(ruleset) == ""
    assert "bulkhead_load" not in nft(netns, "list", "tables")


def test_an_unsorted_list_is_encoded_in_whole_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller's unsorted list is encoded as the sorted one, in as few runs: trying
    each text's run up to where bisection lands in an unsorted list took quadratic
    time (seconds for 8,000 elements)."""
    texts = [f"6 . {(80, 443)[i % 2]} . 198.18.{i // 256 % 256}.{i % 256} : "
             f"{('accept', 'drop')[i // 3 % 2]}" for i in range(4000)]
    random.Random(5).shuffle(texts)
    unsorted = NftSet("m", "inet_proto . inet_service . ipv4_addr", elements=tuple(texts),
                      map_to="verdict")
    runs = []
    real = load_module._by_verdict
    monkeypatch.setattr(load_module, "_by_verdict",
                        lambda run, *a: runs.append(len(run)) or real(run, *a))
    got = split(element_attrs(unsorted))
    assert runs == [2000, 2000]
    assert sorted(got) == sorted(split(element_attrs(dataclasses.replace(
        unsorted, elements=tuple(sorted(texts))))))
    assert sorted(got) == sorted(_element_attr(e) for e in encode_set(unsorted))


UDP_SERVER = """
import select, socket, sys
socks = {}
for port in (5001, 5002):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind(("198.18.7.2", port)); socks[s] = port
counts = {5001: 0, 5002: 0}
print("ready", flush=True)
while True:
    ready, _, _ = select.select(list(socks), [], [], 60)
    if not ready:
        break
    for s in ready:
        data = s.recv(64)
        if data == b"stop":
            print(counts[5001], counts[5002], flush=True)
            sys.exit(0)
        counts[socks[s]] += 1
"""

UDP_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rounds = int(sys.argv[1])
burst = int(sys.argv[2]) if len(sys.argv) > 2 else 1
for i in range(rounds):
    s.sendto(b"x", ("198.18.7.2", 5001)); s.sendto(b"x", ("198.18.7.2", 5002))
    if i % burst == burst - 1:
        time.sleep(0.001)
time.sleep(0.2)
s.sendto(b"stop", ("198.18.7.2", 5001))
print(rounds, flush=True)
"""


def _guarded(extra: str) -> Ruleset:
    """Input of 198.18.7.2: UDP from 198.18.7.1 to 5001 accepted by a big verdict map
    (2,000 elements, 5002 not in it), everything else dropped by the chain's last rule;
    `extra` makes the structure differ. As the renderer's base chains: policy accept and
    the drops explicit. (A base chain with policy drop is not safe to replace with its
    table in one transaction: the kernel gives a new base chain policy accept until the
    commit sets its policy, and the old chain, its rules gone at the generation flip,
    stays on the hook a moment longer; replaced again and again here, such a chain let
    a datagram to 5002 through and dropped one to 5001, through nft -f as through
    netlink. docs/dataplane.md.)"""
    texts = sorted(["17 . 5001 . 198.18.7.1 : accept"]
                   + [f"17 . {5002 + i % 2 * 1000} . 198.19.{i // 256}.{i % 256} : accept"
                      for i in range(2000)])
    return Ruleset("bulkhead", sets={"big": NftSet(
        "big", "inet_proto . inet_service . ipv4_addr", elements=tuple(texts),
        map_to="verdict")}, chains={"in": Chain(
            "in", ("meta l4proto . th dport . ip saddr vmap @big", extra, "drop"),
            "type filter hook input priority filter; policy accept;")})


@root
def test_packets_see_the_old_policy_or_the_new_one_during_full_applies(
        pair: tuple[str, str]) -> None:
    """UDP to 5001 (accepted) and 5002 (dropped by the policy) while the table is loaded
    over netlink again and again: no 5002 datagram arrives, ever, and every 5001 one
    does. (With the table replaced in one transaction, a packet that began the old chain
    before the commit and looked the map up after it found the old map's elements gone
    and met the chain's last rule, drop: a few in 4,000. The old map now stays until an
    RCU grace period after the switch. docs/dataplane.md, "The moment a table is
    replaced".)"""
    client, server = pair
    applier = NftApplier(netns=server)
    variants = [_guarded("udp dport 5009 drop"), _guarded("udp dport 5010 drop")]
    assert applier.apply(variants[0]).via == "netlink"
    listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c",
                                 UDP_SERVER], stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        sender = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, "-c",
                                   UDP_CLIENT, "4000"], stdout=subprocess.PIPE, text=True)
        applies = 0
        while sender.poll() is None and applies < 200:
            result = applier.apply(variants[(applies + 1) % 2])
            assert result.full and result.via == "netlink", result.fallback
            applies += 1
        out, _ = sender.communicate(timeout=30)
        got, _ = listener.communicate(timeout=30)
    finally:
        for process in (sender, listener):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert applies >= 5
    accepted, dropped = map(int, got.split())
    assert dropped == 0                                   # never let through
    assert accepted == int(out)                           # never lost


def test_a_base_chain_dumped_without_its_policy_is_not_copied() -> None:
    """The policy is put in place of the dumped one: a dump without it (an odd kernel)
    would have made a policy-drop chain accept."""
    table, name = _string(1, "t_load"), _string(NFTA_CHAIN_NAME, "in")
    policy = {NFTA_CHAIN_POLICY: _attr(NFTA_CHAIN_POLICY, struct.pack(">I", 0))}
    dumped = bytes(4) + table + name + _attr(NFTA_CHAIN_POLICY, struct.pack(">I", 1))
    copied = _recreate(NFT_MSG_NEWCHAIN, dumped, "t", policy)
    assert copied == _string(1, "t") + name + policy[NFTA_CHAIN_POLICY]
    with pytest.raises(Unsupported, match="missing"):
        _recreate(NFT_MSG_NEWCHAIN, bytes(4) + table + name, "t", policy)


WIDENING = 3000


def _dispatched(extra: bool) -> Ruleset:
    """The renderer's table for db (198.18.7.2) on interface v1: UDP to 5002 from a
    network set of 1,500 addresses that holds the client denied, everything else
    allowed (one verdict map, after the interface's `iifname vmap @ep_in`); `extra`
    adds a rule, which changes the table's structure."""
    nets = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.7.1")) + i * 2))
            for i in range(1500)]
    bad = {"selector": "list == 'bad'"}
    rules: list[dict[str, Any]] = [
        {"action": "Deny", "protocol": "UDP", "source": bad, "destination": {"ports": [5002]}}]
    if extra:
        rules.append({"action": "Deny", "protocol": "TCP", "source": bad,
                      "destination": {"ports": [5009]}})
    rules.append({"action": "Allow", "protocol": "UDP", "source": bad,
                  "destination": {"ports": [5001]}})
    store = [hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
             {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
              "metadata": {"name": "bad", "labels": {"list": "bad"}}, "spec": {"nets": nets}},
             gnp("guard", {"selector": "app == 'db'", "ingress": rules})]
    # Rules before the interface map (failsafe ports of other peers, none of this
    # traffic's) make the moment a packet spends before that lookup longer.
    failsafes = Failsafes(tuple(FailsafePort(6, 1 + i, ipaddress.ip_network(
        f"198.19.{i // 256}.{i % 256}/32")) for i in range(WIDENING)), ())
    return render(calculate(snap(*store), "n1", {}, failsafes))


def _set_denied(extra: bool) -> Ruleset:
    """The renderer's table for db on v1 with the Deny a lookup of a plain set (the
    network set's selector set, `ip saddr @s4_...`) and a later Allow that uses no set
    (`meta l4proto != 6 accept`): a missed lookup would let the packet through."""
    nets = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.7.1")) + i * 2))
            for i in range(1500)]
    rules: list[dict[str, Any]] = [
        {"action": "Deny", "protocol": "UDP", "source": {"selector": "list == 'bad'"},
         "destination": {"ports": [5002]}},
        {"action": "Allow", "notProtocol": "TCP"}]
    if extra:
        rules.insert(1, {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 13}})
    store = [hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
             {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
              "metadata": {"name": "bad", "labels": {"list": "bad"}}, "spec": {"nets": nets}},
             gnp("guard", {"selector": "app == 'db'", "ingress": rules})]
    failsafes = Failsafes(tuple(FailsafePort(6, 1 + i, ipaddress.ip_network(
        f"198.19.{i // 256}.{i % 256}/32")) for i in range(WIDENING)), ())
    ruleset = render(calculate(snap(*store), "n1", {}, failsafes))
    assert any(" @s4_" in rule and rule.endswith('drop comment "policy guard ingress rule 0"')
               for chain in ruleset.chains.values() for rule in chain.rules)
    return ruleset


def under_traffic(server: str, client: str, step: Callable[[int], None], most: int,
                  timeout: float = 30) -> tuple[int, int, int, int]:
    """(steps taken, datagrams sent to each port, arrived at 5001, arrived at 5002):
    `step(i)` called again and again (at most `most` times) while 50,000 datagrams go
    to each of UDP 5001 and 5002; the sender and the listener are killed whatever
    happens."""
    listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c",
                                 UDP_SERVER], stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        sender = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, "-c",
                                   UDP_CLIENT, "50000", "25"], stdout=subprocess.PIPE,
                                  text=True)
        steps = 0
        while sender.poll() is None and steps < most:
            step(steps)
            steps += 1
        out, _ = sender.communicate(timeout=timeout)
        got, _ = listener.communicate(timeout=timeout)
    finally:
        for process in (sender, listener):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    accepted, dropped = map(int, got.split())
    return steps, int(out), accepted, dropped


def _replaced_under_traffic(server: str, client: str, applier: NftApplier,
                            variants: list[Ruleset], via: str) -> tuple[int, int, int, int]:
    """(applies, datagrams sent to each port, arrived at 5001, arrived at 5002) while
    the table is replaced again and again (at most 200 times) under UDP to both."""
    assert applier.apply(variants[0]).full

    def replace(i: int) -> None:
        result = applier.apply(variants[(i + 1) % 2])
        assert result.full and result.via == via, (result.fallback, result.via)
        assert not applier.cleanup_error

    return under_traffic(server, client, replace, 200)


@root
@pytest.mark.parametrize("netlink", [True, False])
def test_a_deny_by_a_plain_set_holds_while_the_table_is_replaced(
        pair: tuple[str, str], netlink: bool) -> None:
    """Plain sets keep their names, deleted and made again in the switch: the old
    rules still look up the deleted set, whose elements the kernel keeps active (it
    deactivates a deleted map's, not a set's). No datagram to 5002 gets through, every
    one to 5001 does."""
    client, server = pair
    applies, sent, accepted, dropped = _replaced_under_traffic(
        server, client, NftApplier(netns=server, netlink=netlink),
        [_set_denied(False), _set_denied(True)], "nft")
    assert applies >= 5
    assert dropped == 0
    assert accepted == sent


@root
@pytest.mark.parametrize("netlink", [True, False])
def test_a_deny_holds_while_the_renderers_table_is_replaced(
        pair: tuple[str, str], netlink: bool) -> None:
    """The renderer's table, with the Deny a verdict-map element behind the interface
    map `ep_in`, replaced again and again (netlink load, and nft -f) while UDP comes
    to 5001 (allowed) and 5002 (denied): no datagram to 5002 gets through, every one to
    5001 does. Replaced in one transaction, 2 to 6 of 50,000 denied datagrams got
    through per run: a packet that began the old input chain before the commit and
    looked `ep_in` up after it found the old map's elements gone, and the chain ended
    in its policy, accept."""
    client, server = pair
    applies, sent, accepted, dropped = _replaced_under_traffic(
        server, client, NftApplier(netns=server, netlink=netlink),
        [_dispatched(False), _dispatched(True)], "netlink" if netlink else "nft")
    assert applies >= 5
    assert dropped == 0
    assert accepted == sent


def _base_chains(ns: str) -> dict[str, tuple[int, int]]:
    """The base chains of `inet bulkhead` in `ns`: name -> (handle, priority)."""
    listing = json.loads(nft(ns, "-j", "-a", "list", "table", "inet", "bulkhead"))
    return {c["name"]: (c["handle"], c["prio"]) for item in listing["nftables"]
            if isinstance(c := item.get("chain"), dict) and "hook" in c}


@root
@pytest.mark.parametrize("netlink", [True, False])
def test_a_full_apply_keeps_the_base_chains_whose_hook_is_the_same(
        netns: str, netlink: bool) -> None:
    """A full apply flushes the base chains and fills them again, the same kernel
    objects (their handles stay): a base chain made again would be on the hook, without
    rules, ahead of the old one from the moment the batch is prepared, while the old
    one's rules are gone from the generation flip until the commit takes it off
    (`replace.py`). One whose priority changes is made again, with the new priority;
    the others stay."""
    applier = NftApplier(netns=netns, netlink=netlink)
    via = "netlink" if netlink else "nft"
    assert applier.apply(_dispatched(False)).full
    first = _base_chains(netns)
    assert len(first) >= 2
    result = applier.apply(_dispatched(True))
    assert result.full and result.via == via, result.fallback
    assert _base_chains(netns) == first
    assert "5009" in nft(netns, "list", "table", "inet", "bulkhead")   # the new rules
    moved = _dispatched(False)
    name = next(n for n, c in moved.chains.items()
                if c.hook and "priority filter;" in c.hook)
    chain = moved.chains[name]
    assert chain.hook is not None
    moved.chains[name] = Chain(name, chain.rules,
                               chain.hook.replace("priority filter;", "priority filter + 5;"))
    result = applier.apply(moved)
    assert result.full and result.via == via, result.fallback
    after = _base_chains(netns)
    assert after[name][0] != first[name][0] and after[name][1] == 5
    assert {n: v for n, v in after.items() if n != name} == \
        {n: v for n, v in first.items() if n != name}
    assert not applier.cleanup_error
