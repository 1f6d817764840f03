"""The NFLOG reader: the message parser on crafted bytes, and the reader on a real
kernel, in a namespace pair of the test's own, against a table that logs the first
packet of each connection (group 7), dropped SYNs (group 8) and a flood range (group 9).
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from bulkhead.netlink import NLMSG_DONE, attr, message
from bulkhead.observe.nflog import (
    PACKET_MESSAGE,
    LoggedPacket,
    NflogError,
    NflogSocket,
    parse_messages,
)
from tests.observe.netpair import ADDRESSES, Pair, collect

NOW = 1_800_000_000.0
V4 = (ipaddress.IPv4Address("198.18.219.1"), ipaddress.IPv4Address("198.18.219.2"))
V6 = (ipaddress.IPv6Address("2001:2:0:db::1"), ipaddress.IPv6Address("2001:2:0:db::2"))

TABLE = """
table inet bhobs {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        udp dport 20000-20999 log prefix "F|flood" group 9 accept
        tcp dport 7001 log prefix "DI1|y" group 8 drop
        ct state new log prefix "AI0|x" group 7 accept
    }
}
"""


# ------------------------------------------------------------------ crafted messages
def ipv4(proto: int, l4: bytes, options: bytes = b"", fragment: int = 0,
         total: int | None = None) -> bytes:
    header = 20 + len(options)
    length = total if total is not None else header + len(l4)
    return (struct.pack(">BBHHHBBH4s4s", 0x40 | header // 4, 0, length, 1, fragment, 64,
                        proto, 0, V4[0].packed, V4[1].packed) + options + l4)


def ipv6(next_header: int, rest: bytes, payload_length: int | None = None) -> bytes:
    length = len(rest) if payload_length is None else payload_length
    return (struct.pack(">IHBB", 6 << 28, length, next_header, 64) + V6[0].packed
            + V6[1].packed + rest)


def logged(packet: bytes, family: int = socket.AF_INET, group: int = 7,
           prefix: str | None = "AI0|x", stamp: tuple[int, int] | None = None) -> bytes:
    attrs = [attr(1, struct.pack(">HBx", 0x0800, 1))]
    if prefix is not None:
        attrs.append(attr(10, prefix.encode() + b"\0"))
    if stamp is not None:
        attrs.append(attr(3, struct.pack(">QQ", *stamp)))
    attrs.append(attr(9, packet))
    return message(PACKET_MESSAGE, 0, 0, family, group, b"".join(attrs))


PORTS = struct.pack(">HH", 40000, 443)


def test_a_tcp_packet_is_read_with_every_field() -> None:
    data = logged(ipv4(6, PORTS + bytes(16), total=1500), stamp=(1_700_000_000, 250_000))
    assert parse_messages(data, NOW) == ([LoggedPacket(
        group=7, prefix="AI0|x", family=4, proto=6, src=V4[0], dst=V4[1], sport=40000,
        dport=443, icmp_type=None, icmp_code=None, length=1500,
        timestamp=1_700_000_000.25)], 0)


def test_ipv4_options_fragments_and_snapped_bytes() -> None:
    packets, bad = parse_messages(b"".join([
        logged(ipv4(17, PORTS, options=bytes(8))),          # ports after the options
        logged(ipv4(17, PORTS, fragment=0x2000)),           # first fragment (MF set)
        logged(ipv4(17, PORTS, fragment=0x2000 | 185)),     # a later one: no ports
        logged(ipv4(6, b"", total=60)),                     # snapped after the header
        logged(ipv4(1, bytes([3, 3]))),                     # ICMP port unreachable
    ]), NOW)
    assert bad == 0
    assert [(p.proto, p.sport, p.dport, p.icmp_type, p.icmp_code) for p in packets] == [
        (17, 40000, 443, None, None), (17, 40000, 443, None, None),
        (17, None, None, None, None), (6, None, None, None, None), (1, None, None, 3, 3)]
    assert packets[3].length == 60
    assert {p.timestamp for p in packets} == {NOW}      # no kernel timestamp


def test_ipv6_extension_headers_are_skipped_to_the_upper_layer() -> None:
    hop_by_hop = bytes([60, 0]) + bytes(6)                  # next: destination options
    destination = bytes([44, 1]) + bytes(14)                # 16 bytes; next: fragment
    first = bytes([17, 0]) + struct.pack(">H", 1) + bytes(4)    # offset 0, M flag
    later = bytes([17, 0]) + struct.pack(">H", 8 << 3) + bytes(4)
    routing_cut = bytes([6, 2, 0, 0])                       # 24 bytes, snapped at 4
    packets, bad = parse_messages(b"".join(logged(p, socket.AF_INET6) for p in [
        ipv6(0, hop_by_hop + destination + first + PORTS),
        ipv6(44, later + PORTS),
        ipv6(43, routing_cut, payload_length=1200),
        ipv6(58, bytes([128, 0, 0, 0])),
    ]), NOW)
    assert bad == 0
    assert [(p.family, p.proto, p.sport, p.dport, p.icmp_type) for p in packets] == [
        (6, 17, 40000, 443, None), (6, 17, None, None, None), (6, 43, None, None, None),
        (6, 58, None, None, 128)]
    assert packets[2].length == 1240 and packets[0].src == V6[0] and packets[0].dst == V6[1]


def test_malformed_messages_are_counted_and_the_rest_still_read() -> None:
    good = logged(ipv4(6, PORTS))
    no_payload = message(PACKET_MESSAGE, 0, 0, socket.AF_INET, 7, attr(10, b"x\0"))
    overlong_attr = message(PACKET_MESSAGE, 0, 0, socket.AF_INET, 7,
                             struct.pack("=HH", 200, 9) + bytes(8))
    done = message(NLMSG_DONE, 0, 0, 0, 7, b"")
    data = b"".join([
        good, done,
        logged(ipv4(6, PORTS), family=7),                   # a bridge family message
        logged(ipv4(6, PORTS)[:12]),                        # shorter than an IP header
        logged(ipv6(6, PORTS)),                             # AF_INET but IPv6 bytes
        no_payload, overlong_attr,
        logged(ipv4(6, PORTS), prefix=None),                # no prefix: ""
    ])
    packets, bad = parse_messages(data, NOW)
    assert bad == 5
    assert [p.prefix for p in packets] == ["AI0|x", ""]
    # A message whose length runs past the datagram ends the datagram: one counted.
    assert parse_messages(good + good[:30], NOW)[1] == 1
    assert parse_messages(b"\x01\x02\x03", NOW) == ([], 1)


# ------------------------------------------------------------------- the real kernel
@pytest.fixture(scope="module")
def logs(pair: Pair) -> Iterator[NflogSocket]:
    pair.nft(TABLE)
    with NflogSocket([7, 8], netns=pair.server) as reader:
        yield reader


def of_flow(packets: list[LoggedPacket], family: int, sport: int | None, dport: int | None
            ) -> list[LoggedPacket]:
    return [p for p in packets if (p.family, p.sport, p.dport) == (family, sport, dport)]


@pytest.mark.parametrize("family", [4, 6])
def test_a_tcp_connection_logs_its_first_packet_only(pair: Pair, logs: NflogSocket,
                                                     family: int) -> None:
    with pair.listen(family) as listener:
        dport = listener.getsockname()[1]
        client, server, sport = pair.tcp_exchange(family, listener, send=5000, answer=5000)
        client.close()
        server.close()
    got = of_flow(collect(logs, lambda g: bool(of_flow(g, family, sport, dport))),
                  family, sport, dport)
    src, dst = V4 if family == 4 else V6
    assert got == [LoggedPacket(group=7, prefix="AI0|x", family=family, proto=6, src=src,
                                dst=dst, sport=sport, dport=dport, icmp_type=None,
                                icmp_code=None, length=got[0].length,
                                timestamp=got[0].timestamp)]
    assert (40 if family == 4 else 60) <= got[0].length <= 120     # a SYN with options
    assert abs(got[0].timestamp - time.time()) < 5                  # NFULA_TIMESTAMP


def test_a_logged_packet_is_readable_within_milliseconds(pair: Pair,
                                                         logs: NflogSocket) -> None:
    delays = []
    with pair.listen(4) as listener:
        for _ in range(3):
            logs.read()
            with pair.socket_in(pair.client, 4) as client:
                start = time.monotonic()
                client.connect(listener.getsockname())
                ready, _, _ = select.select([logs], [], [], 1.0)
                delays.append(time.monotonic() - start)
                assert ready and logs.read()
                listener.accept()[0].close()
    assert min(delays) < 0.05, delays       # FLUSH_TIMEOUT is 10 ms


@pytest.mark.parametrize("family", [4, 6])
def test_udp_and_icmp_log_their_first_packet(pair: Pair, logs: NflogSocket,
                                             family: int) -> None:
    icmp_proto, echo = (1, 8) if family == 4 else (58, 128)
    with pair.listen(family, socket.SOCK_DGRAM) as server:
        dport = server.getsockname()[1]
        sport = pair.udp_exchange(family, server)       # out, back, out again
    pair.ping(family, ident=0x4200 + family)

    def icmp(packets: list[LoggedPacket]) -> list[LoggedPacket]:
        return [p for p in packets if p.family == family and p.proto == icmp_proto]

    got = collect(logs, lambda g: bool(of_flow(g, family, sport, dport)) and bool(icmp(g)))
    (udp,) = of_flow(got, family, sport, dport)
    assert (udp.proto, udp.prefix, udp.group) == (17, "AI0|x", 7)
    assert udp.length == (20 if family == 4 else 40) + 8 + 3
    (ping,) = icmp(got)
    assert (ping.icmp_type, ping.icmp_code, ping.sport, ping.dport) == (echo, 0, None, None)
    assert (str(ping.src), str(ping.dst)) == ADDRESSES[family]


def test_a_dropped_syn_is_logged_with_the_deny_prefix_each_time_it_is_sent(
        pair: Pair, logs: NflogSocket) -> None:
    """A dropped packet never confirms a conntrack entry, so each retransmitted SYN is
    new again and logged again (Linux retransmits a SYN after 1 s)."""
    with pair.socket_in(pair.client, 4) as client:
        client.setblocking(False)
        client.connect_ex((ADDRESSES[4][1], 7001))
        sport = client.getsockname()[1]
        got = of_flow(collect(logs, lambda g: len(of_flow(g, 4, sport, 7001)) >= 2,
                              timeout=3.0, settle=0), 4, sport, 7001)
    assert len(got) >= 2
    assert {(p.group, p.prefix, p.proto, p.src, p.dst) for p in got} == {
        (8, "DI1|y", 6, V4[0], V4[1])}


def test_a_group_another_socket_holds_is_refused_by_name(pair: Pair,
                                                         logs: NflogSocket) -> None:
    with pytest.raises(NflogError, match=r"NFLOG group 7 is already bound") as refused:
        NflogSocket([12, 7], netns=pair.server)
    assert refused.value.code == errno.EPERM
    # The refused socket freed group 12; a closed one frees its groups too.
    with NflogSocket([12], netns=pair.server) as first:
        assert first.groups == (12,)
    with NflogSocket([12, 12], netns=pair.server) as again:
        assert again.groups == (12,)
    with pytest.raises(NflogError, match="bhobs-nowhere"):
        NflogSocket([12], netns="bhobs-nowhere")


def test_read_returns_at_most_limit_and_keeps_the_rest(pair: Pair,
                                                       logs: NflogSocket) -> None:
    logs.read()
    with pair.listen(4, socket.SOCK_DGRAM) as server:
        for _ in range(3):
            with pair.socket_in(pair.client, 4, socket.SOCK_DGRAM) as client:
                client.sendto(b"x", server.getsockname())
        time.sleep(0.1)             # all three flushed by the kernel
        first = logs.read(limit=1)
        rest = logs.read()
    assert len(first) == 1 and len(rest) == 2
    assert len({p.sport for p in first + rest}) == 3


def test_a_full_receive_buffer_counts_overruns_and_reading_goes_on(pair: Pair) -> None:
    with NflogSocket([9], netns=pair.server, rcvbuf=1) as flood, \
            pair.socket_in(pair.client, 4, socket.SOCK_DGRAM) as client:
        for port in range(20000, 20300):
            client.sendto(b"x", (ADDRESSES[4][1], port))
        time.sleep(0.1)
        got = flood.read(limit=1000)
        assert flood.overruns >= 1
        assert 0 < len(got) < 300 and {p.prefix for p in got} == {"F|flood"}
        client.sendto(b"x", (ADDRESSES[4][1], 20999))
        after = collect(flood, lambda g: any(p.dport == 20999 for p in g))
        assert [p.dport for p in after] == [20999]
        assert flood.malformed == 0
