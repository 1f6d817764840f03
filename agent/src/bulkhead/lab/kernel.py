"""Thin helpers over iproute2 for the lab: run `ip` (one command or a batch, in the root
namespace or in a named one), list namespaces, links and addresses."""

from __future__ import annotations

import json
import subprocess
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
