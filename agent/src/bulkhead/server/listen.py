"""The TLS listener in front of the API: a bounded number of connections, a bounded time
to finish the TLS handshake, and a file-descriptor limit raised to what the system allows.

asyncio's own `create_server` cannot count connections that never finish their handshake
(the application protocol only hears of a connection once TLS is up), so a client that
opens TCP connections and sends nothing would exhaust file descriptors unseen. Here every
accepted socket is counted from `accept()` until it closes: during the handshake by this
module, after it by aiohttp's `Server.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

log = logging.getLogger("bulkhead.server.listen")

RESERVED_FDS = 128          # kept for the datastore, log files, etcd connections, CRL reads
OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class RateLimitedLog:
    """Logs a line at most once per `every` seconds, with how many were suppressed."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last = -every
        self.suppressed = 0

    def warn(self, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self.suppressed += 1
            return
        self._last = now
        log.warning(message, extra={"fields": {**fields, "suppressed": self.suppressed}})
        self.suppressed = 0


class Listener:
    """Accepts TLS connections for an aiohttp `web.Server`, at most `max_connections`."""

    def __init__(self, ssl_context: ssl.SSLContext, host: str, port: int, *,
                 max_connections: int, handshake_timeout: float, backlog: int = 1024) -> None:
        self.server: web.Server | None = None
        self.ssl_context = ssl_context
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.backlog = backlog
        self.handshaking = 0
        self.refused = 0              # connections closed at once: over the limit
        self.handshake_failures = 0   # no TLS within the timeout, or a bad handshake
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._over_limit = RateLimitedLog()
        self._no_fds = RateLimitedLog()

    @property
    def connections(self) -> int:
        return self.handshaking + (len(self.server.connections) if self.server else 0)

    async def start(self, server: web.Server) -> None:
        self.server = server
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in infos[:1] if self.host else infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and not self.host:  # one socket per family
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self.backlog)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._sockets.append(sock)
            self._spawn(self._accept(sock))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _peer = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno not in OUT_OF_FDS:
                    raise
                self._no_fds.warn("out of file descriptors: not accepting for 0.5 s",
                                  connections=self.connections, error=str(e))
                await asyncio.sleep(0.5)
                continue
            self._take(conn)
            # Then whatever else waits in the backlog, without a loop pass per socket.
            for _ in range(self.backlog):
                try:
                    conn, _peer = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno not in OUT_OF_FDS:
                        raise
                    break
                self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        if self.connections >= self.max_connections:
            conn.close()
            self.refused += 1
            self._over_limit.warn("connection limit reached: closing new connections",
                                  limit=self.max_connections, refused=self.refused)
            return
        conn.setblocking(False)
        self.handshaking += 1
        self._spawn(self._handshake(conn))

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            assert self.server is not None
            await loop.connect_accepted_socket(
                self.server, sock=conn, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            self.handshake_failures += 1
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            self.handshaking -= 1

    async def close(self) -> None:
        """Stop accepting and drop connections still in their handshake."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
