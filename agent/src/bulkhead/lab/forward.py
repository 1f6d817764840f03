"""Port forwards from the root namespace into a lab: a TCP port of the uplink's switch
address (`Layout.uplink_address`) led to a port of a lab host, so tools in the root
namespace (Ansible on the controller, the CLI) reach a server run in a lab machine.

The switch namespace does it with one nftables table, `ip bulkhead_lab_forward`: DNAT on
`up0` to the host's lab address, SNAT on `br0` to the lab's service address (the hosts
have no route to the uplink, and need none), and a filter on the forward hook that lets
only those connections cross `up0`. Routing (`net.ipv4.ip_forward`) is switched on in the
switch namespace only while a forward exists; without forwards nothing crosses the
uplink, as before. The table is rewritten whole from the list of forwards, atomically.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bulkhead.lab.kernel import IP_TIMEOUT, LabError
from bulkhead.lab.layout import Layout

TABLE = "bulkhead_lab_forward"
MAX_FORWARDS = 64
SPEC_RE = re.compile(r"^(\d{1,5})=([A-Za-z0-9][A-Za-z0-9_.-]{0,31})(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class Forward:
    port: int        # on the uplink's switch address
    host: str        # lab host
    host_port: int   # on the host's first IPv4 address

    def dump(self) -> dict[str, Any]:
        return asdict(self)


def parse(spec: str) -> Forward:
    """`PORT=HOST[:HOST_PORT]` (HOST_PORT defaults to PORT)."""
    m = SPEC_RE.match(spec)
    if m is None:
        raise LabError(f"forward {spec!r}: expected PORT=HOST[:HOST_PORT], "
                       "for example 7443=srv1 or 8443=srv1:7443")
    port, host, host_port = int(m[1]), m[2], int(m[3] or m[1])
    for what, value in (("port", port), ("host port", host_port)):
        if not 1 <= value <= 65535:
            raise LabError(f"forward {spec!r}: {what} {value} is not in 1-65535")
    return Forward(port, host, host_port)


def check(lab: Layout, forwards: Sequence[Forward]) -> None:
    """Every forward names a host of `lab`, and no port of the uplink is used twice."""
    if len(forwards) > MAX_FORWARDS:
        raise LabError(f"lab {lab.name}: {len(forwards)} forwards, at most {MAX_FORWARDS}")
    seen: dict[int, Forward] = {}
    for f in forwards:
        if f.host not in lab.hosts:
            raise LabError(f"forward {f.port}={f.host}: lab {lab.name} has no host {f.host} "
                           f"(hosts: {', '.join(lab.hosts)})")
        if not _ipv4(lab, f.host):
            raise LabError(f"forward {f.port}={f.host}: host {f.host} has no IPv4 address")
        other = seen.setdefault(f.port, f)
        if other != f:
            raise LabError(f"lab {lab.name}: uplink port {f.port} forwarded twice "
                           f"(to {other.host}:{other.host_port} and {f.host}:{f.host_port})")


def _ipv4(lab: Layout, host: str) -> str | None:
    return next((a for a in lab.hosts[host].addresses if ":" not in a), None)


def ruleset(lab: Layout, forwards: Sequence[Forward]) -> str:
    """The switch namespace's forward table for `forwards` (replacing any earlier one)."""
    # Only from the root namespace's end of the uplink: nothing routed in from elsewhere.
    dnat = [f'        iifname "up0" ip saddr {lab.uplink_root_address} '
            f"ip daddr {lab.uplink_address} tcp dport {f.port} "
            f"dnat to {_ipv4(lab, f.host)}:{f.host_port}" for f in forwards]
    return "\n".join([
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        *dnat,
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        f'        oifname "br0" ct status dnat snat to {lab.service_address}',
        "    }",
        "    chain crossing {",
        "        type filter hook forward priority filter; policy accept;",
        '        iifname "up0" ct status dnat accept',
        '        oifname "up0" ct status dnat accept',
        '        iifname "up0" counter drop',
        '        oifname "up0" counter drop',
        "    }",
        "}",
        "",
    ])


def apply(lab: Layout, forwards: Sequence[Forward]) -> None:
    """Make the switch namespace forward exactly `forwards` (none: table removed and
    routing off)."""
    check(lab, forwards)
    sw = lab.switch_ns
    if forwards:
        _run(["ip", "netns", "exec", sw, "nft", "-f", "-"], ruleset(lab, forwards))
        _run(["ip", "netns", "exec", sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    else:
        _run(["ip", "netns", "exec", sw, "sysctl", "-qw", "net.ipv4.ip_forward=0"])
        _run(["ip", "netns", "exec", sw, "nft", "-f", "-"],
             f"table ip {TABLE}\ndelete table ip {TABLE}\n")


def _run(argv: list[str], text: str | None = None) -> None:
    try:
        done = subprocess.run(argv, input=text, capture_output=True, text=True,
                              timeout=IP_TIMEOUT, check=False)
    except FileNotFoundError:
        raise LabError(f"`{argv[4]}` is not installed (Debian packages nftables, procps)"
                       ) from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)} did not finish within {IP_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
