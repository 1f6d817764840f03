"""Flow records for tests and benchmarks: a valid record's JSON form with any field
changed, and the same parsed."""

from __future__ import annotations

import time
from typing import Any

from bulkhead.model.flowlog import FlowRecord, parse_record


def flow_doc(**changes: Any) -> dict[str, Any]:
    """A record web-1 (reporter src) sent about a TCP 5432 connection to db-1, allowed by
    tier security's policy security.db-in and by nothing staged otherwise; `changes`
    replace fields (`end` moves `start` along, 10 s before it)."""
    end = changes.get("end", round(time.time() - 60, 3))
    doc: dict[str, Any] = {
        "start": round(end - 10, 6), "end": end, "node": "web-1", "reporter": "src",
        "src_type": "hep", "src_name": "web-1", "src_labels": {"app": "web", "zone": "dmz"},
        "src_scope": "",
        "dst_type": "hep", "dst_name": "db-1", "dst_labels": {"app": "db", "zone": "trusted"},
        "dst_scope": "",
        "proto": 6, "dst_port": 5432, "action": "allow",
        "enforced_trace": ["security|security.db-in|0|allow"],
        "staged_action": "allow", "staged_trace": ["security|security.db-in|0|allow"],
        "connections": 2, "started": 1, "packets_in": 10, "packets_out": 12,
        "bytes_in": 1000, "bytes_out": 2000, "dst_domains": None,
    }
    doc.update(changes)
    return doc


def flow(**changes: Any) -> FlowRecord:
    return parse_record(flow_doc(**changes), time.time())
