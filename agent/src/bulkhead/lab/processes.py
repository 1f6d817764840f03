"""Processes in lab namespaces: run and start commands there (`ip netns exec`), find the
processes living in a namespace, and stop processes (SIGTERM, a grace period, SIGKILL:
the one place that does it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from bulkhead.lab.kernel import NETNS_DIR

KILL_WAIT = 2.0   # seconds for the kernel to finish off a SIGKILLed process


def in_namespace(ns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` in network namespace `ns`."""
    if not argv:
        raise ValueError("no command given")
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str, argv: Sequence[str], *, check: bool = False, timeout: float | None = 60.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` in namespace `ns` and wait; output captured as text."""
    return subprocess.run(in_namespace(ns, argv), capture_output=True, text=True,
                          check=check, timeout=timeout, input=input)


def spawn(ns: str, argv: Sequence[str], log_path: str | Path | None = None, *,
          env: Mapping[str, str] | None = None, cwd: str | None = None
          ) -> subprocess.Popen[bytes]:
    """Start `argv` in the background in namespace `ns`, in a session of its own, output
    appended to `log_path` (or dropped)."""
    with contextlib.ExitStack() as stack:
        out = (stack.enter_context(open(log_path, "ab")) if log_path is not None
               else subprocess.DEVNULL)
        return subprocess.Popen(in_namespace(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(env) if env is not None else None, cwd=cwd)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a process's log, for error messages."""
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of `pid`, None if it is gone or a zombie:
    with the pid it names one process, even if the pid is reused later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start: int | None) -> bool:
    now = process_start(pid)
    return now is not None and (start is None or now == start)


def pids_in(namespaces: Iterable[str]) -> list[int]:
    """The processes whose network namespace is one of `namespaces` (by name)."""
    wanted = set()
    for name in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in wanted:
            found.append(int(entry.name))
    return sorted(found)


def stop_processes(targets: Mapping[int, int | None], grace: float = 2.0, *,
                   kill: bool = False) -> list[int]:
    """SIGTERM each pid (-> start time, or None), SIGKILL what is left after `grace`
    seconds (`kill`: SIGKILL at once); returns the pids still alive after that (normally
    none). A zombie counts as stopped: its parent reaps it."""
    live = {pid: start for pid, start in targets.items()
            if pid != os.getpid() and alive(pid, start)}
    rounds = [(signal.SIGKILL, KILL_WAIT)]
    if not kill:
        rounds.insert(0, (signal.SIGTERM, grace))
    for sig, wait in rounds:
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            for pid in list(live):
                if not alive(pid, live[pid]):
                    del live[pid]
            if live:
                time.sleep(0.01)
        if not live:
            break
    return sorted(live)


def stop(proc: subprocess.Popen[bytes], grace: float = 2.0, *, kill: bool = False) -> None:
    """Stop a process this one started (as `stop_processes` does) and reap it."""
    if proc.poll() is not None:
        return  # reaped already: its pid may name another process by now
    stop_processes({proc.pid: process_start(proc.pid)}, grace, kill=kill)
    proc.wait(timeout=KILL_WAIT)
