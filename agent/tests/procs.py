"""Processes and ports, one way for the tests and the benchmarks: stopping children
(SIGTERM, a grace period, then SIGKILL, always reaped), a free port on loopback, a
benchmark's entry point that cleans up on SIGTERM, and Ctrl-C for a child as a terminal
gives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bulkhead.testbed.ports import free_port as free_port  # one for tests and labs


def ctrl_c_as_in_a_terminal() -> None:
    """A `preexec_fn` for a child that a test stops with SIGINT, as Ctrl-C in a terminal
    would: SIGINT back at its default in the child. A test run started in the background
    by a non-interactive shell (`make test &`, nohup, some CI runners) has SIGINT ignored,
    and a Python child then keeps it ignored instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)   # unwinds `with` and `finally`: labs and processes go


def run_main(main: Callable[[], int]) -> None:
    """A benchmark's `__main__`: unbuffered output, SIGTERM cleans up like Ctrl-C."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.exit(main())


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
