"""Lab machines (bulkhead.lab.machine): lab hosts that boot systemd as PID 1. Two machines
boot to `running`, run a hardened unit, keep /etc of their own, reach each other over
the lab network; stopping them (and removing a crashed lab by name) leaves no process,
cgroup, mount, namespace or file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead.lab import STATE_ROOT, Lab, LabError, teardown
from bulkhead.lab.machine import MASKED, Machine, cgroup2_root, masked_units
from bulkhead.lab.processes import alive
from tests.labfixture import NEEDS_ROOT, LabFactory

root = pytest.mark.skipif(os.geteuid() != 0, reason=NEEDS_ROOT)
BIN = Path(sys.executable).parent
HARDENED = ["-p", "NoNewPrivileges=yes", "-p", "ProtectSystem=strict", "-p", "ProtectHome=yes",
            "-p", "PrivateTmp=yes", "-p", "CapabilityBoundingSet=CAP_NET_ADMIN",
            "-p", "AmbientCapabilities=CAP_NET_ADMIN", "-p", "User=nobody"]


def traces(lab: str, machines: list[Machine]) -> list[str]:
    """What is left of these machines of lab `lab`: processes, cgroups, mounts, files."""
    found = [f"pid {m.pid}" for m in machines if m.alive]
    found += [f"cgroup {m.cgroup}" for m in machines if Path(m.cgroup).exists()]
    found += [str(p) for p in cgroup2_root().glob(f"bhl-{lab}-*")]
    with open("/proc/self/mountinfo") as f:
        found += [line.strip() for line in f if str(STATE_ROOT / lab) in line]
    if (STATE_ROOT / lab).exists():
        found.append(str(STATE_ROOT / lab))
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    found += [line.split()[0] for line in netns.splitlines() if line.startswith(f"bhl-{lab}-")]
    return found


# -- without the kernel ---------------------------------------------------------------------

def test_masked_units_are_the_fixed_ones_and_what_the_host_enables(tmp_path: Path) -> None:
    (tmp_path / "multi-user.target.wants").mkdir()
    (tmp_path / "multi-user.target.wants" / "postgresql.service").symlink_to("/nowhere")
    (tmp_path / "timers.target.wants").mkdir()
    (tmp_path / "timers.target.wants" / "apt-daily.timer").symlink_to("/nowhere")
    (tmp_path / "multi-user.target.wants" / "remote-fs.target").symlink_to("/nowhere")
    units = masked_units(tmp_path)
    assert {"postgresql.service", "apt-daily.timer", *MASKED} == set(units)
    assert "remote-fs.target" not in units  # targets only group; they start nothing


def test_a_machine_is_entered_in_its_cgroup_and_every_namespace() -> None:
    m = Machine("h1", 4242, 7, 4241, 6, "/sys/fs/cgroup/bhl-t1-h1", "/run/x")
    argv = m.enter(["systemctl", "is-system-running"])
    assert argv[3] == "/sys/fs/cgroup/bhl-t1-h1"
    assert argv[4:12] == ["nsenter", "--target=4242", "--mount", "--uts", "--ipc", "--net",
                          "--pid", "--cgroup"]
    assert argv[12:15] == ["--", "/usr/bin/env", "-i"]
    assert argv[-2:] == ["systemctl", "is-system-running"]
    assert Machine.load(json.loads(json.dumps(m.dump()))) == m
    with pytest.raises(ValueError):
        m.enter([])


def test_machines_must_be_lab_hosts() -> None:
    with pytest.raises(LabError):
        Lab("t1", ["a", "b"], machines=["c"])
    assert Lab("t1", ["a", "b"], machines=True).machine_hosts == ["a", "b"]


# -- two machines ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(make_module_lab: LabFactory) -> Iterator[Lab]:
    yield make_module_lab(["m1", "m2"], machines=True)


@root
def test_machines_boot_systemd_to_running(pair: Lab) -> None:
    ids = set()
    for host in ("m1", "m2"):
        assert pair.status()["hosts"][host]["machine"]["state"] == "running"
        done = pair.run(host, ["sh", "-c", "cat /proc/1/comm; hostname; cat /etc/machine-id; "
                               "systemd-detect-virt; ip -br -4 addr show dev eth0"], check=True)
        comm, hostname, machine_id, virt, addr = done.stdout.splitlines()
        assert (comm, hostname, virt) == ("systemd", host, "container-other")
        assert pair.address(host) in addr
        ids.add(machine_id)
    assert len(ids) == 2
    # the host enables these; in a machine they are masked
    masked = pair.run("m1", ["systemctl", "is-enabled", "getty@tty1.service",
                             "systemd-networkd.service"]).stdout.split()
    assert masked == ["masked", "masked"]


@root
def test_a_hardened_unit_runs(pair: Lab) -> None:
    script = ("touch /etc/x 2>/dev/null && echo etc-writable || echo etc-read-only; "
              "touch /tmp/mine && ls /tmp; id -un; grep CapEff /proc/self/status; "
              "nft list tables >/dev/null && echo nft-ok")
    done = pair.run("m1", ["systemd-run", "--wait", "--pipe", "--quiet", *HARDENED,
                           "sh", "-c", script], check=True)
    assert done.stdout.split() == ["etc-read-only", "mine", "nobody", "CapEff:",
                                   "0000000000001000", "nft-ok"]
    assert "mine" not in pair.run("m1", ["ls", "/tmp"]).stdout  # PrivateTmp


@root
def test_machines_have_their_own_etc(pair: Lab) -> None:
    pair.run("m1", ["sh", "-c", "echo m1 > /etc/bulkhead-lab-test"], check=True)
    assert pair.run("m1", ["cat", "/etc/bulkhead-lab-test"]).stdout == "m1\n"
    assert pair.run("m2", ["test", "-e", "/etc/bulkhead-lab-test"]).returncode == 1
    assert not Path("/etc/bulkhead-lab-test").exists()
    # the host's files show through, read from the lower layer
    assert pair.run("m2", ["test", "-x", sys.executable]).returncode == 0


@root
def test_machines_reach_each_other_on_the_lab_network(pair: Lab) -> None:
    address = pair.address("m2")
    server = (f"import socket\ns = socket.create_server(({address!r}, 7000))\n"
              "c, peer = s.accept()\nc.sendall(('hello ' + peer[0]).encode())\n")
    pair.run("m2", ["systemd-run", "--unit=bhl-test-listener", "--collect", "-p",
                    "DynamicUser=yes", "python3", "-c", server], check=True)
    client = ("import socket, time\nfor _ in range(100):\n    try:\n"
              f"        c = socket.create_connection(({address!r}, 7000), timeout=2)\n"
              "        break\n    except ConnectionRefusedError:\n        time.sleep(0.05)\n"
              "print(c.recv(100).decode())\n")
    done = pair.run("m1", ["python3", "-c", client], check=True, timeout=20)
    assert done.stdout.strip() == f"hello {pair.address('m1')}"


@root
def test_exec_enters_the_machine(pair: Lab) -> None:
    env = {**os.environ, "BULKHEAD_LAB_OWNER": str(os.getpid())}
    done = subprocess.run([str(BIN / "bulkhead"), "lab", "exec", "--name", pair.name, "m2",
                           "--", "cat", "/proc/1/comm"], capture_output=True, text=True,
                          env=env, timeout=30, check=True)
    assert done.stdout == "systemd\n"
    status = subprocess.run([str(BIN / "bulkhead"), "lab", "status", "--name", pair.name],
                            capture_output=True, text=True, env=env, timeout=30, check=True)
    assert "m1" in status.stdout and "running" in status.stdout


# -- stopping -------------------------------------------------------------------------------

@root
def test_down_stops_machines_and_leaves_nothing(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b"], machines=["b"])
    booted = lab.machine("b")
    assert booted is not None and lab.machine("a") is None
    assert lab.run("b", ["systemctl", "is-system-running"]).stdout.strip() == "running"
    lab.stop_machine("b")                  # SIGRTMIN+3: a clean halt
    assert lab.machine("b") is None
    assert not booted.alive and not Path(booted.dir).exists()
    assert lab.run("b", ["cat", "/proc/1/comm"]).stdout != "systemd\n"
    lab.boot_machines(["b"])
    again = lab.machine("b")
    assert again is not None and again.pid != booted.pid
    lab.down()
    assert traces(lab.name, [booted, again]) == []


@root
def test_a_crashed_lab_is_removed_by_name(make_lab: LabFactory) -> None:
    lab = make_lab(["a"], machines=True)
    booted = lab.machine("a")
    assert booted is not None
    (STATE_ROOT / lab.name / "state.json").unlink()   # as if the owner died mid-way
    teardown(lab.name)                                 # finds the machine by its cgroup
    assert traces(lab.name, [booted]) == []
    assert not alive(booted.launcher, booted.launcher_start)
