"""The lab: hosts as network namespaces on a bridge, built and removed by name.

Everything a lab named NAME makes is named from NAME, so `teardown(NAME)` finds it all
again from any process, with or without the state file, even after a crash:

- namespace ``bhl-NAME-sw``: the switch; bridge ``br0`` with one port ``v<i>`` per host,
  the lab's service address on br0 (where bulkhead-server listens when run here), and
  ``up0``, the switch side of the uplink;
- namespace ``bhl-NAME-HOST`` per host: ``lo`` and ``eth0`` (the peer of ``v<i>``);
- ``bhl-NAME`` in the root namespace: the root side of the uplink, with a /30 taken from
  198.19.254.0/24, so tools in the root namespace reach the switch namespace (and only
  it: the lab nets are not routed into the root namespace);
- ``/run/bulkhead-lab/NAME/``: ``state.json``, the host daemons' sockets and logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import bulkhead
from bulkhead.lab.kernel import (
    LabError,
    alive,
    ip,
    ip_batches,
    netns_names,
    pids_in,
    process_start,
    root_addresses,
    root_links,
    stop_processes,
)
from bulkhead.lab.probe import DEFAULT_TIMEOUT, Outcome, ProbeResult, ProbeSpec

PREFIX = "bhl-"
SWITCH = "sw"
STATE_ROOT = Path("/run/bulkhead-lab")
DEFAULT_NET4 = "198.18.0.0/15"
DEFAULT_NET6 = "2001:2::/64"
LAB_NET4 = ipaddress.IPv4Network("198.18.0.0/15")
LAB_NET6 = ipaddress.IPv6Network("2001:2::/48")
UPLINK_POOL = ipaddress.IPv4Network("198.19.254.0/24")
FIRST_HOST = 10
PORT_INDEX = 10
MAX_HOSTS = 1000
HOSTD_START_TIMEOUT = 15.0
PORTS_TIMEOUT = 5.0
IP_TIMEOUT_S = 30.0
REQUEST_SLACK = 10.0
NAME_RE = re.compile(r"^[a-z0-9]{1,8}$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
STATE_VERSION = 1

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


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


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces)")


def _auto_ip4(net: ipaddress.IPv4Network, index: int) -> ipaddress.IPv4Address:
    return net[FIRST_HOST + index]


def _auto_ip6(net: ipaddress.IPv6Network, index: int) -> ipaddress.IPv6Address:
    # The decimal host number read as hex: 198.18.0.10 <-> 2001:2::10, .11 <-> ::11.
    return net[int(str(FIRST_HOST + index), 16)]


@dataclass(frozen=True)
class LabHost:
    """One lab host: its namespace, its port on the bridge, its addresses."""

    name: str
    index: int
    ns: str
    port: str
    interfaces: tuple[str, ...]  # "198.18.0.10/15", "2001:2::10/64"
    socket: str

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(i.split("/")[0] for i in self.interfaces)

    @property
    def ipv4(self) -> str | None:
        return next((a for a in self.addresses if ":" not in a), None)

    @property
    def ipv6(self) -> str | None:
        return next((a for a in self.addresses if ":" in a), None)


def _read_state(name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state_dir(name) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data


@contextlib.contextmanager
def _pool_lock() -> Iterator[None]:
    """Serialises uplink allocation between processes building labs at the same time."""
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_uplink() -> ipaddress.IPv4Network:
    """The first /30 of 198.19.254.0/24 that no root-namespace address and no lab uses."""
    used: list[ipaddress.IPv4Network] = []
    for text in root_addresses():
        iface = ipaddress.ip_interface(text)
        if isinstance(iface, ipaddress.IPv4Interface):
            used.append(iface.network)
    for name in list_labs():
        state = _read_state(name)
        if state and state.get("uplink"):
            used.append(ipaddress.IPv4Network(state["uplink"]))
    for candidate in UPLINK_POOL.subnets(new_prefix=30):
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise LabError(f"no free /30 left in {UPLINK_POOL} for a lab uplink; "
                   "`bulkhead lab down --all` removes old labs")


def list_labs() -> list[str]:
    """Names of the labs with anything left on this machine: namespaces, uplink or state."""
    names: set[str] = set()
    for ns in netns_names():
        if ns.startswith(PREFIX):
            lab = ns[len(PREFIX):].split("-", 1)[0]
            if NAME_RE.match(lab):
                names.add(lab)
    with contextlib.suppress(LabError):
        for link in root_links("veth"):
            ifname = str(link.get("ifname", ""))
            if ifname.startswith(PREFIX) and NAME_RE.match(ifname[len(PREFIX):]):
                names.add(ifname[len(PREFIX):])
    if STATE_ROOT.is_dir():
        names.update(p.name for p in STATE_ROOT.iterdir() if p.is_dir() and NAME_RE.match(p.name))
    return sorted(names)


def _lab_namespaces(name: str) -> list[str]:
    prefix = f"{PREFIX}{name}-"
    return [ns for ns in netns_names() if ns.startswith(prefix)]


def _uplink_exists(name: str) -> bool:
    return any(link.get("ifname") == f"{PREFIX}{name}" for link in root_links())


def teardown(name: str, extra_pids: Mapping[int, int | None] | None = None) -> None:
    """Remove every trace of lab `name`: stop the processes in its namespaces (and the
    ones its state file tracks), delete the uplink, the namespaces and the state dir.
    Works on a half-built lab, and when nothing is left (then it does nothing)."""
    check_name(name)
    _require_root()
    namespaces = _lab_namespaces(name)
    targets: dict[int, int | None] = {pid: process_start(pid) for pid in pids_in(namespaces)}
    state = _read_state(name) or {}
    for entry in [*state.get("hostd", {}).values(), *state.get("spawned", [])]:
        targets.setdefault(int(entry["pid"]), entry.get("start"))
    for pid, start in (extra_pids or {}).items():
        targets.setdefault(pid, start)
    left = stop_processes(targets)
    if _uplink_exists(name):
        ip("link", "del", f"{PREFIX}{name}", check=False)
    if namespaces:
        ip(batch=[f"netns del {ns}" for ns in namespaces], force=True, check=False)
    shutil.rmtree(state_dir(name), ignore_errors=True)
    problems = []
    if left:
        problems.append(f"processes {left} did not stop")
    if _lab_namespaces(name):
        problems.append(f"namespaces {_lab_namespaces(name)} remain")
    if _uplink_exists(name):
        problems.append(f"link {PREFIX}{name} remains")
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
        if not include_live:
            owner = (_read_state(name) or {}).get("owner") or {}
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and alive(pid, owner.get("start")):
                continue
        teardown(name)
        removed.append(name)
    return removed


class Lab:
    """A lab of `hosts` (names, or a count: h1..hN) on one bridge.

    `Lab(...)` only describes the lab; `up()` builds it (an existing lab of that name is
    removed first), `down()` removes it. `Lab.load(name)` gets a lab built by another
    process from its state file. Also a context manager: `with Lab("t1", 3) as lab: ...`.
    """

    def __init__(self, name: str = "demo", hosts: Sequence[str] | int = 2, *,
                 net4: str = DEFAULT_NET4, net6: str = DEFAULT_NET6) -> None:
        self.name = check_name(name)
        self.net4 = ipaddress.IPv4Network(net4)
        self.net6 = ipaddress.IPv6Network(net6)
        if not self.net4.subnet_of(LAB_NET4):
            raise ValueError(f"net4 {net4} is not inside {LAB_NET4}")
        if not self.net6.subnet_of(LAB_NET6):
            raise ValueError(f"net6 {net6} is not inside {LAB_NET6}")
        names = [f"h{i + 1}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= MAX_HOSTS:
            raise ValueError(f"a lab has 1-{MAX_HOSTS} hosts, not {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        if FIRST_HOST + len(names) >= self.net4.num_addresses - 2:
            raise ValueError(f"{len(names)} hosts do not fit in {self.net4}")
        self.hosts: dict[str, LabHost] = {}
        for index, host in enumerate(names):
            check_host_name(host)
            interfaces = (f"{_auto_ip4(self.net4, index)}/{self.net4.prefixlen}",
                          f"{_auto_ip6(self.net6, index)}/{self.net6.prefixlen}")
            self.hosts[host] = LabHost(host, index, f"{PREFIX}{name}-{host}", f"v{index}",
                                       interfaces, str(state_dir(name) / f"{host}.sock"))
        for info in self.hosts.values():
            self._check_interfaces(info.name, [ipaddress.ip_interface(i)
                                               for i in info.interfaces])
        self.uplink: ipaddress.IPv4Network | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._spawned: list[dict[str, Any]] = []
        self._hostd: dict[str, dict[str, Any]] = {}

    # -- names and addresses -------------------------------------------------------------

    @property
    def switch_ns(self) -> str:
        return f"{PREFIX}{self.name}-{SWITCH}"

    @property
    def uplink_ifname(self) -> str:
        return f"{PREFIX}{self.name}"

    @property
    def state_dir(self) -> Path:
        return state_dir(self.name)

    @property
    def service_address(self) -> str:
        """IPv4 service address on the switch's bridge: the last usable address of net4.
        Lab hosts reach a server run in the switch namespace here."""
        return str(self.net4[-2])

    @property
    def service_address6(self) -> str:
        """IPv6 service address on the switch's bridge: the last address of net6."""
        return str(self.net6[-1])

    def _uplink(self) -> ipaddress.IPv4Network:
        if self.uplink is None:
            raise LabError(f"lab {self.name} is not up")
        return self.uplink

    @property
    def uplink_address(self) -> str:
        """The switch side of the uplink: where root-namespace tools reach a server run
        in the switch namespace."""
        return str(self._uplink()[2])

    @property
    def uplink_root_address(self) -> str:
        """The root-namespace side of the uplink."""
        return str(self._uplink()[1])

    def host(self, name: str) -> LabHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"lab {self.name} has no host {name!r} "
                           f"(hosts: {', '.join(self.hosts)})") from None

    def address(self, host: str, family: Literal[4, 6] = 4) -> str:
        """`host`'s first address of that family."""
        found = self.host(host).ipv4 if family == 4 else self.host(host).ipv6
        if found is None:
            raise LabError(f"lab host {host} has no IPv{family} address")
        return found

    def ns(self, where: str) -> str:
        """The namespace of a host, or of the switch for 'sw'."""
        return self.switch_ns if where == SWITCH else self.host(where).ns

    def _check_interfaces(self, host: str, interfaces: Sequence[IPInterface]) -> None:
        reserved = {ipaddress.ip_address(self.service_address),
                    ipaddress.ip_address(self.service_address6)}
        for iface in interfaces:
            net = self.net4 if iface.version == 4 else self.net6
            if iface.ip not in net:
                raise ValueError(f"{host}: address {iface.ip} is outside the lab's net {net}")
            if iface.ip in reserved:
                raise ValueError(f"{host}: address {iface.ip} is the lab's service address")
            if iface.ip in UPLINK_POOL:
                raise ValueError(f"{host}: address {iface.ip} is in {UPLINK_POOL}, "
                                 "kept for lab uplinks")
            if iface.version == 4 and iface.ip in (iface.network.network_address,
                                                   iface.network.broadcast_address):
                raise ValueError(f"{host}: {iface.ip} is not a host address of "
                                 f"{iface.network}")

    # -- state ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        # The owner is the process the lab belongs to (a sweep keeps labs of live owners):
        # this one, or BULKHEAD_LAB_OWNER, e.g. a test session driving the CLI.
        me = int(os.environ.get("BULKHEAD_LAB_OWNER") or os.getpid())
        return {
            "version": STATE_VERSION, "name": self.name, "net4": str(self.net4),
            "net6": str(self.net6), "uplink": str(self.uplink) if self.uplink else None,
            "owner": {"pid": me, "start": process_start(me)},
            "hosts": [{"name": h.name, "interfaces": list(h.interfaces)}
                      for h in self.hosts.values()],
            "hostd": self._hostd, "spawned": self._spawned,
        }

    def _save(self) -> None:
        with self._lock:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / f".state.{os.getpid()}.{threading.get_ident()}"
            tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
            tmp.replace(self.state_dir / "state.json")

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab `name` as its state file describes it (built by any process)."""
        state = _read_state(check_name(name))
        if state is None:
            raise LabError(f"no lab named {name} ({state_dir(name)}/state.json is missing); "
                           "`bulkhead lab status` lists the labs")
        hosts = state["hosts"]
        lab = cls(name, [h["name"] for h in hosts], net4=state["net4"], net6=state["net6"])
        for h in hosts:
            lab.hosts[h["name"]] = replace(lab.hosts[h["name"]],
                                           interfaces=tuple(h["interfaces"]))
        lab.uplink = ipaddress.IPv4Network(state["uplink"]) if state.get("uplink") else None
        lab._hostd = dict(state.get("hostd", {}))
        lab._spawned = list(state.get("spawned", []))
        return lab

    @staticmethod
    def exists(name: str) -> bool:
        return check_name(name) in list_labs()

    # -- up and down ---------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab (removing any lab of this name first); returns self. On failure
        everything built so far is removed again and LabError says why."""
        _require_root()
        self.down()
        with _pool_lock():
            self.uplink = _free_uplink()
            self._save()  # from here on, `down` (or a sweep) finds the owner and uplink
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(LabError):
                self.down()
            raise
        return self

    def _build(self) -> None:
        hosts = list(self.hosts.values())
        sw = self.switch_ns
        up = self._uplink()
        ip(batch=[f"netns add {sw}"] + [f"netns add {h.ns}" for h in hosts])
        # Both ends of a veth pair get distinct ifindexes (switch ports from 10, eth0 = 2,
        # up0 = 3): the kernel handles carrier changes of a device whose peer has its own
        # ifindex lazily (up to a second), and a bridge port stays "disabled" meanwhile.
        root = [f"link add name {h.port} index {PORT_INDEX + h.index} netns {sw} type veth "
                f"peer name eth0 index 2 netns {h.ns}" for h in hosts]
        root += [f"link add name {self.uplink_ifname} type veth peer name up0 index 3 "
                 f"netns {sw}",
                 f"address add {up[1]}/{up.prefixlen} dev {self.uplink_ifname}",
                 f"link set dev {self.uplink_ifname} up"]
        ip(batch=root)
        mac = "02:" + ":".join(f"{b:02x}" for b in hashlib.sha256(self.name.encode()).digest()[:5])
        switch = ["link set dev lo up",
                  f"link add name br0 address {mac} type bridge forward_delay 0 "
                  "mcast_snooping 0",
                  "link set dev br0 up"]
        switch += [f"link set dev {h.port} master br0 up" for h in hosts]
        switch += [f"address add {self.service_address}/{self.net4.prefixlen} dev br0",
                   f"address add {self.service_address6}/{self.net6.prefixlen} dev br0 nodad",
                   f"address add {up[2]}/{up.prefixlen} dev up0",
                   "link set dev up0 up"]
        batches: list[tuple[str | None, Sequence[str]]] = [(sw, switch)]
        for h in hosts:
            batches.append((h.ns, ["link set dev lo up", "link set dev eth0 up",
                                   *_address_lines(h.interfaces)]))
        ip_batches(batches)
        self._start_hostd(hosts)
        self._wait_forwarding(len(hosts))
        self._save()

    def _wait_forwarding(self, ports: int) -> None:
        """Wait (at most PORTS_TIMEOUT s) until every bridge port forwards."""
        deadline = time.monotonic() + PORTS_TIMEOUT
        while True:
            done = subprocess.run(["bridge", "-netns", self.switch_ns, "-j", "link", "show"],
                                  capture_output=True, text=True, timeout=IP_TIMEOUT_S)
            states = [p.get("state") for p in json.loads(done.stdout or "[]")
                      if p.get("master") == "br0"]
            if len(states) == ports and all(st == "forwarding" for st in states):
                return
            if time.monotonic() > deadline:
                raise LabError(f"bridge ports of lab {self.name} not forwarding after "
                               f"{PORTS_TIMEOUT:.0f} s: {states}")
            time.sleep(0.02)

    def _start_hostd(self, hosts: Sequence[LabHost]) -> None:
        env = dict(os.environ)
        src = str(Path(bulkhead.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        started: dict[str, subprocess.Popen[bytes]] = {}
        for h in hosts:
            with open(self.state_dir / f"{h.name}.hostd.log", "ab") as logf:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", h.ns, sys.executable, "-m", "bulkhead.lab.hostd",
                     "--socket", h.socket],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True, env=env, cwd="/")
            self._procs.append(proc)
            started[h.name] = proc
            self._hostd[h.name] = {"pid": proc.pid, "start": process_start(proc.pid)}
        self._save()
        deadline = time.monotonic() + HOSTD_START_TIMEOUT
        waiting = dict(started)
        while waiting:
            for name, proc in list(waiting.items()):
                if proc.poll() is not None:
                    raise LabError(f"the host daemon of {name} exited with {proc.returncode}: "
                                   f"{self._log_tail(name)}")
                with contextlib.suppress(LabError):
                    self._request(name, {"op": "ping"}, timeout=1.0)
                    del waiting[name]
            if waiting:
                if time.monotonic() > deadline:
                    raise LabError(f"host daemons of {sorted(waiting)} not ready within "
                                   f"{HOSTD_START_TIMEOUT:.0f} s")
                time.sleep(0.02)

    def _log_tail(self, host: str) -> str:
        try:
            return (self.state_dir / f"{host}.hostd.log").read_text()[-2000:].strip()
        except OSError:
            return "(no log)"

    def down(self) -> None:
        """Remove the lab: processes, namespaces, uplink, state dir. Safe to call twice,
        and on a lab that is half built."""
        extra = {int(e["pid"]): e.get("start") for e in
                 [*self._hostd.values(), *self._spawned]}
        extra.update({p.pid: None for p in self._procs if p.poll() is None})
        teardown(self.name, extra)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self._procs.clear()
        self._spawned.clear()
        self._hostd.clear()
        self.uplink = None

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # -- addresses -----------------------------------------------------------------------

    def set_addresses(self, host: str, ips: Sequence[str]) -> None:
        """Replace `host`'s addresses (plain IPs take the lab net's prefix length)."""
        self.set_addresses_many({host: ips})

    def set_addresses_many(self, addresses: Mapping[str, Sequence[str]]) -> None:
        """Replace the addresses of several hosts at once; neighbour caches in the lab
        forget the addresses that moved, so a probe never goes to the old owner."""
        new: dict[str, tuple[str, ...]] = {}
        for name, ips in addresses.items():
            self.host(name)
            parsed = [self._interface(ip_text) for ip_text in ips]
            self._check_interfaces(name, parsed)
            new[name] = tuple(str(i) for i in parsed)
        owners: dict[str, str] = {}
        for info in self.hosts.values():
            wanted = new.get(info.name, info.interfaces)
            for ip_text in wanted:
                addr = ip_text.split("/")[0]
                if addr in owners:
                    raise ValueError(f"address {addr} would be on both {owners[addr]} "
                                     f"and {info.name}")
                owners[addr] = info.name
        changed: set[str] = set()
        batches: list[tuple[str | None, Sequence[str]]] = []
        for name, ifaces in new.items():
            old = self.hosts[name]
            changed |= set(old.addresses) ^ {i.split("/")[0] for i in ifaces}
            # Only what changes: an address that stays is never removed, so connections
            # from it (an agent's to its server) live on.
            gone = [i for i in old.interfaces if i not in ifaces]
            batches.append((old.ns, [*(f"address del {i} dev eth0" for i in gone),
                                     *_address_lines(i for i in ifaces
                                                     if i not in old.interfaces)]))
        if self.uplink is not None:
            ip_batches(batches)
            if changed:
                flush = [f"neigh flush to {a}" for a in sorted(changed)]
                ip_batches([(self.switch_ns, flush),
                            *((h.ns, flush) for h in self.hosts.values())])
        for name, ifaces in new.items():
            self.hosts[name] = replace(self.hosts[name], interfaces=ifaces)
        if self.uplink is not None:
            self._save()

    def _interface(self, text: str) -> IPInterface:
        try:
            if "/" in text:
                return ipaddress.ip_interface(text)
            addr = ipaddress.ip_address(text)
        except ValueError as e:
            raise ValueError(f"not an IP address: {text!r} ({e})") from None
        net = self.net4 if addr.version == 4 else self.net6
        return ipaddress.ip_interface(f"{addr}/{net.prefixlen}")

    # -- host daemons: listeners and probes ------------------------------------------------

    def _request(self, host: str, payload: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        path = self.host(host).socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
                s.sendall(json.dumps(payload).encode() + b"\n")
                chunks: list[bytes] = []
                while not chunks or not chunks[-1].endswith(b"\n"):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except (FileNotFoundError, ConnectionRefusedError):
                raise LabError(f"the host daemon of {host} in lab {self.name} is not running "
                               f"(no {path}); is the lab up?") from None
            except TimeoutError:
                raise LabError(f"the host daemon of {host} did not answer within "
                               f"{timeout:.1f} s") from None
        try:
            answer: dict[str, Any] = json.loads(b"".join(chunks))
        except ValueError:
            raise LabError(f"the host daemon of {host} sent no valid answer") from None
        if not answer.get("ok"):
            raise LabError(f"{host}: {answer.get('error', 'request failed')}")
        return answer

    def listen(self, host: str, tcp: Iterable[int] = (), udp: Iterable[int] = (), *,
               replace: bool = False) -> None:
        """Listen on these TCP (accept and close) and UDP (echo) ports on all of `host`'s
        addresses, IPv4 and IPv6. `replace=True` closes the ports not named."""
        self._request(host, {"op": "listen", "tcp": list(tcp), "udp": list(udp),
                             "replace": replace}, timeout=REQUEST_SLACK)

    def listening(self, host: str) -> dict[str, list[int]]:
        """The ports `host` listens on: {"tcp": [...], "udp": [...]}."""
        answer = self._request(host, {"op": "listen"}, timeout=REQUEST_SLACK)
        return {"tcp": list(answer["tcp"]), "udp": list(answer["udp"])}

    def resolve(self, dst: str, family: Literal[4, 6] | None = None) -> str:
        """An IP address as it is, or a lab host's address (IPv4 unless family=6)."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(dst))
        return self.address(dst, family or 4)

    def probe(self, src: str, dst: str, proto: str = "tcp", port: int | None = None, *,
              timeout: float = DEFAULT_TIMEOUT, src_ip: str | None = None,
              family: Literal[4, 6] | None = None) -> ProbeResult:
        """One probe from lab host `src` to `dst` (an address or a lab host name)."""
        return self.probe_many([ProbeSpec(src, dst, proto, port, timeout, src_ip, family)])[0]

    def probe_many(self, probes: Iterable[ProbeSpec]) -> list[ProbeResult]:
        """Run probes concurrently (all hosts at once, each host's probes in parallel);
        results in the order given. LabError if a probe could not be made at all."""
        checked: list[ProbeSpec] = []
        for p in probes:
            self.host(p.src)
            family = p.family
            if family is None and p.src_ip is not None:
                family = 6 if ":" in p.src_ip else 4
            checked.append(p.checked(self.resolve(p.dst, family)))
        by_src: dict[str, list[int]] = {}
        for i, p in enumerate(checked):
            by_src.setdefault(p.src, []).append(i)
        results: list[ProbeResult | None] = [None] * len(checked)

        def run(src: str) -> None:
            indices = by_src[src]
            specs = [checked[i] for i in indices]
            rounds = 1 + len(specs) // 512
            timeout = rounds * max(s.timeout for s in specs) + REQUEST_SLACK
            answer = self._request(src, {"op": "probe", "probes": [s.wire() for s in specs]},
                                   timeout=timeout)
            for i, spec, got in zip(indices, specs, answer["results"], strict=True):
                results[i] = _result(spec, got)

        if len(by_src) == 1:
            run(next(iter(by_src)))
        elif by_src:
            with ThreadPoolExecutor(max_workers=min(32, len(by_src))) as pool:
                list(pool.map(run, by_src))
        done = [r for r in results if r is not None]
        errors = [f"{r.spec.src} -> {r.spec.dst} {r.spec.proto}: {r.detail}"
                  for r in done if r.outcome not in ("open", "refused", "blocked")]
        if errors:
            raise LabError("probe could not be made: " + "; ".join(errors[:10]))
        return done

    # -- processes -----------------------------------------------------------------------

    def _exec_argv(self, where: str, argv: Sequence[str]) -> list[str]:
        if not argv:
            raise ValueError("no command given")
        return ["ip", "netns", "exec", self.ns(where), *argv]

    def run(self, where: str, argv: Sequence[str], *, check: bool = False,
            timeout: float | None = 60.0, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a host's namespace (or the switch's, where='sw') and wait;
        output captured as text."""
        return subprocess.run(self._exec_argv(where, argv), capture_output=True, text=True,
                              check=check, timeout=timeout, input=input)

    def spawn(self, where: str, argv: Sequence[str], log_path: str | Path | None = None, *,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in the background in a host's (or the switch's) namespace, output
        appended to `log_path`; `down()` stops it (and anything else in the lab)."""
        if log_path is not None:
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(self._exec_argv(where, argv), stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True,
                                        env=dict(env) if env is not None else None)
        else:
            proc = subprocess.Popen(self._exec_argv(where, argv), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True,
                                    env=dict(env) if env is not None else None)
        self._procs.append(proc)
        self._spawned.append({"pid": proc.pid, "start": process_start(proc.pid),
                              "where": where, "argv": list(argv),
                              "log": str(log_path) if log_path else None})
        self._save()
        return proc

    def pids(self, where: str | None = None) -> list[int]:
        """Processes in one namespace of the lab, or in all of them."""
        spaces = [self.ns(where)] if where else [self.switch_ns, *(h.ns for h in
                                                                    self.hosts.values())]
        return pids_in(spaces)

    def flush_conntrack(self, host: str | None = None) -> None:
        """Forget tracked connections in one host, or in every host (`conntrack -F`)."""
        names = [host] if host else list(self.hosts)
        procs = []
        for name in names:
            try:
                procs.append((name, subprocess.Popen(
                    self._exec_argv(name, ["conntrack", "-F"]), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)))
            except FileNotFoundError:
                raise LabError("`ip` is not installed (Debian package iproute2)") from None
        errors = []
        for name, proc in procs:
            _out, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                errors.append(f"{name}: {err.strip()}")
        if errors:
            raise LabError("conntrack -F failed (Debian package conntrack): "
                           + "; ".join(errors))

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What is there: namespaces, uplink, host daemons alive, per host."""
        spaces = set(_lab_namespaces(self.name))
        hosts = {}
        for h in self.hosts.values():
            d = self._hostd.get(h.name)
            hosts[h.name] = {
                "ns": h.ns, "port": h.port, "addresses": list(h.addresses),
                "ns_present": h.ns in spaces,
                "hostd": d is not None and alive(int(d["pid"]), d.get("start")),
            }
        return {
            "name": self.name, "net4": str(self.net4), "net6": str(self.net6),
            "switch_ns": self.switch_ns, "switch_present": self.switch_ns in spaces,
            "uplink": self.uplink_ifname if self.uplink else None,
            "uplink_root_address": self.uplink_root_address if self.uplink else None,
            "uplink_address": self.uplink_address if self.uplink else None,
            "service_address": self.service_address,
            "service_address6": self.service_address6,
            "hosts": hosts,
            "spawned": [s for s in self._spawned if alive(int(s["pid"]), s.get("start"))],
        }


def _address_lines(interfaces: Iterable[str]) -> list[str]:
    return [f"address add {i} dev eth0" + (" nodad" if ":" in i else "") for i in interfaces]


def _result(spec: ProbeSpec, got: Mapping[str, Any]) -> ProbeResult:
    outcome = str(got.get("outcome"))
    return ProbeResult(spec, outcome, float(got.get("elapsed", 0.0)),  # type: ignore[arg-type]
                       str(got.get("detail", "")))


__all__ = ["DEFAULT_NET4", "DEFAULT_NET6", "SWITCH", "Lab", "LabError", "LabHost", "Outcome",
           "check_name", "list_labs", "remove_all", "teardown"]
