"""The demo's truth tables: from every host to every other host's service port, allowed
or not. Who and what from `ansible-inventory --list`; the truth from real probes in the
lab, or from the reference evaluator."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bulkhead.demo import DemoError
from bulkhead.lab import Lab, ProbeSpec
from bulkhead.policy import Evaluator, Flow

PROBE_TIMEOUT = 1.0


@dataclass(frozen=True)
class Target:
    """A column of the truth table: a host and the TCP port it serves."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    hosts: list[str]
    addresses: dict[str, list[str]]      # host -> expected IPs (IPv4 first)
    endpoints: dict[str, dict[str, Any]]  # host -> the HostEndpoint the plugin computed
    targets: list[Target]


Table = dict[tuple[str, Target], bool]   # (from, to) -> allowed


def read_inventory(listing: Mapping[str, Any]) -> Inventory:
    """Hosts, addresses, host endpoints and served ports from `ansible-inventory --list`."""
    hostvars: dict[str, dict[str, Any]] = listing.get("_meta", {}).get("hostvars", {})
    hosts = sorted(hostvars, key=lambda h: _first_ip(hostvars[h]))
    addresses: dict[str, list[str]] = {}
    endpoints: dict[str, dict[str, Any]] = {}
    targets: list[Target] = []
    for host in hosts:
        hv = hostvars[host]
        hep = hv.get("bulkhead_host_endpoint")
        if not isinstance(hep, dict):
            raise DemoError(f"host {host}: no bulkhead_host_endpoint; is the "
                            "bulkhead.microseg.endpoints inventory plugin configured?")
        endpoints[host] = hep
        ips = [str(ip) for ip in hep.get("spec", {}).get("expectedIPs", [])]
        if not ips:
            raise DemoError(f"host {host}: its HostEndpoint has no expectedIPs")
        addresses[host] = sorted(ips, key=lambda ip: ":" in ip)
        port = (hv.get("service_ports") or {}).get(hv.get("app"))
        if port is not None:
            targets.append(Target(host, int(port)))
    return Inventory(hosts, addresses, endpoints, targets)


def _first_ip(hv: Mapping[str, Any]) -> tuple[int, ...]:
    ips = (hv.get("bulkhead_host_endpoint") or {}).get("spec", {}).get("expectedIPs") or []
    v4 = [ip for ip in ips if ":" not in ip]
    return tuple(int(part) for part in v4[0].split(".")) if v4 else (999,)


def table_cells(inv: Inventory) -> list[tuple[str, Target]]:
    return [(src, t) for src in inv.hosts for t in inv.targets if t.host != src]


def probe_table(lab: Lab, inv: Inventory) -> Table:
    """Real TCP probes from every host to every other host's service port, over IPv4.
    "open" and "refused" reached the host (allowed); "blocked" did not."""
    cells = table_cells(inv)
    results = lab.probe_many([ProbeSpec(src, inv.addresses[t.host][0], "tcp", t.port,
                                        timeout=PROBE_TIMEOUT) for src, t in cells])
    return {cell: r.outcome != "blocked" for cell, r in zip(cells, results, strict=True)}


def reference_table(evaluator: Evaluator, inv: Inventory) -> Table:
    """What the reference evaluator says of the same cells."""
    return {(src, t): evaluator.evaluate(flow(inv, src, t), trace=False).allowed
            for src, t in table_cells(inv)}


def flow(inv: Inventory, src: str, target: Target) -> Flow:
    """The flow of a cell: `src`'s first address to the target's, TCP."""
    return Flow.make(inv.addresses[src][0], inv.addresses[target.host][0], "TCP", target.port)


def render_table(inv: Inventory, table: Table,
                 word: Callable[[bool], str] = lambda ok: "open" if ok else "BLOCKED") -> str:
    """Rows: from; columns: to (host and port)."""
    width = max(10, *(len(str(t)) + 2 for t in inv.targets))
    first = max(len("from \\ to"), *(len(h) for h in inv.hosts)) + 3
    lines = ["    " + "from \\ to".ljust(first) + "".join(str(t).ljust(width)
                                                        for t in inv.targets)]
    for src in inv.hosts:
        cells = ["-" if t.host == src else word(table[(src, t)]) for t in inv.targets]
        lines.append("    " + src.ljust(first) + "".join(c.ljust(width) for c in cells))
    return "\n".join(line.rstrip() for line in lines)
