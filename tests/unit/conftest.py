"""A fake bulkhead-server for the unit tests: HTTPS on 127.0.0.1 with a certificate from
bulkhead.pki, answering what the test sets (any status, headers and body, optionally
sent a byte at a time), to see how the client and the modules take answers the real
server never gives."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from urllib.parse import urlsplit

import pytest

from bulkhead import pki


class Answer:
    def __init__(self, body=b"", status=200, headers=None, dribble=None):
        self.body = body if isinstance(body, bytes) else body.encode()
        self.status = status
        self.headers = {"Content-Type": "application/json"} if headers is None else headers
        self.dribble = dribble   # seconds between bytes, or None: all at once


class FakeServer:
    def __init__(self, folder):
        pki.init_ca(folder)
        pki.issue(folder, "server", server=True, hosts=("127.0.0.1",))
        self.ca = str(folder / "ca.crt")
        self.answers = {}          # path (no query) -> Answer
        self.default = Answer(b"{}")
        self.requests = []
        self.stopping = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):   # quiet
                pass

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                path = urlsplit(self.path).path
                fake.requests.append((self.command, self.path))
                ans = fake.answers.get(path, fake.default)
                self.send_response(ans.status)
                for key, value in ans.headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in ans.headers:
                    self.send_header("Content-Length", str(len(ans.body)))
                self.end_headers()
                try:
                    if ans.dribble is None:
                        self.wfile.write(ans.body)
                        return
                    for i in range(len(ans.body)):
                        if fake.stopping.is_set():
                            return
                        self.wfile.write(ans.body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(ans.dribble)
                except OSError:   # the client went away
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(folder / "server.crt"), str(folder / "server.key"))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = "https://127.0.0.1:%d" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def set(self, path, body=b"", status=200, headers=None, dribble=None):
        self.answers[path] = Answer(body, status, headers, dribble)

    def stop(self):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def fake_server_once(tmp_path_factory):
    srv = FakeServer(tmp_path_factory.mktemp("fake-server"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def fake_server(fake_server_once):
    """The module's fake server, its answers reset for each test."""
    fake_server_once.answers.clear()
    fake_server_once.default = Answer(b"{}")
    fake_server_once.requests.clear()
    return fake_server_once
