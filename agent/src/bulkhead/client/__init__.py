"""A small synchronous client for bulkhead-server (the CLI's; standard library only).

Connection settings come from, in order: explicit arguments (CLI flags), environment
variables (BULKHEAD_SERVER, BULKHEAD_CA, BULKHEAD_CERT, BULKHEAD_KEY), then
`~/.config/bulkhead/config.yaml` (keys server, ca, cert, key).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bulkhead.api import resource_path, route, segment
from bulkhead.defaults import SERVER_PORT

CONFIG_FILE = Path("~/.config/bulkhead/config.yaml")
__all__ = ["ApiError", "Connection", "Unreachable", "resource_path", "route", "segment"]


class ApiError(Exception):
    """The server refused: carries its HTTP status, reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(message)


class Unreachable(Exception):
    """The server could not be reached (network, TLS), or the settings cannot work."""


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
        url = self.server.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": content_type,
                                              "Accept": "application/json"})
        self.check()
        try:
            ctx = self._context()
        except (OSError, ssl.SSLError) as e:
            raise Unreachable(self.explain(e)) from None
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                err = json.loads(text)["error"]
                raise ApiError(e.code, err["reason"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise ApiError(e.code, e.reason, text.strip() or e.reason) from None
        except (urllib.error.URLError, OSError) as e:
            raise Unreachable(f"{self.server}: {self.explain(e)}") from None
        if not payload:
            return None
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(payload) if "json" in ctype else payload.decode()
