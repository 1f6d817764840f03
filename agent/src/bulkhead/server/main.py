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
from bulkhead.model import strict_yaml
from bulkhead.server.app import make_app
from bulkhead.server.hub import Hub
from bulkhead.server.revocation import Revocation
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
    crl: str | None = None   # None: crl.pem beside clientCA, used when (once) it exists

    KEYS: ClassVar[dict[str, str]] = {
        "listen": "listen", "datastore": "datastore", "tlsCert": "tls_cert",
        "tlsKey": "tls_key", "clientCA": "client_ca", "clientAuth": "client_auth",
        "logLevel": "log_level", "crl": "crl"}

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, str | None]) -> ServerConfig:
        config = cls()
        if path is not None:
            try:
                data = strict_yaml(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise SystemExit(f"bulkhead-server: config {path}: {e}") from None
            if not isinstance(data, dict):
                raise SystemExit(f"bulkhead-server: config {path}: must be a mapping")
            for key, value in data.items():
                if key not in cls.KEYS:
                    raise SystemExit(f"bulkhead-server: config {path}: {key}: unknown field "
                                     f"(known: {', '.join(cls.KEYS)})")
                setattr(config, cls.KEYS[key], str(value))
        for attr, value in overrides.items():
            if value is not None:
                setattr(config, attr, value)
        if config.client_auth not in ("required", "optional"):
            raise SystemExit("bulkhead-server: clientAuth must be required or optional")
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

    def revocation(self) -> Revocation:
        """The revoked client certificates: `crl` if set (it must exist), else
        `crl.pem` in clientCA's folder, watched even before it exists."""
        explicit = self.crl is not None
        path = Path(self.crl) if self.crl is not None else Path(self.client_ca).parent / "crl.pem"
        return Revocation(path, Path(self.client_ca), required=explicit)

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not port.isdigit():
            raise SystemExit(f"bulkhead-server: listen {self.listen!r}: expected HOST:PORT")
        return host.strip("[]") or "0.0.0.0", int(port)


async def serve(config: ServerConfig, started: asyncio.Event | None = None) -> None:
    revocation = config.revocation()  # a bad CRL stops the start, before the store opens
    store = open_store(config.datastore)
    hub = Hub(store)
    follower = asyncio.create_task(hub.run())
    runner = web.AppRunner(make_app(store, hub, revocation=revocation), access_log=None)
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
    with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
        loop.add_signal_handler(signal.SIGHUP, revocation.refresh)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        follower.cancel()
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
    parser.add_argument("--crl", help="the client CA's CRL (default: crl.pem beside "
                        "--client-ca, once it exists)")
    args = parser.parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    config = ServerConfig.load(path, {
        "listen": args.listen, "datastore": args.datastore, "tls_cert": args.tls_cert,
        "tls_key": args.tls_key, "client_ca": args.client_ca,
        "client_auth": args.client_auth, "log_level": args.log_level, "crl": args.crl})
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except ValueError as e:
        raise SystemExit(f"bulkhead-server: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
