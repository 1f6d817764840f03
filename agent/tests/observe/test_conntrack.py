"""The conntrack reader: the entry parser on crafted bytes, and dumps and events on a
real kernel, in a namespace pair of the test's own whose server tracks connections
(with accounting and timestamps on)."""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from bulkhead.lab.processes import run
from bulkhead.netlink import NLA_F_NESTED, attr, message
from bulkhead.observe.conntrack import (
    DELETE_MESSAGE,
    NEW_MESSAGE,
    Conntrack,
    ConntrackEntry,
    ConntrackError,
    ConntrackEvents,
    ConnTuple,
    enable_accounting,
    enable_events,
    enable_timestamps,
    parse_entry,
    parse_messages,
)
from tests.observe.netpair import ADDRESSES, Pair, collect

TABLE = """
table inet bhobs {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
    }
}
"""
A = ipaddress.IPv4Address("198.18.219.1")
B = ipaddress.IPv4Address("198.18.219.2")


# ------------------------------------------------------------------ crafted messages
def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def tuple_attr(kind: int, src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address,
               proto: bytes) -> bytes:
    return nested(kind, nested(1, attr(1, src.packed), attr(2, dst.packed)),
                  nested(2, attr(1, proto[:1]), *[attr(k, proto[i:i + 2])
                                                   for k, i in ((2, 1), (3, 3))]))


def entry_message(kind: int = DELETE_MESSAGE, *extra: bytes) -> bytes:
    body = (tuple_attr(1, A, B, b"\x06" + struct.pack(">HH", 40000, 443))
            + tuple_attr(2, B, A, b"\x06" + struct.pack(">HH", 443, 40000))
            + attr(12, struct.pack(">I", 0xDEADBEEF)) + b"".join(extra))
    return message(kind, 0, 0, socket.AF_INET, 0, body)


COUNTERS = (nested(9, attr(5, b""), attr(1, struct.pack(">Q", 2**32 + 5)),
                   attr(2, struct.pack(">Q", 2**40 + 7)))
            + nested(10, attr(1, struct.pack(">Q", 3)), attr(2, struct.pack(">Q", 180)))
            + nested(20, attr(1, struct.pack(">Q", 1_700_000_000_500_000_000)),
                     attr(2, struct.pack(">Q", 1_700_000_002_000_000_000))))


def test_an_entry_is_read_with_big_endian_counters_and_times() -> None:
    entry = parse_entry(entry_message(DELETE_MESSAGE, COUNTERS)[16:])
    assert entry == ConntrackEntry(
        id=0xDEADBEEF, orig=ConnTuple(4, 6, A, B, 40000, 443),
        reply=ConnTuple(4, 6, B, A, 443, 40000), packets_orig=2**32 + 5,
        bytes_orig=2**40 + 7, packets_reply=3, bytes_reply=180,
        start=1_700_000_000.5, stop=1_700_000_002.0)
    bare = parse_entry(entry_message()[16:])     # accounting and timestamps off
    assert (bare.packets_orig, bare.bytes_reply, bare.start, bare.stop) == (0, 0, None, None)


def test_events_are_named_and_malformed_ones_counted() -> None:
    cut = entry_message(NEW_MESSAGE)[:-1]
    body = entry_message()[16:]
    orig = len(tuple_attr(1, A, B, b"\x06" + bytes(4)))
    no_reply = message(DELETE_MESSAGE, 0, 0, socket.AF_INET, 0, body[:4 + orig])
    short_counter = entry_message(DELETE_MESSAGE, nested(9, attr(1, b"\x01\x02")))
    bridge = message(NEW_MESSAGE, 0, 0, 7, 0, body[4:])
    events, bad = parse_messages(b"".join([
        entry_message(NEW_MESSAGE), entry_message(DELETE_MESSAGE, COUNTERS),
        no_reply, short_counter, bridge, entry_message(DELETE_MESSAGE)]))
    assert [kind for kind, _ in events] == ["new", "destroy", "destroy"]
    assert bad == 3
    assert parse_messages(entry_message() + cut)[1] == 1     # framing broken


def test_a_missing_namespace_is_a_conntrack_error() -> None:
    for call in (lambda: Conntrack("bhobs-nowhere"), lambda: enable_accounting("bhobs-nowhere"),
                 lambda: ConntrackEvents("bhobs-nowhere")):
        with pytest.raises(ConntrackError, match="bhobs-nowhere"):
            call()


# ------------------------------------------------------------------- the real kernel
@pytest.fixture(scope="module")
def tracked(pair: Pair) -> Iterator[Conntrack]:
    pair.nft(TABLE)
    enable_accounting(pair.server)
    enable_timestamps(pair.server)
    with Conntrack(pair.server) as table:
        yield table


def delete(pair: Pair, family: int, proto: str, sport: int) -> str:
    """`conntrack -D` of the server's entries from client port `sport`; its listing."""
    return run(pair.server, ["conntrack", "-D", "-f", f"ipv{family}", "-p", proto,
                             "--orig-port-src", str(sport)], check=True, timeout=10).stdout


