"""DNS logs in the server: ingest (`POST /v1/dns`, agents), queries (`GET /v1/dns`, admins
and viewers), retention, and their metrics, as flow logs have them (`server/flows.py`):
a batch is parsed strictly, every record's node must be the caller's (checked before any
other field) and its client not a HostEndpoint of another node (409), the store takes it
whole or not at all, then the JSON lines copy (if configured) gets it, a failure there
logged and counted, never a refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bulkhead.model.dnslog import MAX_TYPE, parse_dns_batch
from bulkhead.model.flowlog import MAX_NAME
from bulkhead.server.flows import (
    REFUSALS,
    RecordLogs,
    Refused,
    _count,
    _name,
    _time,
    address_or_name,
    check_own_end,
    query_params,
)
from bulkhead.server.limits import BadInput
from bulkhead.store.flowlog import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    FlowLogConfig,
    FlowQueryTimeout,
    FlowStoreError,
)
from bulkhead.store.flowlog.dnslogs import DnsQuery, DnsStore

PARAMS = ("since", "until", "node", "client", "qname", "rcode", "after", "limit")


class DnsLogs(RecordLogs):
    """The server's DNS log state (`RecordLogs`: ingest, retention), its queries and
    metrics."""

    kind = "DNS"
    store: DnsStore

    @staticmethod
    def parse(doc: Any, now: float, node: str) -> Sequence[Any]:
        return parse_dns_batch(doc, now, node)

    @staticmethod
    def check_owners(records: Sequence[Any], node: str,
                     owner: Callable[[str], str | None]) -> None:
        """A record's client (who asked) is an endpoint of the sender's node: one naming
        a HostEndpoint the store has on another node is refused, as flow records are."""
        for i, record in enumerate(records):
            check_own_end(record.client, f"records[{i}].client_name", node, owner,
                          "lookups")

    @classmethod
    def open(cls, config: FlowLogConfig) -> DnsLogs:
        return cls(config, config.open_dns(), config.dns_sink())

    def answer(self, query: DnsQuery) -> dict[str, Any]:
        try:
            page = self.store.query(query)
        except FlowQueryTimeout as e:
            raise Refused(503, "Unavailable", str(e)) from None
        except FlowStoreError as e:
            raise Refused(503, "Unavailable", f"the DNS log store failed: {e}") from None
        return {"dns": [r.json() for r in page.records], "truncated": page.truncated}

    def metrics(self) -> list[str]:
        c = self.counters
        lines = [
            "# HELP bulkhead_dns_records_stored_total DNS log records stored.",
            "# TYPE bulkhead_dns_records_stored_total counter",
            f"bulkhead_dns_records_stored_total {c['records']}",
            "# HELP bulkhead_dns_batches_duplicate_total Batches sent again after their "
            "answer was lost (the same Idempotency-Key): not stored twice.",
            "# TYPE bulkhead_dns_batches_duplicate_total counter",
            f"bulkhead_dns_batches_duplicate_total {c['duplicates']}",
            "# HELP bulkhead_dns_batches_refused_total DNS log batches refused whole, by "
            "reason.",
            "# TYPE bulkhead_dns_batches_refused_total counter"]
        lines += [f'bulkhead_dns_batches_refused_total{{reason="{r}"}} {c["refused:" + r]}'
                  for r in REFUSALS]
        lines += [
            "# HELP bulkhead_dns_records_expired_total DNS log records deleted by retention.",
            "# TYPE bulkhead_dns_records_expired_total counter",
            f"bulkhead_dns_records_expired_total {c['expired']}"]
        return lines


def parse_dns_request(items: Sequence[tuple[str, str]], now: float) -> DnsQuery:
    """`GET /v1/dns`'s parameters, checked: BadInput naming the parameter otherwise."""
    given, since, until = query_params(items, PARAMS, now)
    qname = given.get("qname")
    if qname is not None:
        bare = qname[2:] if qname.startswith("*.") else qname
        if not bare or len(bare) > MAX_NAME or bare != bare.lower() or \
                not all(c.isalnum() or c in "-._" for c in bare) or not bare.isascii():
            raise BadInput(f"qname: {qname[:40]!r} is not a lowercase DNS name or *.SUFFIX")
    rcode = given.get("rcode")
    if rcode is not None and not (0 < len(rcode) <= MAX_TYPE and rcode.isascii()
                                  and rcode.isalnum()):
        raise BadInput(f"rcode: {rcode[:40]!r} is not a response code (NOERROR, NXDOMAIN)")
    limit = _count(given.get("limit"), "limit", MAX_LIMIT)
    return DnsQuery(since=since, until=until, node=_name(given.get("node"), "node"),
                    client=address_or_name(_name(given.get("client"), "client")),
                    qname=qname,
                    rcode=rcode.upper() if rcode else None,
                    after=_time(given.get("after"), "after"), limit=limit or DEFAULT_LIMIT)
