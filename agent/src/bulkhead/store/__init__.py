"""Datastores: one interface, an embedded SQLite file and an etcd v3 cluster."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from bulkhead.store.base import (
    Audit,
    BeforeUndo,
    CommitTimes,
    Conflict,
    Datastore,
    Event,
    FutureRevision,
    MissingReference,
    NotFound,
    Op,
    Referrers,
    StillReferenced,
    StoreChanged,
    Stored,
    StoreError,
    TooLarge,
    TooOld,
    TxResult,
    Unavailable,
    create,
    delete,
    update,
)

__all__ = ["Audit", "BeforeUndo", "CommitTimes", "Conflict", "Datastore", "Event", "FutureRevision",
           "MissingReference", "NotFound", "Op",
           "Referrers", "StillReferenced", "StoreChanged", "StoreError", "Stored", "TooLarge",
           "TooOld",
           "TxResult", "Unavailable", "create", "delete", "open_store", "update"]


def open_store(url: str) -> Datastore:
    """`sqlite:///var/lib/bulkhead/store.db` or `etcd://host:2379,host2:2379[/prefix]`
    (`etcds://` for TLS; `?max-txn-ops=N` when etcd runs with a `--max-txn-ops` other
    than its default 128)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from bulkhead.store.sqlite import SQLiteStore

        if not parsed.path:
            raise ValueError(f"datastore {url!r}: sqlite URL needs a path: sqlite:///path/to.db")
        return SQLiteStore(parsed.path)
    if parsed.scheme in ("etcd", "etcds"):
        from bulkhead.store.etcd import EtcdStore

        scheme = "https" if parsed.scheme == "etcds" else "http"
        hosts = [h for h in parsed.netloc.split(",") if h]
        if not hosts:
            raise ValueError(f"datastore {url!r}: etcd URL needs host:port")
        prefix = parsed.path if parsed.path not in ("", "/") else "/bulkhead/"
        options = parse_qs(parsed.query)
        unknown = set(options) - {"max-txn-ops"}
        if unknown:
            raise ValueError(f"datastore {url!r}: unknown option {sorted(unknown)[0]!r} "
                             "(known: max-txn-ops)")
        raw = options.get("max-txn-ops", ["128"])[-1]
        if not raw.isdigit() or int(raw) < 8:
            raise ValueError(f"datastore {url!r}: max-txn-ops must be a number >= 8, "
                             "as etcd's --max-txn-ops")
        return EtcdStore([f"{scheme}://{h}" for h in hosts], prefix=prefix,
                         max_txn_ops=int(raw))
    raise ValueError(f"datastore {url!r}: expected sqlite:///PATH or etcd://HOST:PORT,...")
