"""The TLS listener's memory (issue 23): every connection's socket is read into one shared
buffer, not a 256 KiB buffer of its own; what goes through it arrives intact; and a Python
whose asyncio is not as expected still gets a working listener (asyncio's own buffers)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bulkhead import pki
from bulkhead.server import listen
from bulkhead.server.listen import Listener
from bulkhead.server.main import ServerConfig
from tests.conftest import free_port


@dataclass
class Served:
    url: str
    listener: Listener
    server: web.Server
    client_ssl: ssl.SSLContext
    release: asyncio.Event


@contextlib.asynccontextmanager
async def serving(tmp_path: Path) -> AsyncIterator[Served]:
    """A Listener in front of a bare aiohttp server: POST answers the body's digest, GET
    answers a line and waits (as a watch does) until `release`."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    crt, key = pki.issue(tmp_path, "web-1", role="agent")
    client_ssl = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    client_ssl.load_cert_chain(crt, key)
    config = ServerConfig(listen="127.0.0.1:0", datastore=f"sqlite://{tmp_path}/s.db",
                          tls_cert=str(tmp_path / "server.crt"),
                          tls_key=str(tmp_path / "server.key"),
                          client_ca=str(tmp_path / "ca.crt"))
    release = asyncio.Event()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "POST":   # the body's digest: what the server read
            return web.Response(text=hashlib.sha256(await request.read()).hexdigest())
        response = web.StreamResponse()   # a watcher: headers, then waiting
        await response.prepare(request)
        await response.write(b"waiting\n")
        await release.wait()
        return response

    port = free_port()
    server = web.Server(handle)
    listener = Listener(config.ssl_context(), "127.0.0.1", port, max_connections=1000,
                        handshake_timeout=5.0)
    await listener.start(server)
    try:
        yield Served(f"https://127.0.0.1:{port}", listener, server, client_ssl, release)
    finally:
        release.set()
        await listener.close()
        await server.shutdown(1.0)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serving(tmp_path) as s:
        yield s


async def _watchers(served: Served, session: aiohttp.ClientSession, n: int
                    ) -> list[aiohttp.ClientResponse]:
    responses = [await session.get(served.url + "/watch") for _ in range(n)]
    for r in responses:
        assert await r.content.readline() == b"waiting\n"
    return responses


def _tls_protocol(handler: Any) -> Any:
    return handler.transport._ssl_protocol   # asyncio's TLS layer under aiohttp's protocol


