"""The conformance runner: case parsing, truth tables, tag rates, JSON, exit codes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.cli.main import main
from bulkhead.conformance import (
    Case,
    CaseError,
    ModelDataplane,
    load_cases,
    report_json,
    report_text,
    run_cases,
    run_cases_at_once,
)

CASES_DIR = Path(__file__).parent / "conformance"


def case(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "deny-db", "tags": ["ingress"],
        "hosts": {"web": {"app": "web"}, "db": {"app": "db"}},
        "policies": [{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                      "metadata": {"name": "deny"},
                      "spec": {"selector": "app == 'db'", "types": ["Ingress"]}}],
        "expect": [{"from": "web", "to": "db", "proto": "TCP", "port": 80, "allowed": False},
                   {"from": "db", "to": "web", "proto": "ICMP", "port": None, "allowed": True}],
    }
    base.update(over)
    return base


def write(tmp_path: Path, *cases: dict[str, Any]) -> Path:
    path = tmp_path / "cases.yaml"
    path.write_text(yaml.safe_dump(list(cases), sort_keys=False))
    return path


def test_addresses_assigned_and_resources_built(tmp_path: Path) -> None:
    [c] = load_cases(write(tmp_path, case()))
    assert c.addresses == {"web": "198.18.0.10", "db": "198.18.0.11"}
    assert [r.kind for r in c.resources] == ["HostEndpoint", "HostEndpoint",
                                             "GlobalNetworkPolicy"]
    assert run_cases([c], ModelDataplane())[0].failed == []


def test_a_wrong_expectation_fails_with_table_and_json(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    wrong = case(expect=[{"from": "web", "to": "db", "proto": "TCP", "port": 80,
                          "allowed": True}])
    path = write(tmp_path, wrong, case(name="ok"))
    assert main(["conformance", "run", str(path)]) == 1
    out = capsys.readouterr().out
    assert "== deny-db [ingress] FAIL" in out
    assert "web  -   !" in out
    assert "ingress                  1/2 cases (50%)" in out
    assert "1 passed, 1 failed" in out
    assert main(["conformance", "run", str(path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data == {"cases": 2, "probes": 3, "failed": [
        {"case": "deny-db", "from": "web", "to": "db", "proto": "TCP", "port": 80,
         "expected": True, "actual": False}], "refused": []}


@pytest.mark.parametrize(("over", "message"), [
    ({"hosts": {"web": {}}}, "hosts: needs at least two hosts"),
    ({"expect": [{"from": "web", "to": "web", "proto": "TCP", "port": 1, "allowed": True}]},
     "a probe never goes from a host to itself"),
    ({"expect": [{"from": "web", "to": "nope", "proto": "TCP", "port": 1, "allowed": True}]},
     "expect[0].to: 'nope' is not one of the hosts"),
    ({"expect": [{"from": "web", "to": "db", "proto": "ICMP", "port": 8, "allowed": True}]},
     "expect[0].port: must be null for ICMP"),
    ({"expect": [{"from": "web", "to": "db", "proto": "GRE", "port": 1, "allowed": True}]},
     "expect[0].proto"),
    ({"addresses": {"web": "10.0.0.1"}}, "addresses.web: 10.0.0.1 is outside 198.18.0.0/15"),
    ({"requires": ["magic"]}, "requires: each entry must be one of"),
    ({"colour": "blue"}, "colour: unknown field"),
    ({"policies": [{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                    "metadata": {"name": "x"}, "spec": {"order": "a"}}]},
     "policies: GlobalNetworkPolicy x: spec.order: must be a number"),
])
def test_case_errors_name_the_case_and_field(tmp_path: Path, over: dict[str, Any],
                                             message: str) -> None:
    with pytest.raises(CaseError) as err:
        load_cases(write(tmp_path, case(**over)))
    assert "case deny-db" in str(err.value) and message in str(err.value)


def test_cases_carry_free_metadata(tmp_path: Path) -> None:
    """FORMAT.md: `description`, `source` and `notes` are free text on a case; any other
    unknown key stays an error, and so does metadata that is not text."""
    meta = case(description="deny all into db", notes=["first line", "second line"],
                source="libcalico-go/lib/validator/v3/validator_test.go: \"allow Types ...\"")
    [c] = load_cases(write(tmp_path, meta))
    assert c.description == "deny all into db"
    assert c.cited.startswith("libcalico-go/lib/validator/v3/validator_test.go")
    assert c.notes == "first line\nsecond line"
    assert c.source == str(tmp_path / "cases.yaml")   # still the file it came from
    with pytest.raises(CaseError, match="case deny-db: source: must be text"):
        load_cases(write(tmp_path, case(source={"url": "x"})))
    with pytest.raises(CaseError, match="case deny-db: note: unknown field"):
        load_cases(write(tmp_path, case(note="typo of notes")))


def test_requires_modes(tmp_path: Path) -> None:
    no_profile = case(requires=["hep-no-profile"], policies=[], expect=[
        {"from": "web", "to": "db", "proto": "TCP", "port": 80, "allowed": False}])
    failsafe = case(name="fs", requires=["failsafe-defaults"], expect=[
        {"from": "web", "to": "db", "proto": "TCP", "port": 22, "allowed": True},
        {"from": "web", "to": "db", "proto": "TCP", "port": 23, "allowed": False}])
    results = run_cases(load_cases(write(tmp_path, no_profile, failsafe)), ModelDataplane())
    assert report_json(results)["failed"] == []


def test_the_project_cases_pass_on_the_model() -> None:
    cases = load_cases(CASES_DIR)
    assert len(cases) >= 1
    results = run_cases(cases, ModelDataplane())
    assert report_json(results)["failed"] == []


class Recording:
    """A dataplane that records which of several ran which case, and that it was closed;
    `slow` makes every case take a moment, so several really run at once."""

    name = "recording"

    def __init__(self, index: int, log: list[tuple[int, str]], closed: list[int],
                 fail_on: str | None = None) -> None:
        self.index, self.log, self.closed, self.fail_on = index, log, closed, fail_on
        self.model = ModelDataplane()

    def run(self, c: Case) -> list[bool]:
        if c.name == self.fail_on:
            raise RuntimeError(f"the lab of dataplane {self.index} broke")
        time.sleep(0.01)
        self.log.append((self.index, c.name))
        return self.model.run(c)

    def close(self) -> None:
        self.closed.append(self.index)


def test_cases_at_once_report_as_one_at_a_time(tmp_path: Path) -> None:
    """Three dataplanes at once each take cases; the results, in the cases' order, are
    the ones a single dataplane gives, and every dataplane is closed."""
    cases = load_cases(CASES_DIR)
    log: list[tuple[int, str]] = []
    closed: list[int] = []
    results = run_cases_at_once(cases, lambda i: Recording(i, log, closed), 3)
    alone = run_cases(cases, ModelDataplane())
    assert [r.case.name for r in results] == [c.name for c in cases]
    assert [(r.actual, r.refused) for r in results] == [(r.actual, r.refused) for r in alone]
    assert sorted(name for _, name in log) == sorted(c.name for c in cases)
    assert {i for i, _ in log} == {0, 1, 2}   # each of them ran cases
    assert sorted(closed) == [0, 1, 2]
    assert report_text(results, "model") == report_text(alone, "model")


def test_a_dataplane_that_breaks_stops_the_run_and_every_lab_is_closed() -> None:
    cases = load_cases(CASES_DIR)
    log: list[tuple[int, str]] = []
    closed: list[int] = []
    with pytest.raises(RuntimeError, match=r"the lab of dataplane [01] broke") as broke:
        run_cases_at_once(cases, lambda i: Recording(i, log, closed, fail_on=cases[5].name), 2)
    assert sorted(closed) == [0, 1]
    assert len(log) < len(cases)   # the other stopped after its case, not at the end
    assert any(f"case {cases[5].name}" in note for note in broke.value.__notes__)


def test_a_dataplane_that_cannot_be_made_stops_the_others() -> None:
    cases = load_cases(CASES_DIR)
    log: list[tuple[int, str]] = []
    closed: list[int] = []

    def make(i: int) -> Recording:
        if i == 1:
            raise OSError("no lab for you")
        return Recording(i, log, closed)
    with pytest.raises(OSError, match="no lab for you") as refused:
        run_cases_at_once(cases, make, 2)
    assert closed == [0]              # the one made is closed, the other never was
    assert len(log) < len(cases)
    assert "dataplane 1, before its first case" in refused.value.__notes__[0]


class Interrupting(Recording):
    """Ctrl-C reaches the main thread while this dataplane runs its third case."""

    def run(self, c: Case) -> list[bool]:
        if len(self.log) == 2:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        return super().run(c)


def test_ctrl_c_stops_every_dataplane_after_its_case_and_closes_them() -> None:
    cases = load_cases(CASES_DIR)
    log: list[tuple[int, str]] = []
    closed: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run_cases_at_once(cases, lambda i: Interrupting(i, log, closed), 2)
    assert sorted(closed) == [0, 1]
    assert len(log) < 10 < len(cases)   # stopped soon, not after every case


@pytest.mark.parametrize("at_once", ["0", "5"])
def test_at_once_out_of_range_is_refused_by_name(at_once: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "run", str(CASES_DIR), "--at-once", at_once]) == 2
    assert f"--at-once {at_once}: from 1 to 4" in capsys.readouterr().err


def test_the_project_cases_pass_on_the_model_two_at_once(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["conformance", "run", str(CASES_DIR), "--at-once", "2"]) == 0
    two = capsys.readouterr().out
    assert main(["conformance", "run", str(CASES_DIR)]) == 0
    assert two == capsys.readouterr().out


class PaperLab:
    """Stands in for a testbed's lab in `NftablesDataplane.run`: six hosts, addresses
    taken and forgotten. Only the retry logic is under test here; `make
    conformance-kernel` runs the real labs."""

    def __init__(self) -> None:
        self.hosts = {f"h{i}": None for i in range(1, 7)}

    def set_addresses_many(self, addresses: dict[str, list[str]]) -> None:
        self.addresses = addresses


class PaperBed:
    failsafe_defaults = False

    def __init__(self) -> None:
        self.lab = PaperLab()

    def replace_all(self, docs: list[dict[str, Any]], marker: str) -> int:
        return 7

    def wait_converged(self, revision: int) -> float:
        return 0.01


def test_an_expected_allowed_probe_that_timed_out_is_asked_again_slowly(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The first round: every probe timed out. The probes expected to get through are
    asked once more with RETRY_TIMEOUT, and their second answer counts; those expected to
    be denied are not asked again."""
    from bulkhead.conformance import kernel

    [c] = load_cases(write(tmp_path, case()))   # web->db TCP/80 denied, db->web ICMP allowed
    rounds: list[tuple[list[str], float]] = []

    def wire(bed: Any, flows: list[kernel.WireFlow], timeout: float = kernel.PROBE_TIMEOUT
             ) -> list[bool]:
        rounds.append(([f.proto for f in flows], timeout))
        return [len(rounds) > 1] * len(flows)   # nothing back at first, then an answer
    monkeypatch.setattr(kernel, "wire_verdicts", wire)
    dataplane = kernel.NftablesDataplane()
    dataplane.testbed = PaperBed()  # type: ignore[assignment]
    assert dataplane.run(c) == [False, True]
    assert rounds == [(["TCP", "ICMP"], kernel.PROBE_TIMEOUT),
                      (["ICMP"], kernel.RETRY_TIMEOUT)]
    assert dataplane.retried == 1


def test_when_every_dataplane_breaks_the_error_notes_the_others() -> None:
    cases = load_cases(CASES_DIR)
    closed: list[int] = []

    class Broken(Recording):
        def run(self, c: Case) -> list[bool]:
            time.sleep(0.05)   # both have taken a case before either raises
            raise RuntimeError(f"the lab of dataplane {self.index} broke")
    with pytest.raises(RuntimeError) as broke:
        run_cases_at_once(cases, lambda i: Broken(i, [], closed), 2)
    first = re.fullmatch(r"the lab of dataplane (\d) broke", str(broke.value))
    assert first is not None
    other = 1 - int(first.group(1))
    assert any(f"and also RuntimeError('the lab of dataplane {other} broke')" in note
               for note in broke.value.__notes__)
    assert sorted(closed) == [0, 1]
