"""bulkhead-server as a process under hostile clients (issue 15): a watch that would spin,
bodies parsed before authorization, idle connections, slow shutdown, inputs that used to
end in a 500, a tier admin reordering tiers, and agent status that lies."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead import __version__, pki
from bulkhead.client import ApiError, Connection
from tests.test_server_process import ServerProcess, pki_dir  # noqa: F401


class Hardened(ServerProcess):
    """A server process on SQLite, with what these tests read of it: CPU time, open file
    descriptors, and TLS contexts for raw requests."""

    def __init__(self, tmp: Path, extra: dict[str, Any] | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        super().__init__(tmp, f"sqlite://{tmp}/store.db", extra=extra, nofile=nofile)
        self.tmp = tmp

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        assert self.proc is not None
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def tls(self, name: str = "web-1", role: str = "agent") -> ssl.SSLContext:
        crt, key = pki.issue(self.tmp, name, role=role)
        ctx = ssl.create_default_context(cafile=self.conn.ca)
        ctx.load_cert_chain(crt, key)
        return ctx


@pytest.fixture
def make_server(pki_dir: Path) -> Iterator[Callable[..., Hardened]]:  # noqa: F811
    made: list[Hardened] = []

    def make(**kwargs: Any) -> Hardened:
        server = Hardened(pki_dir, **kwargs)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for s in made:
            s.kill()


def raw_request(server: Hardened, ctx: ssl.SSLContext, request: bytes,
                timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are over mTLS; the status and the whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(request)
        chunks = []
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    return int(answer.split(b" ", 2)[1]), answer


def http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
         ) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def healthz_seconds(server: Hardened) -> float:
    started = time.monotonic()
    server.conn.request("GET", "/healthz")
    return time.monotonic() - started


# ------------------------------------------------------------------ 1: no spinning watch
@pytest.mark.parametrize("timeout", ["0", "-1", "1e-9", "nan", "inf", "1e999", "x", "301"])
def test_a_stream_timeout_out_of_bounds_is_refused(make_server: Callable[..., Hardened],
                                                   timeout: str) -> None:
    server = make_server()
    agent = server.client("web-1", "agent")
    with pytest.raises(ApiError) as err:
        agent.request("GET", "/v1/watch", query={"stream": "true", "timeout": timeout})
    assert err.value.status == 400 and "timeout" in err.value.message


def test_departed_stream_clients_leave_the_server_idle(
        make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    ctx = server.tls()
    # Fifty streams at the fastest heartbeat the server allows, each dropped at once.
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(http("GET", "/v1/watch?stream=true&timeout=0.1"))
            assert b"200 OK" in tls.recv(4096)
    time.sleep(0.5)
    before = server.cpu_seconds()
    time.sleep(2.0)
    assert server.cpu_seconds() - before < 0.3   # no loop left behind
    assert healthz_seconds(server) < 1.0
    metrics = server.conn.request("GET", "/metrics")
    assert "bulkhead_watchers 0" in metrics
    # A client that leaves is not a server failure: counted (and logged) as 499.
    assert 'route="/v1/watch",status="499"} 50' in metrics
    assert 'status="500"' not in metrics


# ------------------------------------------------ 3: authorize before reading the body
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(9))


@pytest.mark.parametrize("name,role", [("web-1", "agent"), ("val", "viewer")])
def test_apply_refuses_non_admins_before_reading_the_body(
        make_server: Callable[..., Hardened], name: str, role: str) -> None:
    server = make_server()
    ctx = server.tls(name, role)
    started = time.monotonic()
    # A body the size of the limit that never arrives: the answer must not wait for it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = http("POST", "/v1/apply", headers={"Content-Type": "application/yaml"})
        tls.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 8000000"))
        answer = tls.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert time.monotonic() - started < 2.0
    status, _ = raw_request(server, ctx, http("POST", "/v1/apply", ALIAS_BOMB.encode()))
    assert status == 403


def test_yaml_aliases_and_too_many_documents_are_refused(
        make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    with pytest.raises(ApiError) as err:
        server.conn.request("POST", "/v1/apply", raw=ALIAS_BOMB.encode(),
                            content_type="application/yaml")
    assert err.value.status == 400 and "aliases" in err.value.message
    doc = ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n"
           "metadata: {name: s%d}\nspec: {nets: [198.18.0.0/24]}\n")
    many = "---\n".join(doc % i for i in range(10_001))
    with pytest.raises(ApiError) as err:
        server.conn.request("POST", "/v1/apply", raw=many.encode(),
                            content_type="application/yaml", query={"dryRun": "true"})
    assert err.value.status == 400 and "more than 10,000 documents" in err.value.message


def test_a_large_apply_does_not_stall_other_clients(
        make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    doc = ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n"
           "metadata: {name: s%d}\nspec: {nets: [198.18.0.0/24, 198.19.0.0/24]}\n")
    body = "---\n".join(doc % i for i in range(10_000)).encode()
    done = threading.Event()
    answer: list[Any] = []

    patient = Connection(server.conn.server, server.conn.ca, server.conn.cert,
                         server.conn.key, timeout=120)

    def big() -> None:
        try:
            answer.append(patient.request("POST", "/v1/apply", raw=body,
                                              content_type="application/yaml",
                                              query={"dryRun": "true"}))
        finally:
            done.set()

    worker = threading.Thread(target=big)
    worker.start()
    latencies = []
    while not done.wait(0.05) and len(latencies) < 400:
        latencies.append(healthz_seconds(server))
    worker.join(60)
    assert answer and len(answer[0]["results"]) == 10_000
    assert latencies, "the apply finished before the first probe"
    assert max(latencies) < 1.0, f"healthz stalled {max(latencies):.2f} s"


# ------------------------------------------------------- 4: idle connections, fd limit
# The connection-level promises hold on either event loop the server can run on
# (`eventLoop`; the other tests here run on the default, uvloop).
LOOPS = ("asyncio", "uvloop")


def runs_on(server: Hardened, event_loop: str) -> bool:
    """Whether the server says (`/metrics`) it runs on `event_loop`."""
    metrics = server.conn.request("GET", "/metrics")
    return f'bulkhead_server_info{{event_loop="{event_loop}",version="{__version__}"}} 1' \
        in metrics.splitlines()


@pytest.mark.parametrize("event_loop", LOOPS)
def test_idle_tcp_connections_do_not_starve_valid_clients(
        make_server: Callable[..., Hardened], event_loop: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"this machine's hard RLIMIT_NOFILE is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    # Started with the usual soft limit of 1,024: the server raises its own.
    server = make_server(extra={"handshakeTimeout": 1.0, "eventLoop": event_loop},
                         nofile=(1024, 4096))
    assert runs_on(server, event_loop)
    baseline = server.open_fds()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(1100)]
    try:
        assert healthz_seconds(server) < 2.0
        assert server.conn.request("GET", "/v1/resources")["kind"] == "List"
        # The handshake timeout closes them on the server's side.
        deadline = time.monotonic() + 10
        while server.open_fds() > baseline + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.open_fds() <= baseline + 20
    finally:
        for s in idle:
            s.close()
    log = server.log.read_text()
    assert "out of system resource" not in log and "out of file descriptors" not in log


@pytest.mark.parametrize("event_loop", LOOPS)
def test_the_connection_limit_refuses_with_one_log_line(
        make_server: Callable[..., Hardened], event_loop: str) -> None:
    server = make_server(extra={"maxConnections": 20, "handshakeTimeout": 1.0,
                                "eventLoop": event_loop})
    assert runs_on(server, event_loop)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        readable, _, _ = select.select(idle, [], [], 0)
        refused = sum(s.recv(1) == b"" for s in readable)
        assert 20 <= refused <= 22    # closed at once: over the limit (a probe may linger)
        time.sleep(1.5)               # the other twenty time out in their handshake
        assert server.conn.request("GET", "/healthz") == "ok\n"
    finally:
        for s in idle:
            s.close()
    lines = [json.loads(line) for line in server.log.read_text().splitlines()
             if "connection limit" in line]
    assert len(lines) == 1 and lines[0]["limit"] == 20


# ------------------------------------------------------------------ 6: prompt shutdown
@pytest.mark.parametrize("event_loop", LOOPS)
def test_sigterm_with_open_watches_stops_at_once(make_server: Callable[..., Hardened],
                                                 event_loop: str) -> None:
    server = make_server(extra={"eventLoop": event_loop})
    assert runs_on(server, event_loop)
    ctx = server.tls()
    streams = []
    for _ in range(20):
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        tls.sendall(http("GET", "/v1/watch?stream=true&timeout=300"))
        assert b"200 OK" in tls.recv(65536)
        streams.append(tls)
    try:
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        assert time.monotonic() - started < 3.0
        for tls in streams:  # every stream was ended, so its agent reconnects elsewhere
            while tls.recv(65536):
                pass
    finally:
        for tls in streams:
            tls.close()


# ------------------------------------------------------ 8: bad input is a 4xx, not a 500
BAD_REQUESTS = [
    ("POST", "/v1/apply", b"? [1, 2]\n: x\n", "application/yaml"),
    ("POST", "/v1/apply", b"kind: \xff\xfe\n", "application/yaml"),
    ("POST", "/v1/apply", b"kind: x\n", "application/yaml; charset=x"),
    ("POST", "/v1/apply", b"[" * 100_000 + b"]" * 100_000, "application/json"),
    ("POST", "/v1/apply", b"- " * 10_000 + b"x", "application/yaml"),
    ("POST", "/v1/apply", b"".join(b"  " * i + b"k:\n" for i in range(10_000)),
     "application/yaml"),
    ("POST", "/v1/apply", b'{"kind": "Tier", "kind": "Tier"}', "application/json"),
    ("POST", "/v1/apply", b"[NaN]", "application/json"),
    ("POST", "/v1/resources/Tier", b"[" * 100_000 + b"]" * 100_000, "application/json"),
    ("POST", "/v1/resources/Tier", b'{"a": 1, "a": 2}', "application/json"),
    ("GET", "/v1/nodes?revision=" + "9" * 5000, b"", ""),
    ("GET", "/v1/watch?revision=" + "9" * 5000, b"", ""),
    ("GET", "/v1/watch?revision=-5", b"", ""),
    ("GET", "/v1/watch?stream=maybe", b"", ""),
    ("GET", "/v1/resources?selector=" + "a" * 5000, b"", ""),
    ("GET", "/v1/resources/Tier/" + "x" * 300, b"", ""),
    ("DELETE", "/v1/resources/Tier/x?dryRun=perhaps", b"", ""),
]


@pytest.mark.parametrize("method,path,body,ctype", BAD_REQUESTS,
                         ids=[f"{m} {p[:40]} {b[:12]!r}" for m, p, b, _ in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_with_a_message(make_server: Callable[..., Hardened],
                                            method: str, path: str, body: bytes,
                                            ctype: str) -> None:
    server = make_server()
    ctx = server.tls("alice", "admin")
    headers = {"Content-Type": ctype} if ctype else {}
    status, answer = raw_request(server, ctx, http(method, path, body, headers))
    assert 400 <= status < 500, answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == status and error["message"]
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("text", [b"? [1, 2]\n: x\n", b"kind: \xff\n",
                                  b"[" * 100_000 + b"]" * 100_000, b"- " * 10_000 + b"x",
                                  b"a: &a [1]\nb: *a\n"])
def test_validate_exits_2_with_a_message(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(text)
    bulkhead = Path(sys.executable).parent / "bulkhead"
    done = subprocess.run([str(bulkhead), "validate", "-f", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


# ------------------------------------------------------------ 9: tier admins, node status
def test_a_tier_admin_cannot_reorder_its_tier(make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "t1"}, "spec": {"order": 100}}
    server.conn.request("POST", "/v1/resources/Tier", tier)
    ops = server.client("ops", "admin", ("t1",))
    moved = json.loads(json.dumps(tier))
    moved["spec"]["order"] = 1
    for method, path in (("PUT", "/v1/resources/Tier/t1"), ("POST", "/v1/apply")):
        with pytest.raises(ApiError) as err:
            ops.request(method, path, moved)
        assert err.value.status == 403 and "order" in err.value.message
    new = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t1"},
           "spec": {"order": 100, "defaultAction": "Pass"}}
    ops.request("PUT", "/v1/resources/Tier/t1", new)   # the rest of its tier is its own
    assert server.conn.request("GET", "/v1/resources/Tier/t1")["spec"]["order"] == 100


@pytest.mark.parametrize("who", [("alice", "admin", ()), ("ops", "admin", ("t1",)),
                                 ("db-1", "agent", ())])
def test_only_a_node_reports_its_own_status(make_server: Callable[..., Hardened],
                                            who: tuple[str, str, tuple[str, ...]]) -> None:
    server = make_server()
    client = server.client(*who)
    with pytest.raises(ApiError) as err:
        client.request("POST", "/v1/status/web-1", {"appliedRevision": 10**6})
    assert err.value.status == 403
    assert server.conn.request("GET", "/v1/nodes")["nodes"] == []


# ------------------------------------------------------------------ 10: status checked
@pytest.mark.parametrize("body", [
    b'{"appliedRevision": 1, "counters": {"applies": NaN}}',
    b'{"appliedRevision": true}',
    b'{"appliedRevision": 1000000000000000000000000000000}',
    b'{"appliedRevision": -1}',
    b'{"appliedRevision": 1, "errors": "x"}',
    b'{"appliedRevision": 1, "errors": [1]}',
    b'{"appliedRevision": 1, "counters": {"a": "1"}}',
    b'{"appliedRevision": 1, "surprise": 1}',
    b'{"appliedRevision": 1, "errors": ["' + b"x" * 70_000 + b'"]}',
])
def test_agent_status_is_validated(make_server: Callable[..., Hardened], body: bytes) -> None:
    server = make_server()
    ctx = server.tls("web-1", "agent")
    status, answer = raw_request(server, ctx, http("POST", "/v1/status/web-1", body,
                                                   {"Content-Type": "application/json"}))
    assert status in (400, 413, 422), answer[:300]
    nodes = server.conn.request("GET", "/v1/nodes", query={"revision": "1"})
    assert nodes["nodes"] == [] and nodes["converged"] is True


def test_escape_codes_in_status_are_stored_escaped(
        make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    agent = server.client("web-1", "agent")
    agent.request("POST", "/v1/status/web-1",
                  {"appliedRevision": 3, "errors": ["nft: \x1b[2J\x1b]0;pwned\x07 failed"]})
    node = server.conn.request("GET", "/v1/nodes")["nodes"][0]
    assert node["errors"] == ["nft: \\x1b[2J\\x1b]0;pwned\\x07 failed"]


def test_names_in_paths_are_bounded(make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    with pytest.raises(ApiError) as err:
        server.conn.request("GET", "/v1/resources/Tier/" + urllib.parse.quote("a\x1bb"))
    assert err.value.status == 400


# ------------------------------------------------------- 14: revoked while watching
def test_a_watch_ends_when_its_certificate_is_revoked(
        make_server: Callable[..., Hardened]) -> None:
    server = make_server()
    ctx = server.tls("web-1", "agent")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(http("GET", "/v1/watch?stream=true&timeout=0.2"))
        assert b"200 OK" in tls.recv(65536)
        pki.revoke(server.tmp, name="web-1")
        started = time.monotonic()
        tls.settimeout(10)
        while tls.recv(65536):   # heartbeats, until the server ends the stream
            assert time.monotonic() - started < 5.0
        assert time.monotonic() - started < 3.0


def test_a_revoked_watch_gets_no_change_made_after_its_revocation(
        make_server: Callable[..., Hardened]) -> None:
    """A stream waiting out a long heartbeat when its certificate is revoked: the change
    that ends the wait is not sent to it; the stream ends instead. A long poll answers
    403."""
    server = make_server()
    ctx = server.tls("web-1", "agent")
    admin = server.tls("admin-1", role="admin")
    doc = json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                      "metadata": {"name": "after-revocation"},
                      "spec": {"nets": ["198.18.0.0/24"]}}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw2, \
            ctx.wrap_socket(raw2, server_hostname="127.0.0.1") as poll:
        tls.sendall(http("GET", "/v1/watch?stream=true&timeout=60"))
        first = tls.recv(65536)
        assert b"200 OK" in first
        while b'"revision"' not in first:   # the snapshot, before the revocation
            first += tls.recv(65536)
        revision = server.conn.request("GET", "/v1/resources/GlobalNetworkSet")["revision"]
        poll.sendall(http("GET", f"/v1/watch?revision={revision}&timeout=60"))
        pki.revoke(server.tmp, name="web-1")
        time.sleep(1.5)   # the server reads the CRL again at most once a second
        status, answer = raw_request(server, admin, http(
            "POST", "/v1/resources/GlobalNetworkSet", doc,
            {"Content-Type": "application/json"}))
        assert status == 201, answer[:300]
        tls.settimeout(10)
        rest = b""
        while chunk := tls.recv(65536):
            rest += chunk
        assert b"after-revocation" not in rest
        poll.settimeout(10)
        polled = b""
        while b"\r\n\r\n" not in polled:
            polled += poll.recv(65536)
        assert polled.split(b" ", 2)[1] == b"403", polled[:300]
        assert b"after-revocation" not in polled


def test_a_chunked_body_is_read_to_its_end(make_server: Callable[..., Hardened]) -> None:
    """Without Content-Length, a body that arrives in two chunks, apart, is read whole."""
    server = make_server()
    ctx = server.tls("admin-1", role="admin")
    doc = ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n"
           "metadata: {name: chunk%d}\nspec: {nets: [198.18.0.0/24]}\n")
    first, second = (doc % 1 + "---\n").encode(), (doc % 2).encode()
    head = (b"POST /v1/apply HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/yaml\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + f"{len(first):x}\r\n".encode() + first + b"\r\n")
        time.sleep(0.3)
        tls.sendall(f"{len(second):x}\r\n".encode() + second + b"\r\n0\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == b"200", answer[:500]
    names = {r["metadata"]["name"] for r in server.conn.request(
        "GET", "/v1/resources/GlobalNetworkSet")["items"]}
    assert {"chunk1", "chunk2"} <= names
