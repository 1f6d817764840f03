"""Set and map element changes sent to the kernel as one nfnetlink batch, without `nft`.

`nft -f` reads the kernel's whole ruleset (every element of every set) before it sends
anything, which costs 0.2-0.8 s with 100,000 elements. A label change only moves a few
elements, so the applier sends those itself: NFNL_MSG_BATCH_BEGIN, NFT_MSG_DELSETELEM
and NFT_MSG_NEWSETELEM messages, NFNL_MSG_BATCH_END, in one `sendmsg` on a plain
NETLINK_NETFILTER socket. The kernel applies the batch as one transaction (every element
or none) and acknowledges each message.

Elements are encoded the way `nft` 1.0.6 encodes them, so a set filled by `nft -f` and
changed here lists exactly as if `nft -f` had written the new elements:

- interval sets of one field (addresses, or a protocol or port map): a start element
  per interval and an end element (NFT_SET_ELEM_INTERVAL_END) at the value after its
  last one, unless that is past the field's maximum; an end element at zero first when
  the lowest interval does not start there (the kernel's rbtree needs the gap closed);
- concatenated keys: each field's bytes padded to 4; interval concatenations carry the
  last value of every field in NFTA_SET_ELEM_KEY_END;
- verdict maps: NFTA_SET_ELEM_DATA with accept, drop, return, or jump/goto a chain.

`encode_set` raises `Unsupported` for anything else, and the applier falls back to
`nft -f` for that change.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from bulkhead.dataplane.nftables.ruleset import Elements, NftSet, delta
from bulkhead.netlink import (
    NETLINK_CAP_ACK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    NetlinkError,
    NetlinkSocket,
    open_socket,
)
from bulkhead.netlink import attr as _attr
from bulkhead.netlink import message as _message
from bulkhead.netlink import nested as _nested
from bulkhead.netlink import string as _string

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_BATCH_GENID = 1
NFT_MSG_GETCHAIN = 4
NFT_MSG_GETRULE = 7
NFT_MSG_GETSET = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFTA_SET_COUNT = 20   # how many elements a set holds: not part of its shape
# Receive-buffer room per answer a batch waits for: a 36-byte error/ack message costs a
# socket buffer about 700 bytes of its accounting (skb truesize); 1 KiB each is enough.
ANSWER_ROOM = 1024
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_FLAGS = 3
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_KEY_END = 10
NFTA_DATA_VALUE = 1
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2
NFT_SET_ELEM_INTERVAL_END = 1
NFPROTO_INET = 1

VERDICTS = {"accept": 1, "drop": 0, "continue": -1, "return": -5, "jump": -3, "goto": -4}
# The bytes of one value of each nft type (a field of a concatenation is padded to 4).
FIELD_BYTES = {"ipv4_addr": 4, "ipv6_addr": 16, "inet_proto": 1, "inet_service": 2,
               "ifname": 16}
# Element attributes of one NEWSETELEM/DELSETELEM message stay under this many bytes:
# a netlink attribute's length is 16 bits.
MESSAGE_BYTES = 60_000
NLM_F_DUMP_INTR = 0x10   # a dump's answer: the ruleset changed while it was dumped
DUMP_TRIES = 3           # reads of an interrupted dump (or dumps) before giving up


class Unsupported(Exception):
    """A set type or element text this encoder does not know; use `nft -f` instead."""


@dataclass(frozen=True)
class Element:
    """One element as the kernel holds it."""

    key: bytes
    flags: int = 0                       # NFT_SET_ELEM_INTERVAL_END for an end element
    key_end: bytes | None = None         # the range's last key (concatenated intervals)
    verdict: tuple[str, str] | None = None   # ("accept", "") / ("jump", "chain name")
    timeout_ms: int | None = None        # a set with timeouts: the element's lifetime


# ----------------------------------------------------------------------- encoding
def _field_range(typ: str, text: str) -> tuple[int, int]:
    """The inclusive range of integers one element field of type `typ` covers."""
    if typ in ("ipv4_addr", "ipv6_addr"):
        address, network = ((ipaddress.IPv4Address, ipaddress.IPv4Network)
                            if typ == "ipv4_addr" else
                            (ipaddress.IPv6Address, ipaddress.IPv6Network))
        try:
            if "/" in text:
                net = network(text, strict=True)
                lo, hi = int(net.network_address), int(net.broadcast_address)
            elif "-" in text:
                a, b = text.split("-", 1)
                lo, hi = int(address(a)), int(address(b))
            else:
                lo = hi = int(address(text))
        except ValueError:
            raise Unsupported(f"not an {typ} element: {text!r}") from None
    elif typ in ("inet_proto", "inet_service"):
        a, _, b = text.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise Unsupported(f"not a numeric {typ} element: {text!r}")
        lo, hi = int(a), int(b or a)
        if hi >= 1 << (8 * FIELD_BYTES[typ]):
            raise Unsupported(f"{typ} value out of range: {text!r}")
    else:
        raise Unsupported(f"element type {typ} is not encoded over netlink")
    if lo > hi:
        raise Unsupported(f"empty range: {text!r}")
    return lo, hi


def _value(typ: str, text: str) -> bytes:
    """One field's value in the kernel's byte order (network order, names NUL-padded)."""
    if typ == "ifname":
        if len(text) < 2 or text[0] != '"' or text[-1] != '"' or "*" in text \
                or "\\" in text:
            raise Unsupported(f"not a plain interface name: {text!r}")
        name = text[1:-1].encode()
        if not name or len(name) >= FIELD_BYTES["ifname"]:
            raise Unsupported(f"interface name length: {text!r}")
        return name.ljust(FIELD_BYTES["ifname"], b"\0")
    lo, hi = _field_range(typ, text)
    if lo != hi:
        raise Unsupported(f"a range in a set without intervals: {text!r}")
    return lo.to_bytes(FIELD_BYTES[typ], "big")


def _verdict(text: str) -> tuple[str, str]:
    words = text.split()
    if len(words) == 1 and words[0] in ("accept", "drop", "return", "continue"):
        return words[0], ""
    if len(words) == 2 and words[0] in ("jump", "goto"):
        return words[0], words[1]
    raise Unsupported(f"verdict {text!r} is not encoded over netlink")


Unit = tuple[Element, ...]   # what is added or deleted together: an interval's start and end


def encode_set(nft_set: NftSet, elements: Iterable[str] | None = None) -> frozenset[Element]:
    """The kernel's elements for `nft_set` holding `elements` (default: its own), as `nft`
    would have sent them. Raises Unsupported for a type or element not covered here."""
    return frozenset(e for unit in encode_units(nft_set, elements) for e in unit)


def encode_units(nft_set: NftSet, elements: Iterable[str] | None = None,
                 whole: bool = True) -> frozenset[Unit]:
    """`encode_set`, with an interval's start and end element kept together: a change
    replaces whole intervals, as `nft` does, so an end element is never left behind
    without its start (the kernel would see two ends in a row, an overlap, mid-batch).
    `whole=False` encodes some of a set's elements: without the leading end element
    (`leading_end` gives it) and without checking that intervals do not overlap."""
    texts = nft_set.elements if elements is None else tuple(elements)
    if nft_set.map_to not in (None, "verdict"):
        raise Unsupported(f"map data type {nft_set.map_to} is not encoded over netlink")
    if set(nft_set.flags) - {"interval"}:
        raise Unsupported(f"set flags {nft_set.flags} are not encoded over netlink")
    types = [t.strip() for t in nft_set.type.split(" . ")]
    for typ in types:
        if typ not in FIELD_BYTES:
            raise Unsupported(f"element type {typ} is not encoded over netlink")
    interval = "interval" in nft_set.flags
    parsed: list[tuple[list[str], tuple[str, str] | None]] = []
    for text in texts:
        key_text, sep, data = text.partition(" : ")
        if bool(sep) != (nft_set.map_to is not None):
            raise Unsupported(f"element {text!r} does not fit {nft_set.name}")
        parts = [p.strip() for p in key_text.split(" . ")]
        if len(parts) != len(types):
            raise Unsupported(f"element {text!r} does not fit the type {nft_set.type}")
        parsed.append((parts, _verdict(data) if sep else None))
    if len(types) > 1:
        return frozenset((e,) for e in _concatenated(types, parsed, interval))
    if not interval:
        return frozenset((Element(_value(types[0], parts[0]), verdict=verdict),)
                         for parts, verdict in parsed)
    return frozenset(_intervals(types[0], parsed, whole))


def leading_end(nft_set: NftSet, elements: Sequence[str]) -> frozenset[Unit]:
    """The end element at zero that `nft` puts first in an interval set of one field
    whose lowest interval does not start at zero; empty for other sets. `elements`:
    sorted texts."""
    typ = nft_set.type.strip()
    if "interval" not in nft_set.flags or typ not in FIELD_BYTES or typ == "ifname":
        return frozenset()
    if not elements:
        return frozenset()
    # Only a text that begins with 0 or ':' can start at zero; parse just those.
    for text in _maybe_zero(elements):
        key = text.partition(" : ")[0].strip()
        if _field_range(typ, key)[0] == 0:
            return frozenset()
    return frozenset({(Element(bytes(FIELD_BYTES[typ]), NFT_SET_ELEM_INTERVAL_END),)})


def _maybe_zero(elements: Sequence[str]) -> Iterator[str]:
    """The texts of sorted `elements` that begin with 0 or ':' (two runs of a sorted
    list, found by bisection: a patched list is not written out for them)."""
    if isinstance(elements, Elements):
        yield from (t for t in _maybe_zero(elements.root) if t not in elements.gone)
        yield from (t for t in elements.came if t[:1] in ("0", ":"))
        return
    for first, after in (("0", "1"), (":", ";")):
        lo = bisect.bisect_left(elements, first)
        yield from (elements[i] for i in range(lo, bisect.bisect_left(elements, after, lo)))


def _concatenated(types: Sequence[str], parsed: Sequence[tuple[list[str], tuple[str, str] | None]],
                  interval: bool) -> Iterable[Element]:
    def pad(raw: bytes) -> bytes:
        return raw.ljust((len(raw) + 3) // 4 * 4, b"\0")

    for parts, verdict in parsed:
        if not interval:
            yield Element(b"".join(pad(_value(t, p)) for t, p in zip(types, parts, strict=True)),
                          verdict=verdict)
            continue
        lows, highs = [], []
        for typ, part in zip(types, parts, strict=True):
            if typ == "ifname":
                raise Unsupported("interface names in interval concatenations")
            lo, hi = _field_range(typ, part)
            lows.append(pad(lo.to_bytes(FIELD_BYTES[typ], "big")))
            highs.append(pad(hi.to_bytes(FIELD_BYTES[typ], "big")))
        yield Element(b"".join(lows), key_end=b"".join(highs), verdict=verdict)


def _intervals(typ: str, parsed: Sequence[tuple[list[str], tuple[str, str] | None]],
               whole: bool) -> Iterable[Unit]:
    if typ == "ifname":
        raise Unsupported("interface name intervals (wildcards)")
    size = FIELD_BYTES[typ]
    top = (1 << (8 * size)) - 1
    ranges = sorted(((*_field_range(typ, parts[0]), verdict) for parts, verdict in parsed),
                    key=lambda r: (r[0], r[1]))
    for (_, hi, _), (lo, _, _) in itertools.pairwise(ranges if whole else ()):
        if lo <= hi:
            raise Unsupported("overlapping intervals")
    if whole and ranges and ranges[0][0] != 0:
        yield (Element(bytes(size), NFT_SET_ELEM_INTERVAL_END),)
    for lo, hi, verdict in ranges:
        start = Element(lo.to_bytes(size, "big"), verdict=verdict)
        if hi < top:
            yield start, Element((hi + 1).to_bytes(size, "big"), NFT_SET_ELEM_INTERVAL_END)
        else:
            yield (start,)


# ----------------------------------------------------------------------- messages
def _element_attr(e: Element) -> bytes:
    attrs = [_nested(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, e.key))]
    if e.key_end is not None:
        attrs.append(_nested(NFTA_SET_ELEM_KEY_END, _attr(NFTA_DATA_VALUE, e.key_end)))
    if e.flags:
        attrs.append(_attr(NFTA_SET_ELEM_FLAGS, struct.pack(">I", e.flags)))
    if e.timeout_ms is not None:
        attrs.append(_attr(NFTA_SET_ELEM_TIMEOUT, struct.pack(">Q", e.timeout_ms)))
    if e.verdict is not None:
        code, chain = e.verdict
        inner = [_attr(NFTA_VERDICT_CODE, struct.pack(">i", VERDICTS[code]))]
        if chain:
            inner.append(_string(NFTA_VERDICT_CHAIN, chain))
        attrs.append(_nested(NFTA_SET_ELEM_DATA, _nested(NFTA_DATA_VERDICT, *inner)))
    return _nested(NFTA_LIST_ELEM, *attrs)


def timed_elements(family: int, addresses: Iterable[tuple[str, int]]) -> tuple[Element, ...]:
    """Elements of a plain address set with timeouts (`flags timeout`): (address text,
    milliseconds) pairs of `family`; others are skipped. Adding an element the set holds
    sets its timeout anew (kernel 6.x), longer or shorter."""
    out = []
    for text, ms in addresses:
        address = ipaddress.ip_address(text)
        if address.version == family and ms > 0:
            out.append(Element(address.packed, timeout_ms=ms))
    return tuple(sorted(out, key=lambda e: e.key))


@dataclass(frozen=True)
class Change:
    """Elements to delete from and add to one set of the table."""

    set_name: str
    delete: tuple[Element, ...] = ()
    add: tuple[Element, ...] = ()


def _element_messages(table: str, kind: int, flags: int, set_name: str,
                      elements: Sequence[Element]) -> Iterable[tuple[int, int, bytes]]:
    """(kind, flags, body) per message, each message's elements under MESSAGE_BYTES."""
    head = _string(NFTA_SET_ELEM_LIST_TABLE, table) + _string(NFTA_SET_ELEM_LIST_SET, set_name)
    chunk: list[bytes] = []
    size = 0
    for e in elements:
        raw = _element_attr(e)
        if chunk and size + len(raw) > MESSAGE_BYTES:
            yield kind, flags, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw)
    if chunk:
        yield kind, flags, head + _nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)


