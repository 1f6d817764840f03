"""The `flowLogs` section of the server's configuration, checked, and the stores it opens.

    flowLogs:
      store: sqlite                  # sqlite (default) | clickhouse
      path: /var/lib/bulkhead/flows.sqlite   # sqlite: default flows.sqlite in the state dir
      retention: 24                  # hours a record is kept (by its end time)
      expireInterval: 300            # seconds between expiry runs (sqlite)
      jsonLines: {path: /var/log/bulkhead/flows.jsonl, maxBytes: 104857600, keep: 5}
      clickhouse: {dsn: ..., host: ..., port: ..., user: ..., passwordFile: ...,
                   database: bulkhead, table: flows, dnsTable: dns_logs, secure: false,
                   caFile: ..., createSchema: true}

Every mistake is a ValueError naming the key (`flowLogs.jsonLines.keep: ...`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.store.flowlog.base import FlowStore
from bulkhead.store.flowlog.clickhouse import (
    NAME,
    ClickHouseFlowStore,
    ClickHouseSettings,
    available,
)
from bulkhead.store.flowlog.dnslogs import ClickHouseDnsStore, DnsStore, SQLiteDnsStore
from bulkhead.store.flowlog.jsonlines import JsonLinesSink

SECTION = "flowLogs"
STORES = ("sqlite", "clickhouse")
DEFAULT_RETENTION_HOURS = 24.0
DEFAULT_EXPIRE_INTERVAL = 300.0
DEFAULT_JSONL_BYTES = 100 * 1024 * 1024
DEFAULT_JSONL_KEEP = 5
KEYS = ("store", "path", "retention", "expireInterval", "nodeBytesPerMinute", "jsonLines",
        "clickhouse")
# What one agent may send a minute, flow and DNS batches each (bytes of request bodies):
# a node over it is told to come back later (429); its records wait in its spool.
DEFAULT_NODE_BYTES_PER_MINUTE = 32 * 1024 * 1024
JSONL_KEYS = ("path", "maxBytes", "keep")
CLICKHOUSE_KEYS = ("dsn", "host", "port", "user", "passwordFile", "database", "table",
                   "dnsTable", "secure", "caFile", "createSchema")


@dataclass(frozen=True)
class JsonLinesConfig:
    path: Path
    max_bytes: int = DEFAULT_JSONL_BYTES
    keep: int = DEFAULT_JSONL_KEEP


@dataclass(frozen=True)
class FlowLogConfig:
    store: str
    path: Path                                   # the SQLite file
    retention_hours: float = DEFAULT_RETENTION_HOURS
    expire_interval: float = DEFAULT_EXPIRE_INTERVAL
    node_bytes_per_minute: int = DEFAULT_NODE_BYTES_PER_MINUTE
    json_lines: JsonLinesConfig | None = None
    clickhouse: ClickHouseSettings | None = None

    @property
    def retention_seconds(self) -> float:
        return self.retention_hours * 3600

    @classmethod
    def parse(cls, doc: Any, state_dir: Path) -> FlowLogConfig:
        """The section as written (None: every default); `state_dir` holds the default
        SQLite file."""
        doc = {} if doc is None else doc
        _mapping(doc, SECTION, KEYS)
        store = _choice(doc, "store", STORES, "sqlite")
        retention = _number(doc, "retention", DEFAULT_RETENTION_HOURS, 0.001, 24 * 3650)
        settings = None
        if store == "clickhouse":
            if "clickhouse" not in doc:
                raise ValueError(f"{SECTION}.clickhouse: required with store: clickhouse "
                                 "(dsn, or host and port)")
            settings = _clickhouse(doc["clickhouse"], round(retention * 3600))
        elif "clickhouse" in doc:
            raise ValueError(f"{SECTION}.clickhouse: only with store: clickhouse")
        return cls(
            store=store,
            path=Path(_text(doc, "path", str(state_dir / "flows.sqlite"), SECTION)),
            retention_hours=retention,
            expire_interval=_number(doc, "expireInterval", DEFAULT_EXPIRE_INTERVAL, 0.1,
                                    86_400),
            node_bytes_per_minute=int(_number(doc, "nodeBytesPerMinute",
                                              DEFAULT_NODE_BYTES_PER_MINUTE, 1024, 2 ** 40,
                                              integer=True)),
            json_lines=_json_lines(doc["jsonLines"]) if doc.get("jsonLines") is not None
            else None,
            clickhouse=settings)

    def open(self) -> FlowStore:
        """The queried store this section names (SQLite opens its file now; ClickHouse
        connects on first use)."""
        if self.clickhouse is not None:
            return ClickHouseFlowStore(self.clickhouse)
        from bulkhead.store.flowlog.sqlite import SQLiteFlowStore

        return SQLiteFlowStore(self.path)

    def sink(self) -> JsonLinesSink | None:
        j = self.json_lines
        return None if j is None else JsonLinesSink(j.path, j.max_bytes, j.keep)

    @property
    def dns_path(self) -> Path:
        """DNS log records' SQLite file (store sqlite): `dns.sqlite` beside the flow
        store's file."""
        return self.path.with_name("dns.sqlite")

    def open_dns(self) -> DnsStore:
        """The DNS log store beside the flow store: `dns.sqlite`, or the ClickHouse table
        `dnsTable` in the flows' database."""
        if self.clickhouse is not None:
            return ClickHouseDnsStore(self.clickhouse)
        return SQLiteDnsStore(self.dns_path)

    def dns_sink(self) -> JsonLinesSink | None:
        """DNS records as JSON lines beside the flows' file: `dns-NAME` in its folder."""
        j = self.json_lines
        return None if j is None else JsonLinesSink(j.path.with_name("dns-" + j.path.name),
                                                    j.max_bytes, j.keep)


