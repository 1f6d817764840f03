"""The agent's HTTP/1.1 client: what the agent asks of bulkhead-server, and no more.

The agent sends a handful of requests (`GET /v1/snapshot`, the streaming watch, status
reports, flow and DNS log batches) to one server over mutual TLS. aiohttp costs the agent
about 15 MiB of RSS for this; this module is asyncio streams, `ssl` and a parser that
trusts nothing the network says:

    session = Session("https://server:7443", ssl_context)
    async with session.get("/v1/snapshot", timeout=Timeout(total=60)) as r:
        body = await r.json()
    async with session.get("/v1/watch", params={...}, timeout=...) as r:
        async for piece in r.iter_chunks():   # as it arrives, without a bound on the total
            ...
    await session.close()

- Connections are kept alive and reused (at most `max_connections` at a time, 4 by
  default: a request waits for one to come free; an idle one is closed after
  `idle_seconds`, 15 by default). A GET whose reused connection turns out closed by the
  server before a byte of the answer arrived is sent once more on a new connection (a
  POST is not: the server may have taken it). A connection holding bytes beyond the
  answer it framed is not reused.
- TLS: a context, or a function giving the one to use now (the agent's, built again
  when its certificate files change on disk), asked at each request: a new connection
  uses what it gives, a kept one opened with another is closed rather than reused, and
  an answer being read (a stream) keeps its connection.
- Requests: `Host`, `Connection: keep-alive`, `Accept-Encoding: identity` (nothing
  compressed comes back), a JSON body with `Content-Length`.
- Answers: a body framed by `Content-Length`, chunked transfer encoding, or the end of
  the connection (then not reused).
- Bounds (each refusal is a `ProtocolError` naming what was wrong): the status line and
  headers together 64 KiB (`MAX_HEAD`) and 100 headers; a chunk-size line and the
  trailers within the same; a chunk size of 16 hex digits at most; a body read whole
  256 MiB (`MAX_BODY`: a snapshot of a large fleet is one JSON body; `max_body` per
  request); a `Transfer-Encoding` other than chunked, a `Content-Encoding` other than
  identity, both `Transfer-Encoding` and `Content-Length`, or two lengths, refused.
- Time (`Timeout`): `connect` (TCP and the TLS handshake), `total` (the whole exchange,
  the body included) and `read` (the longest wait for any one read); None: no bound.

Every failure is an `HttpError`: `ConnectError`, `Disconnected`, `ProtocolError` (and
`BodyTooLarge`), `HttpTimeout` (also a `TimeoutError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

from bulkhead import __version__

# What each request says of the agent: bulkhead-server keeps the version of each node's
# agent from its status reports (`bulkhead nodes`, /metrics).
USER_AGENT = f"bulkhead-agent/{__version__}"
MAX_HEAD = 64 << 10           # a status line and its headers, a chunk line, trailers
MAX_HEADERS = 100
MAX_BODY = 256 << 20          # a body read whole (a large fleet's snapshot is one body)
MAX_INFORMATIONAL = 8         # 1xx answers skipped before the real one
PIECE = 64 << 10              # the most read from the socket at once
SSL_SHUTDOWN_SECONDS = 5.0    # a closed connection's TLS shutdown, then it is aborted
DRAIN = 64 << 10              # a body left unread up to this is read to keep the connection

_STATUS = re.compile(r"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """No usable answer: the server could not be reached, broke the connection, took too
    long, or answered outside HTTP/1.1 or the bounds above."""


class ConnectError(HttpError):
    """No connection (refused, unreachable, the name unknown, the TLS handshake failed)."""


class TlsRefused(ConnectError):
    """The TLS handshake failed on the server's side (an alert: a client certificate it
    refuses, no cipher in common), not on the server's certificate."""


