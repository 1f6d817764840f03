"""Datastores: one interface, an embedded SQLite file and an etcd v3 cluster."""

from __future__ import annotations

from urllib.parse import urlparse

from bulkhead.store.base import (
    Conflict,
    Datastore,
    Event,
    NotFound,
    Op,
    Stored,
    StoreError,
    TooOld,
    TxResult,
    Unavailable,
    create,
    delete,
    update,
)

__all__ = ["Conflict", "Datastore", "Event", "NotFound", "Op", "StoreError", "Stored",
           "TooOld", "TxResult", "Unavailable", "create", "delete", "open_store", "update"]


def open_store(url: str) -> Datastore:
    """`sqlite:///var/lib/bulkhead/store.db` or `etcd://host:2379,host2:2379[/prefix]`
    (`etcds://` for TLS)."""
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
        return EtcdStore([f"{scheme}://{h}" for h in hosts], prefix=prefix)
    raise ValueError(f"datastore {url!r}: expected sqlite:///PATH or etcd://HOST:PORT,...")
