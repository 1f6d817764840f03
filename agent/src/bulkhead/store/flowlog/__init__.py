"""Flow log storage: the `FlowStore` interface, its SQLite (default) and ClickHouse
backends, and the JSON lines sink for log shippers. Knows the model, never the server."""

from __future__ import annotations

from bulkhead.store.flowlog.base import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_SCAN,
    MAX_TOP,
    QUERY_SECONDS,
    FlowPage,
    FlowQuery,
    FlowQueryTimeout,
    FlowStore,
    FlowStoreError,
    FlowStoreUnavailable,
    GroupPage,
    GroupRow,
    StoredFlow,
    TopPage,
    TopRow,
)
from bulkhead.store.flowlog.config import FlowLogConfig, JsonLinesConfig
from bulkhead.store.flowlog.jsonlines import JsonLinesSink

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "MAX_SCAN", "MAX_TOP", "QUERY_SECONDS", "FlowLogConfig",
           "FlowPage", "FlowQuery", "FlowQueryTimeout", "FlowStore", "FlowStoreError",
           "FlowStoreUnavailable", "GroupPage", "GroupRow", "JsonLinesConfig", "JsonLinesSink",
           "StoredFlow", "TopPage", "TopRow"]
