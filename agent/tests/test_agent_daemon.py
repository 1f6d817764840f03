"""bulkhead-agent against a real bulkhead-server over mutual TLS, with a recording enforcer
at the enforcer seam (the nftables end-to-end tests are the dataplane's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bulkhead import pki
from bulkhead.agent import main as agent_main
from bulkhead.agent.cache import cache_path, load_cache, save_cache
from bulkhead.agent.config import FLAGS, KEYS, AgentConfig
from bulkhead.agent.daemon import Agent
from bulkhead.agent.enforcer import EnforceError, EnforceReport
from bulkhead.agent.sync import DesiredState
from bulkhead.model import Snapshot
from tests.conftest import Server, free_port

NODE = "web-1"


class Recorder:
    """An Enforcer that records what reaches it (called from the agent's worker thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.fail: str | None = None
        self.drift_reason: str | None = None
        self.repairs = 0
        self.dry_runs = 0
        self.applied: tuple[int, list[str]] | None = None
        self.lock = threading.Lock()

    def _report(self, revision: int, names: list[str]) -> EnforceReport:
        return EnforceReport(revision, full=True, changed=True, seconds=0.25,
                             counts={"chains": len(names), "rules": 2 * len(names),
                                     "sets": 1, "elements": 3}, warnings=[])

    def enforce(self, snapshot: Snapshot, revision: int) -> EnforceReport:
        names = sorted(snapshot.policies)
        with self.lock:
            self.calls.append((revision, names))
            if self.fail:
                raise EnforceError(self.fail)
            self.applied = (revision, names)
        return self._report(revision, names)

    def drift(self) -> str | None:
        return self.drift_reason

    def repair(self) -> EnforceReport:
        assert self.applied is not None
        self.repairs += 1
        self.drift_reason = None
        return self._report(*self.applied)

    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]:
        self.dry_runs += 1
        if self.fail:
            raise EnforceError(self.fail)
        names = sorted(snapshot.policies)
        return ("table inet bulkhead {\n" + "".join(f"  chain gnp-{n} {{\n  }}\n"
                                                  for n in names) + "}\n",
                "".join(f"+chain gnp-{n}\n" for n in names))


def gnp(name: str, tier: str = "default") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "order": 10, "selector": "app == 'web'",
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "destination": {"ports": [443]}}]}}


def config_for(url: str, pki_dir: Path, state: Path, **kw: Any) -> AgentConfig:
    crt, key = pki.issue(pki_dir, NODE, role="agent")
    values: dict[str, Any] = {
        "server": url, "node": NODE, "ca": str(pki_dir / "ca.crt"), "cert": str(crt),
        "key": str(key), "state_dir": str(state), "metrics_listen": "",
        "drift_interval": 60.0, "status_interval": 60.0, "heartbeat_interval": 0.3}
    values.update(kw)
    return AgentConfig(**values)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def create(admin: aiohttp.ClientSession, doc: dict[str, Any]) -> int:
    async with admin.post(f"/v1/resources/{doc['kind']}", json=doc) as r:
        assert r.status == 201, await r.text()
        return int((await r.json())["metadata"]["resourceVersion"])


async def node_status(viewer: aiohttp.ClientSession) -> dict[str, Any]:
    async with viewer.get("/v1/nodes") as r:
        nodes: dict[str, dict[str, Any]] = {n["node"]: n for n in (await r.json())["nodes"]}
    return nodes.get(NODE, {})


async def wait_status(viewer: aiohttp.ClientSession, cond: Callable[[dict[str, Any]], bool],
                      what: str, timeout: float = 10.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await node_status(viewer)
        if status and cond(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for status {what}: {status}")
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() installs the JSON log handler on the root logger; put pytest's back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ---------------------------------------------------------------------------- sync
async def test_snapshot_then_deltas_reach_enforce_with_their_revisions(
        server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    async with server.client("alice", "admin") as admin, \
            server.client("val", "viewer") as viewer:
        rev_a = await create(admin, gnp("a"))
        agent = Agent(config_for(server.url, server.pki, tmp_path / "state"), rec)
        async with running(agent):
            await until(lambda: rec.applied is not None, "the snapshot to be enforced")
            assert rec.calls == [(rev_a, ["a"])]          # the snapshot, first contact
            rev_b = await create(admin, gnp("b"))
            await until(lambda: rec.calls[-1][1] == ["a", "b"], "the event for b")
            assert len(rec.calls) == 2 and rec.calls[-1][0] >= rev_b
            await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_b,
                              f"appliedRevision >= {rev_b}")

            # A burst of writes coalesces into fewer applies than writes.
            before = len(rec.calls)
            burst = [f"c{i}" for i in range(5)]
            revs = await asyncio.gather(*(create(admin, gnp(n)) for n in burst))
            await until(lambda: rec.calls[-1][1] == sorted(["a", "b", *burst]), "the burst")
            assert len(rec.calls) - before < len(burst)
            assert rec.calls[-1][0] >= max(revs)

            async with admin.delete("/v1/resources/GlobalNetworkPolicy/a") as r:
                assert r.status == 200
            await until(lambda: rec.calls[-1][1] == sorted(["b", *burst]), "the delete")
            revisions = [rev for rev, _ in rec.calls]
            assert revisions == sorted(revisions)

            status = await wait_status(viewer, lambda s: s["appliedRevision"]
                                       >= rec.calls[-1][0], "the last apply")
            assert status["errors"] == []
            assert status["counters"]["applies"] == len(rec.calls)
            assert status["counters"]["rules"] == 2 * (len(burst) + 1)

        # The cache holds what was enforced last, at its revision.
        cached = load_cache(tmp_path / "state")
        assert cached is not None and cached.revision == rec.calls[-1][0]
        assert sorted(i["metadata"]["name"] for i in cached.items) == sorted(["b", *burst])


def test_invalid_objects_are_left_out_and_reported() -> None:
    state = DesiredState()
    state.replace([gnp("ok"), gnp("lost", tier="nowhere"),
                   {**gnp("bad"), "spec": {"selector": "app = 'x'"}},
                   {"kind": "Mystery", "metadata": {"name": "m"}}])
    snapshot, errors = state.build()
    assert sorted(snapshot.policies) == ["ok"]
    assert len(errors) == 3
    assert any('tier "nowhere" does not exist' in e for e in errors)
    assert any("GlobalNetworkPolicy bad: spec.selector" in e for e in errors)
    assert any("Mystery" in e for e in errors)


# --------------------------------------------------------------------------- cache
def make_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    directory.mkdir()
    pki.init_ca(directory)
    return directory


async def test_cache_is_enforced_at_boot_while_the_server_is_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "ops"}, "spec": {"order": 100}}
    broken = {**gnp("broken"), "spec": {"ingress": [{"action": "Maybe"}]}}
    save_cache(state, NODE, 7, [tier, gnp("ops.ssh", tier="ops"), gnp("web"), broken])
    rec = Recorder()
    down = f"https://127.0.0.1:{free_port()}"
    agent = Agent(config_for(down, make_pki(tmp_path), state), rec)
    async with running(agent):
        await until(lambda: agent.applied_revision == 7, "the cached policy to be enforced")
        assert rec.calls == [(7, ["ops.ssh", "web"])]
        assert agent.applied_revision == 7
        assert [e for e in agent.errors if "GlobalNetworkPolicy broken" in e]
        await asyncio.sleep(1.0)  # backoff and retries against a dead server
        assert not agent.connected and agent.counters.status_failures >= 1
        assert rec.calls == [(7, ["ops.ssh", "web"])]  # never fails open or closed


async def test_a_corrupt_cache_is_reported_and_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cache_path(state).write_text('{"format": 1, "revision": 3, "items": [')
    rec = Recorder()
    agent = Agent(config_for(f"https://127.0.0.1:{free_port()}", make_pki(tmp_path), state),
                  rec)
    async with running(agent):
        await until(lambda: bool(agent.errors), "the cache error")
        assert "not JSON" in agent.errors[0] and "ignored" in agent.errors[0]
        await asyncio.sleep(0.3)
        assert rec.calls == []


# -------------------------------------------------------------- server down and back
class ServerProcess:
    """bulkhead-server as a process, so it can be killed with -9 and started again."""

    def __init__(self, tmp: Path) -> None:
        pki.init_ca(tmp)
        pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
        self.tmp, self.port = tmp, free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.config = tmp / "server.yaml"
        self.config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "datastore": f"sqlite://{tmp}/store.db",
            "tlsCert": str(tmp / "server.crt"), "tlsKey": str(tmp / "server.key"),
            "clientCA": str(tmp / "ca.crt"), "logLevel": "warning"}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.view = Server(self.url, tmp)

    async def start(self) -> None:
        exe = Path(sys.executable).parent / "bulkhead-server"
        with open(self.tmp / "server.log", "ab") as log:
            self.proc = subprocess.Popen([str(exe), "--config", str(self.config)],
                                         stdout=log, stderr=log)
        async with self.view.client("probe", "viewer") as c:
            for _ in range(300):
                assert self.proc.poll() is None, (self.tmp / "server.log").read_text()
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with c.get("/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError("bulkhead-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


async def test_server_killed_and_back(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path)
    await srv.start()
    rec = Recorder()
    try:
        async with srv.view.client("alice", "admin") as admin:
            rev_a = await create(admin, gnp("a"))
        agent = Agent(config_for(srv.url, tmp_path, tmp_path / "state",
                                 status_interval=0.2), rec)
        async with running(agent):
            await until(lambda: agent.connected and rec.applied == (rev_a, ["a"]),
                        "the first apply")
            srv.kill()
            await until(lambda: not agent.connected, "the agent to notice", 5)
            failures = agent.counters.status_failures
            await until(lambda: agent.counters.status_failures > failures,
                        "a status report to fail")
            assert rec.calls == [(rev_a, ["a"])] and agent.applied_revision >= rev_a

            await srv.start()
            await until(lambda: agent.connected, "the reconnect", 15)
            assert agent.counters.reconnects == 1
            async with srv.view.client("alice", "admin") as admin, \
                    srv.view.client("val", "viewer") as viewer:
                rev_b = await create(admin, gnp("b"))
                await until(lambda: rec.applied is not None and rec.applied[1] == ["a", "b"],
                            "the change made after the restart")
                status = await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_b,
                                           "status after the restart")
                assert status["errors"] == [] and status["counters"]["reconnects"] == 1
            # The reconnect resumed from the last revision: no second full apply of a.
            assert [names for _, names in rec.calls] == [["a"], ["a", "b"]]
    finally:
        srv.kill()


# -------------------------------------------------------------- failures and drift
async def test_a_failed_apply_is_reported_and_the_next_change_applies(
        server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    async with server.client("alice", "admin") as admin, \
            server.client("val", "viewer") as viewer:
        rev_a = await create(admin, gnp("a"))
        agent = Agent(config_for(server.url, server.pki, tmp_path / "state"), rec)
        async with running(agent):
            await until(lambda: rec.applied is not None, "the first apply")
            rec.fail = "nft: Error: syntax error, unexpected junk"
            rev_b = await create(admin, gnp("b"))
            status = await wait_status(viewer, lambda s: bool(s["errors"]), "the error")
            assert "syntax error, unexpected junk" in status["errors"][0]
            failed = re.match(r"apply of revision (\d+) failed: ", status["errors"][0])
            assert failed and int(failed[1]) >= rev_b
            assert f"the kernel keeps revision {rev_a}" in status["errors"][0]
            assert status["appliedRevision"] == rev_a and status["counters"]["failures"] == 1
            assert rec.applied == (rev_a, ["a"])
            cached = load_cache(tmp_path / "state")
            assert cached is not None and cached.revision == rev_a   # last known good

            rec.fail = None
            rev_c = await create(admin, gnp("c"))
            status = await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_c,
                                       "the next good change")
            assert status["errors"] == [] and rec.applied[1] == ["a", "b", "c"]
            async with viewer.get("/v1/nodes", params={"revision": str(rev_c)}) as r:
                assert (await r.json())["converged"] is True


async def test_drift_is_repaired_and_a_failed_apply_retried(
        server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    async with server.client("alice", "admin") as admin, \
            server.client("val", "viewer") as viewer:
        await create(admin, gnp("a"))
        agent = Agent(config_for(server.url, server.pki, tmp_path / "state",
                                 drift_interval=0.1), rec)
        async with running(agent):
            await until(lambda: rec.applied is not None, "the first apply")
            rec.drift_reason = "table inet bulkhead is missing"
            await until(lambda: rec.repairs == 1, "the repair")
            status = await wait_status(viewer, lambda s: s["counters"]["driftRepairs"] == 1,
                                       "driftRepairs 1")
            assert status["errors"] == []

            rec.fail = "nft: Could not process rule: Device or resource busy"
            await create(admin, gnp("b"))
            await until(lambda: agent.apply_error is not None, "the failed apply")
            rec.fail = None   # no new write: the drift loop retries the apply by itself
            await until(lambda: agent.errors == [] and rec.applied is not None
                        and rec.applied[1] == ["a", "b"], "the retry")
            assert rec.repairs == 1


# ----------------------------------------------------------------------- metrics
async def test_metrics_endpoint(server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    port = free_port()
    async with server.client("alice", "admin") as admin:
        rev = await create(admin, gnp("a"))
    agent = Agent(config_for(server.url, server.pki, tmp_path / "state",
                             metrics_listen=f"127.0.0.1:{port}"), rec)
    async with running(agent), aiohttp.ClientSession() as plain:
        await until(lambda: agent.counters.applies == 1 and agent.connected, "the apply")
        async with plain.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    lines = set(text.splitlines())
    assert f"bulkhead_agent_applied_revision {agent.applied_revision}" in lines
    assert agent.applied_revision >= rev
    for line in ("bulkhead_agent_connected 1", "bulkhead_agent_applies_total 1",
                 "bulkhead_agent_full_applies_total 1", "bulkhead_agent_apply_failures_total 0",
                 "bulkhead_agent_drift_repairs_total 0", "bulkhead_agent_last_apply_seconds 0.25",
                 'bulkhead_agent_ruleset_objects{kind="rules"} 2',
                 'bulkhead_agent_ruleset_objects{kind="elements"} 3',
                 "# TYPE bulkhead_agent_applies_total counter"):
        assert line in lines, line


# ---------------------------------------------------------------- the command line
def write_config(path: Path, cfg: AgentConfig, **extra: Any) -> Path:
    data = {"server": cfg.server, "node": cfg.node, "ca": cfg.ca, "cert": cfg.cert,
            "key": cfg.key, "stateDir": cfg.state_dir, "metricsListen": "", **extra}
    path.write_text(yaml.safe_dump(data))
    return path


async def run_main(argv: list[str], rec: Recorder) -> int:
    return await asyncio.to_thread(agent_main.main, argv, make_enforcer=lambda _: rec)


async def test_once_and_dry_run(server: Server, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_for(server.url, server.pki, tmp_path / "state")
    conf = write_config(tmp_path / "agent.yaml", cfg)
    rec = Recorder()
    async with server.client("alice", "admin") as admin, \
            server.client("val", "viewer") as viewer:
        rev = await create(admin, gnp("a"))
        for _ in range(200):  # the server's hub follows the store a moment after the write
            async with viewer.get("/v1/snapshot") as r:
                if (await r.json())["revision"] >= rev:
                    break
            await asyncio.sleep(0.02)

        assert await run_main(["--config", str(conf), "--dry-run"], rec) == 0
        out = capsys.readouterr().out
        assert f"revision {rev}" in out and "chain gnp-a {" in out and "+chain gnp-a" in out
        assert rec.calls == [] and rec.dry_runs == 1 and await node_status(viewer) == {}
        assert load_cache(cfg.state_dir) is None   # changed nothing

        assert await run_main(["--config", str(conf), "--once"], rec) == 0
        assert f"applied revision {rev}" in capsys.readouterr().out
        assert rec.calls == [(rev, ["a"])]
        status = await node_status(viewer)
        assert status["appliedRevision"] == rev and status["errors"] == []
        cached = load_cache(cfg.state_dir)
        assert cached is not None and cached.revision == rev

        # --offline: the cache, with the server out of the picture.
        down = ["--server", f"https://127.0.0.1:{free_port()}"]
        assert await run_main(["--config", str(conf), *down, "--dry-run", "--offline"],
                              rec) == 0
        assert "from the cache" in capsys.readouterr().out and rec.dry_runs == 2

        assert await run_main(["--config", str(conf), *down, "--once"], rec) == 3
        assert "cannot reach" in capsys.readouterr().err

        rec.fail = "nft: Error: Could not process rule: No such file or directory"
        assert await run_main(["--config", str(conf), "--once"], rec) == 1
        err = capsys.readouterr().err
        assert "bulkhead-agent: apply of revision" in err and "No such file" in err
        status = await node_status(viewer)
        assert status["errors"] and status["appliedRevision"] == 0  # a fresh process

        assert await run_main(["--config", str(conf), "--dry-run"], rec) == 1
        err = capsys.readouterr().err
        assert "bulkhead-agent: dry run of revision " in err and ": nft: Error: " in err


async def test_sigterm_stops_the_daemon_and_leaves_the_ruleset(
        server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    async with server.client("alice", "admin") as admin:
        await create(admin, gnp("a"))
    agent = Agent(config_for(server.url, server.pki, tmp_path / "state"), rec)
    task = asyncio.create_task(agent_main._daemon(agent))
    await until(lambda: rec.applied is not None and agent.connected, "the apply")
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)
    assert len(rec.calls) == 1   # stopping applied nothing (and the seam has no "remove")


@pytest.mark.parametrize(("content", "argv", "message"), [
    ({"bogus": 1}, [], "bogus: unknown key (known: server, node,"),
    ({"failsafeInbound": ["tcp:22", "tcp:99999"]}, [],
     "failsafeInbound[1]: failsafe port 'tcp:99999': '99999' is not a port"),
    ({"failsafeOutbound": 53}, [], "failsafeOutbound: must be a list of protocol:port"),
    ({"driftInterval": "soon"}, [], "driftInterval: must be a number of seconds"),
    ({"statusInterval": -1}, [], "statusInterval: -1: must be more than 0 seconds"),
    ({"server": "http://bulkhead:7443"}, [], "server: 'http://bulkhead:7443': expected https"),
    ({"metricsListen": "localhost"}, [], "metricsListen: 'localhost': expected HOST:PORT"),
    ({"logLevel": "loud"}, [], "logLevel: 'loud': expected one of debug"),
    ({"node": "web 1"}, [], "node: 'web 1': a node name is one word"),
    ("[1, 2]", [], "must be a mapping of keys to values"),
    ("a: [", [], "not YAML"),
    ({}, ["--failsafe-inbound", "tcp:22,tcpx:1"], "--failsafe-inbound[1]: failsafe port"),
    ({}, ["--heartbeat-interval", "0"], "--heartbeat-interval: '0': must be more than 0"),
    ({}, ["--offline"], "--offline goes with --dry-run"),
])
def test_bad_config_names_the_key_and_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, argv: list[str],
        message: str) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    rc = agent_main.main(["--config", str(conf), *argv], make_enforcer=lambda _: Recorder())
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.startswith("bulkhead-agent: ")


def test_missing_tls_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = agent_main.main(["--once", "--server", "https://127.0.0.1:1", "--ca",
                          str(tmp_path / "nope.crt"), "--metrics-listen", ""],
                         make_enforcer=lambda _: Recorder())
    err = capsys.readouterr().err
    assert rc == 2 and f"ca: {tmp_path / 'nope.crt'}: No such file" in err, err


def test_docs_list_every_config_key_and_flag() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    for key in KEYS:
        assert f"`{key}`" in doc, key
    for flag in FLAGS.values():
        assert f"`{flag}`" in doc, flag
