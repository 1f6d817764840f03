"""Flow and DNS logs over the API: `send_flows`, `send_dns` (agents); `flows`, `dns_logs`
(the CLI, tools)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from bulkhead.api import route
from bulkhead.client import Connection
from bulkhead.model.dnslog import DnsRecord
from bulkhead.model.flowlog import MAX_BATCH, MAX_BATCH_BYTES, FlowRecord

_FRAME = len(b'{"records":[]}')


def batches(records: Iterable[FlowRecord | DnsRecord | Mapping[str, Any]],
            max_records: int = MAX_BATCH, max_bytes: int = MAX_BATCH_BYTES) -> Iterator[bytes]:
    """Ingest bodies holding every record in order, each within the server's bounds
    (records and bytes). ValueError for a record that fits in no body."""
    chunk: list[bytes] = []
    size = _FRAME
    for i, record in enumerate(records):
        doc = record.wire() if isinstance(record, FlowRecord | DnsRecord) else dict(record)
        encoded = json.dumps(doc, separators=(",", ":")).encode()
        if _FRAME + len(encoded) > max_bytes:
            raise ValueError(f"records[{i}]: {len(encoded):,} bytes as JSON, more than one "
                             f"request takes ({max_bytes:,})")
        if chunk and (len(chunk) >= max_records or size + 1 + len(encoded) > max_bytes):
            yield b'{"records":[' + b",".join(chunk) + b"]}"
            chunk, size = [], _FRAME
        chunk.append(encoded)
        size += len(encoded) + (1 if len(chunk) > 1 else 0)
    if chunk:
        yield b'{"records":[' + b",".join(chunk) + b"]}"


def send_flows(conn: Connection, records: Iterable[FlowRecord | DnsRecord | Mapping[str, Any]],
               which: str = "flows") -> int:
    """Send flow records (`which="dns"`: DNS log records) as the agent of the node they
    name; how many the server stored.

    Records go in as few requests as the server's bounds allow; each request is stored
    whole or not at all. On a refusal (ApiError) or an unreachable server (Unreachable),
    the requests before it were stored and the rest were not sent: keep the records from
    the failed one on, and send them again."""
    stored = 0
    for body in batches(records):
        answer = conn.request("POST", route(which), raw=body)
        stored += int(answer["stored"])
    return stored


def send_dns(conn: Connection, records: Iterable[DnsRecord | Mapping[str, Any]]) -> int:
    """`send_flows` for DNS log records (`POST /v1/dns`)."""
    return send_flows(conn, records, "dns")


def dns_logs(conn: Connection, *, since: float | None = None, until: float | None = None,
             node: str | None = None, client: str | None = None, qname: str | None = None,
             rcode: str | None = None, after: float | None = None,
             limit: int | None = None) -> dict[str, Any]:
    """`GET /v1/dns`: `{"dns": [...], "truncated": bool}`; `qname` a name or `*.SUFFIX`
    (docs/dns.md)."""
    params: dict[str, Any] = {"since": since, "until": until, "node": node, "client": client,
                              "qname": qname, "rcode": rcode, "after": after, "limit": limit}
    query = {k: _text(v) for k, v in params.items() if v is not None}
    answer: dict[str, Any] = conn.request("GET", route("dns"), query=query or None)
    return answer


def flows(conn: Connection, *, since: float | None = None, until: float | None = None,
          node: str | None = None, reporter: str | None = None, action: str | None = None,
          policy: str | None = None, tier: str | None = None, staged_differs: bool = False,
          selector: str | None = None, endpoint: str | None = None,
          after: float | None = None, limit: int | None = None, top: int | None = None
          ) -> dict[str, Any]:
    """`GET /v1/flows`: `{"flows": [...], "truncated": bool}`, or with `top`,
    `{"top": [...], "truncated": bool}`. Times are unix seconds; see docs/observability.md
    for what each filter selects."""
    params: dict[str, Any] = {
        "since": since, "until": until, "node": node, "reporter": reporter,
        "action": action, "policy": policy, "tier": tier,
        "staged": "differs" if staged_differs else None, "selector": selector,
        "endpoint": endpoint, "after": after, "limit": limit, "top": top}
    query = {k: _text(v) for k, v in params.items() if v is not None}
    answer: dict[str, Any] = conn.request("GET", route("flows"), query=query or None)
    return answer


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def preview(conn: Connection, *, manifests: str | None = None,
            promote: list[str] | str | None = None, enforce: str | None = None,
            hours: float | None = None,
            until: float | None = None, protected: str | None = None,
            limit: int | None = None) -> dict[str, Any]:
    """`POST /v1/preview`: the stored flows of the last `hours` the proposed state would
    decide differently (the store, with `manifests` over it and the staged policies of
    `promote` promoted: names, "all" or "none"; the host endpoints `enforce` selects in
    enforce mode). See docs/observability.md."""
    body = {"manifests": manifests, "promote": promote, "enforce": enforce, "hours": hours,
            "until": until,
            "protected": protected, "limit": limit}
    answer: dict[str, Any] = conn.request(
        "POST", route("preview"), {k: v for k, v in body.items() if v is not None})
    return answer
