"""NFLOG reader: the packets nftables `log group N` rules send to user space
(nfnetlink_log, NFNL_SUBSYS_ULOG), each with the rule's prefix and the packet's first
bytes, decoded into addresses, protocol, ports or ICMP type and code.

The agent's table logs the first packet of each connection with the verdict in the
prefix (`log prefix "AI0|default.allow-web" group 1 snaplen 128`; group 1 inbound, 2
outbound). This module speaks nfnetlink itself over a plain NETLINK_NETFILTER socket, as
the nftables element batches do: pyroute2 would be a large dependency for two small
message families.

What the kernel does (6.x), and what follows:

- Binding a group makes an instance per network namespace owned by this socket. No
  per-family binding (NFULNL_CFG_CMD_PF_BIND) is needed: `log group N` names the
  nfnetlink_log logger itself, and PF_BIND would only change which logger the
  namespace's plain `log` rules (no group) use, which is not ours to change. Messages
  carry the packet's own family (AF_INET or AF_INET6) even from an `inet` table.
- A group bound by another socket refuses with EPERM, one bound already by this socket
  with EBUSY; both raise NflogError naming the group. Closing the socket frees its
  groups even without the unbind `close` sends.
- The kernel batches messages: it sends when QTHRESH messages are queued or FLUSH_TIMEOUT
  after the first (in 1/100 s: 10 ms here), so a logged packet is readable within about
  10 ms. A datagram holds at most NLBUFSIZ bytes of messages.
- When the socket's receive buffer is full the kernel drops the datagram and the next
  read reports ENOBUFS once: `overruns` counts those reports, not the packets lost.
- A dropped packet never confirms a conntrack entry, so `ct state new` matches its
  retransmissions too: a blocked TCP client's SYN is logged each time it is resent.
- NFULA_TIMESTAMP comes only from the prerouting, input and forward hooks; packets
  logged on output get the time they were read.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

from bulkhead.model.flowlog import PORTED
from bulkhead.netlink import (
    NLM_F_ACK,
    NLM_F_REQUEST,
    NetlinkError,
    attr,
    message,
)
from bulkhead.observe.reader import Malformed, Subscription, attributes, messages

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2

PACKET_MESSAGE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
CONFIG_MESSAGE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
FLUSH_TIMEOUT = 1        # 1/100 s the kernel holds a message for more to batch with it
QTHRESH = 32             # messages in one datagram at most
NLBUFSIZ = 16384         # bytes of one datagram (the kernel allows 4 KiB to 128 KiB)

ICMP = {4: 1, 6: 58}                             # ICMP, ICMPv6 by IP version
# IPv6 extension headers skipped to the upper-layer protocol: hop-by-hop, routing,
# fragment, destination options.
IPV6_SKIPPED = frozenset({0, 43, 44, 60})
IPV6_FRAGMENT = 44
MAX_EXTENSIONS = 8       # a bound, not a protocol limit
FAMILIES: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}   # nfgen_family -> version


class NflogError(NetlinkError):
    """A group could not be bound (another reader holds it) or the socket not opened."""


class LoggedPacket(NamedTuple):
    """One logged packet. Ports and ICMP fields are None when the protocol has none or
    the snapped bytes (or a later fragment) do not hold them. (A named tuple: one is
    made per connection, and a frozen dataclass costs several times more to make.)"""

    group: int
    prefix: str
    family: int                 # 4 or 6
    proto: int                  # after IPv6 extension headers; if they run past the
                                # snapped bytes, the header that could not be passed
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int | None           # TCP, UDP, SCTP, UDP-Lite
    dport: int | None
    icmp_type: int | None       # ICMP, ICMPv6
    icmp_code: int | None
    length: int                 # the whole packet's length, from its IP header
    timestamp: float            # seconds since the epoch
    # The upper-layer bytes (from the TCP/UDP header on) and the whole packet as copied,
    # only from a reader that keeps them (`NflogSocket(keep_payload=True)`, for DNS
    # answers): b"" otherwise.
    payload: bytes = b""
    packet: bytes = b""


@functools.lru_cache(maxsize=4096)
def _v4(raw: bytes) -> ipaddress.IPv4Address:
    """An address object per address bytes, kept for the next packet of the same host
    (the same few addresses come again and again)."""
    return ipaddress.IPv4Address(raw)


@functools.lru_cache(maxsize=4096)
def _v6(raw: bytes) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(raw)


def parse_messages(data: bytes, now: float, keep_payload: bool = False
                   ) -> tuple[list[LoggedPacket], int]:
    """The logged packets in one datagram from nfnetlink_log, and how many messages in
    it were unreadable (truncated, no packet, not IPv4 or IPv6). Other messages (acks,
    NLMSG_DONE) are passed over. `now` stands in for a missing kernel timestamp;
    `keep_payload` keeps each packet's upper-layer bytes."""
    packets: list[LoggedPacket] = []
    bad = 0
    try:
        for kind, _flags, _seq, payload in messages(data):
            if kind != PACKET_MESSAGE:
                continue
            try:
                packets.append(_packet(payload, now, keep_payload))
            except Malformed:
                bad += 1
    except Malformed:
        bad += 1
    return packets, bad


