"""DNS logs in the agent: the exchanges the snooper saw (an answer, with its query when
one was seen), aggregated per flush interval into `bulkhead.model.dnslog.DnsRecord`s.

Records alike share a key: the client end and the server end (as flow records name them:
a host endpoint, else the GlobalNetworkSet holding the address, else the address), the
question, the response code and the answers. Each counts its exchanges, and the latency
of those whose query was read before their answer arrived (the kernel's timestamp of the
answer at the input hook minus the time the query was read on its way out; a query read
late, with its answer, leaves the latency unknown). At most `max_records` keys an
interval; exchanges beyond are counted in `dropped`, never kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bulkhead.model import Snapshot
from bulkhead.model.dnslog import (
    MAX_ANSWER,
    MAX_ANSWERS,
    MAX_LATENCY_MS,
    MAX_TYPE,
    DnsRecord,
)
from bulkhead.model.flowlog import MAX_NAME, End
from bulkhead.observe.dns import DnsPacket
from bulkhead.observe.flows import Ends

# (client type, client name, server type, server name, qname, qtype, rcode, answers)
Key = tuple[str, str, str, str, str, str, str, tuple[str, ...]]


@dataclass
class _Aggregate:
    client: End
    server: End
    start: float
    count: int = 0
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0


@dataclass
class DnsLogAggregator:
    node: str
    snapshot: Snapshot
    max_records: int = 50_000
    dropped: int = 0
    _ends: Ends = field(init=False)
    _open: dict[Key, _Aggregate] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._ends = Ends(self.snapshot)

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._ends = Ends(snapshot)

    def exchange(self, answer: DnsPacket, query: DnsPacket | None) -> None:
        # Only what the server takes: answers of at most MAX_ANSWER characters, at most
        # MAX_ANSWERS of them, the name cut to MAX_NAME (never ending in a dot).
        answers = tuple(sorted(text for r in answer.records
                               if len(text := f"{r.name} {r.kind} {r.value}") <= MAX_ANSWER
                               ))[:MAX_ANSWERS]
        qname = answer.qname[:MAX_NAME].rstrip(".")
        client, server = self._ends.at(answer.client), self._ends.at(answer.server)
        key = (client.type, client.name, server.type, server.name, qname,
               answer.qtype[:MAX_TYPE], answer.rcode[:MAX_TYPE], answers)
        agg = self._open.get(key)
        if agg is None:
            if len(self._open) >= self.max_records:
                self.dropped += 1
                return
            agg = self._open[key] = _Aggregate(client, server, answer.timestamp)
        agg.start = min(agg.start, answer.timestamp)
        agg.count += 1
        # The answer's time is the kernel's (input hook); the query's, the time the agent
        # read it (the kernel stamps no packet on output). A query read only after its
        # answer arrived (a busy agent reads both at once) says nothing of the latency:
        # then it is unknown, never a made-up 0.
        if query is not None and answer.timestamp > query.timestamp:
            ms = min(MAX_LATENCY_MS, (answer.timestamp - query.timestamp) * 1000)
            agg.latency_count += 1
            agg.latency_sum_ms += ms
            agg.latency_max_ms = max(agg.latency_max_ms, ms)

    def flush(self, now: float) -> list[DnsRecord]:
        out = []
        for (_, _, _, _, qname, qtype, rcode, answers), agg in self._open.items():
            mean = agg.latency_sum_ms / agg.latency_count if agg.latency_count else 0.0
            out.append(DnsRecord(
                start=round(min(agg.start, now), 6), end=round(now, 6), node=self.node,
                client=agg.client, server=agg.server, qname=qname, qtype=qtype, rcode=rcode,
                answers=answers, count=agg.count, latency_count=agg.latency_count,
                latency_mean_ms=round(mean, 3), latency_max_ms=round(agg.latency_max_ms, 3)))
        self._open.clear()
        return out
