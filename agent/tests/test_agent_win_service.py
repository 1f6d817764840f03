"""bulkhead.agent.win_service and the Windows side of the agent's config: the service's
start, stop request (from another thread, as the SCM's control handler calls it), the
stop-pending reports while the agent winds down, the failure exits; the default paths
under %ProgramData%; the `dataplane` key. The daemon, the server and the cache are real;
the SCM is `FakeScm`, a recorder at the one boundary that needs Windows."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.agent import hcn
from bulkhead.agent import main as agent_main
from bulkhead.agent.cache import load_cache
from bulkhead.agent.config import (
    AgentConfig,
    ConfigError,
    default_paths,
    load_config,
)
from bulkhead.agent.daemon import AgentError
from bulkhead.agent.enforcer import EnforceReport
from bulkhead.agent.hns_enforcer import HnsEnforcer
from bulkhead.agent.win_service import (
    BAD_CONFIG,
    FAILED,
    ServiceCore,
    file_logging,
    hosting_problem,
    service_command_line,
)
from bulkhead.model import Snapshot
from tests.agentfixture import (  # noqa: F401 (restore_logging: an autouse fixture)
    Recorder,
    config_for,
    create,
    gnp,
    restore_logging,
    until,
)
from tests.conftest import Server
from tests.hcnfake import FakeHcn


class FakeScm:
    """A FAKE service control manager (there is no Windows here): it records what the
    service tells it, in order, from any thread. The real one is win_service._PywinScm."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def running(self) -> None:
        with self.lock:
            self.calls.append(("running", None))

    def stop_pending(self, wait_hint: float) -> None:
        with self.lock:
            self.calls.append(("stop_pending", wait_hint))

    def event(self, level: str, message: str) -> None:
        with self.lock:
            self.calls.append((level, message))

    def states(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.calls]