def _packet(payload: bytes, now: float, keep_payload: bool = False) -> LoggedPacket:
    if len(payload) < 4:
        raise Malformed("no nfgenmsg")
    family = FAMILIES.get(payload[0])
    if family is None:
        raise Malformed(f"family {payload[0]} is not IPv4 or IPv6")
    group = struct.unpack_from(">H", payload, 2)[0]
    attrs = attributes(payload, 4)
    raw = attrs.get(NFULA_PAYLOAD)
    if raw is None:
        raise Malformed("no packet bytes")
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    timestamp = now
    stamp = attrs.get(NFULA_TIMESTAMP)
    if stamp is not None:
        if len(stamp) != 16:
            raise Malformed("timestamp length")
        sec, usec = struct.unpack(">QQ", stamp)
        if sec:
            timestamp = sec + usec / 1e6
    if family == 4:
        proto, src, dst, length, l4 = _ipv4(raw)
    else:
        proto, src, dst, length, l4 = _ipv6(raw)
    sport = dport = icmp_type = icmp_code = None
    if proto in PORTED and len(l4) >= 4:
        sport, dport = struct.unpack_from(">HH", l4)
    elif proto == ICMP[family] and len(l4) >= 2:
        icmp_type, icmp_code = l4[0], l4[1]
    return LoggedPacket(group, prefix, family, proto, src, dst, sport, dport,
                        icmp_type, icmp_code, length, timestamp,
                        bytes(l4) if keep_payload else b"", bytes(raw) if keep_payload else b"")


Addresses = tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address,
                  ipaddress.IPv4Address | ipaddress.IPv6Address, int, bytes]


def _ipv4(raw: bytes) -> Addresses:
    """(protocol, source, destination, length, upper-layer bytes) of an IPv4 packet."""
    if len(raw) < 20 or raw[0] >> 4 != 4:
        raise Malformed("not an IPv4 header")
    header = (raw[0] & 0x0F) * 4
    if header < 20:
        raise Malformed("IPv4 header length")
    length, fragment = struct.unpack_from(">H2xH", raw, 2)
    # A later fragment starts with payload, not with the upper-layer header.
    l4 = raw[header:] if fragment & 0x1FFF == 0 else b""
    return (raw[9], _v4(raw[12:16]), _v4(raw[16:20]),
            length, l4)


