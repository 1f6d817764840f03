"""The running agent's mark in its state directory: an exclusive lock on `agent.lock`,
held by the daemon while it runs and released by the system when the process ends
(a crash included). `bulkhead-agent --release` refuses while another process holds it:
the running agent would put back, at its next drift repair, what the release removed,
and the list of what it set (HNS) would be gone."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import IO

LOCK_FILE = "agent.lock"


class Held(Exception):
    """Another process holds the lock."""


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
    f = open(directory / LOCK_FILE, "a+b")  # noqa: SIM115 (held open: the lock lives with it)
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
            raise Held(f"{directory / LOCK_FILE} is held by a running agent") from None
        raise
    return f