# ----------------------------------------------------------------------------- checks
def _mapping(doc: Any, where: str, keys: tuple[str, ...]) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in doc if k not in keys)
    if unknown:
        raise ValueError(f"{where}.{unknown[0][:40]}: unknown key (known: {', '.join(keys)})")


def _text(doc: dict[str, Any], key: str, default: str | None, where: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key}: expected a non-empty string")
    return value


def _choice(doc: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = doc.get(key, default)
    if value not in choices:
        raise ValueError(f"{SECTION}.{key}: {str(value)[:40]!r} is not one of "
                         f"{', '.join(choices)}")
    return str(value)


def _number(doc: dict[str, Any], key: str, default: float, low: float, high: float,
            where: str = SECTION, integer: bool = False) -> float:
    value = doc.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or not math.isfinite(value) or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{where}.{key}: {value!r} is not {kind} from {low:g} to {high:g}")
    return float(value)


def _flag(doc: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false")
    return value


def _json_lines(doc: Any) -> JsonLinesConfig:
    where = f"{SECTION}.jsonLines"
    _mapping(doc, where, JSONL_KEYS)
    if "path" not in doc:
        raise ValueError(f"{where}.path: required (the file shippers tail)")
    return JsonLinesConfig(
        path=Path(_text(doc, "path", None, where)),
        max_bytes=int(_number(doc, "maxBytes", DEFAULT_JSONL_BYTES, 4096, 2**40, where,
                              integer=True)),
        keep=int(_number(doc, "keep", DEFAULT_JSONL_KEEP, 2, 1000, where, integer=True)))


def _clickhouse(doc: Any, retention_seconds: int) -> ClickHouseSettings:
    where = f"{SECTION}.clickhouse"
    _mapping(doc, where, CLICKHOUSE_KEYS)
    if not available():
        raise ValueError(f"{SECTION}.store: clickhouse needs the clickhouse-connect package, "
                         "which is not installed: pip install 'bulkhead-microseg[clickhouse]'")
    if ("dsn" in doc) == ("host" in doc):
        raise ValueError(f"{where}: give dsn, or host (with port, user, ...), not both")
    password = ""
    if "passwordFile" in doc:
        path = _text(doc, "passwordFile", None, where)
        try:
            password = Path(path).read_text().strip()
        except OSError as e:
            raise ValueError(f"{where}.passwordFile: {e}") from None
    for key in ("database", "table", "dnsTable"):
        if key in doc and not NAME.fullmatch(str(doc[key])):
            raise ValueError(f"{where}.{key}: {str(doc[key])[:70]!r} is not a name this "
                             "server uses (letters, digits and _, not starting with a digit)")
    if doc.get("dnsTable", "dns_logs") == doc.get("table", "flows"):
        raise ValueError(f"{where}.dnsTable: must differ from {where}.table (DNS log records "
                         "have a table of their own)")
    port = doc.get("port")
    if port is not None:
        port = int(_number(doc, "port", 0, 1, 65535, where, integer=True))
    return ClickHouseSettings(
        dsn=_text(doc, "dsn", None, where) if "dsn" in doc else None,
        host=_text(doc, "host", "localhost", where), port=port,
        user=_text(doc, "user", "default", where), password=password,
        database=_text(doc, "database", "bulkhead", where),
        table=_text(doc, "table", "flows", where),
        dns_table=_text(doc, "dnsTable", "dns_logs", where),
        secure=_flag(doc, "secure", False, where),
        ca_file=_text(doc, "caFile", None, where) if "caFile" in doc else None,
        create_schema=_flag(doc, "createSchema", True, where),
        retention_seconds=max(1, retention_seconds))
