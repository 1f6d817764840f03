"""Thin helpers over iproute2 and /proc for the lab: run `ip` (one command or a batch,
in the root namespace or in a named one), list namespaces and links, find and stop the
processes living in a namespace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
IP_TIMEOUT = 30.0


class LabError(RuntimeError):
    """A lab operation failed; the message says what and how to clean up."""


def ip(*args: str, ns: str | None = None, batch: Sequence[str] | None = None,
       force: bool = False, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n NS] ARGS`, or `ip [-n NS] [-force] -batch -` fed the `batch` lines."""
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if batch is not None:
        argv += (["-force"] if force else []) + ["-batch", "-"]
    argv += list(args)
    text = "".join(line + "\n" for line in batch) if batch is not None else None
    try:
        done = subprocess.run(argv, input=text, capture_output=True, text=True,
                              timeout=IP_TIMEOUT, check=False)
    except FileNotFoundError:
        raise LabError("`ip` is not installed (Debian package iproute2)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {IP_TIMEOUT:.0f} s") from None
    if check and done.returncode != 0:
        where = f" in namespace {ns}" if ns else ""
        detail = (done.stderr or done.stdout).strip()
        lines = f" (batch: {'; '.join(batch)})" if batch is not None else ""
        raise LabError(f"{' '.join(argv)}{where} failed: {detail}{lines}")
    return done


def ip_batches(batches: Iterable[tuple[str | None, Sequence[str]]]) -> None:
    """Run several `ip -batch` jobs (namespace, lines) at once; raise on the first failure
    after all have finished."""
    running: list[tuple[str | None, Sequence[str], subprocess.Popen[str]]] = []
    for ns, lines in batches:
        argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
        # stdout is not needed; stderr of a batch is a few lines, well under a pipe's
        # buffer, so it is read after the process ends.
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write("".join(line + "\n" for line in lines))
        proc.stdin.close()
        running.append((ns, lines, proc))
    errors = []
    for ns, lines, proc in running:
        assert proc.stderr is not None
        try:
            proc.wait(timeout=IP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            errors.append(f"ip -n {ns} -batch timed out")
            continue
        finally:
            err = proc.stderr.read()
            proc.stderr.close()
        if proc.returncode != 0:
            errors.append(f"ip -n {ns} -batch failed: {err.strip()} (batch: {'; '.join(lines)})")
    if errors:
        raise LabError("; ".join(errors))


def netns_names() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def root_links(kind: str | None = None) -> list[dict[str, Any]]:
    args = ["-j", "link", "show"] + (["type", kind] if kind else [])
    out = ip(*args).stdout.strip()
    links: list[dict[str, Any]] = json.loads(out) if out else []
    return links


def root_addresses() -> list[str]:
    """Every address/prefix configured in the root namespace."""
    out = ip("-j", "addr", "show").stdout.strip()
    found = []
    for link in json.loads(out) if out else []:
        for info in link.get("addr_info", []):
            found.append(f"{info['local']}/{info['prefixlen']}")
    return found


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


def stop_processes(targets: dict[int, int | None], grace: float = 2.0) -> list[int]:
    """SIGTERM each pid (-> start time, or None), SIGKILL what is left after `grace`
    seconds; returns the pids still alive after that (normally none)."""
    live = {pid: start for pid, start in targets.items()
            if pid != os.getpid() and alive(pid, start)}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            for pid in list(live):
                # A zombie counts as gone: its parent (maybe a Popen) reaps it.
                if not alive(pid, live[pid]):
                    del live[pid]
            if live:
                time.sleep(0.01)
        if not live:
            break
    return sorted(live)