class NftNetlink(NetlinkSocket):
    """One netlink socket to nf_tables in a network namespace ("" = this process's)."""

    def __init__(self, netns: str = "", timeout: float = 30.0) -> None:
        super().__init__()
        self.sock = open_socket(netns)
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        # Error answers carry only the failing message's header, not its 60 kB of elements.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._receive_room = 0
        self.interrupted = False

    def _receive(self) -> list[tuple[int, int, bytes]]:
        """One datagram's messages as (type, seq, payload). A message flagged
        NLM_F_DUMP_INTR sets `interrupted`: the dump it belongs to met a change of the
        ruleset while it ran, and may have skipped or repeated objects."""
        try:
            data = self.sock.recv(1 << 20)
        except OSError as e:
            raise NetlinkError(f"netlink receive: {e}", getattr(e, "errno", 0) or 0) from None
        out = []
        at = 0
        while at + 16 <= len(data):
            length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
            if length < 16:
                break
            if flags & NLM_F_DUMP_INTR:
                self.interrupted = True
            out.append((kind, seq, data[at + 16:at + length]))
            at += (length + 3) & ~3
        return out

    def _room_for_answers(self, count: int) -> None:
        want = max(count * ANSWER_ROOM, 1 << 18)
        if want <= self._receive_room:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, want)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
        self._receive_room = want

    def _send(self, data: bytes | bytearray) -> None:
        # The whole batch is one datagram: make room for it in the send buffer.
        want = max(len(data) * 2, 1 << 16)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        try:
            self.sock.send(data)
        except OSError as e:
            raise NetlinkError(f"netlink send: {e}", getattr(e, "errno", 0) or 0) from None

    def generation(self) -> int:
        """The ruleset generation: every committed transaction, in any table of this
        namespace, raises it by one."""
        seq = self._next_seq()
        self._send(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST,
                            seq, socket.AF_UNSPEC, 0, b""))
        while True:
            for kind, got, payload in self._receive():
                if got != seq:
                    continue
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    raise NetlinkError(f"GETGEN: {os.strerror(code)}", code)
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
                    at = 4
                    while at + 4 <= len(payload):
                        length, attr = struct.unpack_from("=HH", payload, at)
                        if attr & 0x3FFF == NFTA_GEN_ID:
                            return int(struct.unpack_from(">I", payload, at + 4)[0])
                        at += (length + 3) & ~3
                    raise NetlinkError("GETGEN: no generation in the answer")

    def fingerprint(self, table: str) -> str | None:
        """A digest of `inet <table>`'s chains, rules and set declarations, without set
        elements (None when the table is missing). `nft -t list table` still reads every
        element, seconds with 100,000 of them; these dumps carry none. A dump that a
        commit interrupted (the DNS writer's, every second) is read again, up to
        DUMP_TRIES times in all."""
        for attempt in range(DUMP_TRIES):
            try:
                return self._fingerprint(table)
            except NetlinkError as e:
                if e.code != errno.EINTR or attempt == DUMP_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _fingerprint(self, table: str) -> str | None:
        digest = hashlib.sha256()
        found = False
        for kind in (NFT_MSG_GETCHAIN, NFT_MSG_GETSET, NFT_MSG_GETRULE):
            for payload in self.dump(kind):
                attrs = []
                at = 4   # after the nfgenmsg
                while at + 4 <= len(payload):
                    length, attr = struct.unpack_from("=HH", payload, at)
                    attrs.append((attr & 0x3FFF, payload[at:at + length]))
                    at += (length + 3) & ~3
                # The first attribute names the table, for chains, sets and rules alike.
                if not attrs or attrs[0] != (1, _string(1, table)[:4 + len(table) + 1]):
                    continue
                found = True
                digest.update(struct.pack("=H", kind))
                for attr, raw in attrs:
                    if not (kind == NFT_MSG_GETSET and attr == NFTA_SET_COUNT):
                        digest.update(raw)
        return digest.hexdigest() if found else None

    def dump(self, kind: int, body: bytes = b"") -> Iterable[bytes]:
        """The answers (nfgenmsg + attributes) to a dump request of `kind` (GETCHAIN...),
        of every inet table; `body`: the request's attributes (GETSETELEM names a set).
        NetlinkError (EINTR), once the dump is read to its end, if the kernel flagged it
        as interrupted: the ruleset changed while it was read (any commit, in any table,
        even of elements only), and an object may have been skipped or sent twice."""
        seq = self._next_seq()
        self.interrupted = False
        self._send(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_DUMP,
                            seq, NFPROTO_INET, 0, body))
        while True:
            for got_kind, got, payload in self._receive():
                if got != seq:
                    continue
                if got_kind == NLMSG_DONE:
                    # Read to its end first: nothing of the dump is left on the socket.
                    if self.interrupted:
                        raise NetlinkError("dump: the ruleset changed while it was read",
                                           errno.EINTR)
                    return
                if got_kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(f"dump: {os.strerror(code)}", code)
                    continue
                yield payload

    def apply(self, table: str, changes: Sequence[Change],
              generation: int | None = None) -> int:
        """Send every change in one transaction to `inet <table>`: deletions first, then
        additions. With `generation`, the kernel refuses the batch (ERESTART) if the
        ruleset is no longer at that generation. Returns the number of messages sent.
        Raises NetlinkError if any message was refused; then nothing was applied."""
        parts: list[tuple[int, int, bytes]] = []
        for change in changes:
            parts += _element_messages(table, NFT_MSG_DELSETELEM, 0, change.set_name,
                                       change.delete)
        for change in changes:
            parts += _element_messages(table, NFT_MSG_NEWSETELEM, NLM_F_CREATE,
                                       change.set_name, change.add)
        return self.transaction(parts, generation)

    def transaction(self, parts: Sequence[tuple[int, int, bytes]],
                    generation: int | None = None) -> int:
        """Send `parts` ((NFT_MSG_* kind, extra flags, body) of nf_tables messages, family
        inet) in one batch: one transaction, applied whole or not at all. With
        `generation`, the kernel refuses it (ERESTART) if the ruleset is no longer at
        that generation. Returns the number of messages sent. Raises NetlinkError if
        any message was refused; then nothing was applied."""
        if not parts:
            return 0
        begin_seq = self._next_seq()
        genid = b"" if generation is None else _attr(NFNL_BATCH_GENID,
                                                      struct.pack(">I", generation))
        begin = _message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, socket.AF_UNSPEC,
                         NFNL_SUBSYS_NFTABLES, genid)
        # Written into one buffer of the batch's size: a table's load is tens of MB, and
        # a list of messages joined would hold it twice more.
        batch = bytearray(len(begin) + sum(20 + len(body) for _, _, body in parts) + 20)
        batch[:len(begin)] = begin
        at = len(begin)
        pending: set[int] = set()
        for kind, flags, body in parts:
            seq = self._next_seq()
            pending.add(seq)
            struct.pack_into("=IHHIIBBH", batch, at, 20 + len(body),
                             (NFNL_SUBSYS_NFTABLES << 8) | kind,
                             NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0, NFPROTO_INET, 0, 0)
            batch[at + 20:at + 20 + len(body)] = body
            at += 20 + len(body)
        batch[at:] = _message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next_seq(),
                              socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES, b"")
        # Every message is answered before any answer is read: room for all of them (a
        # default buffer holds about 280; past that the kernel drops them, ENOBUFS).
        self._room_for_answers(len(parts))
        self._send(batch)
        errors: list[tuple[int, int]] = []
        while pending:
            for kind, seq, payload in self._receive():
                if kind != NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", payload)[0]
                if seq == begin_seq:
                    # The batch itself (generation check, commit) failed: no per-message
                    # answers may follow.
                    raise NetlinkError(_explain(code, None), code)
                if seq in pending:
                    pending.discard(seq)
                    if code:
                        errors.append((seq, code))
        if errors:
            seq, code = errors[0]
            index = seq - begin_seq - 1
            raise NetlinkError(_explain(code, parts[index] if 0 <= index < len(parts)
                                        else None), code)
        return len(parts)


