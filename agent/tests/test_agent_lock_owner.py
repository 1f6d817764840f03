"""The agent's lock file made by root (`bulkhead-agent --once` run by hand) belongs to
the state directory's owner, the agent's user: a root-owned file made the daemon's lock
fail to open, and the daemon ran without it (a second agent then went unrefused)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bulkhead.agent import lock
from tests.labfixture import need_root

NOBODY = 65534


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX owners")
def test_a_lock_file_made_by_root_is_the_state_directorys_owners() -> None:
    need_root()
    with tempfile.TemporaryDirectory(prefix="bulkhead-lock-") as top:
        Path(top).chmod(0o755)     # the agent's user reaches its state directory
        check(Path(top) / "state")


def check(state: Path) -> None:
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    held = lock.take(state)
    assert held is not None
    held.close()
    made = (state / lock.LOCK_FILE).stat()
    assert (made.st_uid, made.st_gid) == (NOBODY, NOBODY)
    # The agent's user takes it (it could not open a root-owned file: mode 0644).
    taken = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", "import sys; from bulkhead.agent import lock; "
         "f = lock.take(sys.argv[1]); print('held' if f else 'none')", str(state)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert taken.returncode == 0 and taken.stdout.strip() == "held", taken.stderr
