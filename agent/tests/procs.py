"""Stopping child processes one way for the tests and the benchmarks: SIGTERM, a grace
period, then SIGKILL, and always reaped."""

from __future__ import annotations

import subprocess
import time
from typing import Any


def stop(*procs: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM every process still running, give them `grace` seconds together, then
    SIGKILL those left; each is reaped before this returns."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
