"""The Molecule scenarios under molecule/ run for real (tests/run-molecule.sh: lab machines
booted by the shared create step, removed by the destroy step), and leave nothing behind:
no namespace, cgroup, mount, process or file of their lab, also when a step fails."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bulkhead.lab.machine import cgroup2_root
from bulkhead.lab.netns import list_labs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="lab machines need root (network namespaces, systemd)")


def lab_name(scenario_dir):
    """The scenario's bulkhead_lab_name (molecule.yml, provisioner.inventory.group_vars.all)."""
    config = yaml.safe_load((scenario_dir / "molecule.yml").read_text())
    return config["provisioner"]["inventory"]["group_vars"]["all"]["bulkhead_lab_name"]


def leftovers(lab):
    """What lab `lab` still has on this machine, by kind; empty when it is all gone."""
    found = {}
    if lab in list_labs():  # namespaces, uplink, state dir
        found["lab"] = [lab]
    found["cgroups"] = [p.name for p in cgroup2_root().glob("bhl-%s-*" % lab)]
    marks = ("/run/bulkhead-lab/%s/" % lab, "bhl-%s-" % lab)
    with open("/proc/self/mountinfo") as f:
        found["mounts"] = [line for line in f if any(m in line for m in marks)]
    procs = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroup = (proc / "cgroup").read_text()
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if any(m in cgroup or m in argv for m in marks):
            status = dict(line.split(":\t", 1) for line in
                          (proc / "status").read_text().splitlines() if ":\t" in line)
            procs.append("%s %s state %s ppid %s: %s %s" % (
                proc.name, status.get("Name"), status.get("State"), status.get("PPid"),
                argv, cgroup.replace("\n", " ")))
    found["processes"] = procs
    return {kind: items for kind, items in found.items() if items}


def leftovers_after(lab, timeout=15.0):
    """leftovers(lab), given `timeout` seconds to become empty: the machines' `unshare`
    launchers, orphaned when `bulkhead lab up` exits, are reaped by this machine's PID 1,
    which may take a moment (they are zombies by then, holding nothing but their pid)."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(lab)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def plain(text):
    """Molecule's output without the colour codes it prints even with NO_COLOR."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def plain_output(done):
    return plain(done.stdout + done.stderr)


def plain_text(log):
    return plain(log.read_text(errors="replace"))


def lab_down(lab):
    subprocess.run([str(BIN / "bulkhead"), "lab", "down", "--name", lab], check=False,
                   capture_output=True, timeout=120)


SCENARIOS = sorted(p.parent.name for p in (ROOT / "molecule").glob("*/molecule.yml"))
SCENARIO_SECONDS = 1200  # each scenario's whole `molecule test`, all running at once
# (and beside the collection's other tests: tests/run-collection-tests.sh)


def steps(scenario):
    """The steps of the scenario's test sequence that must report success."""
    config = yaml.safe_load((ROOT / "molecule" / scenario / "molecule.yml").read_text())
    sequence = (config.get("scenario") or {}).get("test_sequence") or \
        ["converge", "idempotence", "verify"]
    return [s for s in sequence if s not in ("syntax", "create")] + ["destroy"]


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """One wheelhouse of the checkout for every scenario (run-molecule.sh would build one
    per run otherwise)."""
    d = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(["make", "-s", "-C", str(ROOT), "wheelhouse", "VENV=%s" % BIN.parent,
                    "WHEELHOUSE=%s" % d], check=True, capture_output=True, timeout=600)
    return d


@pytest.fixture(scope="module")
def scenario_runs(wheelhouse, tmp_path_factory):
    """Every scenario's `tests/run-molecule.sh SCENARIO`, started at once (each its own lab,
    each mostly waiting on its machines): scenario -> (process, its TMPDIR, its log).
    Whatever still runs at the end is killed and its lab removed."""
    runs = {}
    try:
        for scenario in SCENARIOS:
            tmp = tmp_path_factory.mktemp("molecule-" + scenario)
            log = tmp.parent / (tmp.name + ".log")
            env = {**os.environ, "VENV": str(BIN.parent), "TMPDIR": str(tmp),
                   "BULKHEAD_WHEELHOUSE": str(wheelhouse)}
            with open(log, "wb") as out:
                proc = subprocess.Popen([str(ROOT / "tests" / "run-molecule.sh"), scenario],
                                        env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            runs[scenario] = (proc, tmp, log, time.monotonic() + SCENARIO_SECONDS)
        yield runs
    finally:
        for scenario, run in runs.items():
            proc = run[0]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            lab_down(lab_name(ROOT / "molecule" / scenario))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(scenario, scenario_runs):
    """molecule test: converge, idempotence (a second converge changes nothing), verify
    (and a side effect where the scenario has one)."""
    lab = lab_name(ROOT / "molecule" / scenario)
    proc, tmp, log, deadline = scenario_runs[scenario]
    try:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail("%s still running after %d s:\n%s" % (
                scenario, SCENARIO_SECONDS, plain_text(log)[-20000:]))
        out = plain_text(log)
        assert proc.returncode == 0, out[-20000:]
        for step in steps(scenario):
            assert "[%s > %s] Executed: Successful" % (scenario, step) in out, out[-20000:]
        assert not leftovers_after(lab)  # molecule's own destroy step removed it all
    finally:
        lab_down(lab)
    assert not list(tmp.iterdir())  # run-molecule.sh's ephemeral dirs are gone


FAILING_CONVERGE = """\
- name: A step that fails after the lab is up
  hosts: all
  gather_facts: false
  tasks:
    - name: Fail in the machine
      ansible.builtin.command: systemctl start bulkhead-no-such-unit.service
      changed_when: true
"""


def test_a_failing_step_still_destroys(tmp_path):
    """A converge that fails: molecule test exits non-zero, and its destroy step has
    removed the lab all the same."""
    project = tmp_path / "project"
    (project / "molecule" / "failing").mkdir(parents=True)
    shutil.copy(ROOT / "molecule" / "config.yml", project / "molecule" / "config.yml")
    (project / "molecule" / "shared").symlink_to(ROOT / "molecule" / "shared")
    scenario = project / "molecule" / "failing"
    (scenario / "molecule.yml").write_text(
        "platforms:\n  - name: f1\nprovisioner:\n  name: ansible\n  inventory:\n"
        "    group_vars:\n      all:\n        bulkhead_lab_name: mfailing\n")
    (scenario / "converge.yml").write_text(FAILING_CONVERGE)
    lab = lab_name(scenario)
    env = {**os.environ, "BULKHEAD_CLI": str(BIN / "bulkhead"),
           "ANSIBLE_COLLECTIONS_PATH": os.environ["BULKHEAD_COLLECTIONS_PATH"],
           "ANSIBLE_HOME": str(tmp_path / "home"), "MOLECULE_GLOB": "molecule/*/molecule.yml",
           "MOLECULE_EPHEMERAL_DIRECTORY": str(tmp_path / "ephemeral"),
           "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "PATH": "%s:%s" % (BIN, os.environ.get("PATH", ""))}
    env.pop("ANSIBLE_PYTHON_INTERPRETER", None)
    try:
        done = subprocess.run([str(BIN / "molecule"), "--base-config", "molecule/config.yml",
                               "test", "-s", "failing"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        out = plain_output(done)
        assert done.returncode != 0, out[-20000:]
        assert "[failing > converge] Executed: Failed" in out, out[-20000:]
        assert "[failing > destroy] Executed: Successful" in out, out[-20000:]
        assert not leftovers_after(lab)
    finally:
        lab_down(lab)
