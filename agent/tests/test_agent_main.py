"""bulkhead.agent.main: the command line (--once, --dry-run, --offline, exit codes) and
the daemon stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.agent import main as agent_main
from bulkhead.agent.cache import load_cache
from bulkhead.agent.config import AgentConfig
from bulkhead.agent.daemon import Agent
from tests.agentfixture import (  # noqa: F401 (restore_logging: an autouse fixture)
    Recorder,
    config_for,
    create,
    gnp,
    node_status,
    restore_logging,
    until,
)
from tests.conftest import Server, free_port


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
    conf = write_config(tmp_path / "agent.yaml", cfg, flowLogs={"enabled": True})
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
        # Not even a directory: run as root before the service's first start, a dry run
        # must leave nothing the service's own user could not write (the flow spool).
        assert not Path(cfg.state_dir).exists()

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
    from bulkhead.agent import lock
    with pytest.raises(lock.Held):           # the running agent's mark (--release)
        lock.take(tmp_path / "state")
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)
    assert len(rec.calls) == 1   # stopping applied nothing (and the seam has no "remove")



def test_missing_tls_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = agent_main.main(["--once", "--server", "https://127.0.0.1:1", "--ca",
                          str(tmp_path / "nope.crt"), "--metrics-listen", "",
                          "--state-dir", str(tmp_path / "state")],   # not the host's
                         make_enforcer=lambda _: Recorder())
    err = capsys.readouterr().err
    assert rc == 2 and f"ca: {tmp_path / 'nope.crt'}: No such file" in err, err



def release_config(tmp_path: Path, dataplane: str) -> Path:
    """An agent config for `--release`, which reaches no server (the TLS files exist,
    empty: only their presence is checked before a connection)."""
    for name in ("ca.crt", "agent.crt", "agent.key"):
        (tmp_path / name).write_text("")
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({
        "server": "https://198.18.0.1:7443", "node": "win1", "ca": str(tmp_path / "ca.crt"),
        "cert": str(tmp_path / "agent.crt"), "key": str(tmp_path / "agent.key"),
        "stateDir": str(tmp_path / "state"), "metricsListen": "", "dataplane": dataplane}))
    return conf


def test_release_removes_the_hns_acls_the_agent_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bulkhead.agent.hns_enforcer import HnsEnforcer
    from bulkhead.policy import Failsafes
    from tests.test_hns_enforcer import DB_ID, SNAPSHOT, WEB_ID, fake

    hcn = fake()
    conf = release_config(tmp_path, "hns")
    HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path / "state").enforce(
        SNAPSHOT, 1)

    def make(config: AgentConfig) -> Any:
        return HnsEnforcer(config.node, config.failsafes, hcn=hcn,
                           state_dir=config.state_dir)

    assert agent_main.main(["--config", str(conf), "--release"], make_enforcer=make) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"released ACLs of HNS endpoint {i}"
                                for i in sorted([WEB_ID, DB_ID])]
    assert not hcn.acls(WEB_ID) and not hcn.acls(DB_ID)
    assert agent_main.main(["--config", str(conf), "--release"], make_enforcer=make) == 0
    assert capsys.readouterr().out == "nothing to release (dataplane hns)\n"
    # a removal HCN refuses: exit 1, naming the endpoint
    HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path / "state").enforce(
        SNAPSHOT, 2)
    hcn.failing = {hcn.calls + 1}
    assert agent_main.main(["--config", str(conf), "--release"], make_enforcer=make) == 1
    err = capsys.readouterr().err
    assert err.startswith("bulkhead-agent: --release: removing the ACLs of HNS endpoint "), err


def test_release_is_refused_while_the_agent_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A running agent holds its lock in the state directory: it would put back what a
    release removes (and the HNS list would be gone), so --release refuses, exit 1."""
    from bulkhead.agent import lock

    conf = release_config(tmp_path, "hns")
    made: list[AgentConfig] = []
    held = lock.take(tmp_path / "state")
    assert held is not None
    try:
        rc = agent_main.main(["--config", str(conf), "--release"],
                             make_enforcer=lambda c: made.append(c) or Recorder())
    finally:
        held.close()
    err = capsys.readouterr().err
    assert rc == 1 and f"is held by a running agent (process {os.getpid()}): stop the " \
        "agent first" in err, err
    assert made == []          # no enforcer was even made
    # stopped (the lock released): the release goes ahead
    assert agent_main.main(["--config", str(conf), "--release"],
                           make_enforcer=lambda c: made.append(c) or Recorder()) == 2
    assert len(made) == 1 and "not offered" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--once"]], ids=["daemon", "once"])
def test_a_second_agent_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    """Two agents on one state directory would each put back their own ruleset at every
    drift check: a daemon (or --once) started while another holds the lock says so in one
    line, naming the lock file and its holder, exit 1, before it touches the kernel."""
    from bulkhead.agent import lock

    conf = release_config(tmp_path, "nftables")
    rec = Recorder()
    held = lock.take(tmp_path / "state")
    assert held is not None
    try:
        rc = agent_main.main(["--config", str(conf), *argv], make_enforcer=lambda _: rec)
    finally:
        held.close()
    err = capsys.readouterr().err
    path = tmp_path / "state" / lock.LOCK_FILE
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"bulkhead-agent: {path} is held by a running agent (process "
                          f"{os.getpid()}): not starting a second agent"), err
    assert rec.calls == [] and rec.dry_runs == 0


@pytest.mark.parametrize(("dataplane", "argv", "message"), [
    ("windows-firewall", ["--release"], "--release: dataplane windows-firewall: remove the "
     "agent's rule group instead"),
    ("hns", ["--release", "--once"], "not allowed with argument"),
])
def test_release_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], dataplane: str,
                         argv: list[str], message: str) -> None:
    conf = release_config(tmp_path, dataplane)
    with pytest.raises(SystemExit) if "--once" in argv else contextlib.nullcontext():
        rc = agent_main.main(["--config", str(conf), *argv],
                             make_enforcer=lambda _: Recorder())
        assert rc == 2
    assert message in capsys.readouterr().err
