"""A small authoritative DNS server for lab hosts: `python -m bulkhead.lab.dnsd --zone
FILE [--listen ADDRESS] [--port 53]`, answers over UDP from a JSON zone the tests control;
and its client: `python -m bulkhead.lab.dnsd --ask NAME --server ADDRESS [--type A]`
prints the answer's addresses as JSON (one query, 2 s at most).

The zone maps names to records, each with its TTL; it is read again whenever the file
changes, so a test can move a name between queries:

    {"api.example.com": {"A": ["198.18.0.11"], "ttl": 5},
     "www.example.org": {"CNAME": "edge.cdn.example", "ttl": 30},
     "edge.cdn.example": {"A": ["198.18.0.14"], "AAAA": ["2001:2::14"], "ttl": 3}}

An answer follows CNAMEs within the zone (as a recursive resolver's does: the CNAME
records, then the target's addresses), at most 8 links. A name not in the zone gets
NXDOMAIN; a name with no record of the asked type, an empty NOERROR. Only for the lab:
it listens on the lab's own addresses, answers nothing but A, AAAA and CNAME, and is
bounded (a query larger than 512 bytes is dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_QUERY = 512
MAX_LINKS = 8


class Zone:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.records: dict[str, dict[str, Any]] = {}

    def current(self) -> dict[str, dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except OSError:
            return self.records
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return self.records    # half-written: keep the last good zone
            if isinstance(data, dict):
                self.records = {str(k).lower().rstrip("."): v for k, v in data.items()
                                if isinstance(v, dict)}
                self._stamp = stamp
        return self.records


def answer(zone: dict[str, dict[str, Any]], query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if not query.question:
        response.set_rcode(dns.rcode.FORMERR)
        return response
    question = query.question[0]
    kind = dns.rdatatype.to_text(question.rdtype)
    name = question.name.to_text(omit_final_dot=True).lower()
    if name not in zone:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response
    for _ in range(MAX_LINKS):
        entry = zone.get(name)
        if entry is None:
            break
        ttl = int(entry.get("ttl", 60))
        owner = dns.name.from_text(name)
        target = entry.get("CNAME")
        if isinstance(target, str) and kind != "CNAME":
            response.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME",
                                                       target.rstrip(".") + "."))
            name = target.lower().rstrip(".")
            continue
        values = entry.get(kind, [])
        if kind == "CNAME" and isinstance(target, str):
            values = [target.rstrip(".") + "."]
        if values:
            response.answer.append(dns.rrset.from_text_list(owner, ttl, "IN", kind,
                                                            [str(v) for v in values]))
        break
    return response


class Server(asyncio.DatagramProtocol):
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.transport: Any = None    # the datagram transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_QUERY or self.transport is None:
            return
        try:
            query = dns.message.from_wire(data)
        except Exception:   # not DNS: nothing to answer
            return
        if query.flags & dns.flags.QR:
            return
        self.transport.sendto(answer(self.zone.current(), query).to_wire(), addr)


async def serve(zone: Path, listen: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Server(Zone(zone)), local_addr=(listen, port))
    print(f"dnsd: answering on {listen}:{port} from {zone}", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()


def ask(name: str, server: str, kind: str = "A", port: int = 53,
        timeout: float = 2.0) -> dict[str, Any]:
    """One query over UDP: {"rcode": ..., "addresses": [...], "chain": [...]}."""
    import dns.query

    query = dns.message.make_query(name, kind)
    response = dns.query.udp(query, server, timeout=timeout, port=port)
    addresses, chain = [], []
    for rrset in response.answer:
        for rdata in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                chain.append(rdata.target.to_text(omit_final_dot=True))
            elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.append(rdata.address)
    return {"rcode": dns.rcode.to_text(response.rcode()), "addresses": addresses,
            "chain": chain}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bulkhead.lab.dnsd", description=__doc__.split("\n")[0])
    p.add_argument("--zone", type=Path)
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--ask", metavar="NAME")
    p.add_argument("--server")
    p.add_argument("--type", default="A")
    args = p.parse_args(argv)
    if args.ask:
        if not args.server:
            p.error("--ask needs --server")
        print(json.dumps(ask(args.ask, args.server, args.type, args.port)), flush=True)
        return 0
    if args.zone is None:
        p.error("--zone FILE (or --ask NAME)")
    asyncio.run(serve(args.zone, args.listen, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
