"""A small synchronous client for bulkhead-server (the CLI's; standard library only).

Connection settings come from, in order: explicit arguments (CLI flags), environment
variables (BULKHEAD_SERVER, BULKHEAD_CA, BULKHEAD_CERT, BULKHEAD_KEY), then
`~/.config/bulkhead/config.yaml` (keys server, ca, cert, key).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bulkhead.api import resource_path, route, segment
from bulkhead.client.certificates import certificate_problem
from bulkhead.defaults import SERVER_PORT

CONFIG_FILE = Path("~/.config/bulkhead/config.yaml")
__all__ = ["ApiError", "BadAnswer", "Connection", "Unreachable", "resource_path", "route",
           "segment"]
# The largest answer read (an export of a big store is tens of MiB); past it, BadAnswer.
MAX_ANSWER = 256 * 1024 * 1024


class ApiError(Exception):
    """The server refused: carries its HTTP status, reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(message)


class Unreachable(Exception):
    """The server could not be reached (network, TLS), or the settings cannot work."""


class BadAnswer(Exception):
    """The server answered, but not what a bulkhead-server answers: not JSON where JSON was
    said, nested past reading, larger than MAX_ANSWER, or of another shape."""


# Each setting as a message names it: flag, environment variable, config file key.
SETTINGS = {"server": "--server (BULKHEAD_SERVER)", "ca": "--ca (BULKHEAD_CA)",
            "cert": "--cert (BULKHEAD_CERT)", "key": "--key (BULKHEAD_KEY)"}
HOLDS = {"ca": "the CA certificate that signed the server's certificate",
         "cert": "the client certificate (PEM) the server knows the caller by",
         "key": "the private key (PEM) of the client certificate"}


