"""`bulkhead flows` against a real bulkhead-server process: filters as options, the
table, wide, JSON and YAML outputs, top talkers, and --follow until Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead import pki
from bulkhead.cli.flows import follow, when
from bulkhead.cli.main import main
from bulkhead.client.flows import send_flows
from tests.flowfixture import flow_doc
from tests.procs import ctrl_c_as_in_a_terminal
from tests.test_server_process import ServerProcess

NOW = round(time.time(), 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module, holding four records web-1 sent."""
    tmp = tmp_path_factory.mktemp("flows-cli")
    pki.init_ca(tmp)
    pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
    process = ServerProcess(tmp, f"sqlite://{tmp}/store.db")
    try:
        process.start()
        send_flows(process.client("web-1", "agent"), [
            flow_doc(end=NOW - 50, dst_name="db-1"),
            flow_doc(end=NOW - 40, dst_name="db-2", action="deny", reporter="dst",
                     enforced_trace=["security|security.block|1|deny"],
                     staged_action="deny", staged_trace=["security|security.block|1|deny"],
                     bytes_in=5000, dst_labels={"app": "db", "zone": "restricted"}),
            flow_doc(end=NOW - 30, dst_name="partners", dst_type="ns",
                     staged_action="deny", staged_trace=["audit|audit.lockdown|-|deny"],
                     dst_labels={"kind": "partners"}, proto=17, dst_port=53),
            flow_doc(end=NOW - 3 * 3600, dst_name="old"),
        ])
        yield process
    finally:
        process.kill()


