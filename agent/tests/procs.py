"""Processes and ports, one way for the tests and the benchmarks: stopping children
(SIGTERM, a grace period, then SIGKILL, always reaped), a free port on loopback, a
benchmark's entry point that cleans up on SIGTERM, and Ctrl-C for a child as a terminal
gives it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1, for a server started next.

    Below the kernel's ephemeral range: a port bind(0) hands out is one of that range,
    which the next outgoing connection (a client polling a server not ready yet) can
    take as its own before the server binds it, and the server then fails to start. Not
    one this process handed out before (two servers started before either binds)."""
    low = _ephemeral_low()
    first = max(10_000, low - 16_384)
    for _ in range(1000):
        port = random.randrange(first, low) if first < low else 0
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {first}-{low - 1}")


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