class Disconnected(HttpError):
    """The server closed the connection before the answer was complete."""

    def __init__(self, message: str, *, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty     # nothing of the answer had come


class ProtocolError(HttpError):
    """The answer is not HTTP/1.1 as this client reads it, or is over a bound."""


class BodyTooLarge(ProtocolError):
    """A body over the request's cap."""


class HttpTimeout(HttpError, TimeoutError):
    """A connect, read or total timeout."""


@dataclass(frozen=True, slots=True)
class Timeout:
    total: float | None = 300.0     # the whole exchange, the body included
    connect: float | None = 30.0    # TCP connect and the TLS handshake
    read: float | None = None       # the longest wait for any one read


DEFAULT_TIMEOUT = Timeout()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n / 1024:g} KiB"


class Headers:
    """An answer's headers: names case-insensitive, in the order they came."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items = [(k.lower(), v) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The header's value; several are joined with ", " (RFC 9110, 5.3)."""
        values = self.getall(name)
        return ", ".join(values) if values else default

    def getall(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k == name.lower() for k, _ in self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class _Conn:
    __slots__ = ("idle_since", "reader", "reused", "tls", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tls: ssl.SSLContext | None) -> None:
        self.reader, self.writer = reader, writer
        self.tls = tls            # the context it was opened with
        self.reused = False
        self.idle_since = 0.0

    def usable(self) -> bool:
        """Open, and holding no byte beyond the last answer (a server that sent more
        than it framed would have it read as the next request's answer)."""
        buffered = getattr(self.reader, "_buffer", None)   # asyncio.StreamReader's
        return (not self.writer.transport.is_closing() and not self.reader.at_eof()
                and buffered is not None and not buffered)

    def close(self) -> None:
        """Always the orderly close (TLS close_notify, then FIN), never an abort: on a
        host whose kernel began tracking connections after this one opened (the agent's
        first ruleset turns conntrack on), a bare FIN or RST of ours is invalid to
        conntrack and dropped, the server goes on sending, and its packets arrive as new
        connections to a closed port (that a policy denies, flow logs record). The close
        is bounded by the TLS shutdown timeout (`SSL_SHUTDOWN_SECONDS`)."""
        self.writer.close()


TlsSource = ssl.SSLContext | Callable[[], ssl.SSLContext]


class Session:
    """Requests to one server (`base_url`, https:// with `ssl_context`: a context, or a
    function giving the one for the next request), over kept-alive connections.
    `close()` (or `async with`) closes them."""

    def __init__(self, base_url: str, ssl_context: TlsSource | None, *,
                 max_connections: int = 4, idle_seconds: float = 15.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("https", "http") or not url.hostname \
                or (url.scheme == "https") != (ssl_context is not None):
            raise ValueError(f"{base_url!r}: expected https://HOST[:PORT] with a TLS "
                             "context (http:// without one)")
        if url.query or url.fragment or url.username or url.password:
            raise ValueError(f"{base_url!r}: a base URL has no query, fragment or user")
        self.base_url = base_url
        self._tls: Callable[[], ssl.SSLContext] | None = \
            (lambda: ssl_context) if isinstance(ssl_context, ssl.SSLContext) else ssl_context
        self._host = url.hostname
        self._port = url.port or (443 if ssl_context is not None else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = 443 if ssl_context is not None else 80
        self._host_header = host if self._port == default else f"{host}:{self._port}"
        self._prefix = url.path.rstrip("/")
        self._max = max_connections
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    # -- requests ------------------------------------------------------------------------
    def get(self, path: str, *, params: Mapping[str, str] | None = None,
            headers: Mapping[str, str] | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
            max_body: int = MAX_BODY) -> Request:
        return self.request("GET", path, params=params, headers=headers, timeout=timeout,
                            max_body=max_body)

    def post(self, path: str, *, json_body: Any = None, data: bytes | None = None,
             params: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
             max_body: int = MAX_BODY) -> Request:
        return self.request("POST", path, params=params, json_body=json_body, data=data,
                            headers=headers, timeout=timeout, max_body=max_body)

    def request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                json_body: Any = None, data: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: Timeout = DEFAULT_TIMEOUT,
                max_body: int = MAX_BODY) -> Request:
        """The answer, once its head has come: `await` it, or `async with` it (which
        releases the connection at the end). Its body is read with `read()`, `text()`,
        `json()` or, as it comes, `iter_chunks()`."""
        if not _TOKEN.fullmatch(method):
            raise ValueError(f"{method!r} is not an HTTP method")
        if not path.startswith("/") or _BAD_VALUE.search(path) or " " in path:
            raise ValueError(f"{path!r}: expected an absolute path without spaces or "
                             "control characters")
        target = self._prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        fields = {"Host": self._host_header, "User-Agent": USER_AGENT,
                  "Accept-Encoding": "identity", "Connection": "keep-alive"}
        if json_body is not None:
            if data is not None:
                raise ValueError("a request has json_body or data, not both")
            data = json.dumps(json_body, separators=(",", ":")).encode()
            fields["Content-Type"] = "application/json"
        if data is not None or method in ("POST", "PUT", "PATCH"):
            fields["Content-Length"] = str(len(data or b""))
        for name, value in (headers or {}).items():
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise ValueError(f"header {name!r}: {value!r} is not a valid header")
            fields[name] = value
        head = f"{method} {target} HTTP/1.1\r\n" + \
            "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        what = f"{method} {path.split('?', 1)[0]}"
        message = head.encode("latin-1") + (data or b"")
        return Request(lambda: self._send(what, method, message, timeout, max_body))

    async def _send(self, what: str, method: str, message: bytes, timeout: Timeout,
                    max_body: int) -> Response:
        if self._closed:
            raise HttpError(f"{what}: the session is closed")
        loop = asyncio.get_running_loop()
        deadline = None if timeout.total is None else loop.time() + timeout.total
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise HttpTimeout(f"{what}: no connection came free within {timeout.total:g} s "
                              "(total timeout)") from None
        conn: _Conn | None = None
        try:
            tls = self._tls() if self._tls is not None else None
            # A reused connection the server closed meanwhile: once more on a new one.
            for attempt in range(2):
                conn = self._pooled(loop.time(), tls) if attempt == 0 else None
                if conn is None:
                    conn = await self._connect(what, deadline, timeout.connect, tls)
                self._busy.add(conn)
                response = Response(self, conn, what, method, deadline, timeout, max_body)
                try:
                    await response._start(message)
                    return response
                except Disconnected as e:
                    # Only a request that changes nothing is sent again: the server
                    # may have taken a POST before the connection ended.
                    if not (e.empty and conn.reused and not response.heard
                            and method in ("GET", "HEAD")):
                        raise
                    self._drop(conn)
                    conn = None
            raise AssertionError("unreachable: a new connection is never reused")
        except BaseException:
            if conn is not None:
                self._drop(conn)
            self._slots.release()
            raise

    async def _connect(self, what: str, deadline: float | None, connect: float | None,
                       tls: ssl.SSLContext | None) -> _Conn:
        loop = asyncio.get_running_loop()
        when = _earliest(deadline, None if connect is None else loop.time() + connect)
        where = f"{self._host}:{self._port}"
        try:
            async with asyncio.timeout_at(when):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=tls,
                    server_hostname=self._host if tls is not None else None,
                    ssl_handshake_timeout=connect if tls is not None and connect else None,
                    ssl_shutdown_timeout=SSL_SHUTDOWN_SECONDS if tls is not None else None,
                    limit=MAX_HEAD)
        except TimeoutError:
            which = "connect" if when != deadline else "total"
            raise HttpTimeout(f"{what}: cannot connect to {where} in time ({which} "
                              "timeout)") from None
        except ssl.SSLCertVerificationError as e:   # what is wrong with it, not only that
            raise ConnectError(f"{what}: TLS with {where} failed: the server's certificate "
                               f"(or its CA): {e.verify_message or e.reason or e}") from None
        except ssl.SSLError as e:
            raise TlsRefused(f"{what}: TLS with {where} failed: {e.reason or e}") from None
        except OSError as e:
            raise ConnectError(f"{what}: cannot connect to {where}: "
                               f"{e.strerror or e}") from None
        return _Conn(reader, writer, tls)

    def _pooled(self, now: float, tls: ssl.SSLContext | None) -> _Conn | None:
        """A kept connection to reuse, opened with `tls` (one opened with a context since
        replaced is closed: the next request presents the renewed certificate)."""
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since <= self._idle_seconds and conn.usable() \
                    and conn.tls is tls:
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn, reusable: bool) -> None:
        """An answer is done with its connection: kept for the next request or closed."""
        self._busy.discard(conn)
        self._slots.release()
        if reusable and not self._closed and len(self._idle) < self._max and conn.usable():
            loop = asyncio.get_running_loop()
            conn.idle_since = loop.time()
            self._idle.append(conn)
            if self._expiry is None:
                self._expiry = loop.call_later(self._idle_seconds, self._expire)
        else:
            conn.close()

    def _expire(self) -> None:
        """Close the connections idle for `idle_seconds` (and those the server closed)."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        kept = []
        for conn in self._idle:
            if now - conn.idle_since < self._idle_seconds and conn.usable():
                kept.append(conn)
            else:
                conn.close()
        self._idle = kept
        if kept:
            first = min(c.idle_since for c in kept)
            self._expiry = loop.call_at(first + self._idle_seconds, self._expire)

    def _drop(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        conn.close()

    async def close(self) -> None:
        """Close every connection, idle or in use (answers being read then fail)."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conn in self._idle:
            conn.close()
        for conn in self._busy:
            conn.close()
        self._idle.clear()
        self._busy.clear()
        await asyncio.sleep(0)   # let the transports finish closing

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class Request:
    """A request to be sent: awaitable (the answer, its head read) and an async context
    manager (the answer, released at the end). Nothing is sent before either."""

    __slots__ = ("_response", "_send")

    def __init__(self, send: Callable[[], Coroutine[Any, Any, Response]]) -> None:
        self._send = send
        self._response: Response | None = None

    def __await__(self) -> Generator[Any, None, Response]:
        return self._send().__await__()

    async def __aenter__(self) -> Response:
        self._response = await self._send()
        return self._response

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._response is not None:
            await self._response.__aexit__(exc_type, exc, tb)


