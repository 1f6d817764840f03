"""The lab host daemon: `python -m bulkhead.lab.hostd --socket PATH`, one per lab host,
started by the lab inside the host's network namespace (`ip netns exec`).

It listens on the TCP ports asked for (accept, then close) and UDP ports (echo each
datagram back from the address it was sent to), and runs probes for the controller.
The controller talks to it over a unix socket, one JSON line per request and one per
answer:

    {"op": "ping"}                                    -> {"ok": true, "pid": ...}
    {"op": "listen", "tcp": [80], "udp": [53], "replace": false}
                                                      -> {"ok": true, "tcp": [...], "udp": [...]}
    {"op": "probe", "probes": [{"dst": "198.18.0.11", "proto": "tcp", "port": 80,
                                "timeout": 1.0, "src_ip": null}, ...]}
                                                      -> {"ok": true, "results": [
                                                           {"outcome": "open", "elapsed": 0.0004,
                                                            "detail": ""}, ...]}
    {"op": "shutdown"}                                -> {"ok": true}

Failures answer {"ok": false, "error": "..."}. A probe that cannot even be made (the
source address is not on the host, no route to the destination's family) answers
{"outcome": "error", "detail": ...}; the controller raises for those.

Every probe is bounded: its timeout (at most 30 s), at most MAX_SENDS datagrams, and at
most MAX_CONCURRENT probes in flight per daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from bulkhead.lab.probe import MAX_TIMEOUT, MIN_TIMEOUT, normalize_proto

RESEND_INTERVAL = 0.25     # UDP and ICMP probes send again this often, until the timeout
MAX_SENDS = 8
MAX_CONCURRENT = 512
MAX_PROBES = 20_000        # per request
MAX_PORTS = 4_096          # listening ports per protocol
ACCEPTS_PER_WAKEUP = 64
REQUEST_LIMIT = 1 << 24

# Sysctls of the host's namespace that probes depend on: ping sockets for root (no raw
# socket needed), and no rate limit on ICMP errors, or a burst of UDP probes to closed
# ports would turn "refused" into "blocked". Best effort: a kernel without one of them
# still works, with the defaults.
SYSCTLS = {
    "net/ipv4/ping_group_range": "0 2147483647",
    "net/ipv4/icmp_ratelimit": "0",
    "net/ipv4/icmp_ratemask": "0",
    "net/ipv4/icmp_msgs_per_sec": "100000",
    "net/ipv4/icmp_msgs_burst": "100000",
    "net/ipv6/icmp/ratelimit": "0",
    "net/ipv6/icmp/ratemask": "",
}

# Linux's IP_PKTINFO (typeshed lists it for some platforms only).
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)

ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
ICMP_PROTO = {socket.AF_INET: socket.IPPROTO_ICMP, socket.AF_INET6: socket.IPPROTO_ICMPV6}


class ProbeError(Exception):
    """The probe could not be made at all (a usage problem, not a network verdict)."""


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} hostd[{os.getpid()}] {message}", file=sys.stderr,
          flush=True)


def apply_sysctls() -> None:
    for key, value in SYSCTLS.items():
        try:
            Path("/proc/sys", key).write_text(value + "\n")
        except OSError as e:
            log(f"sysctl {key.replace('/', '.')}={value!r} not set: {e.strerror}")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _new_socket(family: socket.AddressFamily, kind: socket.SocketKind, proto: int,
                src_ip: str | None) -> socket.socket:
    s = socket.socket(family, kind, proto)
    s.setblocking(False)
    if src_ip is not None:
        try:
            s.bind((src_ip, 0))
        except OSError as e:
            s.close()
            raise ProbeError(f"cannot bind to source {src_ip}: {e.strerror}") from None
    return s


def _connect_datagram(s: socket.socket, dst: str, port: int) -> None:
    try:
        s.connect((dst, port))
    except OSError as e:
        s.close()
        raise ProbeError(f"cannot send to {dst}: {e.strerror}") from None


async def probe_tcp(dst: str, port: int, timeout: float, src_ip: str | None) -> tuple[str, str]:
    loop = asyncio.get_running_loop()
    s = _new_socket(family_of(dst), socket.SOCK_STREAM, 0, src_ip)
    # Close with RST (linger 0): a probe leaves no TIME_WAIT behind, however many run.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        await asyncio.wait_for(loop.sock_connect(s, (dst, port)), timeout)
        return "open", ""
    except TimeoutError:
        return "blocked", "timeout"
    except ConnectionRefusedError:
        return "refused", "RST"
    except OSError as e:
        if e.errno in (errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
            raise ProbeError(f"cannot connect to {dst}: {e.strerror}") from None
        return "blocked", _errname(e)
    finally:
        s.close()


async def _exchange(s: socket.socket, payload: bytes, timeout: float,
                    accept: Any) -> tuple[str, str]:
    """Send `payload` on connected socket `s` every RESEND_INTERVAL (at most MAX_SENDS
    times) until `accept(reply)` is true or `timeout` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sends = 0
    while True:
        now = loop.time()
        if now >= deadline:
            return "blocked", "timeout"
        if sends < MAX_SENDS:
            try:
                s.send(payload)
            except ConnectionRefusedError:
                return "refused", "ICMP port unreachable"
            except (PermissionError, BlockingIOError) as e:
                return "blocked", f"{_errname(e)} on send"
            except OSError as e:
                return "blocked", f"{_errname(e)} on send"
            sends += 1
        wait = min(RESEND_INTERVAL, deadline - now) if sends < MAX_SENDS else deadline - now
        round_end = loop.time() + wait
        while True:
            left = round_end - loop.time()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(loop.sock_recv(s, 65535), left)
            except TimeoutError:
                break
            except ConnectionRefusedError:
                return "refused", "ICMP port unreachable"
            except OSError as e:
                return "blocked", _errname(e)
            if accept(data):
                return "open", ""