def _ipv6(raw: bytes) -> Addresses:
    """(protocol, source, destination, length, upper-layer bytes) of an IPv6 packet."""
    if len(raw) < 40 or raw[0] >> 4 != 6:
        raise Malformed("not an IPv6 header")
    length = 40 + struct.unpack_from(">H", raw, 4)[0]
    proto = raw[6]
    at = 40
    later_fragment = False
    for _ in range(MAX_EXTENSIONS):
        if proto not in IPV6_SKIPPED or at + 8 > len(raw):
            break
        if proto == IPV6_FRAGMENT:
            later_fragment = later_fragment or struct.unpack_from(">H", raw, at + 2)[0] >> 3 != 0
            proto, at = raw[at], at + 8
        else:
            proto, at = raw[at], at + (raw[at + 1] + 1) * 8
    l4 = b"" if later_fragment or proto in IPV6_SKIPPED else raw[at:]
    return (proto, _v6(raw[8:24]), _v6(raw[24:40]),
            length, l4)


def _config(group: int, seq: int, *attrs: bytes, ack: bool = True) -> bytes:
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return message(CONFIG_MESSAGE, flags, seq, socket.AF_UNSPEC, group, b"".join(attrs))


def _command(command: int) -> bytes:
    return attr(NFULA_CFG_CMD, bytes([command]))


class NflogSocket(Subscription[LoggedPacket]):
    """A reader of NFLOG groups in a network namespace ("" = this process's). Each
    group is bound to copy up to `copy_bytes` of each packet (the rule's `snaplen` may
    ask for fewer); `rcvbuf` is the socket's receive buffer (SO_RCVBUFFORCE).
    `qthresh` is how many messages the kernel batches before sending (1: each at once,
    for DNS answers that race their first connection); `keep_payload` keeps each
    packet's upper-layer bytes. Non-blocking: wait on `fileno()`, then `read()`."""

    error = NflogError

    def __init__(self, groups: Sequence[int], netns: str = "", copy_bytes: int = 128,
                 rcvbuf: int = 4 << 20, qthresh: int = QTHRESH,
                 keep_payload: bool = False) -> None:
        wanted = list(dict.fromkeys(groups))
        for group in wanted:
            if not 0 <= group <= 0xFFFF:
                raise ValueError(f"NFLOG group {group} is not in 0..65535")
        if not 0 < copy_bytes <= 0xFFFF - 4:
            raise ValueError(f"copy_bytes {copy_bytes} is not in 1..65531")
        if not 1 <= qthresh <= 1000:
            raise ValueError(f"qthresh {qthresh} is not in 1..1000")
        super().__init__(netns, rcvbuf=rcvbuf)
        self.keep_payload = keep_payload
        self.groups: tuple[int, ...] = ()
        try:
            for group in wanted:
                self._bind(group, copy_bytes, qthresh)
                self.groups += (group,)
        except BaseException:
            self.sock.close()
            raise

    def _bind(self, group: int, copy_bytes: int, qthresh: int) -> None:
        seq = self._next_seq()
        code = self._request(_config(
            group, seq, _command(NFULNL_CFG_CMD_BIND),
            attr(NFULA_CFG_MODE, struct.pack(">IBx", copy_bytes, NFULNL_COPY_PACKET)),
            attr(NFULA_CFG_NLBUFSIZ, struct.pack(">I", NLBUFSIZ)),
            attr(NFULA_CFG_TIMEOUT, struct.pack(">I", FLUSH_TIMEOUT)),
            attr(NFULA_CFG_QTHRESH, struct.pack(">I", qthresh))), seq)
        if code in (errno.EBUSY, errno.EPERM):
            raise NflogError(f"NFLOG group {group} is already bound by another reader "
                             f"({errno.errorcode[code]}); one socket per group and "
                             "namespace", code)
        if code:
            raise NflogError(f"binding NFLOG group {group}: {errno.errorcode.get(code, code)}",
                             code)

    def _parse(self, data: bytes) -> tuple[list[LoggedPacket], int]:
        return parse_messages(data, time.time(), self.keep_payload)

    def close(self) -> None:
        """Unbind the groups and close the socket (closing alone frees them too)."""
        if self.sock.fileno() < 0:
            return
        for group in self.groups:
            try:
                self.sock.send(_config(group, self._next_seq(),
                                       _command(NFULNL_CFG_CMD_UNBIND), ack=False))
            except OSError:
                break
        self.groups = ()
        self.sock.close()
