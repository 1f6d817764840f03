"""A lab's state file, ``/run/bulkhead-lab/NAME/state.json``: its layout (nets, uplink,
host addresses), its owner process, and the processes it started (host daemons and
spawned ones), so that any process can load, inspect or remove the lab.

The owner is the process the lab belongs to: a sweep keeps the labs of live owners.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from bulkhead.lab.names import STATE_ROOT, state_dir
from bulkhead.lab.processes import alive, process_start

VERSION = 1
_write_lock = threading.Lock()


def read(name: str) -> dict[str, Any] | None:
    """Lab `name`'s state, None when there is no readable state file."""
    try:
        data: dict[str, Any] = json.loads((state_dir(name) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def write(name: str, data: Mapping[str, Any]) -> None:
    """Replace lab `name`'s state file at once (readers see the old or the new one),
    stamped with the version and the owner."""
    directory = state_dir(name)
    stamped = {"version": VERSION, **data, "owner": owner()}
    with _write_lock:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".state.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps(stamped, indent=2) + "\n")
        tmp.replace(directory / "state.json")


def owner() -> dict[str, int | None]:
    """This process, or BULKHEAD_LAB_OWNER (e.g. a test session driving the CLI)."""
    pid = int(os.environ.get("BULKHEAD_LAB_OWNER") or os.getpid())
    return {"pid": pid, "start": process_start(pid)}


def owned_by_another(data: Mapping[str, Any]) -> bool:
    """Whether the state names a live owner other than this process."""
    found = data.get("owner") or {}
    pid = found.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and alive(pid, found.get("start"))


def tracked(data: Mapping[str, Any]) -> dict[int, int | None]:
    """The processes the state tracks (host daemons, spawned): pid -> start time."""
    entries = [*data.get("hostd", {}).values(), *data.get("spawned", [])]
    return {int(e["pid"]): e.get("start") for e in entries}


@contextlib.contextmanager
def pool_lock() -> Iterator[None]:
    """Serialises uplink allocation between processes building labs at the same time."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
