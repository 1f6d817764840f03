"""The TLS listener in front of the API: a bounded number of connections, a bounded time
to finish the TLS handshake, and a file-descriptor limit raised to what the system allows.

asyncio's own `create_server` cannot count connections that never finish their handshake
(the application protocol only hears of a connection once TLS is up), so a client that
opens TCP connections and sends nothing would exhaust file descriptors unseen. Here every
accepted socket is counted from `accept()` until it closes: during the handshake by this
module, after it by aiohttp's `Server.connections`.

Every connection's TLS layer reads its socket into one buffer shared by all of them,
not into the 256 KiB buffer asyncio gives each SSL connection: with a thousand agents
holding a streaming watch open, those buffers were most of the server's memory.
`lean_tls_protocol` is the one place that leans on that detail of asyncio; it is checked
when the listener starts, and without it connections are made as before.
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
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from bulkhead.heap import malloc_trim

log = logging.getLogger("bulkhead.server.listen")

RESERVED_FDS = 128          # kept for the datastore, log files, etcd connections, CRL reads
OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# asyncio gives every TLS connection a read buffer of its own (256 KiB, allocated when
# the connection is made, kept until it closes). The socket is read into that buffer and
# the bytes are copied out at once, in the same call, to OpenSSL's input, so one buffer per
# event loop serves every connection. DECRYPT_CHUNK: the most one decrypting read asks
# for; a TLS record carries at most 16 KiB of data, so a larger read gains nothing.
SHARED_READ_BUFFER = 256 * 1024
DECRYPT_CHUNK = 16 * 1024
WRITE_BUFFER_HIGH = 64 * 1024   # and a quarter of it, the low mark (asyncio's defaults)


def lean_tls_protocol(loop: asyncio.AbstractEventLoop, ssl_context: ssl.SSLContext,
                      buffer: bytearray) -> type[asyncio.BufferedProtocol] | None:
    """asyncio's server-side TLS protocol reading every connection's socket into
    `buffer` (shared: no read buffer per connection), or None when this Python's asyncio
    is not the one this was written for (the listener then makes connections with
    `connect_accepted_socket(ssl=...)` and asyncio's buffers, as before).

    This is the one place that relies on asyncio's internals: `SSLProtocol` (not a
    documented API) sizes its buffer by its class attribute `max_size` and keeps it in
    `_ssl_buffer`/`_ssl_buffer_view`; its transport calls `get_buffer`, `recv_into` and
    `buffer_updated` in one go, and `buffer_updated` copies the bytes out at once, so
    nothing is left in the buffer when another connection's read comes. On uvloop
    (`eventLoop`, bulkhead.server.main) the same class runs over uvloop's TCP transport,
    which treats it as any buffered protocol: libuv asks for the buffer, reads into it
    and hands it back in one callback per read. Nothing here checks that of a later
    uvloop or libuv (reads into buffers registered in advance would break it);
    `test_concurrent_bodies_arrive_intact` does, on both loops. The check builds
    one instance, without a connection, and asks it for a buffer the way a transport does
    (`get_buffer(-1)`, the documented protocol API): it must be `buffer`."""
    view = memoryview(buffer)
    try:
        from asyncio import sslproto
        base: Any = sslproto.SSLProtocol
        if not isinstance(getattr(base, "max_size", None), int) or \
                not issubclass(base, asyncio.BufferedProtocol):
            raise TypeError("no SSLProtocol.max_size")

        class LeanSSLProtocol(base):  # type: ignore[misc]
            max_size = DECRYPT_CHUNK   # also the buffer __init__ makes, dropped at once

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._ssl_buffer = buffer
                self._ssl_buffer_view = view

        probe = LeanSSLProtocol(loop, asyncio.Protocol(), ssl_context, None,
                                server_side=True, ssl_handshake_timeout=1.0)
        got = probe.get_buffer(-1)
        shared = isinstance(got, memoryview) and got.obj is buffer and \
            len(got) == len(buffer)
        probe.connection_lost(None)   # marks its transport closed: no ResourceWarning
    except Exception as e:  # any surprise means: do as asyncio does
        log.warning("TLS read buffers: asyncio's SSLProtocol is not as expected (%s); "
                    "every connection gets a buffer of its own", e)
        return None
    if not shared:
        log.warning("TLS read buffers: asyncio's SSLProtocol did not take the shared "
                    "buffer; every connection gets a buffer of its own")
        return None
    lean: type[asyncio.BufferedProtocol] = LeanSSLProtocol
    return lean


# A TLS handshake allocates far more than the connection keeps; a burst of them (agents
# reconnecting after a restart) leaves that memory freed but scattered through the heap,
# where the C allocator keeps it. Once a burst is over (TRIM_DELAY seconds after a
# handshake ended with none under way, if TRIM_AFTER handshakes were done since the last
# time, and at most once per TRIM_EVERY seconds), the free pages go back to the system,
# in a worker thread.
TRIM_DELAY = 0.5
TRIM_AFTER = 64
TRIM_EVERY = 60.0


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
        self.tls_protocol: type[asyncio.BufferedProtocol] | None = None  # see start()
        self._read_buffer = bytearray(SHARED_READ_BUFFER)
        self._tasks: set[asyncio.Task[None]] = set()
        self._over_limit = RateLimitedLog()
        self.trim = malloc_trim()
        self.trims = 0                # times the heap's free pages were given back
        self._handshakes_untrimmed = 0
        self._last_trim = -TRIM_EVERY
        self._trim_handle: asyncio.TimerHandle | None = None
        self._no_fds = RateLimitedLog()

    @property
    def connections(self) -> int:
        return self.handshaking + (len(self.server.connections) if self.server else 0)

    async def start(self, server: web.Server) -> None:
        self.server = server
        loop = asyncio.get_running_loop()
        self.tls_protocol = lean_tls_protocol(loop, self.ssl_context, self._read_buffer)
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
            if self.tls_protocol is None:
                await loop.connect_accepted_socket(
                    self.server, sock=conn, ssl=self.ssl_context,
                    ssl_handshake_timeout=self.handshake_timeout)
            else:
                await self._lean_handshake(loop, conn, self.tls_protocol)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            self.handshake_failures += 1
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        else:
            # Only completed handshakes count: failed ones (anyone can make them) do not
            # bring a trim sooner.
            self._handshakes_untrimmed += 1
        finally:
            self.handshaking -= 1
            if self.handshaking == 0 and self._trim_handle is None and self.trim and \
                    self._handshakes_untrimmed >= TRIM_AFTER:
                wait = max(TRIM_DELAY, self._last_trim + TRIM_EVERY - loop.time())
                self._trim_handle = loop.call_later(wait, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        if self.handshaking or self.trim is None:   # still under way: at its end
            return
        self._handshakes_untrimmed = 0
        loop = asyncio.get_running_loop()
        self._last_trim = loop.time()
        # In a worker thread: malloc_trim releases the GIL, and takes 5-100 ms on a
        # large fragmented heap, which the event loop would otherwise wait for.
        self._spawn(self._trim_in_thread(self.trim))
        self.trims += 1

    @staticmethod
    async def _trim_in_thread(trim: Callable[[], object]) -> None:
        await asyncio.to_thread(trim)

    async def _lean_handshake(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                              tls_protocol: type[asyncio.BufferedProtocol]) -> None:
        """What `connect_accepted_socket(ssl=...)` does, with `tls_protocol` in place of
        asyncio's own: the TLS protocol over a plain socket transport, aiohttp's protocol
        over it once the handshake (bounded by the same timeout) is done."""
        assert self.server is not None
        handshake = loop.create_future()
        tls = tls_protocol(loop, self.server(), self.ssl_context,  # type: ignore[call-arg]
                           handshake, server_side=True,
                           ssl_handshake_timeout=self.handshake_timeout)
        transport, _ = await loop.connect_accepted_socket(lambda: tls, sock=conn)
        try:
            # The socket's write buffer: writing pauses above 64 KiB and resumes below
            # 16 KiB, asyncio's marks, on either loop (uvloop's own low mark is 16 bytes,
            # which lets the queue run dry before it is refilled). Not on the fallback
            # (`connect_accepted_socket(ssl=...)`): uvloop's own TLS keeps its marks.
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            await handshake
        except BaseException:
            transport.close()
            raise

    async def close(self) -> None:
        """Stop accepting and drop connections still in their handshake."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
