"""What the kernel readers share: netlink framing (messages in a datagram, attributes in
a message) and a non-blocking socket read in bounded batches, with the kernel's drops
(ENOBUFS) and unreadable messages counted, never raised.

The readers speak nfnetlink over a plain NETLINK_NETFILTER socket, as the nftables
element batches do (`dataplane.nftables.netlink`, whose `open_socket` they use): two
small message families do not warrant pyroute2."""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

from bulkhead.netlink import (
    SO_RCVBUFFORCE,
    NetlinkError,
    NetlinkSocket,
    open_socket,
)

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF       # clears NLA_F_NESTED and NLA_F_NET_BYTEORDER
RECV_BYTES = 1 << 18         # above the largest datagram either family sends (128 KiB)
REQUEST_TIMEOUT = 5.0        # seconds for the kernel to answer a request

T = TypeVar("T")


class Malformed(ValueError):
    """Bytes that are not the message they claim to be."""


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in one datagram. Raises
    Malformed at a header whose length does not fit: nothing after it can be framed."""
    at = 0
    while at < len(data):
        if at + 16 > len(data):
            raise Malformed(f"{len(data) - at} bytes left, less than a message header")
        length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", data, at)
        if length < 16 or at + length > len(data):
            raise Malformed(f"message length {length} at byte {at} of {len(data)}")
        yield kind, flags, seq, data[at + 16:at + length]
        at += (length + 3) & ~3


def attributes(data: bytes, at: int = 0) -> dict[int, bytes]:
    """Type (flags cleared) -> payload of the attributes in data[at:] (a repeated type:
    the last). Raises Malformed when an attribute's length does not fit."""
    found: dict[int, bytes] = {}
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4 or at + length > len(data):
            raise Malformed(f"attribute length {length} at byte {at} of {len(data)}")
        found[kind & NLA_TYPE_MASK] = data[at + 4:at + length]
        at += (length + 3) & ~3
    return found


def error_code(payload: bytes) -> int:
    """The errno an NLMSG_ERROR answer carries (0 for an acknowledgement)."""
    if len(payload) < 4:
        raise Malformed("short error message")
    code: int = struct.unpack_from("=i", payload)[0]
    return -code


class Channel(NetlinkSocket):
    """One non-blocking NETLINK_NETFILTER socket in a network namespace ("" = this
    process's), subscribed to multicast `groups` (a bit mask, bit n-1 for group n)."""

    error: type[NetlinkError] = NetlinkError   # what the subclass raises

    def __init__(self, netns: str = "", groups: int = 0, rcvbuf: int = 0) -> None:
        super().__init__()
        self.overruns = 0     # times the kernel dropped messages for want of room
        self.malformed = 0    # messages skipped as unreadable
        try:
            self.sock = open_socket(netns)
        except NetlinkError as e:
            raise self.error(str(e), e.code) from None
        try:
            self.sock.bind((0, groups))
            if rcvbuf:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except PermissionError:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
            raise self.error(f"netlink socket: {e.strerror}", e.errno or 0) from None
        self._buffer = bytearray(RECV_BYTES)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as e:
            raise self.error(f"netlink send: {e.strerror}", e.errno or 0) from None

    def _datagram(self, wait: float = 0.0) -> bytes | None:
        """The next datagram from the kernel, waiting up to `wait` seconds for one; None
        when none came. ENOBUFS (the kernel dropped messages) counts an overrun, a
        datagram cut short by the buffer a malformed message."""
        deadline = time.monotonic() + wait
        while True:
            try:
                size, _anc, flags, sender = self.sock.recvmsg_into([self._buffer])
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                select.select([self.sock], [], [], left)
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            if flags & socket.MSG_TRUNC:
                self.malformed += 1
                continue
            if sender[0] != 0:    # only the kernel (port 0) speaks to these sockets
                continue
            return bytes(self._buffer[:size])


class Subscription(Channel, Generic[T]):
    """A channel the kernel writes to unasked, read in bounded batches: `read` returns
    what is queued now and never blocks; items of a datagram beyond the limit wait for
    the next call."""

    def __init__(self, netns: str = "", groups: int = 0, rcvbuf: int = 0) -> None:
        super().__init__(netns, groups, rcvbuf)
        self._pending: deque[T] = deque()

    def _parse(self, data: bytes) -> tuple[list[T], int]:
        """The items of one datagram and how many of its messages were unreadable."""
        raise NotImplementedError

    def _take(self, data: bytes) -> None:
        items, bad = self._parse(data)
        self.malformed += bad
        self._pending.extend(items)

    def read(self, limit: int = 1000) -> list[T]:
        out: list[T] = []
        while len(out) < limit:
            if self._pending:
                out.append(self._pending.popleft())
                continue
            data = self._datagram()
            if data is None:
                break
            self._take(data)
        return out

    def _request(self, data: bytes, seq: int) -> int:
        """Send one request asking for an acknowledgement and return the errno it
        answers (0: done); what the kernel sends meanwhile is kept for `read`."""
        self._send(data)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            got = self._datagram(left)
            if got is None:
                break
            try:
                for kind, _flags, got_seq, payload in messages(got):
                    if kind == NLMSG_ERROR and got_seq == seq:
                        return error_code(payload)
            except Malformed:
                pass
            self._take(got)
        raise self.error(f"no answer from the kernel within {REQUEST_TIMEOUT:.0f} s",
                         errno.ETIMEDOUT)