def write_config(path: Path, cfg: AgentConfig, **extra: Any) -> Path:
    data = {"server": cfg.server, "node": cfg.node, "ca": cfg.ca, "cert": cfg.cert,
            "key": cfg.key, "stateDir": cfg.state_dir, "metricsListen": "",
            "heartbeatInterval": 0.3, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------- config
def test_windows_defaults_live_under_programdata() -> None:
    paths = default_paths("win32", {"ProgramData": "D:\\Data"})
    assert paths.config == "D:\\Data\\Bulkhead\\agent.yaml"
    assert (paths.ca, paths.cert, paths.key) == ("D:\\Data\\Bulkhead\\pki\\ca.crt",
                                                 "D:\\Data\\Bulkhead\\pki\\agent.crt",
                                                 "D:\\Data\\Bulkhead\\pki\\agent.key")
    assert paths.state_dir == "D:\\Data\\Bulkhead\\state"
    assert paths.log_dir == "D:\\Data\\Bulkhead\\logs"
    assert paths.dataplane == "windows-firewall"
    assert default_paths("win32", {}).config == "C:\\ProgramData\\Bulkhead\\agent.yaml"


def test_linux_defaults_are_unchanged() -> None:
    paths = default_paths("linux", {"ProgramData": "D:\\Data"})
    assert (paths.config, paths.ca, paths.cert, paths.key, paths.state_dir, paths.log_dir,
            paths.dataplane) == (
        "/etc/bulkhead/agent.yaml", "/etc/bulkhead/pki/ca.crt", "/etc/bulkhead/pki/agent.crt",
        "/etc/bulkhead/pki/agent.key", "/var/lib/bulkhead-agent", "", "nftables")
    config = load_config(None)
    assert (config.ca, config.state_dir, config.dataplane) == \
        ("/etc/bulkhead/pki/ca.crt", "/var/lib/bulkhead-agent", "nftables")
    assert config.dns is not None   # DNS snooping stays on by default with nftables


def test_windows_dataplanes_turn_netfilter_features_off(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    for dataplane in ("windows-firewall", "hns"):
        conf.write_text(yaml.safe_dump({"dataplane": dataplane}))
        config = load_config(conf)
        assert config.dataplane == dataplane and config.dns is None
        assert config.flow_logs is None
    conf.write_text(yaml.safe_dump({"dataplane": "windows-firewall",
                                    "dns": {"enabled": False},
                                    "flowLogs": {"enabled": False}}))
    assert load_config(conf).dns is None
    assert load_config(None, {"dataplane": "hns"}).dataplane == "hns"


@pytest.mark.parametrize(("content", "message"), [
    ({"dataplane": "iptables"},
     "dataplane: 'iptables': expected one of nftables, windows-firewall, hns"),
    ({"dataplane": "windows-firewall", "flowLogs": {"enabled": True}},
     "flowLogs: flow logs need the nftables dataplane (NFLOG, conntrack); dataplane "
     "windows-firewall has none"),
    ({"dataplane": "hns", "dns": {"mode": "NoDelay"}},
     "dns: DNS snooping needs the nftables dataplane (NFLOG); dataplane hns has none"),
])
def test_bad_dataplane_settings_name_the_key(tmp_path: Path, content: dict[str, Any],
                                             message: str) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    assert message in str(e.value)


def test_hns_dataplane_builds_the_hns_enforcer(monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, {"dataplane": "hns", "node": "win1"})
    if sys.platform != "win32":    # computenetwork.dll is loaded when the agent starts
        with pytest.raises(AgentError, match="dataplane hns: HCN is only on Windows"):
            agent_main.default_enforcer(config)
    fake = FakeHcn([])
    monkeypatch.setattr(hcn, "ComputeNetwork", lambda: fake)
    enforcer = agent_main.default_enforcer(config)
    assert isinstance(enforcer, HnsEnforcer) and enforcer.node == "win1"
    assert enforcer.hcn is fake and enforcer.enforce(Snapshot.build([]), 1).counts[
        "endpoints"] == 0


# ------------------------------------------------------------------- command line
def test_service_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main.main(["service", "install"]) == BAD_CONFIG
    assert "service install: needs Windows" in capsys.readouterr().err
    assert agent_main.main(["service", "reload"]) == 2
    assert "invalid choice: 'reload'" in capsys.readouterr().err
    line = service_command_line("C:\\Program Files\\Bulkhead\\Python\\python.exe",
                                "C:\\ProgramData\\Bulkhead\\agent.yaml")
    assert line == ('"C:\\Program Files\\Bulkhead\\Python\\python.exe" -m bulkhead.agent.main '
                    'service run --config C:\\ProgramData\\Bulkhead\\agent.yaml')


def test_a_venv_cannot_host_the_service() -> None:
    assert hosting_problem("C:\\Bulkhead\\Python", "C:\\Bulkhead\\Python") is None
    problem = hosting_problem("C:\\venvs\\bulkhead", "C:\\Python311")
    assert problem is not None and "is a venv" in problem and "dedicated Python" in problem


def test_file_logging_is_bounded(tmp_path: Path) -> None:
    path = file_logging(AgentConfig(), str(tmp_path / "logs"))
    assert path == tmp_path / "logs" / "agent.log"
    import logging
    import logging.handlers

    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert (handler.maxBytes, handler.backupCount) == (10 << 20, 5)
    logging.getLogger("bulkhead.agent").info("hello")
    handler.flush()
    assert '"msg": "hello"' in path.read_text()
    assert file_logging(AgentConfig(), "") is None   # Linux: stderr, to the journal


# ------------------------------------------------------------------------ the core
async def test_stop_request_ends_the_daemon_and_leaves_the_rules(
        server: Server, tmp_path: Path) -> None:
    async with server.client("alice", "admin") as admin:
        rev = await create(admin, gnp("a"))
    conf = write_config(tmp_path / "agent.yaml",
                        config_for(server.url, server.pki, tmp_path / "state"))
    scm, rec = FakeScm(), Recorder()
    core = ServiceCore(scm, conf, lambda _: rec, stop_report=0.05)
    run = asyncio.ensure_future(asyncio.to_thread(core.run))
    await until(lambda: rec.applied is not None and rec.applied[0] >= rev, "the apply")
    assert scm.states() == ["running"]
    await asyncio.to_thread(core.stop)          # from another thread, as the SCM calls it
    assert await asyncio.wait_for(run, 15) == 0
    states = scm.states()
    assert states[:2] == ["running", "stop_pending"] and states[-1] == "info"
    assert "the rules it applied stay in place" in scm.calls[-1][1]
    assert len(rec.calls) == 1                  # stopping applied nothing, removed nothing
    cached = load_cache(str(tmp_path / "state"))
    assert cached is not None and cached.revision >= rev
    core.stop()                                 # a second request, after the end: ignored
    assert scm.states() == states


class SlowEventLog(FakeScm):
    """An event log that takes a while to write (the service's last word among them)."""

    def event(self, level: str, message: str) -> None:
        super().event(level, message)
        time.sleep(0.3)


async def test_no_stop_pending_is_reported_after_the_last_word(
        server: Server, tmp_path: Path) -> None:
    """The stop-pending reports end before the service says it stopped (after that the
    SCM reports it stopped itself): a report whose wait ran out just as the daemon ended
    is not sent after it, however long the last word takes."""
    conf = write_config(tmp_path / "agent.yaml",
                        config_for(server.url, server.pki, tmp_path / "state"))
    scm, rec = SlowEventLog(), Recorder()
    core = ServiceCore(scm, conf, lambda _: rec, stop_report=0.02)
    run = asyncio.ensure_future(asyncio.to_thread(core.run))
    await until(lambda: rec.applied is not None, "the apply")
    await asyncio.to_thread(core.stop)
    assert await asyncio.wait_for(run, 15) == 0
    states = scm.states()
    assert states[-1] == "info" and states.count("info") == 1, states
    core.stop()                                 # after the end: nothing more either
    assert scm.states() == states


async def test_stop_before_the_loop_runs_still_stops(server: Server, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "agent.yaml",
                        config_for(server.url, server.pki, tmp_path / "state"))
    scm = FakeScm()
    core = ServiceCore(scm, conf, lambda _: Recorder(), stop_report=0.05)
    core.stop()
    assert await asyncio.wait_for(asyncio.to_thread(core.run), 15) == 0
    assert scm.states()[:2] == ["stop_pending", "running"]


class SlowEnforcer(Recorder):
    """A Recorder whose applies wait for `release`: an apply under way at the stop."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def enforce(self, snapshot: Snapshot, revision: int, changed: Any = None
                ) -> EnforceReport:
        self.started.set()
        assert self.release.wait(20)
        return super().enforce(snapshot, revision, changed)


async def test_stop_pending_is_reported_while_an_apply_finishes(
        server: Server, tmp_path: Path) -> None:
    async with server.client("alice", "admin") as admin:
        await create(admin, gnp("a"))
    conf = write_config(tmp_path / "agent.yaml",
                        config_for(server.url, server.pki, tmp_path / "state"))
    scm, slow = FakeScm(), SlowEnforcer()
    core = ServiceCore(scm, conf, lambda _: slow, stop_report=0.05)
    run = asyncio.ensure_future(asyncio.to_thread(core.run))
    await until(slow.started.is_set, "the apply to start")
    core.stop()
    await until(lambda: scm.states().count("stop_pending") >= 3, "stop-pending reports")
    assert not run.done()                       # the apply holds the stop
    slow.release.set()
    assert await asyncio.wait_for(run, 15) == 0
    time.sleep(0.2)                             # the reporter has stopped: no more reports
    count = scm.states().count("stop_pending")
    time.sleep(0.2)
    assert scm.states().count("stop_pending") == count
    assert slow.applied is not None             # the apply under way was finished


def test_bad_config_exits_2_and_says_why(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"dataplane": "iptables"}))
    scm = FakeScm()
    assert ServiceCore(scm, conf, lambda _: Recorder()).run() == BAD_CONFIG
    assert scm.states() == ["error"]
    assert "exit 2" in scm.calls[0][1] and "dataplane: 'iptables'" in scm.calls[0][1]


def test_an_enforcer_that_cannot_start_exits_1(tmp_path: Path) -> None:
    def missing(_: AgentConfig) -> Recorder:
        raise AgentError("the Windows Firewall enforcer is not available: no module")

    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"metricsListen": ""}))
    scm = FakeScm()
    assert ServiceCore(scm, conf, missing).run() == FAILED
    assert scm.states() == ["error"] and "exit 1" in scm.calls[0][1]
    assert "enforcer is not available" in scm.calls[0][1]


def test_a_daemon_that_fails_exits_with_its_code(tmp_path: Path) -> None:
    # A CA file that does not exist: the daemon raises when it builds its TLS context
    # (after the boot from the cache), a configuration error.
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"metricsListen": "", "ca": str(tmp_path / "nope.crt"),
                                    "stateDir": str(tmp_path / "state")}))
    scm = FakeScm()
    assert ServiceCore(scm, conf, lambda _: Recorder()).run() == BAD_CONFIG
    assert scm.states() == ["running", "error"]
    assert "exit 2" in scm.calls[-1][1] and "ca: " in scm.calls[-1][1]
    assert "nope.crt" in scm.calls[-1][1]


# ------------------------------------------------------------- `service debug`, real
def _debug_process(conf: Path) -> Any:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "bulkhead.agent.main", "service", "debug",
                             "--config", str(conf)], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)


@pytest.mark.skipif(sys.platform == "win32", reason="HCN is there on Windows")
def test_service_debug_refuses_hns_off_windows_with_exit_1(tmp_path: Path) -> None:
    conf = tmp_path / "agent.yaml"
    conf.write_text(yaml.safe_dump({"dataplane": "hns", "metricsListen": ""}))
    proc = _debug_process(conf)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == FAILED
    assert "bulkhead-agent: error: bulkhead-agent stopped (exit 1): dataplane hns: HCN is " \
        "only on Windows" in err


def test_service_debug_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The console's Ctrl+C is the SCM's stop request: exit 0, nothing applied. The server
    is unreachable and there is no cache, so the nftables enforcer never touches the
    kernel (no DNS snooping, no flow logs)."""
    import signal

    from tests.agentfixture import make_pki

    directory = make_pki(tmp_path)
    cfg = config_for("https://127.0.0.1:1", directory, tmp_path / "state")
    conf = write_config(tmp_path / "agent.yaml", cfg, dns={"enabled": False})
    proc = _debug_process(conf)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "running (Ctrl+C stops it" in line:
                break
        else:
            raise AssertionError("".join(lines))
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "bulkhead-agent: stopping" in rest
    assert "the rules it applied stay in place (revision 0)" in rest


def test_windows_firewall_dataplane_makes_the_windows_enforcer() -> None:
    """The config's node, failsafes and default mode reach the enforcer; nothing runs
    PowerShell yet."""
    from bulkhead.agent import win_enforcer
    config = load_config(None, {"dataplane": "windows-firewall", "node": "win-1",
                                "enforcement": "observe", "failsafe_inbound": "tcp:5986"})
    enforcer = agent_main.default_enforcer(config)
    assert isinstance(enforcer, win_enforcer.WindowsFirewallEnforcer)
    assert (enforcer.node, enforcer.default_mode) == ("win-1", "observe")
    assert [str(p) for p in enforcer.failsafes.inbound] == ["tcp:5986"]
