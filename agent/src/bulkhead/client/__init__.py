"""A small synchronous client for bulkhead-server (the CLI's; standard library only).

Connection settings come from, in order: explicit arguments (CLI flags), environment
variables (BULKHEAD_SERVER, BULKHEAD_CA, BULKHEAD_CERT, BULKHEAD_KEY), then
`~/.config/bulkhead/config.yaml` (keys server, ca, cert, key).
"""

from __future__ import annotations

import json
import os
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
    """The server could not be reached (network, TLS)."""


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
        try:
            ctx = self._context()
        except (OSError, ssl.SSLError) as e:
            raise Unreachable(f"TLS files: {e}") from None
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
            reason = getattr(e, "reason", e)
            raise Unreachable(f"{self.server}: {reason}") from None
        if not payload:
            return None
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(payload) if "json" in ctype else payload.decode()
