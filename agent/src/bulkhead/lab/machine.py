"""Lab machines: a lab host that boots systemd as PID 1 in its network namespace.

A machine is the host's network namespace (addresses as the lab set them) plus its own
PID, mount, UTS, IPC and cgroup namespaces; its root is an overlayfs whose lower layer
is the machine's `/` and whose upper layer is ``/run/bulkhead-lab/LAB/machines/HOST/upper``
(so /etc, /opt, /var are its own, and the host's files, Python and checkouts are seen
as they are). /proc, /sys (read-only), a cgroup2 subtree of its own, /dev (a tmpfs with
the usual nodes), /run and /tmp are fresh mounts. All mounts live in the machine's
private mount namespace: nothing is mounted in the root namespace, and they go away
with the machine's last process.

`boot` starts machines and waits until systemd says `running`; `stop` sends SIGRTMIN+3
(systemd's "halt" in a container), waits, kills what is left through the machine's
cgroup, removes the cgroup and the machine's directory. `stop_leftovers` does the same
for a lab by name (after a crash: from the state file and the cgroup names).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bulkhead.lab.kernel import NETNS_DIR, LabError
from bulkhead.lab.names import machine_cgroup, machine_cgroup_prefix, state_dir
from bulkhead.lab.processes import KILL_WAIT, alive, log_tail, process_start

CONTAINER = "bulkhead-lab"          # $container for systemd: it knows it is in one
SYSTEMD = "/lib/systemd/systemd"
BOOT_TIMEOUT = 60.0
HALT_TIMEOUT = 10.0
ENTER = ("--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup")
# `sh -c JOIN_CGROUP CGROUP ARGV...`: moves itself into the machine's cgroup, then execs ARGV
JOIN_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
# A command in a machine starts from this environment, not the caller's (whose PATH,
# PYTHONPATH or virtualenv mean nothing to the machine's systemd and units).
ENVIRONMENT = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/sh", "LANG=C.UTF-8")

# Units that must not run in a lab machine, besides every unit the machine's own
# /etc/systemd/system enables (the host's services: databases, timers, gettys):
MASKED = (
    # no consoles: a machine is entered with `bulkhead lab exec` / nsenter
    "getty@.service", "serial-getty@.service", "console-getty.service",
    "container-getty@.service",
    # the lab owns the addressing of eth0; DNS is not part of a lab
    "systemd-networkd.service", "systemd-networkd.socket",
    "systemd-networkd-wait-online.service", "systemd-resolved.service",
    "networking.service", "ifup@.service", "NetworkManager.service",
    # the clock is the host's (and CAP_SYS_TIME is dropped)
    "systemd-timesyncd.service",
)

# Capabilities the machine's bounding set drops: what reaches past its namespaces into
# the host kernel (modules, clock, raw I/O, the kernel log). The rest (CAP_NET_ADMIN,
# CAP_SYS_ADMIN for the mount namespaces of hardened units, ...) stays.
DROPPED_CAPS = ("sys_module", "sys_time", "sys_rawio", "syslog", "wake_alarm",
                "block_suspend")

# Runs as PID 1 of the new PID namespace, in the new mount namespace: builds the root
# and execs systemd. $1 the machine dir (upper, work, root), $2 the host name.
INIT = r"""
set -eu
D=$1 R=$1/root
mount -t overlay -o lowerdir=/,upperdir="$D/upper",workdir="$D/work" bhl-machine "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount --bind "$R/proc/sys/net" "$R/proc/sys/net"
mount -o remount,bind,rw "$R/proc/sys/net"
if [ -e "$R/proc/sysrq-trigger" ]; then
  mount --bind "$R/proc/sysrq-trigger" "$R/proc/sysrq-trigger"
  mount -o remount,bind,ro "$R/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid,size=16m dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mkdir -m 755 "$R/dev/net" "$R/dev/pts"
