"""Ports for the servers that tests, benchmarks and labs start on loopback."""

from __future__ import annotations

import os
import random
import re
import socket
from pathlib import Path

_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_share() -> tuple[int, int]:
    """(this pytest-xdist worker's number, how many workers), (0, 1) outside xdist."""
    found = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        count = 1
    if not found or count < 2:
        return 0, 1
    return int(found.group(1)) % count, count


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1, for a server started next.

    Below the kernel's ephemeral range: a port bind(0) hands out is one of that range,
    which the next outgoing connection (a client polling a server not ready yet) can
    take as its own before the server binds it, and the server then fails to start. Not
    one this process handed out before (two servers started before either binds), nor
    one another pytest-xdist worker could hand out (each takes the ports of its own
    remainder: worker N of K those with port % K == N)."""
    low = _ephemeral_low()
    first = max(10_000, low - 16_384)
    share, workers = _worker_share()
    for _ in range(1000):
        port = (random.randrange(first, low) // workers * workers + share
                if first + workers < low else 0)
        if port and port < first:
            port += workers   # rounded down below the range: the share's next one
        if port >= low:
            continue
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {first}-{low - 1}")
