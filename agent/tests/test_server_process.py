"""bulkhead-server as a process: kill -9 mid-stream on SQLite, and two servers on one etcd."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bulkhead import pki
from bulkhead.client import ApiError, Connection, Unreachable
from bulkhead.server.main import ServerConfig, event_loop_factory
from tests.conftest import EtcdProcess, free_port


class ServerProcess:
    def __init__(self, tmp: Path, datastore: str, name: str = "server",
                 extra: dict[str, object] | None = None,
                 nofile: tuple[int, int] | None = None) -> None:
        self.port = free_port()
        self.nofile = nofile   # the RLIMIT_NOFILE to start with (soft, hard), or inherited
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "datastore": datastore,
            "tlsCert": str(tmp / "server.crt"), "tlsKey": str(tmp / "server.key"),
            "clientCA": str(tmp / "ca.crt"), "logLevel": "warning",
            # in the test's directory, not the default /var/lib/bulkhead (an etcd datastore
            # has no directory of its own for the flow log store to go beside)
            "flowLogs": {"path": str(tmp / f"{name}-flows.sqlite")}, **(extra or {})}))
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        crt, key = pki.issue(tmp, "alice", role="admin")
        self.conn = Connection(f"https://127.0.0.1:{self.port}", str(tmp / "ca.crt"),
                               str(crt), str(key), timeout=10)
        self._clients: dict[tuple[str, str, tuple[str, ...]], Connection] = {}

    def client(self, name: str, role: str, tiers: tuple[str, ...] = ()) -> Connection:
        """A connection with a certificate of its own (CN `name`, `role`, tier limits),
        issued once per server."""
        key = (name, role, tiers)
        if key not in self._clients:
            crt, private = pki.issue(Path(self.conn.ca).parent, name, role=role, tiers=tiers)
            self._clients[key] = Connection(self.conn.server, self.conn.ca, str(crt),
                                            str(private), timeout=30)
        return self._clients[key]

    def start(self) -> None:
        server = Path(sys.executable).parent / "bulkhead-server"
        with open(self.log, "ab") as log:
            limit = self.nofile
            self.proc = subprocess.Popen(
                [str(server), "--config", str(self.config)], stdout=log, stderr=log,
                preexec_fn=None if limit is None else
                (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                self.conn.request("GET", "/readyz")
                return
            except (Unreachable, ApiError):
                time.sleep(0.1)
        raise AssertionError("bulkhead-server did not get ready: " + self.log.read_text())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=10)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    return tmp_path


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for s in started:
            s.kill()


def netset(name: str) -> dict[str, object]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name}, "spec": {"nets": ["198.18.0.0/24"]}}


@pytest.mark.parametrize("kill_after", [3, 30])
def test_kill_9_during_writes_keeps_every_acknowledged_write(
        pki_dir: Path, servers: list[ServerProcess], kill_after: int) -> None:
    server = ServerProcess(pki_dir, f"sqlite://{pki_dir}/store.db")
    servers.append(server)
    server.start()
    acked: list[int] = []
    for i in range(kill_after):
        server.conn.request("POST", "/v1/resources/GlobalNetworkSet", netset(f"s{i}"))
        acked.append(i)
    # One more write races the kill: it may land or not, but never half.
    assert server.proc is not None
    pid = server.proc.pid
    conn = [server.conn.server, server.conn.ca, server.conn.cert, server.conn.key]
    racer = subprocess.Popen([sys.executable, "-c", (
        f"from bulkhead.client import Connection; c = Connection(*{conn!r}); "
        f"c.request('POST', '/v1/resources/GlobalNetworkSet', {netset(f's{kill_after}')!r})")],
        stderr=subprocess.DEVNULL)
    time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    racer.wait(timeout=30)
    server.start()
    items = server.conn.request("GET", "/v1/resources/GlobalNetworkSet")["items"]
    names = {d["metadata"]["name"] for d in items}
    assert {f"s{i}" for i in acked} <= names <= {f"s{i}" for i in range(kill_after + 1)}
    for doc in items:
        assert doc["spec"]["nets"] == ["198.18.0.0/24"] and doc["metadata"]["resourceVersion"]


def test_two_servers_share_one_etcd(pki_dir: Path, servers: list[ServerProcess],
                                    etcd: EtcdProcess) -> None:
    datastore = f"etcd://127.0.0.1:{etcd.client_port}/ha-{os.getpid()}-{time.time_ns()}"
    a, b = ServerProcess(pki_dir, datastore, "a"), ServerProcess(pki_dir, datastore, "b")
    servers += [a, b]
    a.start()
    b.start()
    start = b.conn.request("GET", "/v1/snapshot")["revision"]
    a.conn.request("POST", "/v1/resources/GlobalNetworkSet", netset("from-a"))
    # B's watchers see A's write, from etcd's own revisions.
    body = b.conn.request("GET", "/v1/watch", query={"revision": str(start), "timeout": "10"})
    assert [e["name"] for e in body["events"]] == ["from-a"]
    got = b.conn.request("GET", "/v1/resources/GlobalNetworkSet/from-a")
    # Optimistic concurrency across servers: a stale write through B is refused.
    stale = netset("from-a")
    stale["metadata"]["resourceVersion"] = got["metadata"]["resourceVersion"]  # type: ignore[index]
    a.conn.request("PUT", "/v1/resources/GlobalNetworkSet/from-a", stale)
    with pytest.raises(ApiError) as err:
        b.conn.request("PUT", "/v1/resources/GlobalNetworkSet/from-a", stale)
    assert err.value.status == 409
    # A server going away does not take the data with it.
    a.kill()
    assert b.conn.request("GET", "/v1/resources/GlobalNetworkSet/from-a")["metadata"]["name"] \
        == "from-a"


@pytest.mark.parametrize("choice, expected", [(None, "uvloop"), ("asyncio", "asyncio"),
                                              ("uvloop", "uvloop")])
def test_the_server_runs_on_uvloop_unless_told_otherwise(
        pki_dir: Path, servers: list[ServerProcess], choice: str | None,
        expected: str) -> None:
    extra: dict[str, object] = {"logLevel": "info"}
    if choice is not None:
        extra["eventLoop"] = choice
    server = ServerProcess(pki_dir, f"sqlite://{pki_dir}/s.db", extra=extra)
    servers.append(server)
    server.start()
    # Writes, reads and a watch answer the same on either loop.
    start = server.conn.request("GET", "/v1/snapshot")["revision"]
    server.conn.request("POST", "/v1/resources/GlobalNetworkSet", netset("on-the-loop"))
    body = server.conn.request("GET", "/v1/watch",
                               query={"revision": str(start), "timeout": "10"})
    assert [e["name"] for e in body["events"]] == ["on-the-loop"]
    started = [json.loads(line) for line in server.log.read_text().splitlines()
               if '"listening"' in line]
    assert [s["eventLoop"] for s in started] == [expected]


def test_an_unknown_event_loop_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("eventLoop: twisted\n")
    with pytest.raises(SystemExit, match=r"eventLoop: 'twisted' is not one of auto, uvloop, "
                                         r"asyncio"):
        ServerConfig.load(path, {})


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)   # import uvloop: ImportError
    with pytest.raises(SystemExit, match="eventLoop: uvloop is not installed"):
        event_loop_factory("uvloop")
    name, factory = event_loop_factory("auto")
    assert (name, factory) == ("asyncio", asyncio.new_event_loop)