mkdir -m 1777 "$R/dev/shm"
mknod -m 666 "$R/dev/net/tun" c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5,nosuid,noexec devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
hostname "$2"
cd "$R"
pivot_root . .
umount -l .
cd /
exec setpriv --bounding-set "$3" env -i container="$4" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  "$5"
"""


@dataclass(frozen=True)
class Machine:
    """A booted lab machine as the lab's state file keeps it. `pid` is its systemd (PID
    1 inside) as seen from the root namespace; `launcher` the `unshare` waiting for it."""

    host: str
    pid: int
    start: int | None
    launcher: int
    launcher_start: int | None
    cgroup: str      # its cgroup2 directory, on this side
    dir: str         # upper, work, root mount point, console.log

    def dump(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Machine:
        return cls(str(data["host"]), int(data["pid"]), data.get("start"),
                   int(data["launcher"]), data.get("launcher_start"), str(data["cgroup"]),
                   str(data["dir"]))

    @property
    def alive(self) -> bool:
        return alive(self.pid, self.start)

    def enter(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` in this machine: in its cgroup, in every
        namespace of its PID 1, with ENVIRONMENT (and the caller's TERM)."""
        if not argv:
            raise ValueError("no command given")
        term = [f"TERM={os.environ['TERM']}"] if "TERM" in os.environ else []
        return ["/bin/sh", "-c", JOIN_CGROUP, self.cgroup,
                "nsenter", f"--target={self.pid}", *ENTER, "--",
                "/usr/bin/env", "-i", *ENVIRONMENT, *term, *argv]

    def run(self, argv: Sequence[str], *, check: bool = False, timeout: float | None = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.enter(argv), capture_output=True, text=True, check=check,
                              timeout=timeout, input=input)


def machines_dir(lab: str) -> Path:
    return state_dir(lab) / "machines"


