"""Shared fixtures: a real etcd on 127.0.0.1 (Debian's etcd-server), started once; one
embedded ClickHouse (chdb) for the session."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bulkhead import pki
from bulkhead.server.main import DEFAULT_STATE_DIR, ServerConfig, serve
from tests.procs import free_port, stop

# `make test` runs the package's tests in two passes (Makefile, `unit`): first the tests
# marked `alone`, one at a time with the machine to themselves, then the others two at
# a time (pytest-xdist, `-n 2`). Alone: every module that builds network namespaces, lab
# machines or nftables tables in the kernel (their probes and traffic counts must not
# share the CPU: "every allowed datagram arrived"), that runs the benchmark scripts or
# `make demo`, or that bounds a time or a memory figure. `test_alone.py` fails when a
# module that needs root, a lab or a namespace is missing here.
ALONE = frozenset({
    # network namespaces, labs, nftables in the kernel
    "observe/test_conntrack.py", "observe/test_nflog.py", "test_agent_dns.py",
    "test_agent_faults.py", "test_demo.py", "test_differential.py", "test_dns_lab.py",
    "test_flowlogs_lab.py", "test_lab.py", "test_lab_machines.py", "test_netlink.py",
    "test_nftables_apply.py", "test_nftables_elements.py", "test_nftables_load.py",
    "test_notrack.py", "test_observe_mode_lab.py", "test_enforcement_mode.py",
    "test_nftables_flowlogs.py",
    # a tmpfs mounted as root (under the spool, filled and remounted read-only); files
    # made as root and taken as another user
    "test_agent_spool_disk.py", "test_agent_lock_owner.py",
    # the benchmark scripts, small
    "test_benchmarks.py", "test_benchmarks_dataplane.py",
    # a time or a memory bound: a slow client cut in time, a revoked certificate refused
    # within its bound, commits grouped while one runs, a crash mid-write, memory per
    # waiting connection, latencies under fuzzing, the agent's HTTP timeouts, a child
    # that must answer within a second
    "test_server_hardening.py", "test_pki_revocation.py", "test_server_peer_identity.py",
    "test_store_group_commit.py", "test_store_crash.py", "test_server_listen.py",
    "test_server_fuzz.py", "test_agent_http.py", "test_win_enforcer.py",
})
TESTS = Path(__file__).resolve().parent
# The server runs on uvloop when it is installed (`eventLoop: auto`, bulkhead.server.main),
# on asyncio's own loop when told: the modules that run it in the test's process and lean
# on the event loop's transports (the listener's TLS buffers, the peer's certificate read
# from the connection, the API end to end) run their async tests on both loops. Servers
# started as processes run on the default unless a test says otherwise
# (test_server_hardening.py runs its connection-level tests on both).
BOTH_LOOPS = frozenset({
    "test_server_listen.py", "test_server_peer_identity.py", "test_server_api.py",
})


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.relative_to(TESTS).as_posix() in BOTH_LOOPS:
        import uvloop
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(TESTS).as_posix() in ALONE:
            item.add_marker(pytest.mark.alone)


@pytest.fixture(autouse=True, scope="session")
def no_state_left_on_the_machine() -> Iterator[None]:
    """The tests keep their files in temporary directories: a server started without a
    flow log path (an etcd datastore has no directory to put it beside) writes
    /var/lib/bulkhead, where later lab machines (an overlay of this machine's /) and the
    next session would find it. Fails the session when that directory appears."""
    existed = DEFAULT_STATE_DIR.exists()
    yield
    assert existed or not DEFAULT_STATE_DIR.exists(), (
        f"a test created {DEFAULT_STATE_DIR}: start servers with flowLogs.path in the "
        "test's directory")


@pytest.fixture(autouse=True)
def nothing_left_frozen() -> Iterator[None]:
    """An agent in the test process settles its memory (gc.freeze, bulkhead.agent.memory):
    the next test starts with every object in the collector's view again."""
    yield
    gc.unfreeze()


class EtcdProcess:
    """etcd on two free ports of 127.0.0.1. A port found free can be taken by another
    process before etcd binds it (the tests run two at a time, each starting servers and
    etcd): etcd then exits with "address already in use", and it is started again on
    other ports, up to three times."""

    def __init__(self, data_dir: Path, extra: tuple[str, ...] = ()) -> None:
        for attempt in range(3):
            if self._start(data_dir, extra, attempt):
                return
        raise RuntimeError(f"etcd found no free ports in 3 tries: "
                           f"{self.log_path.read_text()[-2000:]}")

    def _start(self, data_dir: Path, extra: tuple[str, ...], attempt: int) -> bool:
        """True once etcd is healthy; False when its ports were taken meanwhile."""
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log_path = data_dir / ("etcd.log" if attempt == 0 else f"etcd-{attempt}.log")
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # A name of its own: an etcd another test left on the port would answer /health
        # too, so it is ours only when it names itself so.
        self.name = f"bulkhead-test-{self.client_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", self.name, "--data-dir", str(data_dir / f"data{attempt}"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"{self.name}={peer}", "--log-level", "warn", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                text = self.log_path.read_text()
                if "address already in use" in text:
                    return False
                raise RuntimeError(f"etcd exited: {text[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as resp:
                    healthy = resp.status == 200
                members = urllib.request.Request(self.url + "/v3/cluster/member/list",
                                                 data=b"{}", method="POST")
                with urllib.request.urlopen(members, timeout=1) as resp:
                    ours = f'"name":"{self.name}"' in resp.read().decode()
                if healthy and ours:
                    return True
                time.sleep(0.1)
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("etcd did not become healthy within 30 s")

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed: `make test` installs Debian's etcd-server")
    process = EtcdProcess(tmp_path_factory.mktemp("etcd"))
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Server:
    url: str
    pki: Path

    def client(self, name: str, role: str, tiers: tuple[str, ...] = ()) -> aiohttp.ClientSession:
        crt, key = pki.issue(self.pki, name, role=role, tiers=tiers)
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(crt, key)
        return aiohttp.ClientSession(self.url, connector=aiohttp.TCPConnector(ssl=ctx))


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with serving(tmp_path) as srv:
        yield srv


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **settings: Any) -> AsyncIterator[Server]:
    """bulkhead-server in this process on SQLite, with its PKI in `tmp_path` and
    `settings` (ServerConfig fields) on top, once it is ready."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    port = free_port()
    config = ServerConfig(listen=f"127.0.0.1:{port}", datastore=f"sqlite://{tmp_path}/s.db",
                          tls_cert=str(tmp_path / "server.crt"),
                          tls_key=str(tmp_path / "server.key"),
                          client_ca=str(tmp_path / "ca.crt"), **settings)
    started = asyncio.Event()
    task = asyncio.create_task(serve(config, started))
    await asyncio.wait_for(started.wait(), 10)
    srv = Server(f"https://127.0.0.1:{port}", tmp_path)
    async with srv.client("probe", "viewer") as c:
        for _ in range(100):
            async with c.get("/readyz") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)
    try:
        yield srv
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# Lab fixtures (network namespaces): make_lab, make_module_lab, and the session sweep.
from tests.labfixture import (  # noqa: E402, F401
    lab_sweep,
    make_lab,
    make_module_lab,
    pytest_pycollect_makeitem,
)


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace of the test's own (`ip netns`), deleted after it."""
    import uuid

    name = f"bhtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded ClickHouse for the session (chdb runs one per process); each test
    gets a database of its own in it."""
    if importlib.util.find_spec("chdb") is None:
        pytest.fail("chdb is not installed: `make test` installs the flows-test extra "
                    "(pip install -e 'agent[dev,flows-test]')")
    import clickhouse_connect

    dsn = f"chdb://{tmp_path_factory.mktemp('chdb')}/engine"
    keeper = clickhouse_connect.get_client(dsn=dsn)   # keeps the engine up between tests
    try:
        yield dsn
    finally:
        keeper.close()
