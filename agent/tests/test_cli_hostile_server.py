"""The CLI and its client library (`bulkhead.client.Connection`) against a server that
answers wrongly: the wrong shape, not JSON, nested past reading, too large, one byte at a
time, or a redirect to plain HTTP. Each ends in a clear error and an exit code, never a
traceback, never more memory than the answer bound, never longer than the timeout. The
server here is a fake on 127.0.0.1 with a real certificate of the test CA: what a broken
or hostile server could send."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bulkhead.client as client
from bulkhead import pki
from bulkhead.cli.main import main
from bulkhead.client import BadAnswer, Connection, Unreachable

Answer = Callable[[ssl.SSLSocket], None]


def plain(status: str, body: bytes, content_type: str = "application/json",
          extra: str = "") -> Answer:
    def send(tls: ssl.SSLSocket) -> None:
        tls.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: "
                    f"{len(body)}\r\nConnection: close\r\n{extra}\r\n".encode() + body)
    return send


def dribble(tls: ssl.SSLSocket) -> None:
    """A head that promises 1,000 bytes, then a byte every quarter second."""
    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
    for _ in range(40):
        tls.sendall(b" ")
        time.sleep(0.25)


class FakeServer:
    """Answers every request with `answer` (set by the test), TLS with the test CA's
    server certificate, client certificates required as the real server does."""

    def __init__(self, tmp: Path) -> None:
        pki.init_ca(tmp)
        pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
        self.crt, self.key = pki.issue(tmp, "alice", role="admin")
        self.ca = tmp / "ca.crt"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp / "server.crt", tmp / "server.key")
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer: Answer = plain("200 OK", b"{}")
        self.stopping = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(10)
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    self.answer(tls)
            except OSError:
                pass   # the client gave up (what several tests want)

    def conn(self, timeout: float = 30.0) -> Connection:
        return Connection(server=f"https://127.0.0.1:{self.port}", ca=str(self.ca),
                          cert=str(self.crt), key=str(self.key), timeout=timeout)

    def cli(self, *args: str) -> int:
        return main([*args, "--server", f"https://127.0.0.1:{self.port}", "--ca",
                     str(self.ca), "--cert", str(self.crt), "--key", str(self.key)])

    def close(self) -> None:
        self.stopping = True
        # shutdown() wakes the thread's accept(); close() alone would leave it waiting
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeServer]:
    server = FakeServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("body", [b"[1, 2, 3]", b"null", b'"hello"', b'{"items": "abc"}',
                                  b'{"items": [1]}', b'{"nodes": {"a": 1}}'])
@pytest.mark.parametrize("command", [["get", "gnp"], ["nodes"], ["history"]])
def test_an_answer_of_another_shape_is_a_clear_error(
        fake: FakeServer, body: bytes, command: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer = plain("200 OK", body)
    code = fake.cli(*command)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == 3 and f"is not what `bulkhead {command[0]}` reads" in err and \
        "of this version" in err, (code, err)


@pytest.mark.parametrize(("body", "words"), [
    (b"{not json", "the answer is not JSON bulkhead can read (JSONDecodeError"),
    (b"[" * 100_000 + b"]" * 100_000, "the answer is not JSON bulkhead can read (Recursion"),
])
def test_an_answer_that_is_not_readable_json_is_a_clear_error(
        fake: FakeServer, body: bytes, words: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake.answer = plain("200 OK", body)
    with pytest.raises(BadAnswer, match=words.replace("(", r"\(")):
        fake.conn().request("GET", "/v1/nodes")
    assert fake.cli("nodes") == 3
    err = capsys.readouterr().err
    assert "answer cannot be read" in err and "Traceback" not in err


def test_an_answer_over_the_bound_is_not_read_whole(
        fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "MAX_ANSWER", 1024 * 1024)

    def chunked(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b" " * 65536
        for _ in range(64):   # 4 MiB, never a Content-Length
            tls.sendall(b"10000\r\n" + piece + b"\r\n")
        tls.sendall(b"0\r\n\r\n")
    fake.answer = chunked
    with pytest.raises(BadAnswer, match="larger than 1,048,576 bytes"):
        fake.conn().request("GET", "/v1/export")


def test_a_server_sending_a_byte_at_a_time_cannot_hold_the_client(fake: FakeServer) -> None:
    fake.answer = dribble
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"no whole answer within 1\.5 s"):
        fake.conn(timeout=1.5).request("GET", "/v1/nodes")
    assert time.monotonic() - started < 4.0


def test_a_redirect_is_not_followed(fake: FakeServer,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as plain_http:
        plain_http.settimeout(0.5)
        target = f"http://127.0.0.1:{plain_http.getsockname()[1]}/elsewhere"
        fake.answer = plain("302 Found", b"", extra=f"Location: {target}\r\n")
        assert fake.cli("get", "gnp") == 1
        err = capsys.readouterr().err
        assert f"redirect to '{target}'" in err and "does not follow redirects" in err
        with pytest.raises(socket.timeout):
            plain_http.accept()   # nothing went to the plain-HTTP address


def test_a_slow_connect_counts_against_the_deadline(
        fake: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline runs from the request's start: a connect that took all of it (a first
    address that never answers) leaves none for a server that then dribbles."""
    import http.client

    real = socket.create_connection

    def slow(*args: object, **kwargs: object) -> socket.socket:
        time.sleep(1.2)
        return real(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(http.client.socket, "create_connection", slow)

    fake.answer = dribble
    started = time.monotonic()
    with pytest.raises(Unreachable, match=r"no whole answer within 1 s"):
        fake.conn(timeout=1.0).request("GET", "/v1/nodes")
    assert time.monotonic() - started < 3.0