async def probe_udp(dst: str, port: int, timeout: float, src_ip: str | None) -> tuple[str, str]:
    s = _new_socket(family_of(dst), socket.SOCK_DGRAM, 0, src_ip)
    try:
        _connect_datagram(s, dst, port)
        token = b"bulkhead-lab " + os.urandom(8).hex().encode()
        return await _exchange(s, token, timeout, lambda data: data == token)
    finally:
        s.close()


async def probe_icmp(dst: str, timeout: float, src_ip: str | None) -> tuple[str, str]:
    family = family_of(dst)
    try:
        s = _new_socket(family, socket.SOCK_DGRAM, ICMP_PROTO[family], src_ip)
    except PermissionError as e:
        raise ProbeError(f"ping sockets not permitted ({e.strerror}); "
                         "net.ipv4.ping_group_range must include root") from None
    try:
        _connect_datagram(s, dst, 0)
        token = os.urandom(16)
        # Ping socket: the kernel sets the identifier and the checksum.
        packet = struct.pack("!BBHHH", ECHO_REQUEST[family], 0, 0, 0, 1) + token
        reply = ECHO_REPLY[family]
        return await _exchange(s, packet, timeout,
                               lambda data: len(data) >= 8 and data[0] == reply
                               and data[8:] == token)
    finally:
        s.close()


async def run_probe(spec: dict[str, Any], limit: asyncio.Semaphore) -> dict[str, Any]:
    started = time.monotonic()
    try:
        dst = str(spec["dst"])
        proto = normalize_proto(str(spec["proto"]))
        timeout = min(max(float(spec.get("timeout") or 1.0), MIN_TIMEOUT), MAX_TIMEOUT)
        src_ip = spec.get("src_ip")
        port = spec.get("port")
        async with limit:
            started = time.monotonic()
            if proto == "icmp":
                outcome, detail = await probe_icmp(dst, timeout, src_ip)
            elif not isinstance(port, int) or not 1 <= port <= 65535:
                raise ProbeError(f"a {proto} probe needs a port in 1-65535, got {port!r}")
            elif proto == "tcp":
                outcome, detail = await probe_tcp(dst, port, timeout, src_ip)
            else:
                outcome, detail = await probe_udp(dst, port, timeout, src_ip)
    except (ProbeError, ValueError, KeyError, TypeError) as e:
        outcome, detail = "error", str(e)
    return {"outcome": outcome, "elapsed": round(time.monotonic() - started, 6),
            "detail": detail}


