"""Labs in the kernel: build a lab's namespaces, veths, bridge and uplink from its layout,
change host addresses, find the labs on this machine and remove them (see names.py for
what is named how)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence

from bulkhead.lab import machine, state
from bulkhead.lab.kernel import (
    IP_TIMEOUT,
    LabError,
    ip,
    ip_batches,
    netns_names,
    root_addresses,
    root_links,
)
from bulkhead.lab.layout import UPLINK_POOL, Layout
from bulkhead.lab.names import (
    NAME_RE,
    STATE_ROOT,
    check_name,
    lab_of_namespace,
    lab_of_uplink,
    namespace_prefix,
    state_dir,
    uplink_ifname,
)
from bulkhead.lab.processes import pids_in, process_start, stop_processes

PORT_INDEX = 10
PORTS_TIMEOUT = 5.0


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces)")


def build(lab: Layout) -> None:
    """Create the namespaces, veth pairs, bridge, uplink and addresses of `lab`, whose
    uplink is allocated (`free_uplink`)."""
    if lab.uplink is None:
        raise LabError(f"lab {lab.name} has no uplink allocated")
    up = lab.uplink
    hosts = list(lab.hosts.values())
    sw = lab.switch_ns
    ip(batch=[f"netns add {sw}"] + [f"netns add {h.ns}" for h in hosts])
    # Both ends of a veth pair get distinct ifindexes (switch ports from 10, eth0 = 2,
    # up0 = 3): the kernel handles carrier changes of a device whose peer has its own
    # ifindex lazily (up to a second), and a bridge port stays "disabled" meanwhile.
    root = [f"link add name {h.port} index {PORT_INDEX + h.index} netns {sw} type veth "
            f"peer name eth0 index 2 netns {h.ns}" for h in hosts]
    root += [f"link add name {lab.uplink_ifname} type veth peer name up0 index 3 netns {sw}",
             f"address add {up[1]}/{up.prefixlen} dev {lab.uplink_ifname}",
             f"link set dev {lab.uplink_ifname} up"]
    ip(batch=root)
    mac = "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(lab.name.encode()).digest()[:5])
    switch = ["link set dev lo up",
              f"link add name br0 address {mac} type bridge forward_delay 0 mcast_snooping 0",
              "link set dev br0 up"]
    switch += [f"link set dev {h.port} master br0 up" for h in hosts]
    switch += [f"address add {lab.service_address}/{lab.net4.prefixlen} dev br0",
               f"address add {lab.service_address6}/{lab.net6.prefixlen} dev br0 nodad",
               f"address add {up[2]}/{up.prefixlen} dev up0",
               "link set dev up0 up"]
    batches: list[tuple[str | None, Sequence[str]]] = [(sw, switch)]
    for h in hosts:
        batches.append((h.ns, ["link set dev lo up", "link set dev eth0 up",
                               *_address_lines(h.interfaces)]))
    ip_batches(batches)


def wait_forwarding(lab: Layout) -> None:
    """Wait (at most PORTS_TIMEOUT s) until every bridge port forwards."""
    deadline = time.monotonic() + PORTS_TIMEOUT
    while True:
        done = subprocess.run(["bridge", "-netns", lab.switch_ns, "-j", "link", "show"],
                              capture_output=True, text=True, timeout=IP_TIMEOUT)
        states = [p.get("state") for p in json.loads(done.stdout or "[]")
                  if p.get("master") == "br0"]
        if len(states) == len(lab.hosts) and all(st == "forwarding" for st in states):
            return
        if time.monotonic() > deadline:
            raise LabError(f"bridge ports of lab {lab.name} not forwarding after "
                           f"{PORTS_TIMEOUT:.0f} s: {states}")
        time.sleep(0.02)


def move_addresses(lab: Layout, new: Mapping[str, Sequence[str]]) -> None:
    """Give hosts of a built lab their `new` interfaces; only what changes: an address
    that stays is never removed, so connections from it (an agent's to its server) live
    on. Every namespace of the lab forgets the neighbours of the addresses that moved, so
    a probe never goes to the old owner."""
    changed: set[str] = set()
    batches: list[tuple[str | None, Sequence[str]]] = []
    for name, ifaces in new.items():
        old = lab.hosts[name]
        changed |= set(old.addresses) ^ {i.split("/")[0] for i in ifaces}
        gone = [i for i in old.interfaces if i not in ifaces]
        batches.append((old.ns, [*(f"address del {i} dev eth0" for i in gone),
                                 *_address_lines(i for i in ifaces if i not in old.interfaces)]))
    ip_batches(batches)
    if changed:
        flush = [f"neigh flush to {a}" for a in sorted(changed)]
        ip_batches([(lab.switch_ns, flush), *((h.ns, flush) for h in lab.hosts.values())])


def _address_lines(interfaces: Iterable[str]) -> list[str]:
    return [f"address add {i} dev eth0" + (" nodad" if ":" in i else "") for i in interfaces]


def free_uplink() -> ipaddress.IPv4Network:
    """The first /30 of 198.19.254.0/24 that no root-namespace address and no lab uses
    (call under `state.pool_lock`, and save the lab's state before leaving it)."""
    used: list[ipaddress.IPv4Network] = []
    for text in root_addresses():
        iface = ipaddress.ip_interface(text)
        if isinstance(iface, ipaddress.IPv4Interface):
            used.append(iface.network)
    for name in list_labs():
        saved = state.read(name)
        if saved and saved.get("uplink"):
            used.append(ipaddress.IPv4Network(saved["uplink"]))
    for candidate in UPLINK_POOL.subnets(new_prefix=30):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise LabError(f"no free /30 left in {UPLINK_POOL} for a lab uplink; "
                   "`bulkhead lab down --all` removes old labs")


def list_labs() -> list[str]:
    """Names of the labs with anything left on this machine: namespaces, uplink or state."""
    names = {lab for lab in map(lab_of_namespace, netns_names()) if lab}
    with contextlib.suppress(LabError):
        links = (lab_of_uplink(str(link.get("ifname", ""))) for link in root_links("veth"))
        names.update(lab for lab in links if lab)
    if STATE_ROOT.is_dir():
        names.update(p.name for p in STATE_ROOT.iterdir()
                     if p.is_dir() and NAME_RE.match(p.name))
    return sorted(names)


def lab_namespaces(name: str) -> list[str]:
    return [ns for ns in netns_names() if ns.startswith(namespace_prefix(name))]


def _uplink_exists(name: str) -> bool:
    return any(link.get("ifname") == uplink_ifname(name) for link in root_links())


def teardown(name: str, extra_pids: Mapping[int, int | None] | None = None) -> None:
    """Remove every trace of lab `name`: shut its lab machines down, stop the processes in
    its namespaces (and the ones its state file tracks), delete the uplink, the namespaces
    and the state dir. Works on a half-built lab, and when nothing is left (then it does
    nothing)."""
    check_name(name)
    require_root()
    saved = state.read(name) or {}
    problems = machine.stop_leftovers(name, saved.get("machines", {}).values())
    namespaces = lab_namespaces(name)
    targets: dict[int, int | None] = {pid: process_start(pid) for pid in pids_in(namespaces)}
    for pid, start in [*state.tracked(saved).items(),
                       *(extra_pids or {}).items()]:
        targets.setdefault(pid, start)
    left = stop_processes(targets)
    if _uplink_exists(name):
        ip("link", "del", uplink_ifname(name), check=False)
    if namespaces:
        ip(batch=[f"netns del {ns}" for ns in namespaces], force=True, check=False)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    if left:
        problems.append(f"processes {left} did not stop")
    if lab_namespaces(name):
        problems.append(f"namespaces {lab_namespaces(name)} remain")
    if _uplink_exists(name):
        problems.append(f"link {uplink_ifname(name)} remains")
    if problems:
        raise LabError(f"lab {name} not fully removed: {'; '.join(problems)}")


def remove_all(prefix: str = "", *, include_live: bool = True) -> list[str]:
    """Remove every lab whose name starts with `prefix`; returns their names. With
    `include_live=False`, labs whose owner (the process that built them) is another live
    process are kept: a test session sweeps its own leftovers and those of crashed
    sessions, not the labs of a session running next to it."""
    removed = []
    for name in list_labs():
        if not name.startswith(prefix):
            continue
        if not include_live and state.owned_by_another(state.read(name) or {}):
            continue
        teardown(name)
        removed.append(name)
    return removed
