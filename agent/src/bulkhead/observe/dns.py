"""DNS snooping: DNS messages read off the wire between this host and its trusted
resolvers, for the name cache (`bulkhead.policy.names`) that fills the domain sets, and
for DNS logs.

    packet   the agent's table logs UDP packets from and to the trusted resolvers (port
             53) to an NFLOG group with the whole packet (`dataplane.nftables.render`)
    parse    dnspython reads the DNS message; a query is kept for pairing, an answer
             gives the records on the chain from the question's name: CNAMEs followed
             (at most MAX_CHAIN), A and AAAA taken, from the answer and additional
             sections; records off the chain are ignored, and so is an answer whose
             response code is not NOERROR

UDP only, as felix: an answer over TCP teaches nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

from bulkhead.observe.nflog import LoggedPacket
from bulkhead.policy.names import AAAA, CNAME, MAX_CHAIN, A, Record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UDP = 17
DNS_PORT = 53
UDP_HEADER = 8


@dataclass(frozen=True)
class DnsPacket:
    """A DNS message seen on the wire between a client and a trusted resolver."""

    answer: bool                # True: a response (from the server); False: a query
    id: int
    client: IPAddress
    client_port: int
    server: IPAddress
    server_port: int
    qname: str                  # lowercase, no trailing dot ("" if no question)
    qtype: str                  # "A", "AAAA", "TYPE65534" ...
    rcode: str                  # "NOERROR", "NXDOMAIN" ... ("" for a query)
    records: tuple[Record, ...]  # on the chain from qname (answers only)
    timestamp: float

    @property
    def chain(self) -> tuple[str, ...]:
        """The names from the question along its CNAMEs (qname first)."""
        names = [self.qname]
        links = {r.name: r.value for r in self.records if r.kind == CNAME}
        while names[-1] in links and len(names) <= MAX_CHAIN:
            target = links[names[-1]]
            if target in names:
                break
            names.append(target)
        return tuple(names)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(r.value for r in self.records if r.kind in (A, AAAA))


class NotDns(ValueError):
    """Bytes that are not a DNS message over UDP."""


def _name(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _rcode_text(rcode: dns.rcode.Rcode) -> str:
    text = dns.rcode.to_text(rcode)
    return text if text.isascii() and text.isalnum() else f"RCODE{int(rcode)}"


def _type_text(rdtype: dns.rdatatype.RdataType) -> str:
    """A record type as letters and digits (NSAP-PTR is TYPE23): what logs carry."""
    text = dns.rdatatype.to_text(rdtype)
    return text if text.isascii() and text.isalnum() else f"TYPE{int(rdtype)}"


def parse_packet(packet: LoggedPacket) -> DnsPacket:
    """The DNS message of a logged UDP packet (upper-layer bytes kept). Raises NotDns."""
    if packet.proto != UDP or len(packet.payload) < UDP_HEADER:
        raise NotDns("not a UDP packet with its header")
    if packet.sport != DNS_PORT and packet.dport != DNS_PORT:
        raise NotDns("neither port is 53")
    # From port 53 to port 53 (a forwarding server that queries from its own port, as
    # BIND's query-source port 53 or Windows DNS may): the QR bit says which it is.
    answer_side: bool | None = None if packet.sport == packet.dport \
        else packet.sport == DNS_PORT
    try:
        message = dns.message.from_wire(packet.payload[UDP_HEADER:], ignore_trailing=True,
                                        one_rr_per_rrset=False)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError) as e:
        raise NotDns(f"not a DNS message: {type(e).__name__}") from None
    response = bool(message.flags & dns.flags.QR)
    if answer_side is not None and response != answer_side:
        raise NotDns("a response to port 53, or a query from it")
    question = message.question[0] if message.question else None
    qname = _name(question.name) if question is not None else ""
    qtype = _type_text(question.rdtype) if question is not None else ""
    if response:
        client, client_port, server, server_port = packet.dst, packet.dport, packet.src, \
            packet.sport
    else:
        client, client_port, server, server_port = packet.src, packet.sport, packet.dst, \
            packet.dport
    records: tuple[Record, ...] = ()
    if response and question is not None and message.rcode() == dns.rcode.NOERROR:
        records = _chain_records(qname, [*message.answer, *message.additional])
    return DnsPacket(response, message.id, client, client_port or 0, server,
                     server_port or 0, qname, qtype,
                     _rcode_text(message.rcode()) if response else "",
                     records, packet.timestamp)


def _chain_records(qname: str, rrsets: Iterable[Any]) -> tuple[Record, ...]:
    """The A, AAAA and CNAME records whose owner is on the CNAME chain from `qname`: at
    each name its addresses and the one CNAME followed (a name has one; others are not
    taken). Names written with escapes (a `\\` in their text: a dot or a byte inside a
    label) are never taken: a pattern compares plain labels."""
    by_owner: dict[str, list[Record]] = {}
    for rrset in rrsets:
        kind = dns.rdatatype.to_text(rrset.rdtype)
        if kind not in (A, AAAA, CNAME) or rrset.rdclass != 1:    # IN only
            continue
        owner = _name(rrset.name)
        for rdata in rrset:
            value = _name(rdata.target) if kind == CNAME else rdata.address
            if "\\" in owner or "\\" in value:
                continue
            by_owner.setdefault(owner, []).append(Record(owner, kind, value, int(rrset.ttl)))
    out: list[Record] = []
    name, seen = qname, set()
    for _ in range(MAX_CHAIN + 1):
        if name in seen:
            break
        seen.add(name)
        records = by_owner.get(name, [])
        targets = [r for r in records if r.kind == CNAME]
        out += [r for r in records if r.kind != CNAME] + targets[:1]
        if not targets:
            break
        name = targets[0].value
    return tuple(out)