def _explain(code: int, part: tuple[int, int, bytes] | None) -> str:
    where = ""
    if part is not None and part[0] not in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM):
        where = f" (nf_tables message {part[0]})"
    elif part is not None:
        body = part[2]
        names: list[str] = []
        at = 0
        while at + 4 <= len(body) and len(names) < 2:
            length, attr = struct.unpack_from("=HH", body, at)
            if attr in (NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET):
                names.append(body[at + 4:at + length].rstrip(b"\0").decode(errors="replace"))
            at += (length + 3) & ~3
        where = f" (set {' '.join(names[1:])})" if len(names) > 1 else ""
    if code == errno.ERESTART:
        return "the ruleset changed since it was read (generation mismatch)" + where
    return f"the kernel refused the batch: {os.strerror(code)}{where}"


def set_changes(old: Iterable[NftSet], new: Iterable[NftSet]) -> list[Change]:
    """The element changes that turn the `old` sets into the `new` ones (same names and
    declarations). Raises Unsupported if any changed set cannot be encoded."""
    before = {s.name: s for s in old}
    out = []
    for s in new:
        previous = before[s.name]
        # Only the texts that changed are encoded: with 100,000 elements, parsing them
        # all would cost more than the kernel's whole update. Patched lists of one root
        # say what changed; others are compared where they differ.
        known = delta(previous.elements, s.elements)
        if known is not None:
            old_texts, new_texts = known
        else:
            if previous.elements == s.elements:
                continue
            old_texts, new_texts = (frozenset(t) for t in _differing(
                tuple(previous.elements), tuple(s.elements)))
        if not old_texts and not new_texts:
            continue
        gone = encode_units(previous, old_texts - new_texts, whole=False)
        came = encode_units(s, new_texts - old_texts, whole=False)
        was_end, now_end = leading_end(previous, previous.elements), leading_end(s, s.elements)
        gone, came = gone | (was_end - now_end), came | (now_end - was_end)
        gone, came = gone - came, came - gone   # the same element written another way
        if gone or came:
            out.append(Change(s.name, in_kernel_order(e for u in gone for e in u),
                              in_kernel_order(e for u in came for e in u)))
    return out


