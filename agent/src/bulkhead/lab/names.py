"""How everything a lab makes is named, from the lab's name alone.

So `teardown(NAME)` finds it all again from any process, with or without the state file,
even after a crash:

- namespace ``bhl-NAME-sw``: the switch; bridge ``br0`` with one port ``v<i>`` per host,
  the lab's service address on br0 (where bulkhead-server listens when run here), and
  ``up0``, the switch side of the uplink;
- namespace ``bhl-NAME-HOST`` per host: ``lo`` and ``eth0`` (the peer of ``v<i>``);
- ``bhl-NAME`` in the root namespace: the root side of the uplink;
- ``/run/bulkhead-lab/NAME/``: ``state.json``, the host daemons' sockets and logs;
- cgroup ``bhl-NAME-HOST`` at the root of the cgroup2 hierarchy: a lab machine (booting
  systemd, see machine.py), its upper layer in ``/run/bulkhead-lab/NAME/machines/HOST/``.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "bhl-"
SWITCH = "sw"
STATE_ROOT = Path("/run/bulkhead-lab")
NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"lab name {name!r}: 1-8 characters of [a-z0-9]")
    return name


def check_host_name(host: str) -> str:
    if not HOST_RE.match(host) or host == SWITCH:
        raise ValueError(f"lab host name {host!r}: 1-32 characters of [A-Za-z0-9_.-], "
                         f"starting with a letter or digit, and not {SWITCH!r}")
    return host


def state_dir(name: str) -> Path:
    return STATE_ROOT / name


def namespace(name: str, where: str) -> str:
    """The namespace of lab `name`'s host `where`, or of its switch for 'sw'."""
    return f"{namespace_prefix(name)}{where}"


def namespace_prefix(name: str) -> str:
    return f"{PREFIX}{name}-"


def uplink_ifname(name: str) -> str:
    return f"{PREFIX}{name}"


def lab_of_namespace(ns: str) -> str | None:
    """The lab a namespace belongs to, by its name; None for other namespaces."""
    if not ns.startswith(PREFIX):
        return None
    lab = ns[len(PREFIX):].split("-", 1)[0]
    return lab if NAME_RE.match(lab) else None


def lab_of_uplink(ifname: str) -> str | None:
    """The lab a root-namespace link is the uplink of; None for other links."""
    lab = ifname[len(PREFIX):]
    return lab if ifname.startswith(PREFIX) and NAME_RE.match(lab) else None


def machine_cgroup(name: str, host: str) -> str:
    """The cgroup2 directory (under the hierarchy's root) of lab `name`'s machine `host`."""
    return f"{machine_cgroup_prefix(name)}{host}"


def machine_cgroup_prefix(name: str) -> str:
    return f"{PREFIX}{name}-"