def cgroup2_root() -> Path:
    """Where the unified cgroup hierarchy is mounted here (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid machine)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split(" ", 1)[0] == "cgroup2":
                return Path(before.split()[4])
    raise LabError("no cgroup2 hierarchy is mounted (lab machines need one)")


def masked_units(etc: Path = Path("/etc/systemd/system")) -> list[str]:
    """MASKED plus every unit enabled in `etc` (the *.wants and *.requires links)."""
    found = set(MASKED)
    for wants in [*etc.glob("*.wants"), *etc.glob("*.requires")]:
        found.update(p.name for p in wants.iterdir() if p.name.endswith(
            (".service", ".timer", ".socket", ".path")))
    return sorted(found)


def _upper_dir(upper: Path, rel: str) -> Path:
    """`upper/rel`, made with the owner and mode of `/rel` (the lower layer's), so the
    merged directory looks like the host's."""
    path = upper
    lower = Path("/")
    for part in Path(rel).parts:
        path, lower = path / part, lower / part
        if not path.exists():
            path.mkdir()
            with contextlib.suppress(OSError):
                st = lower.stat()
                os.chown(path, st.st_uid, st.st_gid)
                path.chmod(st.st_mode & 0o7777)
    return path


def prepare(lab: str, host: str) -> Path:
    """A fresh machine dir for `host`, its upper layer seeded: hostname, machine-id, masks."""
    mdir = machines_dir(lab) / host
    if mdir.exists():
        shutil.rmtree(mdir)
    for sub in ("upper", "work", "root"):
        (mdir / sub).mkdir(parents=True)
    mdir.chmod(0o700)
    upper = mdir / "upper"
    etc = _upper_dir(upper, "etc")
    (etc / "hostname").write_text(host + "\n")
    (etc / "machine-id").write_text(secrets.token_hex(16) + "\n")
    (etc / "machine-id").chmod(0o444)
    units = _upper_dir(upper, "etc/systemd/system")
    for unit in masked_units():
        (units / unit).symlink_to("/dev/null")
    return mdir


def launch(lab: str, host: str, ns: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start booting `host` in network namespace `ns`; returns the launcher, the machine
    dir and the cgroup (not waited for: see `wait_booted`)."""
    mdir = prepare(lab, host)
    cgroup = cgroup2_root() / machine_cgroup(lab, host)
    cgroup.mkdir(exist_ok=True)
    argv = ["/bin/sh", "-c", JOIN_CGROUP, str(cgroup),
            "nsenter", f"--net={NETNS_DIR / ns}",
            "unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--cgroup",
            "--propagation", "private", "--",
            "/bin/sh", "-c", INIT, "bulkhead-machine", str(mdir), host,
            ",".join(f"-{c}" for c in DROPPED_CAPS), CONTAINER, SYSTEMD]
    with open(mdir / "console.log", "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, mdir, cgroup


def _child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def wait_booted(host: str, proc: subprocess.Popen[bytes], mdir: Path, cgroup: Path,
                timeout: float = BOOT_TIMEOUT) -> Machine:
    """Wait until `host`'s systemd is PID 1 and `systemctl is-system-running` says
    `running`; LabError (with the failed units, or the console) otherwise."""
    deadline = time.monotonic() + timeout
    machine: Machine | None = None
    said = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"lab machine {host} did not boot (exit {proc.returncode}): "
                           f"{log_tail(mdir / 'console.log')}")
        if machine is None:
            pid = _child(proc.pid)
            if pid is not None and _comm(pid) == "systemd":
                machine = Machine(host, pid, process_start(pid), proc.pid,
                                  process_start(proc.pid), str(cgroup), str(mdir))
        else:
            done = machine.run(["systemctl", "is-system-running"], timeout=10.0)
            said = done.stdout.strip()
            if said == "running":
                return machine
            if said == "degraded":
                failed = machine.run(["systemctl", "--failed", "--plain", "--no-legend",
                                      "--no-pager"], timeout=10.0).stdout.strip()
                raise LabError(f"lab machine {host} booted degraded; failed units:\n{failed}")
        time.sleep(0.1)
    jobs = machine.run(["systemctl", "list-jobs", "--no-pager"], timeout=10.0).stdout \
        if machine else log_tail(mdir / "console.log")
    raise LabError(f"lab machine {host} not running after {timeout:.0f} s "
                   f"(systemd says {said or 'nothing yet'}):\n{jobs}")


Launched = Callable[[str, "subprocess.Popen[bytes]", Path, Path], None]


def boot(lab: str, hosts: Mapping[str, str], timeout: float = BOOT_TIMEOUT,
         on_launch: Launched | None = None) -> dict[str, Machine]:
    """Boot machines {host: netns} at once and wait for all. `on_launch(host, proc,
    cgroup, dir)` is called as each starts (to record it before waiting). On failure
    the machines started here are stopped again."""
    started: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
    try:
        for host, ns in hosts.items():
            started[host] = launch(lab, host, ns)
            if on_launch is not None:
                on_launch(host, *started[host])
        return {host: wait_booted(host, *started[host], timeout=timeout)
                for host in started}
    except BaseException:
        for proc, mdir, cgroup in started.values():
            _halt(None, cgroup, grace=0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_WAIT)
            shutil.rmtree(mdir, ignore_errors=True)
        raise


def _procs(cgroup: Path) -> list[int]:
    pids: list[int] = []
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(p) for p in procs.read_text().split()]
    return pids


def _kill_cgroup(cgroup: Path) -> None:
    """SIGKILL the machine's processes, its `unshare` launcher last (so that it, not the
    root namespace's init, reaps the machine's PID 1)."""
    if not cgroup.is_dir():
        return
    inside = [p for p in _procs(cgroup) if _comm(p) != "unshare"]
    for pid in inside:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT   # the launcher returns once PID 1 is reaped
    while inside and _procs(cgroup) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        (cgroup / "cgroup.kill").write_text("1")
    except OSError:   # before Linux 5.14
        for pid in _procs(cgroup):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _remove_cgroup(cgroup: Path) -> bool:
    """rmdir the cgroup and its children, deepest first; False if it could not."""
    if not cgroup.is_dir():
        return True
    deadline = time.monotonic() + KILL_WAIT
    while True:
        with contextlib.suppress(OSError):
            for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            cgroup.rmdir()
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _halt(machine: Machine | None, cgroup: Path, grace: float = HALT_TIMEOUT) -> list[str]:
    """Stop one machine; returns problems (empty when all went)."""
    if machine is not None and machine.alive and grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(machine.pid, signal.SIGRTMIN + 3)
        deadline = time.monotonic() + grace
        while machine.alive and time.monotonic() < deadline:
            time.sleep(0.05)
    _kill_cgroup(cgroup)
    deadline = time.monotonic() + KILL_WAIT
    while _procs(cgroup) and time.monotonic() < deadline:
        time.sleep(0.02)
    problems = []
    left = _procs(cgroup)
    if left:
        problems.append(f"processes {left} of cgroup {cgroup} did not stop")
    elif not _remove_cgroup(cgroup):
        problems.append(f"cgroup {cgroup} could not be removed")
    return problems


def stop(machine: Machine, grace: float = HALT_TIMEOUT) -> None:
    """Shut `machine` down (SIGRTMIN+3, at most `grace` s, then SIGKILL to its cgroup),
    remove its cgroup and directory."""
    problems = _halt(machine, Path(machine.cgroup), grace)
    shutil.rmtree(machine.dir, ignore_errors=True)
    if problems:
        raise LabError(f"lab machine {machine.host}: {'; '.join(problems)}")


def stop_leftovers(lab: str, recorded: Iterable[Mapping[str, Any]] = ()) -> list[str]:
    """Stop every machine of lab `lab`: those `recorded` in its state (cleanly), then any
    cgroup named after the lab (a crash before the state was written); returns problems."""
    problems: list[str] = []
    done: set[str] = set()
    for data in recorded:
        machine = Machine.load(data)
        done.add(machine.cgroup)
        try:
            stop(machine)
        except LabError as e:
            problems.append(str(e))
    with contextlib.suppress(LabError):
        root = cgroup2_root()
        for cgroup in root.glob(machine_cgroup_prefix(lab) + "*"):
            if str(cgroup) not in done:
                problems += _halt(None, cgroup, grace=0)
    shutil.rmtree(machines_dir(lab), ignore_errors=True)
    return problems