def addresses(family: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    return tuple(ipaddress.ip_address(a) for a in ADDRESSES[family])


@pytest.mark.parametrize("family", [4, 6])
def test_a_tcp_exchange_shows_in_the_dump_and_its_destroy_event(
        pair: Pair, tracked: Conntrack, family: int) -> None:
    client_ip, server_ip = addresses(family)
    with ConntrackEvents(pair.server) as events, pair.listen(family) as listener:
        dport = listener.getsockname()[1]
        client, server, sport = pair.tcp_exchange(family, listener, send=10_000,
                                                  answer=20_000)
        with client, server:
            orig = ConnTuple(family, 6, client_ip, server_ip, sport, dport)
            (entry,) = [e for e in tracked.dump() if e.orig == orig]
        time.sleep(0.1)     # the closing segments counted
        listing = delete(pair, family, "tcp", sport)
        got = collect(events, lambda g: any(e.orig == orig for _, e in g))
    assert entry.reply == ConnTuple(family, 6, server_ip, client_ip, dport, sport)
    header = 20 + (20 if family == 4 else 40)
    assert 10_000 <= entry.bytes_orig <= 10_000 + entry.packets_orig * (header + 40)
    assert 20_000 <= entry.bytes_reply <= 20_000 + entry.packets_reply * (header + 40)
    assert 3 <= entry.packets_orig <= 30 and 2 <= entry.packets_reply <= 30
    assert entry.id is not None and entry.stop is None
    assert entry.start is not None and abs(entry.start - time.time()) < 5
    (final,) = [e for kind, e in got if kind == "destroy" and e.orig == orig]
    assert final.id == entry.id and final.start == entry.start
    assert final.stop is not None and final.stop >= entry.start
    assert final.packets_orig > entry.packets_orig            # the FINs and ACKs
    # The same counters as conntrack(8) listed when it deleted the entry.
    counted = [int(n) for n in re.findall(r"(?:packets|bytes)=(\d+)", listing)]
    assert counted == [final.packets_orig, final.bytes_orig, final.packets_reply,
                       final.bytes_reply]
    assert events.overruns == 0 and events.malformed == 0


@pytest.mark.parametrize("family", [4, 6])
def test_icmp_entries_carry_id_type_and_code(pair: Pair, tracked: Conntrack,
                                             family: int) -> None:
    pair.ping(family, ident=0x5100 + family)
    (entry,) = [e for e in tracked.dump() if e.orig.icmp_id == 0x5100 + family]
    request, reply = (8, 0) if family == 4 else (128, 129)
    assert (entry.orig.proto, entry.orig.icmp_type, entry.orig.icmp_code) == (
        1 if family == 4 else 58, request, 0)
    assert (entry.reply.icmp_type, entry.reply.icmp_id) == (reply, 0x5100 + family)
    assert entry.orig.sport is None and entry.orig.dport is None
    assert (entry.orig.src, entry.orig.dst) == addresses(family)


def test_the_dump_limit_counts_what_it_leaves_out_and_new_events_come(
        pair: Pair, tracked: Conntrack) -> None:
    with ConntrackEvents(pair.server, destroy=False, new=True) as events, \
            pair.listen(4, socket.SOCK_DGRAM) as server:
        ports = set()
        for _ in range(5):
            with pair.socket_in(pair.client, 4, socket.SOCK_DGRAM) as client:
                client.sendto(b"x", server.getsockname())
                ports.add(client.getsockname()[1])
        every = tracked.dump()
        assert tracked.truncated == 0 and len(every) >= 5
        assert len(tracked.dump(limit=2)) == 2 and tracked.truncated == len(every) - 2
        ipv4, ipv6 = tracked.dump(socket.AF_INET), tracked.dump(socket.AF_INET6)
        assert {e.orig.family for e in ipv4} == {4} and {e.orig.family for e in ipv6} <= {6}
        assert len(ipv4) + len(ipv6) == len(every)
        got = collect(events, lambda g: ports <= {e.orig.sport for _, e in g})
    assert ports <= {e.orig.sport for kind, e in got if kind == "new"}
    assert {kind for kind, _ in got} == {"new"}


def test_only_connections_made_while_a_reader_listens_get_events_unless_enabled(
        pair: Pair, tracked: Conntrack) -> None:
    """With nf_conntrack_events at its default (2) the kernel gives a connection events
    only if some socket listened when it was created; `enable_events` (1) gives every
    new connection events."""
    with pair.listen(4, socket.SOCK_DGRAM) as server:
        sports = []
        for enable in (False, True):
            if enable:
                enable_events(pair.server)
            with pair.socket_in(pair.client, 4, socket.SOCK_DGRAM) as client:
                client.sendto(b"x", server.getsockname())
                sports.append(client.getsockname()[1])
            with ConntrackEvents(pair.server) as events:
                assert delete(pair, 4, "udp", sports[-1])
                got = collect(events, lambda g: any(e.orig.sport == sports[-1]
                                                    for _, e in g), timeout=0.3)
            assert any(e.orig.sport == sports[-1] for _, e in got) == enable
