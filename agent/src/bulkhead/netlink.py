"""Netlink plumbing shared by the rooms that talk to the kernel (`dataplane` writes
nftables set elements; `observe` reads NFLOG and conntrack): the message and attribute
framing, a NETLINK_NETFILTER socket made inside a named network namespace, and a sysctl
written as that namespace sees it. Standard library only; no room of Bulkhead's."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import socket
import struct
from collections.abc import Iterator
from typing import Self

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLMSG_ERROR = 2
NLMSG_DONE = 3
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000


class NetlinkError(Exception):
    """The kernel refused the batch (or could not be reached); nothing of it applied."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code    # the errno the kernel answered, 0 if none


# ----------------------------------------------------------------------- messages
def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes((4 - length % 4) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def message(kind: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    header = struct.pack("=IHHII", 16 + 4 + len(body), kind, flags, seq, 0)
    return header + struct.pack("=BB", family, 0) + struct.pack(">H", res_id) + body


# ----------------------------------------------------------------------- the socket
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise NetlinkError(f"setns: {os.strerror(code)}", code)


@contextlib.contextmanager
def inside_netns(netns: str) -> Iterator[None]:
    """The calling thread inside the named network namespace (`ip netns` name,
    /run/netns/NAME) until the block ends, then back in its own; "" stays where it is.
    Sockets made and /proc/sys files opened meanwhile belong to that namespace."""
    if not netns:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        except OSError as e:
            raise NetlinkError(f"network namespace {netns}: {e.strerror}", e.errno or 0) \
                from None
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def open_socket(netns: str = "") -> socket.socket:
    """A NETLINK_NETFILTER socket in this process's network namespace, or in the named
    one (`ip netns` name, /run/netns/NAME): the thread enters it only while the socket is
    made, and the socket stays bound to it."""
    with inside_netns(netns):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def write_sysctl(name: str, value: str, netns: str = "") -> None:
    """Set sysctl `name` (dotted, as `sysctl` spells it) as the named network namespace
    sees it: per-namespace settings (net.netfilter.*, most of net.ipv4.*) change there
    only."""
    path = "/proc/sys/" + name.replace(".", "/")
    with inside_netns(netns):
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            where = f" in network namespace {netns}" if netns else ""
            raise NetlinkError(f"sysctl {name}={value}{where}: {e.strerror}", e.errno or 0) \
                from None


class NetlinkSocket:
    """What every netlink socket of Bulkhead's does alike: the socket (`sock`, made by
    the subclass), request sequence numbers, closing, use as a context manager."""

    sock: socket.socket

    def __init__(self) -> None:
        self._seq = int.from_bytes(os.urandom(3), "big")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq
