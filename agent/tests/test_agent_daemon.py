"""bulkhead.agent.daemon against a real bulkhead-server over mutual TLS, with a recording
enforcer at the enforcer seam (the nftables end-to-end tests are the dataplane's): the
server killed and back, a failed apply, drift repair."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bulkhead import __version__, pki
from bulkhead.agent.cache import load_cache
from bulkhead.agent.daemon import Agent
from bulkhead.agent.enforcer import EnforceReport
from bulkhead.model import Snapshot
from tests.agentfixture import (
    Recorder,
    config_for,
    create,
    gnp,
    running,
    started_after_a,
    until,
    wait_status,
)
from tests.conftest import Server, free_port


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
    async with started_after_a(server, tmp_path) as (admin, viewer, rec, _, rev_a):
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
        # Every apply ran with the cycle collector held off (memory.collector_paused),
        # the failed one too, and it is back on after them.
        assert rec.collector and not any(rec.collector) and gc.isenabled()
        async with viewer.get("/v1/nodes", params={"revision": str(rev_c)}) as r:
            body = await r.json()
        assert body["converged"] is True
        # The agent's reports say its version (their User-Agent), as the server's.
        assert body["nodes"][0]["agentVersion"] == body["serverVersion"] == __version__


async def test_drift_is_repaired_and_a_failed_apply_retried(
        server: Server, tmp_path: Path) -> None:
    async with started_after_a(server, tmp_path, drift_interval=0.1) as (
            admin, viewer, rec, agent, _):
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


async def test_drift_is_repaired_to_the_last_good_ruleset_while_an_apply_fails(
        server: Server, tmp_path: Path) -> None:
    """A refused apply is retried at every drift check; while it keeps failing, the drift
    check still runs and the repair puts back the last ruleset the kernel accepted (not
    the refused one), and the status says both."""
    async with started_after_a(server, tmp_path, drift_interval=0.1) as (
            admin, viewer, rec, agent, rev_a):
        await until(lambda: rec.applied is not None, "the first apply")
        rec.fail = "nft: Error: Could not process rule: Invalid argument"
        rev_b = await create(admin, gnp("b"))
        await until(lambda: agent.apply_error is not None, "the failed apply")
        rec.drift_reason = "table inet bulkhead is missing"   # nft flush ruleset
        await until(lambda: rec.repairs == 1, "the repair while the apply fails")
        assert rec.applied == (rev_a, ["a"])   # the last good one, put back
        status = await wait_status(viewer, lambda s: s["counters"]["driftRepairs"] == 1,
                                   "driftRepairs 1")
        assert status["appliedRevision"] == rev_a
        [error] = status["errors"]
        assert f"the kernel keeps revision {rev_a}" in error and "Invalid argument" in error
        await until(lambda: sum(names == ["a", "b"] for _, names in rec.calls) >= 3,
                    "the failed apply retried after the repair")
        rec.fail = None
        await until(lambda: agent.errors == [] and rec.applied is not None
                    and rec.applied[0] >= rev_b, "the retry")
        assert rec.repairs == 1


async def test_an_endpoint_left_unenforced_is_in_the_status_until_it_is_enforced(
        server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A host endpoint the dataplane cannot enforce (its expectedIPs on no interface of
    the host: an address gone, found by the drift check) is an error in the status, so
    the node is not counted converged, and it is logged; once it is enforced again
    (the address back, another repair), the error goes."""
    gone = "HostEndpoint web-1-eth0: no interface of this host has any of its " \
        "expectedIPs ['198.18.0.111']; not enforced"
    async with started_after_a(server, tmp_path, drift_interval=0.1) as (
            admin, viewer, rec, _, rev_a):
        await until(lambda: rec.applied is not None, "the first apply")
        await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_a, "the first status")
        rec.unenforced = [gone]
        rec.drift_reason = "the host's interfaces or addresses changed"
        await until(lambda: rec.repairs == 1, "the repair")
        status = await wait_status(viewer, lambda s: s["errors"] == [gone],
                                   "the endpoint reported unenforced")
        assert status["appliedRevision"] >= rev_a
        assert [r.levelname for r in caplog.records if r.getMessage() == gone] == ["WARNING"]
        async with viewer.get("/v1/nodes", params={"revision": str(rev_a)}) as r:
            assert (await r.json())["converged"] is False
        rev_b = await create(admin, gnp("b"))   # an apply keeps reporting it
        status = await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_b,
                                   "the next apply")
        assert status["errors"] == [gone]
        rec.unenforced = []
        rec.drift_reason = "the host's interfaces or addresses changed"
        await until(lambda: rec.repairs == 2, "the second repair")
        await wait_status(viewer, lambda s: s["errors"] == [], "the error cleared")
        async with viewer.get("/v1/nodes", params={"revision": str(rev_b)}) as r:
            assert (await r.json())["converged"] is True


class DnsRecorder(Recorder):
    """A Recorder whose "table" logs DNS with `dns`'s resolvers, as the nftables enforcer's."""

    def __init__(self, dns: Any) -> None:
        super().__init__()
        self.dns = dns
        self.rendered: list[tuple[str, ...]] = []   # the resolvers of each enforce

    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[tuple[str, str]] | None = None) -> EnforceReport:
        self.rendered.append(self.dns.servers)
        return super().enforce(snapshot, revision, changed)

    def use_dns(self, dns: Any) -> None:
        self.dns = dns


async def test_a_changed_resolv_conf_is_read_at_the_drift_check_and_rendered(
        tmp_path: Path) -> None:
    """Without trustedServers the resolvers are resolv.conf's: a new one there (a DHCP
    renew) is read at the next drift check, the table rendered again to log its answers,
    and they are trusted; an unchanged file is one stat."""
    from bulkhead.agent.config import DnsSettings
    from bulkhead.agent.dns import snooping

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 198.18.0.12\n")
    rec = DnsRecorder(snooping(DnsSettings(), resolv))
    pki.init_ca(tmp_path)
    agent = Agent(config_for("https://127.0.0.1:1", tmp_path, tmp_path / "state"), rec)
    assert agent.dns is not None
    agent.dns.resolv_conf = resolv
    try:
        assert await agent.enforce_current()
        await agent.check_drift()
        assert rec.rendered == [("198.18.0.12",)]   # the same resolvers: no apply
        resolv.write_text("# renewed\nnameserver 198.18.0.10\nnameserver 2001:2::53\n")
        await agent.check_drift()
        assert rec.rendered[1:] == [("198.18.0.10", "2001:2::53")]
        assert agent.dns.trusted == {ipaddress.ip_address("198.18.0.10"),
                                     ipaddress.ip_address("2001:2::53")}
        await agent.check_drift()
        assert len(rec.rendered) == 2 and agent.errors == []
    finally:
        agent.dns.close()


def test_memory_settles_after_a_scratch_apply_once_the_gap_has_passed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An apply from scratch makes a settle due; it runs at once unless one ran within
    SETTLE_GAP (then the next apply or drift check runs it), and every SETTLE_EVERY
    applies in any case. (`settle` itself is tested in test_agent_memory.)"""
    from bulkhead.agent import daemon
    from bulkhead.agent.memory import SETTLE_EVERY, SETTLE_GAP

    settled: list[float] = []
    monkeypatch.setattr(daemon, "settle", lambda: settled.append(1.0))
    pki.init_ca(tmp_path)
    agent = Agent(config_for("https://127.0.0.1:1", tmp_path, tmp_path / "state"), Recorder())
    agent._settle_if_due()
    assert settled == []                       # nothing from scratch yet
    agent._settle_due = True
    agent._settle_if_due()
    assert settled == [1.0] and not agent._settle_due
    agent._settle_due = True                   # another, within the gap: kept due
    agent._settle_if_due()
    assert settled == [1.0] and agent._settle_due
    agent._settled -= SETTLE_GAP               # the gap has passed
    agent._settle_if_due()
    assert len(settled) == 2 and not agent._settle_due
    agent._since_settle = SETTLE_EVERY         # many applies, none from scratch
    agent._settle_if_due()
    assert len(settled) == 3 and agent._since_settle == 0