async def test_connections_share_one_read_buffer(served: Served) -> None:
    assert served.listener.tls_protocol is not None
    connector = aiohttp.TCPConnector(ssl=served.client_ssl, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        responses = await _watchers(served, session, 5)
        handlers = list(served.server.connections)
        assert len(handlers) == 5
        buffers = set()
        for handler in handlers:
            tls = _tls_protocol(handler)
            assert isinstance(tls, served.listener.tls_protocol)
            view = tls.get_buffer(-1)   # what the socket transport reads into
            assert view.obj is served.listener._read_buffer
            buffers.add(id(view.obj))
        assert len(buffers) == 1
        served.release.set()
        for r in responses:
            r.close()


async def test_a_waiting_connection_costs_little_memory(served: Served) -> None:
    """Python-side memory the listener's connections hold while they wait: was over
    256 KiB each (asyncio's read buffer), a few KiB now (OpenSSL's is not traced)."""
    n = 40
    connector = aiohttp.TCPConnector(ssl=served.client_ssl, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _watchers(served, session, 1)   # warm up: one connection, imports, caches
        only_server = [tracemalloc.Filter(True, listen.__file__, all_frames=True)]
        tracemalloc.start(25)
        try:
            before = tracemalloc.take_snapshot().filter_traces(only_server)
            responses = await _watchers(served, session, n)
            await asyncio.sleep(0.2)
            after = tracemalloc.take_snapshot().filter_traces(only_server)
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert len(served.server.connections) == n + 1
        assert grown / n < 16 * 1024, f"{grown / n / 1024:.1f} KiB per waiting connection"
        served.release.set()
        for r in responses:
            r.close()


async def test_a_connections_socket_pauses_at_64_kib_and_resumes_at_16(served: Served
                                                                        ) -> None:
    """The same write-buffer marks under the TLS layer on either loop (uvloop's own low
    mark would be 16 bytes)."""
    connector = aiohttp.TCPConnector(ssl=served.client_ssl, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(served.url + "/watch") as r:
            assert await r.content.readline() == b"waiting\n"
            [handler] = served.server.connections
            assert handler.transport is not None
            socket_transport = handler.transport._ssl_protocol._transport  # type: ignore[attr-defined]
            assert socket_transport.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
            served.release.set()


async def test_concurrent_bodies_arrive_intact(served: Served) -> None:
    """Many connections sending at once through the one buffer: each body reaches its
    handler byte for byte."""
    bodies = [os.urandom(300_000 + i * 7919) for i in range(12)]
    connector = aiohttp.TCPConnector(ssl=served.client_ssl, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def send(body: bytes) -> str:
            async with session.post(served.url + "/upload", data=body) as r:
                assert r.status == 200
                return await r.text()
        for _ in range(3):
            digests = await asyncio.gather(*(send(b) for b in bodies))
            assert digests == [hashlib.sha256(b).hexdigest() for b in bodies]


async def test_an_unexpected_asyncio_falls_back_to_its_own_buffers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """If asyncio's SSLProtocol does not take the shared buffer, the check says so and
    connections get asyncio's own buffers: the listener still serves."""
    from asyncio import sslproto
    monkeypatch.setattr(sslproto.SSLProtocol, "get_buffer",
                        lambda self, n: memoryview(bytearray(4096)))
    with caplog.at_level(logging.WARNING, "bulkhead.server.listen"):
        async with serving(tmp_path) as s:
            assert s.listener.tls_protocol is None
            assert "did not take the shared buffer" in caplog.text
            monkeypatch.undo()   # asyncio's own protocol works again for the request
            connector = aiohttp.TCPConnector(ssl=s.client_ssl)
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.post(s.url + "/upload", data=b"abc") as r:
                    assert await r.text() == hashlib.sha256(b"abc").hexdigest()


async def test_lean_tls_protocol_refuses_an_asyncio_without_max_size(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from asyncio import sslproto
    monkeypatch.delattr(sslproto.SSLProtocol, "max_size")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert listen.lean_tls_protocol(asyncio.get_running_loop(), ctx, bytearray(1024)) is None


async def test_a_burst_of_handshakes_ends_with_the_heap_trimmed(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once handshakes stop (none under way for TRIM_DELAY, at least TRIM_AFTER done),
    the listener gives the C heap's free pages back, once per burst."""
    assert listen.malloc_trim() is not None   # glibc (Debian)
    monkeypatch.setattr(listen, "TRIM_AFTER", 4)
    monkeypatch.setattr(listen, "TRIM_DELAY", 0.05)
    calls: list[int] = []
    served.listener.trim = lambda: calls.append(served.listener.handshaking)
    connector = aiohttp.TCPConnector(ssl=served.client_ssl, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        responses = await _watchers(served, session, 2)   # under TRIM_AFTER: no trim
        await asyncio.sleep(0.3)
        assert calls == []
        responses += await _watchers(served, session, 6)
        await asyncio.sleep(0.3)
        assert calls == [0] and served.listener.trims == 1   # once, with none under way
        # Handshakes that fail (anyone can make them) do not count towards a trim.
        counted = served.listener._handshakes_untrimmed
        for _ in range(6):
            _, writer = await asyncio.open_connection("127.0.0.1", served.listener.port)
            writer.write(b"not TLS\r\n\r\n")
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.3)
        assert served.listener._handshakes_untrimmed == counted
        # Another burst within TRIM_EVERY: its trim waits (at most one a minute).
        responses += await _watchers(served, session, 6)
        await asyncio.sleep(0.3)
        assert served.listener.trims == 1 and served.listener._trim_handle is not None
        served.release.set()
        for r in responses:
            r.close()
