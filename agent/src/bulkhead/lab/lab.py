"""`Lab`: one lab as its users see it. Its layout (`Layout`: names and addresses) plus
the jobs done elsewhere: building and removing it (netns.py), its state file (state.py),
its host daemons (daemons.py), processes in it (processes.py), conntrack (conntrack.py).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from bulkhead.lab import conntrack, forward, machine, netns, processes, state
from bulkhead.lab.daemons import HostDaemons
from bulkhead.lab.forward import Forward
from bulkhead.lab.kernel import LabError
from bulkhead.lab.layout import DEFAULT_NET4, DEFAULT_NET6, Layout
from bulkhead.lab.machine import Machine
from bulkhead.lab.names import check_name, state_dir
from bulkhead.lab.probe import DEFAULT_TIMEOUT, ProbeResult, ProbeSpec


class Lab(Layout):
    """A lab of `hosts` (names, or a count: h1..hN) on one bridge.

    `Lab(...)` only describes the lab; `up()` builds it (an existing lab of that name is
    removed first), `down()` removes it. `Lab.load(name)` gets a lab built by another
    process from its state file. Also a context manager: `with Lab("t1", 3) as lab: ...`.

    `machines` (True: every host; or some host names) makes those hosts lab machines:
    `up()` boots systemd in them (machine.py, docs/lab.md "Lab machines"). `forwards`
    lead TCP ports of the uplink's switch address to lab hosts (forward.py).
    """

    def __init__(self, name: str = "demo", hosts: Sequence[str] | int = 2, *,
                 net4: str = DEFAULT_NET4, net6: str = DEFAULT_NET6,
                 machines: bool | Sequence[str] = (), forwards: Sequence[Forward] = ()
                 ) -> None:
        super().__init__(name, hosts, net4=net4, net6=net6)
        wanted = list(self.hosts) if machines is True else list(machines or ())
        for host in wanted:
            self.host(host)
        self.machine_hosts = wanted
        self.forwards = list(forwards)
        forward.check(self, self.forwards)
        self._machines: dict[str, Machine] = {}
        self.daemons = HostDaemons(self, self.state_dir)
        self._procs: list[subprocess.Popen[bytes]] = []   # to reap when they stop
        self._hostd: dict[str, dict[str, Any]] = {}       # as the state file keeps them
        self._spawned: list[dict[str, Any]] = []

    @property
    def state_dir(self) -> Path:
        return state_dir(self.name)

    # -- the state file --------------------------------------------------------------------

    def _save(self) -> None:
        state.write(self.name, {**self.dump(), "hostd": self._hostd,
                                "spawned": self._spawned,
                                "forwards": [f.dump() for f in self.forwards],
                                "machines": {h: m.dump() for h, m in self._machines.items()}})

    @classmethod
    def load(cls, name: str) -> Lab:
        """The lab `name` as its state file describes it (built by any process)."""
        saved = state.read(check_name(name))
        if saved is None:
            raise LabError(f"no lab named {name} ({state_dir(name)}/state.json is missing); "
                           "`bulkhead lab status` lists the labs")
        lab = cls(name, [h["name"] for h in saved["hosts"]], net4=saved["net4"],
                  net6=saved["net6"])
        lab.restore(saved)
        lab._hostd = dict(saved.get("hostd", {}))
        lab._spawned = list(saved.get("spawned", []))
        lab._machines = {h: Machine.load(m) for h, m in saved.get("machines", {}).items()}
        lab.machine_hosts = list(lab._machines)
        lab.forwards = [Forward(**f) for f in saved.get("forwards", [])]
        return lab

    @staticmethod
    def exists(name: str) -> bool:
        return check_name(name) in netns.list_labs()

    # -- up and down -----------------------------------------------------------------------

    def up(self) -> Lab:
        """Build the lab (removing any lab of this name first); returns self. On failure
        everything built so far is removed again and LabError says why."""
        netns.require_root()
        self.down()
        with state.pool_lock():
            self.uplink = netns.free_uplink()
            self._save()  # from here on, `down` (or a sweep) finds the owner and uplink
        try:
            netns.build(self)
            started = self.daemons.start(self.hosts.values())
            for name, proc in started.items():
                self._procs.append(proc)
                self._hostd[name] = {"pid": proc.pid, "start": processes.process_start(proc.pid)}
            self._save()
            self.daemons.wait_ready(started)
            netns.wait_forwarding(self)
            if self.forwards:
                forward.apply(self, self.forwards)
            self._save()
            if self.machine_hosts:
                self.boot_machines(self.machine_hosts)
        except BaseException:
            with contextlib.suppress(LabError):
                self.down()
            raise
        return self

    def down(self) -> None:
        """Remove the lab: processes, namespaces, uplink, state dir. Safe to call twice,
        and on a lab that is half built."""
        extra = state.tracked({"hostd": self._hostd, "spawned": self._spawned})
        extra.update({p.pid: None for p in self._procs if p.poll() is None})
        netns.teardown(self.name, extra)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        self._procs.clear()
        self._spawned.clear()
        self._hostd.clear()
        self._machines.clear()
        self.uplink = None

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    # -- addresses -------------------------------------------------------------------------

    def set_addresses(self, host: str, ips: Sequence[str]) -> None:
        """Replace `host`'s addresses (plain IPs take the lab net's prefix length)."""
        self.set_addresses_many({host: ips})

    def set_addresses_many(self, addresses: Mapping[str, Sequence[str]]) -> None:
        """Replace the addresses of several hosts at once; neighbour caches in the lab
        forget the addresses that moved, so a probe never goes to the old owner."""
        new = self.checked_addresses(addresses)
        if self.uplink is not None:
            netns.move_addresses(self, new)
        for name, ifaces in new.items():
            self.hosts[name] = replace(self.hosts[name], interfaces=ifaces)
        if self.uplink is not None:
            if any(f.host in new for f in self.forwards):
                forward.apply(self, self.forwards)
            self._save()

    # -- port forwards from the root namespace ---------------------------------------------

    def forward(self, forwards: Sequence[Forward]) -> None:
        """Forward exactly these TCP ports of the uplink's switch address
        (`uplink_address`) to lab hosts; an empty list removes every forward."""
        forward.check(self, forwards)
        if self.uplink is not None:
            forward.apply(self, forwards)
        self.forwards = list(forwards)
        if self.uplink is not None:
            self._save()

    # -- host daemons: listeners and probes ------------------------------------------------

    def listen(self, host: str, tcp: Iterable[int] = (), udp: Iterable[int] = (), *,
               replace: bool = False) -> None:
        """Listen on these TCP (accept and close) and UDP (echo) ports on all of `host`'s
        addresses, IPv4 and IPv6. `replace=True` closes the ports not named."""
        self.daemons.listen(host, tcp, udp, replace)

    def listening(self, host: str) -> dict[str, list[int]]:
        """The ports `host` listens on: {"tcp": [...], "udp": [...]}."""
        return self.daemons.listen(host, (), (), False)

    def probe(self, src: str, dst: str, proto: str = "tcp", port: int | None = None, *,
              timeout: float = DEFAULT_TIMEOUT, src_ip: str | None = None,
              family: Literal[4, 6] | None = None) -> ProbeResult:
        """One probe from lab host `src` to `dst` (an address or a lab host name)."""
        return self.probe_many([ProbeSpec(src, dst, proto, port, timeout, src_ip, family)])[0]

    def probe_many(self, probes: Iterable[ProbeSpec]) -> list[ProbeResult]:
        """Run probes concurrently (all hosts at once, each host's probes in parallel);
        results in the order given. LabError if a probe could not be made at all."""
        return self.daemons.probe_many(probes)

    # -- lab machines ----------------------------------------------------------------------

    def boot_machines(self, hosts: Iterable[str], timeout: float = machine.BOOT_TIMEOUT
                      ) -> None:
        """Boot systemd in these hosts of the built lab (a host that is a machine already
        is rebooted: stopped, then booted from a fresh upper layer), all at once; returns
        when every one is `running`. LabError, with the failed units, otherwise."""
        names = list(dict.fromkeys(hosts))
        for host in names:
            self.host(host)
            if host in self._machines:
                self.stop_machine(host)
        booted = machine.boot(self.name, {h: self.ns(h) for h in names}, timeout,
                              on_launch=lambda _h, proc, *_: self._procs.append(proc))
        self._machines.update(booted)
        self.machine_hosts = list(dict.fromkeys([*self.machine_hosts, *names]))
        self._save()

    def stop_machine(self, host: str, grace: float = machine.HALT_TIMEOUT) -> None:
        """Shut `host`'s systemd down (SIGRTMIN+3, then SIGKILL after `grace` s) and drop
        its upper layer; the host stays, as a plain namespace."""
        found = self._machines.pop(self.host(host).name, None)
        self.machine_hosts = [h for h in self.machine_hosts if h != host]
        if found is not None:
            self._save()
            machine.stop(found, grace)

    def machine(self, host: str) -> Machine | None:
        """`host` as a lab machine (its systemd's pid, cgroup, dir), None if it is not one."""
        return self._machines.get(self.host(host).name)

    # -- processes -------------------------------------------------------------------------

    def enter(self, where: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` in a host: in every namespace of its systemd
        when it is a lab machine, else in its network namespace (or the switch's)."""
        found = self._machines.get(where)
        return found.enter(argv) if found else processes.in_namespace(self.ns(where), argv)

    def run(self, where: str, argv: Sequence[str], *, check: bool = False,
            timeout: float | None = 60.0, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in a host's namespace (or the switch's, where='sw'; in a lab machine:
        in all its namespaces) and wait; output captured as text."""
        return subprocess.run(self.enter(where, argv), capture_output=True, text=True,
                              check=check, timeout=timeout, input=input)

    def spawn(self, where: str, argv: Sequence[str], log_path: str | Path | None = None, *,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in the background in a host's (or the switch's) namespace, output
        appended to `log_path`; `down()` stops it (and anything else in the lab)."""
        proc = processes.spawn(self.ns(where), argv, log_path, env=env)
        self._procs.append(proc)
        self._spawned.append({"pid": proc.pid, "start": processes.process_start(proc.pid),
                              "where": where, "argv": list(argv),
                              "log": str(log_path) if log_path else None})
        self._save()
        return proc

    def pids(self, where: str | None = None) -> list[int]:
        """Processes in one namespace of the lab, or in all of them."""
        spaces = [self.ns(where)] if where else [self.switch_ns, *(h.ns for h in
                                                                    self.hosts.values())]
        return processes.pids_in(spaces)

    def flush_conntrack(self, host: str | None = None) -> None:
        """Forget tracked connections in one host, or in every host (`conntrack -F`)."""
        names = [host] if host else list(self.hosts)
        conntrack.flush({name: self.ns(name) for name in names})

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What is there: namespaces, uplink, host daemons alive, per host."""
        spaces = set(netns.lab_namespaces(self.name))
        hosts = {}
        for h in self.hosts.values():
            d = self._hostd.get(h.name)
            hosts[h.name] = {
                "ns": h.ns, "port": h.port, "addresses": list(h.addresses),
                "ns_present": h.ns in spaces,
                "hostd": d is not None and processes.alive(int(d["pid"]), d.get("start")),
                "machine": self._machine_status(h.name),
            }
        return {
            "name": self.name, "net4": str(self.net4), "net6": str(self.net6),
            "switch_ns": self.switch_ns, "switch_present": self.switch_ns in spaces,
            "uplink": self.uplink_ifname if self.uplink else None,
            "uplink_root_address": self.uplink_root_address if self.uplink else None,
            "uplink_address": self.uplink_address if self.uplink else None,
            "service_address": self.service_address,
            "service_address6": self.service_address6,
            "forwards": [f.dump() for f in self.forwards],
            "hosts": hosts,
            "spawned": [s for s in self._spawned
                        if processes.alive(int(s["pid"]), s.get("start"))],
        }

    def _machine_status(self, host: str) -> dict[str, Any] | None:
        found = self._machines.get(host)
        if found is None:
            return None
        said = "stopped"
        if found.alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                said = found.run(["systemctl", "is-system-running"],
                                 timeout=10.0).stdout.strip() or "unknown"
        return {"pid": found.pid, "state": said, "dir": found.dir}