class Listeners:
    """TCP (accept and close) and UDP (echo) listeners on 0.0.0.0 and [::]."""

    def __init__(self) -> None:
        self.tcp: dict[int, list[socket.socket]] = {}
        self.udp: dict[int, list[socket.socket]] = {}

    def _open(self, kind: socket.SocketKind, port: int) -> list[socket.socket]:
        loop = asyncio.get_running_loop()
        opened: list[socket.socket] = []
        try:
            for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                s = socket.socket(family, kind)
                opened.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setblocking(False)
                s.bind((address, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(1024)
                    loop.add_reader(s.fileno(), self._accept, s)
                else:
                    if family == socket.AF_INET:
                        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                    loop.add_reader(s.fileno(), self._echo, s)
        except OSError as e:
            self._close(opened)
            name = "tcp" if kind == socket.SOCK_STREAM else "udp"
            raise ProbeError(f"cannot listen on {name}/{port}: {e.strerror}") from None
        return opened

    @staticmethod
    def _close(sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for s in sockets:
            if s.fileno() >= 0:
                loop.remove_reader(s.fileno())
                s.close()

    @staticmethod
    def _accept(s: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _peer = s.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log(f"accept: {e}")
                return
            conn.close()

    @staticmethod
    def _echo(s: socket.socket) -> None:
        """Echo each datagram from the address it was sent to: with several addresses
        on the host, the sender's connected socket only takes replies from that one."""
        v4 = s.family == socket.AF_INET
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                data, ancdata, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(64))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error for an earlier echo; nothing to do
            cmsgs = []
            for level, kind, value in ancdata:
                if v4 and level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr;}
                    local = value[8:12]
                    cmsgs = [(level, kind, struct.pack("=i4s4s", 0, local, bytes(4)))]
                elif not v4 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                    # struct in6_pktinfo {in6_addr addr; unsigned ifindex;}
                    cmsgs = [(level, kind, struct.pack("=16sI", value[:16], 0))]
            with contextlib.suppress(OSError):
                s.sendmsg([data], cmsgs, 0, peer)

    def set(self, tcp: list[int], udp: list[int], replace: bool) -> None:
        for ports, kind, table in ((tcp, socket.SOCK_STREAM, self.tcp),
                                   (udp, socket.SOCK_DGRAM, self.udp)):
            wanted = set(ports)
            if len(wanted | (set() if replace else set(table))) > MAX_PORTS:
                raise ProbeError(f"at most {MAX_PORTS} listening ports per protocol")
            for port in wanted:
                if not 1 <= port <= 65535:
                    raise ProbeError(f"port {port} is outside 1-65535")
            if replace:
                for port in [p for p in table if p not in wanted]:
                    self._close(table.pop(port))
            for port in sorted(wanted - set(table)):
                table[port] = self._open(kind, port)

    def close(self) -> None:
        for table in (self.tcp, self.udp):
            for sockets in table.values():
                self._close(sockets)
            table.clear()


class Daemon:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.listeners = Listeners()
        self.limit = asyncio.Semaphore(MAX_CONCURRENT)
        self.stopped = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            try:
                answer = await self.dispatch(json.loads(line))
            except (ProbeError, ValueError, KeyError, TypeError) as e:
                answer = {"ok": False, "error": str(e)}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            log(f"request dropped: {e}")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "listen":
            tcp = [int(p) for p in request.get("tcp") or ()]
            udp = [int(p) for p in request.get("udp") or ()]
            self.listeners.set(tcp, udp, bool(request.get("replace")))
            return {"ok": True, "tcp": sorted(self.listeners.tcp),
                    "udp": sorted(self.listeners.udp)}
        if op == "probe":
            probes = list(request.get("probes") or ())
            if len(probes) > MAX_PROBES:
                raise ProbeError(f"at most {MAX_PROBES} probes per request")
            results = await asyncio.gather(*(run_probe(p, self.limit) for p in probes))
            return {"ok": True, "results": list(results)}
        if op == "shutdown":
            self.stopped.set()
            return {"ok": True}
        raise ProbeError(f"unknown op {op!r}")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopped.set)
        self.socket_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self.handle, path=str(self.socket_path),
                                                 limit=REQUEST_LIMIT)
        log(f"serving on {self.socket_path}")
        try:
            await self.stopped.wait()
        finally:
            server.close()
            self.listeners.close()
            self.socket_path.unlink(missing_ok=True)
            log("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkhead.lab.hostd",
                                     description="the bulkhead lab's daemon in one lab host")
    parser.add_argument("--socket", required=True, help="unix socket to serve requests on")
    parser.add_argument("--no-sysctl", action="store_true",
                        help="leave the namespace's ICMP and ping sysctls alone")
    args = parser.parse_args(argv)
    if not args.no_sysctl:
        apply_sysctls()
    raise_fd_limit()
    asyncio.run(Daemon(Path(args.socket)).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
