"""Two network namespaces joined by a veth pair, for the kernel readers' tests, and the
traffic they need: sockets made inside a namespace (`inside_netns`, so no subprocess per
probe), every one with a timeout.

Client 198.18.219.1 and 2001:2:0:db::1, server .2 and ::2 (benchmarking ranges only).
The fixture removes the namespaces (the veth pair goes with them) and stops any process
left in them, pass or fail.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

from bulkhead.lab.kernel import ip, ip_batches
from bulkhead.lab.processes import pids_in, process_start, run, stop_processes
from bulkhead.netlink import inside_netns
from bulkhead.observe.reader import Subscription
from tests.labfixture import need_root

TIMEOUT = 2.0              # seconds for any one socket operation
ADDRESSES = {4: ("198.18.219.1", "198.18.219.2"), 6: ("2001:2:0:db::1", "2001:2:0:db::2")}
PREFIXES = {4: 24, 6: 64}
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_serial = itertools.count()
T = TypeVar("T")


@dataclass(frozen=True)
class Pair:
    client: str
    server: str

    def socket_in(self, ns: str, family: int, kind: int = socket.SOCK_STREAM,
               proto: int = 0) -> socket.socket:
        """A socket of namespace `ns` with a timeout."""
        with inside_netns(ns):
            sock = socket.socket(FAMILY[family], kind, proto)
        sock.settimeout(TIMEOUT)
        return sock

    def nft(self, script: str) -> None:
        run(self.server, ["nft", "-f", "-"], check=True, timeout=30, input=script)

    def listen(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A server socket on a free port of the server's address."""
        sock = self.socket_in(self.server, family, kind)
        sock.bind((ADDRESSES[family][1], 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(8)
        return sock

    def tcp_exchange(self, family: int, listener: socket.socket, send: int = 0,
                     answer: int = 0) -> tuple[socket.socket, socket.socket, int]:
        """Connect from the client to `listener`, send `send` bytes, have the server
        answer `answer` bytes; (client socket, server socket, client port), both open."""
        client = self.socket_in(self.client, family)
        client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
        server.settimeout(TIMEOUT)
        client.sendall(b"q" * send)
        _read_exactly(server, send)
        server.sendall(b"a" * answer)
        _read_exactly(client, answer)
        return client, server, client.getsockname()[1]

    def udp_exchange(self, family: int, server: socket.socket) -> int:
        """A datagram to `server`, its answer, a second datagram; the client's port."""
        with self.socket_in(self.client, family, socket.SOCK_DGRAM) as client:
            target = server.getsockname()[:2]
            client.sendto(b"one", target)
            _, peer = server.recvfrom(64)
            server.sendto(b"back", peer)
            client.recvfrom(64)
            client.sendto(b"two", target)
            server.recvfrom(64)
            port: int = client.getsockname()[1]
            return port

    def ping(self, family: int, ident: int) -> None:
        """One ICMP(v6) echo request from the client to the server, its reply awaited."""
        proto = socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6
        request, reply = (8, 0) if family == 4 else (128, 129)
        message = struct.pack(">BBHHH", request, 0, 0, ident, 1) + b"bulkhead"
        if family == 4:    # the kernel computes ICMPv6 checksums itself
            message = message[:2] + struct.pack(">H", checksum(message)) + message[4:]
        with self.socket_in(self.client, family, socket.SOCK_RAW, proto) as sock:
            sock.sendto(message, (ADDRESSES[family][1], 0))
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                data = sock.recv(2048)
                icmp = data[(data[0] & 0x0F) * 4:] if family == 4 else data
                if icmp[0] == reply and struct.unpack_from(">H", icmp, 4)[0] == ident:
                    return
        raise AssertionError("no echo reply")


def _read_exactly(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        assert chunk, "connection closed early"
        got += len(chunk)


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def collect(reader: Subscription[T], enough: Callable[[list[T]], bool],
            timeout: float = TIMEOUT, settle: float = 0.1) -> list[T]:
    """What `reader` reads until `enough` of it came (at most `timeout` seconds), and
    whatever else arrives `settle` seconds after."""
    got: list[T] = []
    deadline = time.monotonic() + timeout
    while not enough(got) and (left := deadline - time.monotonic()) > 0:
        select.select([reader], [], [], left)
        got += reader.read()
    time.sleep(settle)
    got += reader.read()
    return got


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    need_root()
    tag = f"bhobs-{os.getpid()}-{next(_serial)}"
    p = Pair(f"{tag}-c", f"{tag}-s")
    try:
        ip(batch=[f"netns add {p.client}", f"netns add {p.server}"])
        ip(ns=p.client, batch=[f"link add v0 type veth peer name v1 netns {p.server}"])
        ip_batches([(ns, ["link set lo up", f"link set {dev} up",
                          *(f"address add {ADDRESSES[f][end]}/{PREFIXES[f]} dev {dev}"
                            + (" nodad" if f == 6 else "") for f in (4, 6))])
                    for ns, dev, end in ((p.client, "v0", 0), (p.server, "v1", 1))])
        yield p
    finally:
        namespaces = [p.client, p.server]
        stop_processes({pid: process_start(pid) for pid in pids_in(namespaces)})
        ip(batch=[f"netns del {ns}" for ns in namespaces], force=True, check=False)