@dataclass
class Connection:
    server: str = f"https://localhost:{SERVER_PORT}"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 30.0

    @classmethod
    def resolve(cls, server: str | None = None, ca: str | None = None, cert: str | None = None,
                key: str | None = None, config_file: Path | None = None) -> Connection:
        file_values: dict[str, Any] = {}
        path = (config_file or CONFIG_FILE).expanduser()
        if path.exists():
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"{path}: {e}") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: must be a mapping with server, ca, cert, key")
            file_values = loaded

        def pick(arg: str | None, env: str, key: str) -> str | None:
            value = arg or os.environ.get(env) or file_values.get(key)
            return None if value is None else str(value)

        return cls(server=pick(server, "BULKHEAD_SERVER", "server") or cls.server,
                   ca=pick(ca, "BULKHEAD_CA", "ca"), cert=pick(cert, "BULKHEAD_CERT", "cert"),
                   key=pick(key, "BULKHEAD_KEY", "key"))

    def check(self) -> None:
        """Unreachable naming the setting, its value and what to do, when the settings
        cannot work (nothing is sent)."""
        parts = urllib.parse.urlsplit(self.server)
        where = f"{SETTINGS['server']}: {self.server}"
        if parts.scheme == "http":
            raise Unreachable(f"{where}: bulkhead-server speaks HTTPS only (mutual TLS): use "
                              "https://")
        if parts.scheme != "https" or not parts.hostname:
            raise Unreachable(f"{where}: expected https://HOST:PORT")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise Unreachable(f"{where}: has a path ({parts.path or '?' + parts.query}): give "
                              "only https://HOST:PORT; the API's paths (/v1/...) are added to "
                              "it, so with a path every request misses (404)")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise Unreachable(f"{SETTINGS[name]}: {path}: no such file; it should hold "
                                  f"{HOLDS[name]}")
        if self.key and not self.cert:
            raise Unreachable(f"{SETTINGS['key']} is set ({self.key}) but {SETTINGS['cert']} "
                              "is not: give both")

    def explain(self, error: BaseException) -> str:
        """The likely cause of a failed connection, naming the setting and path involved."""
        reason = getattr(error, "reason", None)
        inner = reason if isinstance(reason, BaseException) else error
        text, lowered = str(inner), str(inner).lower()
        if "KEY_VALUES_MISMATCH" in text:
            return (f"{SETTINGS['key']}: {self.key} is not the private key of "
                    f"{SETTINGS['cert']}: {self.cert} (KEY_VALUES_MISMATCH); give the key "
                    "issued with that certificate")
        if "NO_CERTIFICATE_OR_CRL_FOUND" in text:
            return f"{SETTINGS['ca']}: {self.ca} holds no PEM certificate ({text})"
        if "PEM lib" in text or "NO_START_LINE" in text:
            return (f"{SETTINGS['cert']}: {self.cert} or {SETTINGS['key']}: "
                    f"{self.key or self.cert} is not a PEM certificate and key ({text})")
        if "CERTIFICATE_VERIFY_FAILED" in text:
            for words in ("has expired", "is not yet valid"):
                if f"certificate {words}" in text:
                    return (f"the server's certificate (or the CA that issued it) {words} "
                            f"({text}): renew it, or check this machine's clock")
            if "mismatch" in text:
                return (f"the server's certificate is not issued for "
                        f"{urllib.parse.urlsplit(self.server).hostname} ({text})")
            trust = f"{SETTINGS['ca']}: {self.ca}" if self.ca else \
                f"the system's trust store ({SETTINGS['ca']} is not set)"
            return (f"the server's certificate is not signed by the CA in {trust} ({text}); "
                    "give the CA that issued the server's certificate")
        if isinstance(inner, ConnectionResetError) or "remote end closed" in lowered or \
                "alert" in lowered or "eof occurred" in lowered:
            if not self.cert:
                return ("the server closed the connection: it requires a client certificate "
                        f"(mutual TLS) and none was given: set {SETTINGS['cert']} and "
                        f"{SETTINGS['key']}")
            problem = certificate_problem(self.cert, self.ca)
            if problem:
                return ("the server closed the connection without an answer: it most likely "
                        f"rejected the client certificate {SETTINGS['cert']}: {problem} "
                        f"[{text}]")
            return ("the server closed the connection without an answer: it most likely "
                    f"rejected the client certificate {SETTINGS['cert']}: {self.cert} (not "
                    f"issued by the server's client CA, expired or revoked) [{text}]")
        if isinstance(inner, ConnectionRefusedError):
            return (f"nothing accepts connections at {urllib.parse.urlsplit(self.server).netloc}"
                    f" (connection refused): is bulkhead-server running there?")
        if isinstance(inner, socket.gaierror):
            return f"cannot resolve {urllib.parse.urlsplit(self.server).hostname} ({text})"
        return text

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def request(self, method: str, path: str, body: Any = None, *,
                query: dict[str, str] | None = None, raw: bytes | None = None,
                content_type: str = "application/json") -> Any:
        """One request on a connection of its own; the answer's JSON (or text). The whole
        request, answer read, lasts at most `timeout` seconds (not each read: a server
        sending a byte at a time cannot hold the caller); redirects are not followed."""
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.check()
        try:
            ctx = self._context()
        except (OSError, ssl.SSLError) as e:
            raise Unreachable(self.explain(e)) from None
        parts = urllib.parse.urlsplit(self.server)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                           context=ctx, timeout=self.timeout)
        expired = threading.Event()

        def expire() -> None:   # unblocks whatever read or write is waiting
            expired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        deadline = time.monotonic() + self.timeout
        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            # Connected first: the timer cannot cut a connect short (no socket yet), so
            # the time left is checked after it and given to each read as its bound.
            conn.connect()
            if expired.is_set() or conn.sock is None:
                raise TimeoutError
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            conn.request(method, target, body=data, headers={
                "Content-Type": content_type, "Accept": "application/json"})
            resp = conn.getresponse()
            payload = _read_at_most(resp, MAX_ANSWER, self.server)
            if expired.is_set():   # what came before the cut is not the answer
                raise TimeoutError
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise Unreachable(f"{self.server}: no whole answer within {self.timeout:g} "
                                  "s") from None
            raise Unreachable(f"{self.server}: {self.explain(e)}") from None
        finally:
            timer.cancel()
            conn.close()
        if 300 <= resp.status < 400:
            where = str(resp.getheader("Location", ""))[:200]
            raise ApiError(resp.status, resp.reason, f"the server answered with a redirect "
                           f"to {where!r}; bulkhead does not follow redirects: give the "
                           "server's own https:// address")
        if resp.status >= 400:
            text = payload.decode(errors="replace")
            try:
                err = json.loads(text)["error"]
                raise ApiError(resp.status, str(err["reason"]), str(err["message"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                raise ApiError(resp.status, resp.reason, text.strip()[:1000] or resp.reason
                               ) from None
        if not payload:
            return None
        if "json" in resp.getheader("Content-Type", ""):
            try:
                return json.loads(payload)
            except (ValueError, RecursionError) as e:
                raise BadAnswer(f"{self.server}{path}: the answer is not JSON bulkhead can "
                                f"read ({type(e).__name__}: {str(e)[:200]})") from None
        return payload.decode(errors="replace")


def _read_at_most(resp: http.client.HTTPResponse, most: int, server: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read(65536):
        size += len(chunk)
        if size > most:
            raise BadAnswer(f"{server}: the answer is larger than {most:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
