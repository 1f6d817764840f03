"""The running agent's mark in its state directory: an exclusive lock on `agent.lock`,
held by the daemon while it runs and released by the system when the process ends
(a crash included). `bulkhead-agent --release` refuses while another process holds it:
the running agent would put back, at its next drift repair, what the release removed,
and the list of what it set (HNS) would be gone. So do a second daemon and `--once`
(bulkhead.agent.daemon): two agents on one state directory would each put back their own
ruleset at every drift check. The holder writes its process id after the first byte
(which `msvcrt.locking` locks on Windows, where a locked byte cannot be read), so a
refusal can name it."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import IO

LOCK_FILE = "agent.lock"


class Held(Exception):
    """Another process holds the lock."""


def holder(path: Path) -> int | None:
    """The process id the holder of the lock file `path` wrote, None if unknown."""
    try:
        with open(path, "rb") as f:
            f.seek(1)
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def take(state_dir: str | Path, create: bool = True) -> IO[bytes] | None:
    """The lock, held until the file returned is closed (or the process ends). Raises
    Held when another process has it, OSError when the file cannot be made. Without
    `create`, None when there is no lock file (no agent ever ran there, so none holds
    it; a root `--release` then leaves no root-owned file the agent's user could not
    open)."""
    directory = Path(state_dir)
    if not create and not (directory / LOCK_FILE).exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    made = not path.exists()
    f = open(path, "a+b")  # noqa: SIM115 (held open: the lock lives with it)
    if made and sys.platform != "win32" and os.geteuid() == 0:
        # Made by root (`--once` by hand): the directory's owner, the agent's user, must
        # still open it, or the daemon would run without its lock.
        with contextlib.suppress(OSError):
            owner = directory.stat()
            os.chown(path, owner.st_uid, owner.st_gid)
    try:
        if sys.platform == "win32":
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        # flock: EWOULDBLOCK; msvcrt.locking: EACCES, or EDEADLOCK after its retries
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", None)):
            pid = holder(directory / LOCK_FILE)
            by = f" (process {pid})" if pid is not None else ""
            raise Held(f"{directory / LOCK_FILE} is held by a running agent{by}") from None
        raise
    with contextlib.suppress(OSError):   # only informative: the lock is what counts
        f.truncate(0)
        f.write(f"\n{os.getpid()}\n".encode("ascii"))   # appended ("a"): after byte 0
        f.flush()
    return f
