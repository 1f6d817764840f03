"""Conntrack reader: the kernel's connection tracking table and its destroy (and new)
events, over ctnetlink (NFNL_SUBSYS_CTNETLINK), with each direction's packet and byte
counters.

This module speaks nfnetlink itself over a plain NETLINK_NETFILTER socket, as the
nftables element batches do: pyroute2 would be a large dependency for two small message
families.

Every integer in a ctnetlink attribute is big-endian: ports and ICMP ids (16 bits),
CTA_ID (32), counters and timestamps (64; CTA_TIMESTAMP in nanoseconds since the epoch).

What needs which per-namespace sysctl (each applies to connections created after it is
set, since the kernel attaches the extension when it creates an entry):

- net.netfilter.nf_conntrack_acct = 1 for the counters (`enable_accounting`); without
  it they read 0.
- net.netfilter.nf_conntrack_timestamp = 1 for `start` and `stop`
  (`enable_timestamps`); without it they are None.
- net.netfilter.nf_conntrack_events = 1 or 2 for events at all. With 2 (the kernel's
  default) only connections created while some socket listened to conntrack events get
  them: a reader started later misses the destroy events of older connections. With 1
  (`enable_events`) every connection gets them. A destroy event carries the final
  counters when accounting is on.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from bulkhead.netlink import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NetlinkError,
    message,
    write_sysctl,
)
from bulkhead.observe.reader import (
    NLMSG_DONE,
    NLMSG_ERROR,
    REQUEST_TIMEOUT,
    Channel,
    Malformed,
    Subscription,
    attributes,
    error_code,
    messages,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TIMESTAMP = 20
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2
CTA_TIMESTAMP_START = 1
CTA_TIMESTAMP_STOP = 2

NEW_MESSAGE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
DELETE_MESSAGE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
GET_MESSAGE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
EVENT_KINDS = {NEW_MESSAGE: "new", DELETE_MESSAGE: "destroy"}
FAMILIES: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 6}   # nfgen_family -> version
# (source, destination) attributes and address bytes per family.
ADDRESSES = {4: (CTA_IP_V4_SRC, CTA_IP_V4_DST, 4), 6: (CTA_IP_V6_SRC, CTA_IP_V6_DST, 16)}
# (id, type, code) attributes for ICMP and ICMPv6.
ICMP_FIELDS = {1: (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE),
               58: (CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE)}
DUMP_LIMIT = 1_000_000


class ConntrackError(NetlinkError):
    """The conntrack table could not be read (no namespace, no answer, refused)."""


@dataclass(frozen=True)
class ConnTuple:
    """One direction of a tracked connection. Ports for the protocols that have them
    (TCP, UDP, SCTP, UDP-Lite, DCCP), else None; ICMP and ICMPv6 carry their id, type
    and code in the icmp_ fields instead (the names `nflog.LoggedPacket` uses)."""

    family: int                 # 4 or 6
    proto: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


@dataclass(frozen=True)
class ConntrackEntry:
    """A tracked connection: counters are 0 without accounting, times None without
    timestamps (see the module's sysctls); `stop` only in destroy events."""

    id: int | None
    orig: ConnTuple             # as the first packet went
    reply: ConnTuple            # as answers come back (after NAT, where there is any)
    packets_orig: int = 0
    bytes_orig: int = 0
    packets_reply: int = 0
    bytes_reply: int = 0
    start: float | None = None  # seconds since the epoch
    stop: float | None = None


def enable_accounting(netns: str = "") -> None:
    """Count packets and bytes of connections created from now on in `netns`."""
    _sysctl("nf_conntrack_acct", netns)


def enable_timestamps(netns: str = "") -> None:
    """Record start (and, on destroy, stop) times of connections created from now on."""
    _sysctl("nf_conntrack_timestamp", netns)


def enable_events(netns: str = "") -> None:
    """Give every connection created from now on events, listened to or not (the
    default, 2, only gives them to connections created while a reader listens)."""
    _sysctl("nf_conntrack_events", netns)


def _sysctl(name: str, netns: str) -> None:
    try:
        write_sysctl(f"net.netfilter.{name}", "1", netns)
    except NetlinkError as e:
        raise ConntrackError(str(e), e.code) from None


def _u(raw: bytes, size: int, what: str) -> int:
    if len(raw) != size:
        raise Malformed(f"{what}: {len(raw)} bytes, not {size}")
    return int.from_bytes(raw, "big")


def _tuple(family: int, raw: bytes) -> ConnTuple:
    attrs = attributes(raw)
    if CTA_TUPLE_IP not in attrs or CTA_TUPLE_PROTO not in attrs:
        raise Malformed("tuple without addresses or protocol")
    ips = attributes(attrs[CTA_TUPLE_IP])
    src_attr, dst_attr, size = ADDRESSES[family]
    if len(ips.get(src_attr, b"")) != size or len(ips.get(dst_attr, b"")) != size:
        raise Malformed(f"tuple without IPv{family} addresses")
    proto = attributes(attrs[CTA_TUPLE_PROTO])
    if CTA_PROTO_NUM not in proto:
        raise Malformed("tuple without a protocol number")
    number = _u(proto[CTA_PROTO_NUM], 1, "protocol")
    ports = [None if kind not in proto else _u(proto[kind], 2, "port")
             for kind in (CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT)]
    icmp: list[int | None] = [None, None, None]
    if number in ICMP_FIELDS:
        icmp = [None if kind not in proto else _u(proto[kind], size, "icmp")
                for kind, size in zip(ICMP_FIELDS[number], (2, 1, 1), strict=True)]
    return ConnTuple(family, number, ipaddress.ip_address(ips[src_attr]),
                     ipaddress.ip_address(ips[dst_attr]),
                     ports[0], ports[1], *icmp)


def _counters(raw: bytes | None) -> tuple[int, int]:
    if raw is None:
        return 0, 0
    attrs = attributes(raw)
    return (_u(attrs.get(CTA_COUNTERS_PACKETS, bytes(8)), 8, "packets"),
            _u(attrs.get(CTA_COUNTERS_BYTES, bytes(8)), 8, "bytes"))


def parse_entry(payload: bytes) -> ConntrackEntry:
    """One ctnetlink message's entry (the payload after the netlink header: nfgenmsg and
    attributes). Raises Malformed when it is not one."""
    if len(payload) < 4:
        raise Malformed("no nfgenmsg")
    family = FAMILIES.get(payload[0])
    if family is None:
        raise Malformed(f"family {payload[0]} is not IPv4 or IPv6")
    attrs = attributes(payload, 4)
    if CTA_TUPLE_ORIG not in attrs or CTA_TUPLE_REPLY not in attrs:
        raise Malformed("entry without both tuples")
    times = attributes(attrs.get(CTA_TIMESTAMP, b""))
    start, stop = (_u(times[kind], 8, "timestamp") / 1e9 if kind in times else None
                   for kind in (CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP))
    packets_orig, bytes_orig = _counters(attrs.get(CTA_COUNTERS_ORIG))
    packets_reply, bytes_reply = _counters(attrs.get(CTA_COUNTERS_REPLY))
    return ConntrackEntry(
        _u(attrs[CTA_ID], 4, "id") if CTA_ID in attrs else None,
        _tuple(family, attrs[CTA_TUPLE_ORIG]), _tuple(family, attrs[CTA_TUPLE_REPLY]),
        packets_orig, bytes_orig, packets_reply, bytes_reply, start or None, stop or None)


def parse_messages(data: bytes) -> tuple[list[tuple[str, ConntrackEntry]], int]:
    """The ("new" | "destroy", entry) events in one datagram, and how many of its
    messages were unreadable; other messages are passed over."""
    events: list[tuple[str, ConntrackEntry]] = []
    bad = 0
    try:
        for kind, _flags, _seq, payload in messages(data):
            if kind not in EVENT_KINDS:
                continue
            try:
                events.append((EVENT_KINDS[kind], parse_entry(payload)))
            except Malformed:
                bad += 1
    except Malformed:
        bad += 1
    return events, bad


class Conntrack(Channel):
    """The conntrack table of a network namespace ("" = this process's), read on
    demand. `truncated` says how many entries the last dump left out for its limit,
    `malformed` how many messages were unreadable."""

    error = ConntrackError

    def __init__(self, netns: str = "") -> None:
        super().__init__(netns)
        self.truncated = 0

    def dump(self, family: int = 0, limit: int = DUMP_LIMIT) -> list[ConntrackEntry]:
        """Every entry of `family` (AF_INET, AF_INET6; 0: both), the first `limit` of
        them; the rest are read off the socket and counted in `truncated`."""
        seq = self._next_seq()
        self._send(message(GET_MESSAGE, NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, b""))
        entries: list[ConntrackEntry] = []
        self.truncated = 0
        while True:
            data = self._datagram(REQUEST_TIMEOUT)
            if data is None:
                raise ConntrackError(f"conntrack dump: no answer within "
                                     f"{REQUEST_TIMEOUT:.0f} s")
            try:
                for kind, _flags, got, payload in messages(data):
                    if got != seq:
                        continue
                    if kind == NLMSG_DONE:
                        return entries
                    if kind == NLMSG_ERROR:
                        code = error_code(payload)
                        if code:
                            raise ConntrackError(f"conntrack dump: errno {code}", code)
                    elif kind == NEW_MESSAGE:
                        if len(entries) >= limit:
                            self.truncated += 1
                            continue
                        try:
                            entries.append(parse_entry(payload))
                        except Malformed:
                            self.malformed += 1
            except Malformed:
                self.malformed += 1


class ConntrackEvents(Subscription[tuple[str, ConntrackEntry]]):
    """Conntrack events of a network namespace ("" = this process's) as they happen:
    ("destroy", entry) with the final counters, and ("new", entry) if asked.
    Non-blocking: wait on `fileno()`, then `read()`; `overruns` counts the times the
    kernel dropped events (ENOBUFS) for want of room in the `rcvbuf` bytes."""

    error = ConntrackError

    def __init__(self, netns: str = "", destroy: bool = True, new: bool = False,
                 rcvbuf: int = 4 << 20) -> None:
        groups = ((1 << (NFNLGRP_CONNTRACK_DESTROY - 1) if destroy else 0)
                  | (1 << (NFNLGRP_CONNTRACK_NEW - 1) if new else 0))
        if not groups:
            raise ValueError("ConntrackEvents needs destroy or new events")
        super().__init__(netns, groups, rcvbuf)

    def _parse(self, data: bytes) -> tuple[list[tuple[str, ConntrackEntry]], int]:
        return parse_messages(data)
