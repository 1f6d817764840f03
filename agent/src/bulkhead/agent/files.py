"""Files the agent keeps in its state directory, written so that a crash or a power loss
at any moment leaves the old file or the new one, never part of one: a temporary file
beside it, written and flushed to the disk (fsync), renamed over the old one, and the
directory flushed so the rename lasts too.

On Windows a directory cannot be opened to be flushed (`os.open` refuses it with
PermissionError): NTFS journals the rename itself, so the directory flush is left out
there, and only there (`sync_directory`)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

WINDOWS = sys.platform == "win32"


def sync_directory(directory: Path) -> None:
    """Flush `directory`'s entries (a rename in it) to the disk; nothing on Windows."""
    if WINDOWS:
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` (see the module's docstring); raises OSError when the
    disk refuses, leaving the old file as it was and no temporary file behind."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_directory(directory)
