"""`bulkhead-server`: configuration, TLS, logging, and the process around the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import yaml
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bulkhead.defaults import SERVER_PORT
from bulkhead.logs import setup_logging
from bulkhead.model import strict_yaml
from bulkhead.server.app import ACCESS_LOG_MODES, HUB, STOPPING, event_loop_name, make_app
from bulkhead.server.dnslogs import DnsLogs
from bulkhead.server.flows import FlowLogs
from bulkhead.server.hub import Hub
from bulkhead.server.listen import RESERVED_FDS, Listener, raise_nofile_limit
from bulkhead.server.revocation import Revocation
from bulkhead.store import StoreError, open_store
from bulkhead.store.flowlog import FlowLogConfig, FlowStoreError

DEFAULT_CONFIG = Path("/etc/bulkhead/server.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/bulkhead")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")   # eventLoop: event_loop_factory


class BadHttpFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a request line over 8 KiB, bad headers) as
    an error with a traceback; it is a client's fault, already answered with a 400. Keep
    one warning line per `every` seconds, without the traceback, counting the rest."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last = -every
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            self._suppressed += 1
            return False
        self._last = now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args, record.exc_info, record.exc_text = (
            "bad HTTP request: %s", (str(error).replace("\n", " ")[:200],), None, None)
        record.fields = {"suppressed": self._suppressed}
        self._suppressed = 0
        return True


@dataclass
class ServerConfig:
    listen: str = f"0.0.0.0:{SERVER_PORT}"
    datastore: str = "sqlite:///var/lib/bulkhead/store.db"
    tls_cert: str = "/etc/bulkhead/pki/server.crt"
    tls_key: str = "/etc/bulkhead/pki/server.key"
    client_ca: str = "/etc/bulkhead/pki/ca.crt"
    client_auth: str = "required"   # required | optional (then only /healthz, /readyz)
    log_level: str = "info"
    max_connections: int = 10_000       # capped by the file-descriptor limit
    handshake_timeout: float = 10.0     # seconds to finish the TLS handshake
    shutdown_timeout: float = 5.0       # seconds open requests get at shutdown
    crl: str | None = None   # None: crl.pem beside clientCA, used when (once) it exists
    compaction_interval: float = 300.0      # seconds between compactions; 0: never
    compaction_retain: int = 10_000         # last revisions with changes kept
    compaction_max_revisions: int = 100_000  # and never more revisions than this in all
    flow_logs_doc: Any = None                # the flowLogs section as written
    flow_logs: FlowLogConfig | None = None   # checked by load; None: every default
    event_loop: str = "auto"   # auto (uvloop when installed) | uvloop | asyncio
    access_log: str = "all"    # all | errors (status 400 and up) | off: the request lines

    KEYS: ClassVar[dict[str, str]] = {
        "listen": "listen", "datastore": "datastore", "tlsCert": "tls_cert",
        "tlsKey": "tls_key", "clientCA": "client_ca", "clientAuth": "client_auth",
        "logLevel": "log_level", "maxConnections": "max_connections",
        "handshakeTimeout": "handshake_timeout", "shutdownTimeout": "shutdown_timeout",
        "crl": "crl", "compactionInterval": "compaction_interval",
        "compactionRetain": "compaction_retain",
        "compactionMaxRevisions": "compaction_max_revisions", "flowLogs": "flow_logs_doc",
        "eventLoop": "event_loop", "accessLog": "access_log"}
    NUMBERS: ClassVar[dict[str, tuple[type, float, float]]] = {
        "max_connections": (int, 1, 1_000_000), "handshake_timeout": (float, 0.5, 300),
        "shutdown_timeout": (float, 0, 300), "compaction_interval": (float, 0, 86_400),
        "compaction_retain": (int, 1, 10_000_000),
        "compaction_max_revisions": (int, 1, 1_000_000_000)}

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
                attr = cls.KEYS[key]
                setattr(config, attr, value if attr in cls.NUMBERS or attr == "flow_logs_doc"
                        else str(value))
        for attr, value in overrides.items():
            if value is not None:
                setattr(config, attr, value)
        for attr, (kind, low, high) in cls.NUMBERS.items():
            raw = getattr(config, attr)
            try:
                number = kind(raw)
            except (TypeError, ValueError):
                number = None
            if kind is int and isinstance(raw, float):
                number = None  # 1.5 connections: refused, not rounded
            if isinstance(raw, bool) or number is None or not low <= number <= high:
                key = next(k for k, a in cls.KEYS.items() if a == attr)
                raise SystemExit(f"bulkhead-server: {key}: {raw!r} is not a number from "
                                 f"{low:g} to {high:g}")
            setattr(config, attr, number)
        if config.client_auth not in ("required", "optional"):
            raise SystemExit("bulkhead-server: clientAuth must be required or optional")
        if config.access_log not in ACCESS_LOG_MODES:
            raise SystemExit(f"bulkhead-server: accessLog: {config.access_log!r} is not one "
                             f"of {', '.join(ACCESS_LOG_MODES)}")
        if config.event_loop not in EVENT_LOOPS:
            raise SystemExit(f"bulkhead-server: eventLoop: {config.event_loop!r} is not one "
                             f"of {', '.join(EVENT_LOOPS)}")
        if config.compaction_interval < 0 or config.compaction_retain < 1 or \
                config.compaction_max_revisions < config.compaction_retain:
            raise SystemExit("bulkhead-server: compactionInterval must be >= 0 (0: never), "
                             "compactionRetain >= 1 and compactionMaxRevisions >= "
                             "compactionRetain")
        try:
            config.flow_logs = FlowLogConfig.parse(config.flow_logs_doc, config.state_dir())
        except ValueError as e:
            raise SystemExit(f"bulkhead-server: config {path}: {e}") from None
        return config

    def state_dir(self) -> Path:
        """Where the server keeps its files: the SQLite datastore's folder, else
        /var/lib/bulkhead."""
        parsed = urlparse(self.datastore)
        if parsed.scheme == "sqlite" and parsed.path:
            return Path(parsed.path).parent
        return DEFAULT_STATE_DIR

    def flow_log_config(self) -> FlowLogConfig:
        return self.flow_logs or FlowLogConfig.parse(None, self.state_dir())

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # A connection's client certificate is read once and holds for the connection
        # (`bulkhead.server.app`): no renegotiation (TLS 1.2) may bring another.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
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
    nofile = raise_nofile_limit()
    max_connections = max(1, min(config.max_connections, nofile - RESERVED_FDS))
    ssl_context = config.ssl_context()
    try:
        store = open_store(config.datastore)
    except StoreError as e:
        raise SystemExit(f"bulkhead-server: datastore: {e}") from None
    try:
        flow_logs = FlowLogs.open(config.flow_log_config())
    except (FlowStoreError, OSError, ValueError) as e:
        await store.close()
        raise SystemExit(f"bulkhead-server: flowLogs: {e}") from None
    try:
        dns_logs = DnsLogs.open(config.flow_log_config())
    except (FlowStoreError, OSError, ValueError) as e:
        flow_logs.close()
        await store.close()
        raise SystemExit(f"bulkhead-server: flowLogs (DNS logs): {e}") from None
    expiry = asyncio.create_task(flow_logs.expire_forever())
    dns_expiry = asyncio.create_task(dns_logs.expire_forever())
    hub = Hub(store, history=config.compaction_max_revisions)
    follower = asyncio.create_task(hub.run())
    compactor = asyncio.create_task(hub.compact_forever(
        config.compaction_interval, config.compaction_retain,
        config.compaction_max_revisions)) if config.compaction_interval > 0 else None
    host, port = config.host_port()
    listener = Listener(ssl_context, host, port, max_connections=max_connections,
                        handshake_timeout=config.handshake_timeout)
    app = make_app(store, hub, listener=listener, revocation=revocation, flow_logs=flow_logs,
                   dns_logs=dns_logs, access_log=config.access_log)
    # handler_cancellation: a stream whose client left is cancelled at once, not at its
    # next heartbeat. auto_decompress off: a compressed body is never inflated (a few KB
    # of gzip can hold gigabytes); `_text` refuses one (415).
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=config.shutdown_timeout, auto_decompress=False)
    await runner.setup()
    assert runner.server is not None
    await listener.start(runner.server)
    logging.getLogger("bulkhead.server").info(
        "listening", extra={"fields": {"listen": config.listen, "datastore": config.datastore,
                                       "maxConnections": max_connections, "nofile": nofile,
                                       "flowLogs": flow_logs.config.store,
                                       "eventLoop": event_loop_name()}})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
        loop.add_signal_handler(signal.SIGHUP, revocation.refresh)
        handled.append(signal.SIGHUP)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        try:
            # Stop accepting, end every watch (agents reconnect to another server), let
            # requests in flight finish for up to shutdown_timeout, then let go of the store.
            await listener.close()
            app[STOPPING].set()
            app[HUB].close()
            if compactor is not None:
                compactor.cancel()
            await runner.cleanup()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await store.close()
            for task in (expiry, dns_expiry):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(flow_logs.close)
            await asyncio.to_thread(dns_logs.close)
        finally:
            # While the loop runs: uvloop's close() leaves them in place (a stopped loop's
            # remove_signal_handler does nothing), and the process would then ignore
            # SIGTERM and SIGINT until it exits.
            for handled_sig in handled:
                loop.remove_signal_handler(handled_sig)


def event_loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop the server runs on, and its name. uvloop (libuv's loop, in C)
    carries a request's bytes between the socket and aiohttp with less of Python's time
    than asyncio's own loop (docs/benchmarks.md, "The server's event loop"); `auto` takes
    it when it is installed (a dependency but on Windows), `asyncio` keeps Python's own."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("bulkhead-server: eventLoop: uvloop is not installed "
                                 "(pip install uvloop), or set eventLoop: asyncio") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def bump_revision(datastore: str, by: int) -> int:
    """`--bump-revision N`: the restored SQLite file's revision raised, its history
    marked compacted; says what it did."""
    if not datastore.startswith("sqlite:"):
        raise SystemExit("bulkhead-server: --bump-revision is for a SQLite datastore; for "
                         "etcd, restore with etcdutl snapshot restore --bump-revision N "
                         "--mark-compacted")
    if by < 1:
        raise SystemExit(f"bulkhead-server: --bump-revision {by}: give a number of at "
                         "least 1, more than the writes made since the backup")

    from bulkhead.store.sqlite import SQLiteStore

    path = Path(urlparse(datastore).path)
    if not path.is_file():   # a mistyped path would be a new, empty store
        raise SystemExit(f"bulkhead-server: --bump-revision: {path}: no such file (the "
                         "restored store)")

    async def run() -> tuple[int, int]:
        store = open_store(datastore)
        assert isinstance(store, SQLiteStore)
        try:
            before = await store.revision()
            return before, await store.bump_revision(by)
        finally:
            await store.close()

    try:
        before, after = asyncio.run(run())
    except (ValueError, StoreError, OSError) as e:
        raise SystemExit(f"bulkhead-server: --bump-revision: {e}") from None
    print(f"{datastore}: revision {before} -> {after}; the history before it is marked "
          "compacted: every agent takes a snapshot when it connects")
    return 0


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
    parser.add_argument("--event-loop", choices=EVENT_LOOPS,
                        help="auto (default: uvloop when installed), uvloop or asyncio")
    parser.add_argument("--crl", help="the client CA's CRL (default: crl.pem beside "
                        "--client-ca, once it exists)")
    parser.add_argument("--bump-revision", type=int, metavar="N",
                        help="SQLite, the server stopped, after restoring the file from a "
                        "backup: raise its revision by N (more than the writes since the "
                        "backup) and mark the history before it compacted, so every agent "
                        "takes a snapshot; then exit (etcd: etcdutl snapshot restore "
                        "--bump-revision N --mark-compacted)")
    args = parser.parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    config = ServerConfig.load(path, {
        "listen": args.listen, "datastore": args.datastore, "tls_cert": args.tls_cert,
        "tls_key": args.tls_key, "client_ca": args.client_ca,
        "client_auth": args.client_auth, "log_level": args.log_level, "crl": args.crl,
        "event_loop": args.event_loop})
    setup_logging(config.log_level, BadHttpFilter())
    if args.bump_revision is not None:
        return bump_revision(config.datastore, args.bump_revision)
    _, factory = event_loop_factory(config.event_loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(config))
    except ValueError as e:
        raise SystemExit(f"bulkhead-server: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
