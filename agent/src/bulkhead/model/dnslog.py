"""DNS log records: what an agent reports about the lookups its host made to its trusted
resolvers, as agents send them and as the server stores and answers them.

One record aggregates the exchanges (a query and its answer) of one flush interval that
share a key: the client end (a host endpoint, else the address), the server end, the
question (name and type), the response code and the answers (the records on the chain
from the question's name, each `NAME TYPE VALUE`). It counts the exchanges and their
latency (query seen leaving -> answer seen arriving, paired by ends, ID and question).

A record from the outside is hostile until checked: `parse_dns_record` refuses anything
that is not exactly this shape, naming the field, and every size is bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bulkhead.model.flowlog import (
    MAX_COUNT,
    End,
    FlowRecordError,
    _end,
    _int,
    _kind,
    _text,
    _time,
    check_shape,
    dns_name,
    parse_batch,
)
from bulkhead.model.reader import show

MAX_ANSWERS = 32           # answer records kept per record
MAX_ANSWER = 300           # "NAME TYPE VALUE"
MAX_TYPE = 16              # "A", "AAAA", "TYPE65534"
MAX_LATENCY_MS = 3_600_000.0


class DnsRecordError(FlowRecordError):
    """A DNS log record (or a batch) is not acceptable; the message names the field."""


@dataclass(frozen=True)
class DnsRecord:
    start: float               # unix seconds, the interval's first exchange
    end: float                 # unix seconds, the interval's end
    node: str                  # the reporting node (the agent's certificate name)
    client: End                # who asked: a host endpoint, else the address
    server: End                # the resolver
    qname: str                 # lowercase, without the final dot
    qtype: str                 # A, AAAA, CNAME, ... TYPE<n>
    rcode: str                 # NOERROR, NXDOMAIN, ... (a number for one without a name)
    answers: tuple[str, ...]   # "NAME TYPE VALUE", on the chain from qname, sorted
    count: int = 1             # exchanges in the interval
    latency_count: int = 0     # of them, with a query seen (their latency known)
    latency_mean_ms: float = 0.0
    latency_max_ms: float = 0.0

    def json(self) -> dict[str, Any]:
        return {
            "start": self.start, "end": self.end, "node": self.node,
            **self.client.json("client"), **self.server.json("server"),
            "qname": self.qname, "qtype": self.qtype, "rcode": self.rcode,
            "answers": list(self.answers), "count": self.count,
            "latency_count": self.latency_count, "latency_mean_ms": self.latency_mean_ms,
            "latency_max_ms": self.latency_max_ms,
        }

    def wire(self) -> dict[str, Any]:
        """The JSON form an agent sends (the same as `json()`)."""
        return self.json()


FIELDS = tuple(DnsRecord(0, 0, "", End("net", ""), End("net", ""), "", "", "", ()).json())


def _ms(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DnsRecordError(f"{key}: expected milliseconds, got {_kind(value)}")
    try:
        ms = float(value)
    except OverflowError:   # an integer beyond a float's range
        ms = math.inf
    if not math.isfinite(ms) or not 0 <= ms <= MAX_LATENCY_MS:
        raise DnsRecordError(f"{key}: {show(value)} is not 0 to {MAX_LATENCY_MS:.0f} ms")
    return round(ms, 3)


def _qname(doc: Mapping[str, Any]) -> str:
    try:
        return dns_name(doc, "qname")
    except DnsRecordError:
        raise
    except FlowRecordError as e:
        raise DnsRecordError(str(e)) from None


def _answers(doc: Mapping[str, Any]) -> tuple[str, ...]:
    value = doc.get("answers")
    if not isinstance(value, list):
        raise DnsRecordError(f"answers: expected a list of 'NAME TYPE VALUE', got "
                             f"{_kind(value)}")
    if len(value) > MAX_ANSWERS:
        raise DnsRecordError(f"answers: more than {MAX_ANSWERS}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or len(item) > MAX_ANSWER or not item.isprintable() \
                or len(item.split(" ")) != 3 or not all(item.split(" ")):
            raise DnsRecordError(f"answers[{i}]: expected 'NAME TYPE VALUE' (at most "
                                 f"{MAX_ANSWER} characters)")
    return tuple(value)


def parse_dns_record(doc: Any, now: float, node: str | None = None) -> DnsRecord:
    """A DnsRecord from its JSON form; DnsRecordError naming the field if the document is
    not exactly a record. `node`: the node the sender may report for."""
    record_node = check_shape(doc, FIELDS, node, "a DNS log record", DnsRecordError)
    try:
        start, end = _time(doc, "start", now), _time(doc, "end", now)
        client, server = _end(doc, "client"), _end(doc, "server")
        count = _int(doc, "count", 1, MAX_COUNT)
        latency_count = _int(doc, "latency_count", 0, count)
        rcode = _text(doc, "rcode", limit=MAX_TYPE)
        qtype = _text(doc, "qtype", empty=True, limit=MAX_TYPE)
    except DnsRecordError:
        raise
    except FlowRecordError as e:
        raise DnsRecordError(str(e)) from None
    if start > end:
        raise DnsRecordError(f"start: {start} is after end {end}")
    if qtype and not (qtype.isascii() and qtype.isalnum()):
        raise DnsRecordError(f"qtype: {qtype[:20]!r} is not a record type (A, AAAA, TYPE65)")
    if not (rcode.isascii() and rcode.isalnum()):
        raise DnsRecordError(f"rcode: {rcode[:20]!r} is not a response code (NOERROR, "
                             "NXDOMAIN, or its number)")
    return DnsRecord(start=start, end=end, node=record_node, client=client, server=server,
                     qname=_qname(doc), qtype=qtype, rcode=rcode,
                     answers=_answers(doc), count=count, latency_count=latency_count,
                     latency_mean_ms=_ms(doc, "latency_mean_ms"),
                     latency_max_ms=_ms(doc, "latency_max_ms"))


def parse_dns_batch(doc: Any, now: float, node: str | None = None) -> list[DnsRecord]:
    """Every record of an ingest body `{"records": [...]}`, or DnsRecordError for the
    first bad one: a batch is taken whole or not at all (as flow records'). With `node`,
    a record of another node is refused as ForeignNode before anything else."""
    records: list[DnsRecord] = parse_batch(doc, now, node, parse_dns_record, DnsRecordError)
    return records