def _differing(old: tuple[str, ...], new: tuple[str, ...], chunk: int = 256
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`old` and `new` without the run of elements they begin with and the run they end
    with: a label change usually moves a few neighbouring elements, and comparing slices
    runs in C, where sets of 100,000 strings cost tens of milliseconds. (Elements of a
    rendered set are distinct, so nothing in the runs can be in the rest.)"""
    n = min(len(old), len(new))
    head = 0
    while head + chunk <= n and old[head:head + chunk] == new[head:head + chunk]:
        head += chunk
    while head < n and old[head] == new[head]:
        head += 1
    rest = n - head
    tail = 0
    while tail + chunk <= rest and (old[len(old) - tail - chunk:len(old) - tail]
                                    == new[len(new) - tail - chunk:len(new) - tail]):
        tail += chunk
    while tail < rest and old[len(old) - 1 - tail] == new[len(new) - 1 - tail]:
        tail += 1
    return old[head:len(old) - tail], new[head:len(new) - tail]


def in_kernel_order(elements: Iterable[Element]) -> tuple[Element, ...]:
    """Ascending keys, an end element before a start element of the same key: the order
    `nft` sends them in. The kernel's interval tree finds elements to delete in one
    transaction only in this order (deleting a start before the end of the same key
    fails with ENOENT)."""
    return tuple(sorted(elements, key=lambda e: (e.key, -e.flags, e.key_end or b"",
                                                 e.verdict or ("", ""))))
