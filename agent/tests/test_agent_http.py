"""bulkhead.agent.http: the agent's HTTP/1.1 client, against a real bulkhead-server over
mutual TLS, and against a scripted server that answers what a hostile one would (heads
over the bound, bad chunks, cut bodies, silence, a body over the cap). Also the agent's
/metrics responder, and that the agent's import path does not import aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bulkhead.agent import metrics as agent_metrics
from bulkhead.agent.http import (
    MAX_HEAD,
    BodyTooLarge,
    ConnectError,
    Disconnected,
    HttpError,
    HttpTimeout,
    ProtocolError,
    Session,
    Timeout,
)
from bulkhead.agent.metrics import MetricsServer, MetricsView
from bulkhead.agent.status import Counters, post_status
from bulkhead.agent.sync import (
    SyncError,
    client_ssl_context,
    error_of,
    fetch_snapshot,
    lines,
    open_session,
)
from bulkhead.api import route
from tests.agentfixture import NODE, config_for, create, gnp
from tests.conftest import Server
from tests.procs import free_port

AGENT_DIR = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the real server
def agent_session(server: Server, tmp_path: Path) -> Session:
    config = config_for(server.url, server.pki, tmp_path / "state")
    return open_session(config, client_ssl_context(config))


def connections(session: Session) -> list[int]:
    """Counts each new connection the session opens (patched in)."""
    opened: list[int] = []
    connect = session._connect

    async def counted(*args: object) -> object:
        opened.append(1)
        return await connect(*args)  # type: ignore[arg-type]

    session._connect = counted  # type: ignore[assignment,method-assign]
    return opened


async def test_snapshot_status_and_reuse_against_the_server(server: Server,
                                                            tmp_path: Path) -> None:
    async with server.client("alice", "admin") as admin:
        rev = await create(admin, gnp("a"))
    async with agent_session(server, tmp_path) as session:
        opened = connections(session)
        revision, items = await fetch_snapshot(session)
        assert revision >= rev
        assert [i["metadata"]["name"] for i in items if i["kind"] ==
                "GlobalNetworkPolicy"] == ["a"]
        await post_status(session, NODE, {"appliedRevision": revision, "errors": [],
                                           "counters": {}})
        await fetch_snapshot(session)
        assert len(opened) == 1, "one kept-alive connection for the three requests"

        # Refused: another node's status. The server's message, with its status.
        with pytest.raises(SyncError, match=r"POST /v1/status/web-2: HTTP 403: "):
            await post_status(session, "web-2", {"appliedRevision": 0, "errors": [],
                                                 "counters": {}})
        async with session.get("/v1/no-such-route") as r:
            assert r.status == 404
            assert (await error_of(r)).startswith("HTTP 404: ")
        assert len(opened) == 1, "answers with a body read to their end keep it open"


async def test_the_watch_streams_chunked_lines(server: Server, tmp_path: Path) -> None:
    async with server.client("alice", "admin") as admin:
        rev = await create(admin, gnp("a"))
    async with agent_session(server, tmp_path) as session:
        resp = await session.get(route("watch"), params={"stream": "true", "timeout": "0.2"},
                                 timeout=Timeout(total=None, connect=10))
        async with resp:
            assert resp.status == 200
            assert resp.headers.get("Transfer-Encoding", "").lower() == "chunked"
            seen: list[str] = []
            async with asyncio.timeout(10):
                async for line in lines(resp.iter_chunks()):
                    message = json.loads(line)
                    seen.append(message["type"])
                    if message["type"] == "snapshot":
                        assert message["revision"] >= rev
                    if seen.count("heartbeat") == 2:
                        break
        assert seen[0] == "snapshot" and seen.count("heartbeat") == 2


async def test_tls_and_connect_failures_are_connect_errors(server: Server,
                                                           tmp_path: Path) -> None:
    # A CA that did not sign the server's certificate.
    other = tmp_path / "other"
    other.mkdir()
    from bulkhead import pki
    pki.init_ca(other)
    config = config_for(server.url, server.pki, tmp_path / "state")
    config.ca = str(other / "ca.crt")
    async with open_session(config, client_ssl_context(config)) as session:
        with pytest.raises(ConnectError, match=r"GET /v1/snapshot: TLS with 127\.0\.0\.1"):
            await fetch_snapshot(session)
    config = config_for(f"https://127.0.0.1:{free_port()}", server.pki, tmp_path / "s2")
    async with open_session(config, client_ssl_context(config)) as session:
        with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1:"):
            await fetch_snapshot(session)


# ----------------------------------------------------------- a scripted (hostile) server
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


class Scripted:
    """A plain-TCP HTTP server on 127.0.0.1 whose connections run `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Session:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.session = Session(f"http://127.0.0.1:{port}", None)
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        assert self.server is not None
        self.server.close()


def answering(*raw: bytes, keep: bool = False) -> Handler:
    """Reads a request, writes `raw` (in pieces, a moment apart), then closes unless
    `keep` (then waits for the next request, and answers it the same)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            for piece in raw:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
            if not keep:
                return
    return handler


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


FIVE_SECONDS = Timeout(total=5)


async def get_body(session: Session, *, timeout: Timeout = FIVE_SECONDS,
                   max_body: int | None = None) -> bytes:
    async with session.get("/x", timeout=timeout) as r:
        return await r.read(max_body)


async def test_bodies_by_length_chunks_and_close() -> None:
    async with Scripted(answering(ok(b"hello"), keep=True)) as session:
        assert await get_body(session) == b"hello"
    chunked = CHUNKED + b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-T: 1\r\n\r\n"
    async with Scripted(answering(chunked, keep=True)) as session:
        assert await get_body(session) == b"hello world"
    to_close = b"HTTP/1.0 200 OK\r\n\r\nall of it"
    async with Scripted(answering(to_close)) as session:
        assert await get_body(session) == b"all of it"
    async with Scripted(answering(ok(b'{"a": [1]}'), keep=True)) as session:
        async with session.get("/x", params={"q": "a b&c"}) as r:
            assert await r.json() == {"a": [1]}
            assert await r.text() == '{"a": [1]}'


async def test_requests_say_host_keep_alive_identity_and_length() -> None:
    scripted = Scripted(answering(ok(b""), keep=True))
    async with scripted as session:
        heads: list[bytes] = []
        original = scripted.handler

        async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> None:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            body = await reader.readexactly(int(heads[-1].split(b"Content-Length: ")[1]
                                                .split(b"\r\n")[0]))
            heads.append(body)
            writer.write(ok(b""))
            await writer.drain()
            await original(reader, writer)

        scripted.handler = recording
        async with session.post("/v1/flows", json_body={"records": [1]},
                                params={"a": "1"}) as r:
            assert r.status == 200
        head = heads[0].decode()
        port = scripted.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        assert head.startswith("POST /v1/flows?a=1 HTTP/1.1\r\n")
        for line in (f"Host: 127.0.0.1:{port}", "Connection: keep-alive",
                     "Accept-Encoding: identity", "Content-Type: application/json",
                     'Content-Length: 15'):
            assert line + "\r\n" in head, line
        assert heads[1] == b'{"records":[1]}'


async def test_connections_are_kept_alive_and_a_stale_one_replaced() -> None:
    scripted = Scripted(answering(ok(b"one"), keep=True))
    async with scripted as session:
        for _ in range(3):
            assert await get_body(session) == b"one"
        assert scripted.connections == 1
    # The server closes after each answer without saying so: the next request finds the
    # kept connection closed, and is sent again on a new one.
    scripted = Scripted(answering(ok(b"two")))
    async with scripted as session:
        assert await get_body(session) == b"two"
        await asyncio.sleep(0.05)
        assert await get_body(session) == b"two"
        assert scripted.connections == 2
    # Connection: close is honoured.
    scripted = Scripted(answering(ok(b"3", "Connection: close"), keep=True))
    async with scripted as session:
        assert await get_body(session) == b"3"
        assert await get_body(session) == b"3"
        assert scripted.connections == 2


async def test_idle_connections_are_closed_after_idle_seconds() -> None:
    closed = asyncio.Event()

    async def once_then_wait(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                             ) -> None:
        await read_request(reader)
        writer.write(ok(b"k"))
        await writer.drain()
        if await reader.read() == b"":
            closed.set()

    scripted = Scripted(once_then_wait)
    async with scripted as session:
        session._idle_seconds = 0.1
        assert await get_body(session) == b"k"
        assert len(session._idle) == 1
        async with asyncio.timeout(5):
            await closed.wait()
        assert session._idle == []


async def test_an_error_body_that_never_ends_is_not_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.agent import sync
    monkeypatch.setattr(sync, "ERROR_READ_SECONDS", 0.2)

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\nx")
        await writer.drain()
        await asyncio.sleep(30)

    async with Scripted(slow) as session:
        async with session.get("/x", timeout=Timeout(total=None)) as r:
            assert await error_of(r) == \
                "HTTP 503: Busy (the body not read within 0.2 s)"


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    """Unless what is left is small (up to 64 KiB with a length): then it is read."""
    scripted = Scripted(answering(ok(b"x" * 1_000_000), keep=True))
    async with scripted as session:
        async with session.get("/x") as r:
            assert r.status == 200
            async for _ in r.iter_chunks():
                break
        assert await get_body(session) == b"x" * 1_000_000
        assert scripted.connections == 2
    scripted = Scripted(answering(ok(b"x" * 1000), keep=True))
    async with scripted as session:
        async with session.get("/x") as r:
            assert r.status == 200
        assert await get_body(session) == b"x" * 1000
        assert scripted.connections == 1


@pytest.mark.parametrize(("raw", "error", "match"), [
    # Heads over the bound, or not HTTP.
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", ProtocolError,
     "over 64 KiB"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"Content-Length: 0\r\n\r\n",
     ProtocolError, "more than 100 headers"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", ProtocolError, "not an HTTP/1.x status line"),
    (b"HTTP/1.1 999 Odd\r\n\r\n", ProtocolError, "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", ProtocolError, "malformed header"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", ProtocolError, "malformed header"),
    (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", ProtocolError, "control characters"),
    (b"HTTP/1.1 101 Switching\r\n\r\n", ProtocolError, "switched protocols"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 9, ProtocolError, "informational"),
    # Framing.
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", ProtocolError,
     "chunked only"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
     ProtocolError, "both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     ProtocolError, "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ProtocolError,
     "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Encoding: gzip\r\n\r\nx",
     ProtocolError, "Content-Encoding 'gzip'"),
    # Chunks.
    (CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", ProtocolError, "malformed chunk size"),
    (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", ProtocolError, "malformed chunk size"),
    (CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", ProtocolError, "malformed chunk size"),
    (CHUNKED + b"\r\nhello\r\n0\r\n\r\n", ProtocolError, "malformed chunk size"),
    (CHUNKED + b"1" * 17 + b"\r\n", ProtocolError, "malformed chunk size"),
    (CHUNKED + b"5" + b" " * MAX_HEAD + b"\r\n", ProtocolError, "over 64 KiB"),
    (CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", ProtocolError, "longer than its size"),
    (CHUNKED + b"0\r\n" + b"X: y\r\n" * 200 + b"\r\n", ProtocolError, "trailers"),
    # Cut short.
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", Disconnected, "7 bytes"),
    (CHUNKED + b"a\r\nabc", Disconnected, "middle of a chunk"),
    (CHUNKED + b"3\r\nabc\r\n", Disconnected, "closed the connection"),
    (b"HTTP/1.1 200 OK\r\nContent-", Disconnected, "middle of the answer"),
    (b"", Disconnected, "closed the connection"),
])
async def test_hostile_answers_are_refused_with_what_was_wrong(
        raw: bytes, error: type[HttpError], match: str) -> None:
    async with Scripted(answering(raw)) as session:
        with pytest.raises(error, match=match) as caught:
            await get_body(session)
        assert str(caught.value).startswith("GET /x: ")


async def test_bodies_over_the_cap() -> None:
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n"
    async with Scripted(answering(huge)) as session:
        with pytest.raises(BodyTooLarge, match="300000000 bytes, over the cap of 256 MiB"):
            await get_body(session)
    chunks = CHUNKED + b"400\r\n" + b"x" * 1024 + b"\r\n400\r\n" + b"y" * 1024 + \
        b"\r\n0\r\n\r\n"
    async with Scripted(answering(chunks)) as session:
        with pytest.raises(BodyTooLarge, match=r"over the cap of 1\.5 KiB"):
            await get_body(session, max_body=1536)
    async with Scripted(answering(b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 5000)) as session:
        with pytest.raises(BodyTooLarge, match="over the cap"):
            await get_body(session, max_body=4096)


async def test_silence_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with Scripted(silent) as session:
        started = asyncio.get_running_loop().time()
        with pytest.raises(HttpTimeout, match=r"GET /x: no complete answer within 0.3 s"):
            await get_body(session, timeout=Timeout(total=0.3))
        assert asyncio.get_running_loop().time() - started < 2
        with pytest.raises(TimeoutError, match=r"nothing read for 0.2 s \(read timeout\)"):
            await get_body(session, timeout=Timeout(total=None, read=0.2))

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    # A read timeout is per read: a trickle keeps it happy, the total timeout does not.
    async with Scripted(trickle) as session:
        with pytest.raises(HttpTimeout, match="total timeout"):
            await get_body(session, timeout=Timeout(total=0.5, read=0.2))


async def test_a_connect_timeout() -> None:
    """A server that takes the TCP connection and never does the TLS handshake."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = Session(f"https://127.0.0.1:{port}", ssl.create_default_context())
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(HttpTimeout, match=r"GET /x: cannot connect to 127\.0\.0\.1:\d+ "
                           r"in time \(connect timeout\)"):
            await get_body(session, timeout=Timeout(total=5, connect=0.2))
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        await session.close()
        server.close()


async def test_cancelled_requests_give_their_connection_back() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with Scripted(silent) as session:
        for _ in range(6):   # more than the pool's 4: each cancel released its slot
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(get_body(session, timeout=Timeout(total=None)), 0.05)
        assert session._slots._value == 4


async def test_stream_lines_are_bounded_and_split_as_they_come() -> None:
    async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    got = [line async for line in lines(pieces(b'{"a"', b':1}\n\n  {"b":2}\r\n{', b"}\n"))]
    assert got == [b'{"a":1}', b'{"b":2}', b"{}"]
    with pytest.raises(SyncError, match="a line of the stream is over 1 MiB"):
        async for _ in lines(pieces(*[b"x" * 65536] * 17), max_line=1 << 20):
            pass
    with pytest.raises(SyncError, match="over 1 MiB"):
        async for _ in lines(pieces(b"x" * ((1 << 20) + 1) + b"\nok\n"), max_line=1 << 20):
            pass


# ----------------------------------------------------------------------- /metrics
async def metrics_request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def test_metrics_responder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_metrics, "READ_TIMEOUT", 0.3)
    view = MetricsView("web-1", 3, 4, True, 0, Counters())
    metrics = MetricsServer(lambda: view)
    port = free_port()
    await metrics.start("127.0.0.1", port)
    try:
        answer = await metrics_request(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert b"bulkhead_agent_applied_revision 3\n" in body
        assert f"Content-Length: {len(body)}".encode() in head
        # LF line ends (nc, a person) and a query string are fine.
        answer = await metrics_request(port, b"GET /metrics?x=1 HTTP/1.0\n\n")
        assert answer.startswith(b"HTTP/1.0 200 OK")
        for raw in (b"GET / HTTP/1.1\r\n\r\n", b"POST /metrics HTTP/1.1\r\n\r\n"):
            assert (await metrics_request(port, raw)).startswith(b"HTTP/1.0 404 Not Found")
        for raw in (b"hello\r\n\r\n", b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n",
                    b"GET /metrics HTTP/1.1\r\n" + b"X: 1\r\n" * 70 + b"\r\n"):
            assert (await metrics_request(port, raw)).startswith(b"HTTP/1.0 400")
        # A client that never finishes its request is closed after READ_TIMEOUT.
        started = asyncio.get_running_loop().time()
        assert await metrics_request(port, b"GET /metrics HTTP/1.1\r\n") == b""
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        await metrics.stop()


# --------------------------------------------------------------------- no aiohttp
def test_the_agent_does_not_import_aiohttp() -> None:
    code = ("import bulkhead.agent.main, bulkhead.agent.daemon, bulkhead.agent.http, sys; "
            "bad = sorted(m for m in sys.modules if m == 'aiohttp' or "
            "m.startswith('aiohttp.')); assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(AGENT_DIR / "src"), str(AGENT_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr


async def test_a_post_on_a_connection_that_ends_unanswered_is_not_sent_again() -> None:
    """The server may have taken the POST before the connection ended: it fails, and
    the caller decides (a GET is sent again on a new connection)."""
    bodies: list[bytes] = []

    async def take_then_hang_up(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        bodies.append(await reader.readexactly(length))
        if len(bodies) == 1:               # the first is answered, the connection kept
            writer.write(ok(b"{}"))
            await writer.drain()
            await read_request(reader)     # the second: taken, never answered
            bodies.append(b"(second on the kept connection)")

    scripted = Scripted(take_then_hang_up)
    async with scripted as session:
        async with session.post("/v1/flows", json_body={"n": 1}, timeout=FIVE_SECONDS) as r:
            assert r.status == 200 and await r.read() == b"{}"
        with pytest.raises(Disconnected):
            async with session.post("/v1/flows", json_body={"n": 2}, timeout=FIVE_SECONDS):
                pass
        assert scripted.connections == 1   # not sent again on a new connection


async def test_bytes_past_an_answer_are_never_read_as_the_next_answer() -> None:
    """A server that sends more than its answer frames: the connection is not reused."""
    scripted = Scripted(answering(ok(b"one") + b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n"
                                  b"\r\n{\"evil\":1", keep=True))
    async with scripted as session:
        assert await get_body(session) == b"one"
        await asyncio.sleep(0.1)
        assert await get_body(session) == b"one"
        assert scripted.connections == 2


async def test_a_cancelled_drain_gives_its_connection_back() -> None:
    """Leaving an answer whose small rest is still being read, cancelled: the slot comes
    back (else, after max_connections such, nothing could be sent)."""
    async def slow_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12")
        await writer.drain()
        await asyncio.sleep(30)

    scripted = Scripted(slow_rest)
    async with scripted as session:
        for _ in range(6):                 # more than the pool's 4 connections
            async def leave_early() -> None:
                async with session.get("/x", timeout=FIVE_SECONDS):
                    pass                   # the rest (8 bytes) is drained on leaving
            task = asyncio.create_task(leave_early())
            await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert session._slots._value == 4 and not session._busy   # every slot is back


async def test_a_metrics_client_that_does_not_read_is_cut_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer bigger than the socket buffers, to a client that asks and never reads:
    after READ_TIMEOUT the connection is aborted (not closed: a close would keep it,
    and the answer buffered for it, until it reads)."""
    monkeypatch.setattr(agent_metrics, "READ_TIMEOUT", 0.5)
    body = "x" * (24 << 20)
    monkeypatch.setattr(agent_metrics, "render_metrics", lambda view: body)
    view = MetricsView("web-1", 3, 4, True, 0, Counters())
    metrics = MetricsServer(lambda: view)
    port = free_port()
    await metrics.start("127.0.0.1", port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.5)                # never read in time
        got = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):
                while piece := await reader.read(1 << 20):
                    got += len(piece)
        writer.close()
        assert 0 < got < len(body)              # what was on its way, then cut off
    finally:
        await metrics.stop()