class Response:
    """An answer: `status`, `reason`, `headers`; the body read once, whole or in pieces.
    `release()` (done by `async with`, and by reading the body whole) gives the
    connection back, or closes it if the body was not read to its end."""

    def __init__(self, session: Session, conn: _Conn, what: str, method: str,
                 deadline: float | None, timeout: Timeout, max_body: int) -> None:
        self._session, self._conn, self.what = session, conn, what
        self._method = method
        self._deadline, self._timeout, self._max_body = deadline, timeout, max_body
        self.status = 0
        self.reason = ""
        self.version = (1, 1)
        self.headers = Headers()
        self._keep_alive = False
        self._chunked = False
        self._left: int | None = None      # bytes of the body (or of the chunk) to come
        self._done = False
        self._released = False
        self.heard = False          # something of the answer came
        self._body: bytes | None = None

    # -- reading -------------------------------------------------------------------------
    async def _io(self, read: Any) -> Any:
        """One read, within the read and total timeouts; socket errors made HttpErrors."""
        loop = asyncio.get_running_loop()
        read_timeout = self._timeout.read
        when = _earliest(self._deadline,
                         None if read_timeout is None else loop.time() + read_timeout)
        try:
            async with asyncio.timeout_at(when):
                return await read
        except TimeoutError:
            if self._deadline is not None and when == self._deadline:
                raise HttpTimeout(f"{self.what}: no complete answer within "
                                  f"{self._timeout.total:g} s (total timeout)") from None
            raise HttpTimeout(f"{self.what}: nothing read for {read_timeout:g} s "
                              "(read timeout)") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"{self.what}: a line of the answer's head (status, "
                                f"headers, chunk size, trailers) is over "
                                f"{_mib(MAX_HEAD)}") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise Disconnected(f"{self.what}: the server closed the connection before "
                                   "the answer was complete", empty=True) from None
            raise Disconnected(f"{self.what}: the server closed the connection in the "
                               f"middle of the answer ({len(e.partial)} bytes of "
                               f"{e.expected or 'a line'} read)") from None
        except ssl.SSLError as e:
            raise Disconnected(f"{self.what}: TLS failed: {e.reason or e}",
                               empty=True) from None
        except OSError as e:
            raise Disconnected(f"{self.what}: the connection broke: {e.strerror or e}",
                               empty=True) from None

    async def _start(self, message: bytes) -> None:
        """Send the request and read the answer's head (Disconnected with `empty`: the
        connection ended before anything of an answer came)."""
        conn = self._conn
        conn.writer.write(message)
        await self._io(conn.writer.drain())
        raw = await self._io(conn.reader.readuntil(b"\r\n\r\n"))
        self.heard = True
        for _ in range(MAX_INFORMATIONAL):
            self._parse_head(raw)
            if self.status >= 200:
                break
            if self.status == 101:
                raise ProtocolError(f"{self.what}: the server switched protocols (101)")
            raw = await self._io(conn.reader.readuntil(b"\r\n\r\n"))
        else:
            raise ProtocolError(f"{self.what}: more than {MAX_INFORMATIONAL} informational "
                                "(1xx) answers")
        self._framing()

    def _parse_head(self, raw: bytes) -> None:
        lines = raw[:-4].decode("latin-1").split("\r\n")
        match = _STATUS.fullmatch(lines[0])
        if match is None:
            raise ProtocolError(f"{self.what}: not an HTTP/1.x status line: "
                                f"{lines[0][:80]!r}")
        self.version = (1, int(match.group(1)))
        self.status = int(match.group(2))
        self.reason = match.group(3) or ""
        if len(lines) - 1 > MAX_HEADERS:
            raise ProtocolError(f"{self.what}: more than {MAX_HEADERS} headers")
        items: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                raise ProtocolError(f"{self.what}: a malformed header line: {line[:80]!r}")
            value = value.strip(" \t")
            if _BAD_VALUE.search(value):
                raise ProtocolError(f"{self.what}: header {name} has control characters")
            items.append((name, value))
        self.headers = Headers(items)

    def _framing(self) -> None:
        """How the body ends: a length, chunks, or the end of the connection."""
        h = self.headers
        connection = {t.strip().lower() for t in (h.get("connection") or "").split(",")}
        self._keep_alive = "close" not in connection and \
            (self.version == (1, 1) or "keep-alive" in connection)
        encoding = h.get("content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            raise ProtocolError(f"{self.what}: a body in Content-Encoding {encoding!r}, "
                                "not asked for")
        if self._method == "HEAD" or self.status in (204, 304):
            self._left = 0
            self._done = True
            return
        te = h.get("transfer-encoding")
        lengths = set(h.getall("content-length"))
        if te is not None:
            if te.strip().lower() != "chunked":
                raise ProtocolError(f"{self.what}: Transfer-Encoding {te[:80]!r} is not "
                                    "supported (chunked only)")
            if lengths:
                raise ProtocolError(f"{self.what}: both Transfer-Encoding and "
                                    "Content-Length")
            self._chunked = True
            self._left = 0
        elif lengths:
            length = lengths.pop()
            if lengths or not length.isascii() or not length.isdigit() or len(length) > 18:
                raise ProtocolError(f"{self.what}: an invalid Content-Length: "
                                    f"{', '.join(sorted({length, *lengths}))[:80]!r}")
            self._left = int(length)
            self._done = self._left == 0
        else:
            self._keep_alive = False          # read to the end of the connection

    async def _chunk_size(self) -> int:
        line = await self._io(self._conn.reader.readuntil(b"\r\n"))
        size = line[:-2].split(b";", 1)[0].rstrip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size):
            raise ProtocolError(f"{self.what}: a malformed chunk size: {line[:40]!r}")
        return int(size, 16)

    async def _trailers(self) -> None:
        total = 0
        for _ in range(MAX_HEADERS + 1):
            line = await self._io(self._conn.reader.readuntil(b"\r\n"))
            total += len(line)
            if total > MAX_HEAD:
                raise ProtocolError(f"{self.what}: trailers over {_mib(MAX_HEAD)}")
            if line == b"\r\n":
                return
        raise ProtocolError(f"{self.what}: more than {MAX_HEADERS} trailers")

    async def _piece(self) -> bytes:
        """The next piece of the body as it comes; b"" at its end."""
        if self._done:
            return b""
        if self._released:
            raise HttpError(f"{self.what}: the answer was released before its body was read")
        reader = self._conn.reader
        if self._chunked:
            if self._left == 0:
                size = await self._chunk_size()
                if size == 0:
                    await self._trailers()
                    self._done = True
                    return b""
                self._left = size
            assert self._left is not None
            data: bytes = await self._io(reader.read(min(self._left, PIECE)))
            if not data:
                raise Disconnected(f"{self.what}: the server closed the connection in the "
                                   "middle of a chunk")
            self._left -= len(data)
            if self._left == 0 and await self._io(reader.readexactly(2)) != b"\r\n":
                raise ProtocolError(f"{self.what}: a chunk is longer than its size says")
            return data
        if self._left is not None:
            data = await self._io(reader.read(min(self._left, PIECE)))
            if not data:
                raise Disconnected(f"{self.what}: the server closed the connection with "
                                   f"{self._left} bytes of the body still to come")
            self._left -= len(data)
            self._done = self._left == 0
            return data
        data = await self._io(reader.read(PIECE))
        self._done = not data
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces as they come (at most 64 KiB each), with no bound on the
        total: for a stream, the reader bounds what it keeps."""
        while data := await self._piece():
            yield data

    async def read(self, max_body: int | None = None) -> bytes:
        """The body, whole (at most `max_body`, the request's cap by default); the
        connection is then released."""
        if self._body is not None:
            return self._body
        cap = self._max_body if max_body is None else max_body
        if self._left is not None and not self._chunked and self._left > cap:
            self.release()
            raise BodyTooLarge(f"{self.what}: the answer's body is {self._left} bytes, "
                               f"over the cap of {_mib(cap)}")
        parts: list[bytes] = []
        size = 0
        try:
            while data := await self._piece():
                size += len(data)
                if size > cap:
                    raise BodyTooLarge(f"{self.what}: the answer's body is over the cap "
                                       f"of {_mib(cap)}")
                parts.append(data)
        finally:
            self.release()
        self._body = b"".join(parts)
        return self._body

    async def text(self, errors: str = "strict") -> str:
        body = await self.read()
        return body.decode(self._charset(), errors)

    async def json(self) -> Any:
        """The body decoded as JSON (ValueError if it is not)."""
        return json.loads(await self.read())

    def _charset(self) -> str:
        for param in (self.headers.get("content-type") or "").split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset":
                value = value.strip().strip('"').lower()
                if value in ("utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1"):
                    return value
        return "utf-8"

    # -- the end -------------------------------------------------------------------------
    def release(self) -> None:
        """Done with the connection: back to the pool if the body was read to its end
        and the server keeps it open, closed otherwise. Idempotent."""
        if self._released:
            return
        self._released = True
        self._session._release(self._conn, self._done and self._keep_alive)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Released; the rest of a small body (`DRAIN`, with a length) read first, so
        the connection is kept, when the block ended without an exception."""
        try:
            if exc_type is None and not self._done and not self._released \
                    and not self._chunked and self._left is not None and self._left <= DRAIN:
                with contextlib.suppress(HttpError):
                    while await self._piece():
                        pass
        finally:
            self.release()      # also when cancelled while reading the rest

    def __repr__(self) -> str:
        return f"<Response {self.what}: {self.status} {self.reason}>"