@pytest.fixture
def as_viewer(server: ServerProcess, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> dict[str, str]:
    viewer = server.client("carol", "viewer")
    env = {"BULKHEAD_SERVER": viewer.server, "BULKHEAD_CA": str(viewer.ca),
           "BULKHEAD_CERT": str(viewer.cert), "BULKHEAD_KEY": str(viewer.key),
           "HOME": str(tmp_path)}   # no stray ~/.config/bulkhead/config.yaml
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["flows", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def dsts(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    code, out, err = run(capsys, *argv, "-o", "json")
    assert code == 0, err
    return [f["dst_name"] for f in json.loads(out)["flows"]]


def test_when_reads_durations_unix_seconds_and_iso_times() -> None:
    assert when("2h", 10_000.0) == 2_800.0
    assert when("1h30m", 10_000.0) == 4_600.0
    assert when("1.5d", 200_000.0) == 200_000.0 - 129_600
    assert when("1764950400", 0) == 1_764_950_400.0
    assert when("2026-12-05T16:00:00Z", 0) == datetime(2026, 12, 5, 16, tzinfo=UTC).timestamp()
    assert when("2026-12-05T17:00:00+01:00", 0) == when("2026-12-05T16:00:00", 0)
    with pytest.raises(ValueError, match="'yesterday' is not a time"):
        when("yesterday", 0)


def test_the_table_shows_each_flow_on_one_line(as_viewer: dict[str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert code == 0, err
    head, *rows = out.splitlines()
    assert head.split() == ["TIME", "(UTC)", "NODE", "FLOW", "PORT", "ACTION", "COUNTS",
                            "POLICY"]
    assert len(rows) == 3                                       # the last hour, oldest first
    assert rows[0].split()[2:] == ["web-1", "web-1", "->", "db-1", "tcp/5432", "allow", "2",
                                   "conn,", "22", "pkt,", "3.0kB",
                                   "security|security.db-in|0|allow"]
    assert rows[0].split()[:2] == datetime.fromtimestamp(NOW - 50, UTC).strftime(
        "%Y-%m-%d %H:%M:%S").split()
    assert "deny" in rows[1] and "7.0kB" in rows[1]
    assert "web-1 -> ns:partners" in rows[2] and "udp/53" in rows[2]
    assert "allow (staged deny)" in rows[2]


def test_filters_as_options(as_viewer: dict[str, str],
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert dsts(capsys) == ["db-1", "db-2", "partners"]
    assert dsts(capsys, "--since", "4h") == ["old", "db-1", "db-2", "partners"]
    assert dsts(capsys, "--since", str(NOW - 45), "--until", str(NOW - 35)) == ["db-2"]
    assert dsts(capsys, "--action", "deny") == ["db-2"]
    assert dsts(capsys, "--policy", "security.block") == ["db-2"]
    assert dsts(capsys, "--tier", "audit") == ["partners"]
    assert dsts(capsys, "--staged-differs") == ["partners"]
    assert dsts(capsys, "-l", "zone == 'restricted'") == ["db-2"]
    assert dsts(capsys, "--endpoint", "partners") == ["partners"]
    assert dsts(capsys, "--node", "web-2") == []
    assert dsts(capsys, "--reporter", "dst") == ["db-2"]
    assert dsts(capsys, "--limit", "1") == ["partners"]        # the newest one


def test_wide_yaml_and_top(as_viewer: dict[str, str],
                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "-o", "wide", "--action", "deny")
    assert code == 0
    head, row = out.splitlines()
    assert "ENFORCED" in head and "STAGED TRACE" in head and "DST LABELS" in head
    assert "web-1 (dst)" in row and "5000/2000" in row and "app=db,zone=restricted" in row
    code, out, _ = run(capsys, "-o", "yaml", "--tier", "audit")
    doc = yaml.safe_load(out)
    assert [f["dst_name"] for f in doc["flows"]] == ["partners"] and doc["truncated"] is False
    code, out, _ = run(capsys, "--top", "2")
    head, first, second = out.splitlines()
    assert head.split() == ["SRC", "DST", "PORT", "BYTES", "PACKETS", "CONNECTIONS",
                            "RECORDS"]
    assert first.split()[:4] == ["web-1", "db-2", "tcp/5432", "7.0kB"]
    assert second.split()[:4] == ["web-1", "db-1", "tcp/5432", "3.0kB"]
    code, out, err = run(capsys, "--limit", "1", "-o", "table")
    assert code == 0 and len(out.splitlines()) == 2
    assert "more records match than are shown" in err


def test_refusals_and_bad_options(as_viewer: dict[str, str], server: ServerProcess,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--since", "yesterday")
    assert code == 2 and "'yesterday' is not a time" in err
    code, _, err = run(capsys, "--limit", "20000")
    assert code == 1 and "limit: '20000' is not a number from 1 to 10,000" in err
    code, _, err = run(capsys, "--top", "3", "--follow")
    assert code == 2 and "give one" in err
    agent = server.client("web-1", "agent")
    monkeypatch.setenv("BULKHEAD_CERT", str(agent.cert))
    monkeypatch.setenv("BULKHEAD_KEY", str(agent.key))
    code, _, err = run(capsys)
    assert code == 1 and "agent web-1 may not GET /v1/flows" in err and "403" in err


class Lines:
    """Whole lines from a process's stdout, read from the file descriptor (a text wrapper
    would buffer lines select() then never reports)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buffer = b""

    def read(self, count: int, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {self.buffer!r} within {timeout} s"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"bulkhead flows ended early after {self.buffer!r}"
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n", count)
        return [line.decode() for line in lines]

@contextlib.contextmanager
def following(command: str, node: str, env: dict[str, str]
              ) -> Iterator[tuple[subprocess.Popen[bytes], Lines]]:
    """`bulkhead COMMAND --follow` for NODE's records, one JSON record a line, as `env`'s
    client; killed at the end if it still runs."""
    exe = Path(sys.executable).parent / "bulkhead"
    proc = subprocess.Popen([str(exe), command, "--follow", "--interval", "0.5", "-o", "json",
                             "--node", node], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env},
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        yield proc, Lines(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)



def test_follow_prints_new_records_until_ctrl_c(as_viewer: dict[str, str],
                                                server: ServerProcess) -> None:
    with following("flows", "web-3", as_viewer) as (proc, out):
        # JSON one record a line: none yet (whenever the first poll runs, these come once).
        agent = server.client("web-3", "agent")
        send_flows(agent, [flow_doc(node="web-3", src_name="web-3", dst_name="new-1"),
                           flow_doc(node="web-3", src_name="web-3", dst_name="new-2")])
        got = [json.loads(line)["dst_name"] for line in out.read(2, 30)]
        assert got == ["new-1", "new-2"]
        send_flows(agent, [flow_doc(node="web-3", src_name="web-3", dst_name="new-3")])
        assert json.loads(out.read(1, 30)[0])["dst_name"] == "new-3"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        assert out.buffer + proc.stdout.read() == b""                # each record once


def test_follow_goes_past_a_burst_bigger_than_a_page(as_viewer: dict[str, str],
                                                      server: ServerProcess) -> None:
    """One batch of 1,500 records (a batch holds up to 5,000, all stored at one time):
    --follow printed the first 1,000 (the server's default page), then asked for the
    same page again each poll, and never printed anything after it."""
    with following("flows", "web-4", as_viewer) as (proc, out):
        agent = server.client("web-4", "agent")
        end = round(time.time() - 30, 3)
        send_flows(agent, [flow_doc(node="web-4", src_name="web-4", dst_name=f"burst-{i}",
                                    end=end) for i in range(1500)])
        send_flows(agent, [flow_doc(node="web-4", src_name="web-4", dst_name="after")])
        try:
            lines = out.read(1501, 60)
        except AssertionError:
            printed = out.buffer.count(b"\n")
            pytest.fail(f"{printed} of 1,501 records printed within 60 s")
        got = [json.loads(line)["dst_name"] for line in lines]
        assert sorted(got[:1500]) == sorted(f"burst-{i}" for i in range(1500))
        assert got[1500] == "after"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


def test_follow_pages_on_from_a_full_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full page (more stored than one answer holds) is followed at once by the next,
    from its newest record; the overlap would ask for the same page again."""
    stored = [{"n": i, "received": r} for i, r in enumerate((10.0, 10.1, 10.2, 10.3, 20.0))]
    asked: list[float] = []

    def fetch(after: float) -> tuple[list[dict[str, Any]], bool]:
        asked.append(after)
        if len(asked) > 6:
            raise KeyboardInterrupt
        rows = [r for r in stored if r["received"] >= after]
        return rows[:3], len(rows) > 3

    printed: list[dict[str, Any]] = []
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        follow(fetch, [], 0.5, printed.extend)
    assert [r["n"] for r in printed] == [0, 1, 2, 3, 4]


def test_until_alone_answers_the_hour_before_it(as_viewer: dict[str, str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The API's default window with `until` alone is the hour before it; the CLI sent
    `since` = 1h before now anyway, after any --until earlier than that: refused, with
    two times printed alike (`1.79663e+09 is after until 1.79663e+09`)."""
    assert dsts(capsys, "--until", "2h30m") == ["old"]
    code, _, err = run(capsys, "--since", "1h", "--until", "2h")
    assert code == 1
    since, until = (float(w) for w in err.split() if "." in w and w.replace(".", "").isdigit())
    assert round(since - until) == 3600, err
