"""`bulkhead-server`: configuration, TLS, logging, and the process around the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from aiohttp import web

from bulkhead.defaults import SERVER_PORT
from bulkhead.server.app import make_app
from bulkhead.server.hub import Hub
from bulkhead.store import open_store

DEFAULT_CONFIG = Path("/etc/bulkhead/server.yaml")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                               "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@dataclass
class ServerConfig:
    listen: str = f"0.0.0.0:{SERVER_PORT}"
    datastore: str = "sqlite:///var/lib/bulkhead/store.db"
    tls_cert: str = "/etc/bulkhead/pki/server.crt"
    tls_key: str = "/etc/bulkhead/pki/server.key"
    client_ca: str = "/etc/bulkhead/pki/ca.crt"
    client_auth: str = "required"   # required | optional (then only /healthz, /readyz)
    log_level: str = "info"
    compaction_interval: float = 300.0      # seconds between compactions; 0: never
    compaction_retain: int = 10_000         # last revisions with changes kept
    compaction_max_revisions: int = 100_000  # and never more revisions than this in all

    KEYS: ClassVar[dict[str, str]] = {
        "listen": "listen", "datastore": "datastore", "tlsCert": "tls_cert",
        "tlsKey": "tls_key", "clientCA": "client_ca", "clientAuth": "client_auth",
        "logLevel": "log_level", "compactionInterval": "compaction_interval",
        "compactionRetain": "compaction_retain",
        "compactionMaxRevisions": "compaction_max_revisions"}
    NUMBERS: ClassVar[dict[str, type[int] | type[float]]] = {
        "compaction_interval": float, "compaction_retain": int,
        "compaction_max_revisions": int}

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, str | None]) -> ServerConfig:
        config = cls()
        if path is not None:
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise SystemExit(f"bulkhead-server: config {path}: {e}") from None
            if not isinstance(data, dict):
                raise SystemExit(f"bulkhead-server: config {path}: must be a mapping")
            for key, value in data.items():
                if key not in cls.KEYS:
                    raise SystemExit(f"bulkhead-server: config {path}: {key}: unknown field "
                                     f"(known: {', '.join(cls.KEYS)})")
                attr = cls.KEYS[key]
                number = cls.NUMBERS.get(attr)
                if number is None:
                    setattr(config, attr, str(value))
                    continue
                try:
                    if isinstance(value, bool) or (number is int and isinstance(value, float)):
                        raise ValueError
                    setattr(config, attr, number(value))
                except (TypeError, ValueError):
                    raise SystemExit(f"bulkhead-server: config {path}: {key}: expected "
                                     f"{'an integer' if number is int else 'a number'}, "
                                     f"not {value!r}") from None
        for attr, value in overrides.items():
            if value is not None:
                setattr(config, attr, value)
        if config.client_auth not in ("required", "optional"):
            raise SystemExit("bulkhead-server: clientAuth must be required or optional")
        if config.compaction_interval < 0 or config.compaction_retain < 1 or \
                config.compaction_max_revisions < config.compaction_retain:
            raise SystemExit("bulkhead-server: compactionInterval must be >= 0 (0: never), "
                             "compactionRetain >= 1 and compactionMaxRevisions >= "
                             "compactionRetain")
        return config

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
            ctx.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise SystemExit(f"bulkhead-server: TLS files: {e} (create them with "
                             "`bulkhead pki init` and `bulkhead pki issue --server`)") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if self.client_auth == "required" \
            else ssl.CERT_OPTIONAL
        return ctx

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not port.isdigit():
            raise SystemExit(f"bulkhead-server: listen {self.listen!r}: expected HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)


async def serve(config: ServerConfig, started: asyncio.Event | None = None) -> None:
    store = open_store(config.datastore)
    hub = Hub(store, history=config.compaction_max_revisions)
    follower = asyncio.create_task(hub.run())
    compactor = asyncio.create_task(hub.compact_forever(
        config.compaction_interval, config.compaction_retain,
        config.compaction_max_revisions)) if config.compaction_interval > 0 else None
    runner = web.AppRunner(make_app(store, hub), access_log=None)
    await runner.setup()
    host, port = config.host_port()
    site = web.TCPSite(runner, host, port, ssl_context=config.ssl_context())
    await site.start()
    logging.getLogger("bulkhead.server").info(
        "listening", extra={"fields": {"listen": config.listen, "datastore": config.datastore}})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        follower.cancel()
        if compactor is not None:
            compactor.cancel()
        await runner.cleanup()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bulkhead-server",
                                     description="The Bulkhead central store and API.")
    parser.add_argument("--config", type=Path,
                        help=f"YAML config (default {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--listen", help=f"HOST:PORT (default 0.0.0.0:{SERVER_PORT})")
    parser.add_argument("--datastore", help="sqlite:///PATH or etcd://HOST:PORT,...")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--client-ca")
    parser.add_argument("--client-auth", choices=["required", "optional"])
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    config = ServerConfig.load(path, {
        "listen": args.listen, "datastore": args.datastore, "tls_cert": args.tls_cert,
        "tls_key": args.tls_key, "client_ca": args.client_ca,
        "client_auth": args.client_auth, "log_level": args.log_level})
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except ValueError as e:
        raise SystemExit(f"bulkhead-server: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
