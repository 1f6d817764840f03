"""Conformance case files (shared/conformance/FORMAT.md): parse, check, build resources."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bulkhead.model import (
    API_VERSION,
    DEFAULT_ALLOW_PROFILE,
    Resource,
    Snapshot,
    ValidationError,
    parse_resource,
)
from bulkhead.policy import Failsafes, Flow

PROTOCOLS = ("TCP", "UDP", "ICMP")
REQUIRES = ("failsafe-defaults", "hep-no-profile", "hep-by-address")
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
FIRST_HOST = 10  # auto-assigned addresses start at 198.18.0.10


class CaseError(ValueError):
    """A case file that does not follow the format; names file, case and field."""


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    proto: str
    port: int | None
    allowed: bool

    @property
    def column(self) -> str:
        """The truth table this probe belongs to: one per protocol and port."""
        return self.proto if self.port is None else f"{self.proto}/{self.port}"


@dataclass
class Case:
    name: str
    tags: list[str]
    requires: list[str]
    hosts: dict[str, dict[str, str]]
    addresses: dict[str, str]
    named_ports: dict[str, list[dict[str, Any]]]
    policies: list[dict[str, Any]]
    expect: list[Probe]
    source: str = ""          # the file the case was read from
    resources: list[Resource] = field(default_factory=list)
    # Free metadata (FORMAT.md): what the case shows, where it was taken from, remarks.
    description: str = ""
    cited: str = ""           # the case's own `source:` key
    notes: str = ""

    @property
    def failsafes(self) -> Failsafes:
        return Failsafes() if "failsafe-defaults" in self.requires else Failsafes.off()

    def host_endpoints(self) -> list[dict[str, Any]]:
        """Calico's automatic host endpoints (`interfaceName: "*"`), one per lab host, as
        the format assumes; with `requires: [hep-by-address]`, endpoints without an
        interfaceName, which the agent finds by their address (one interface each: what
        takes untracked policies, which Calico ignores on a "*" endpoint)."""
        out = []
        for host, labels in self.hosts.items():
            spec: dict[str, Any] = {"node": host, "expectedIPs": [self.addresses[host]]}
            if "hep-by-address" not in self.requires:
                spec["interfaceName"] = "*"
            if "hep-no-profile" not in self.requires:
                spec["profiles"] = [DEFAULT_ALLOW_PROFILE]
            if self.named_ports.get(host):
                spec["ports"] = self.named_ports[host]
            out.append({"apiVersion": API_VERSION, "kind": "HostEndpoint",
                        "metadata": {"name": host, "labels": dict(labels)}, "spec": spec})
        return out

    def snapshot(self) -> Snapshot:
        return Snapshot.build(self.resources)


def _fail(source: str, case: str, where: str, problem: str) -> CaseError:
    return CaseError(f"{source}: case {case or '#?'}: {where}: {problem}")


def _mapping(value: Any, source: str, case: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, case, where, "must be a mapping")
    return value


def parse_case(raw: Any, source: str, index: int) -> Case:
    if not isinstance(raw, dict):
        raise CaseError(f"{source}: case #{index + 1}: must be a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CaseError(f"{source}: case #{index + 1}: name: is required")
    allowed_keys = {"name", "tags", "requires", "hosts", "addresses", "named_ports",
                    "policies", "expect", *FREE_TEXT}
    for key in raw:
        if key not in allowed_keys:
            raise _fail(source, name, str(key), "unknown field")
    free = {key: _free_text(raw.get(key), source, name, key) for key in FREE_TEXT}
    tags = raw.get("tags") or []
    requires = raw.get("requires") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _fail(source, name, "tags", "must be a list of strings")
    if not isinstance(requires, list) or any(r not in REQUIRES for r in requires):
        raise _fail(source, name, "requires", f"each entry must be one of {list(REQUIRES)}")
    hosts: dict[str, dict[str, str]] = {}
    for host, labels in _mapping(raw.get("hosts"), source, name, "hosts").items():
        labels = _mapping(labels, source, name, f"hosts.{host}")
        hosts[str(host)] = {str(k): str(v) for k, v in labels.items()}
    if len(hosts) < 2:
        raise _fail(source, name, "hosts", "needs at least two hosts")
    addresses = _addresses(_mapping(raw.get("addresses"), source, name, "addresses"),
                           hosts, source, name)
    named_ports = _mapping(raw.get("named_ports"), source, name, "named_ports")
    for host in named_ports:
        if host not in hosts:
            raise _fail(source, name, f"named_ports.{host}", "is not one of the hosts")
    policies = raw.get("policies") or []
    if not isinstance(policies, list):
        raise _fail(source, name, "policies", "must be a list of resources")
    expect = [_probe(p, hosts, source, name, i) for i, p in enumerate(raw.get("expect") or [])]
    if not expect:
        raise _fail(source, name, "expect", "needs at least one probe")
    case = Case(name, tags, requires, hosts, addresses, named_ports, policies, expect, source,
                description=free["description"], cited=free["source"], notes=free["notes"])
    try:
        case.resources = [parse_resource(doc) for doc in [*case.host_endpoints(), *policies]]
        case.snapshot()
    except ValidationError as e:
        raise _fail(source, name, "policies", str(e)) from None
    return case


FREE_TEXT = ("description", "source", "notes")  # free metadata a case may carry


def _free_text(value: Any, source: str, case: str, key: str) -> str:
    """Free text: a string, or a list of strings (kept one per line)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise _fail(source, case, key, "must be text (a string or a list of strings)")


def _addresses(given: dict[str, Any], hosts: dict[str, dict[str, str]], source: str,
               case: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for host, addr in given.items():
        if host not in hosts:
            raise _fail(source, case, f"addresses.{host}", "is not one of the hosts")
        try:
            ip = ipaddress.ip_address(str(addr))
        except ValueError:
            raise _fail(source, case, f"addresses.{host}", f"{addr!r} is not an IP") from None
        if ip.version != 4 or ip not in LAB_NET:
            raise _fail(source, case, f"addresses.{host}", f"{ip} is outside {LAB_NET}")
        out[host] = str(ip)
    taken = set(out.values())
    next_ip = int(LAB_NET.network_address) + FIRST_HOST
    for host in hosts:
        if host in out:
            continue
        while str(ipaddress.ip_address(next_ip)) in taken:
            next_ip += 1
        out[host] = str(ipaddress.ip_address(next_ip))
        taken.add(out[host])
    if len(set(out.values())) != len(out):
        raise _fail(source, case, "addresses", "two hosts share an address")
    return out


def _probe(raw: Any, hosts: dict[str, Any], source: str, case: str, i: int) -> Probe:
    where = f"expect[{i}]"
    if not isinstance(raw, dict):
        raise _fail(source, case, where, "must be a mapping")
    for key in raw:
        if key not in ("from", "to", "proto", "port", "allowed"):
            raise _fail(source, case, f"{where}.{key}", "unknown field")
    src, dst, proto, port = raw.get("from"), raw.get("to"), raw.get("proto"), raw.get("port")
    for label, host in (("from", src), ("to", dst)):
        if host not in hosts:
            raise _fail(source, case, f"{where}.{label}", f"{host!r} is not one of the hosts")
    if src == dst:
        raise _fail(source, case, where, "a probe never goes from a host to itself")
    if proto not in PROTOCOLS:
        raise _fail(source, case, f"{where}.proto", f"{proto!r} is not one of {PROTOCOLS}")
    if proto == "ICMP":
        if port is not None:
            raise _fail(source, case, f"{where}.port", "must be null for ICMP")
    elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _fail(source, case, f"{where}.port", f"{port!r} is not a port 1-65535")
    allowed = raw.get("allowed")
    if not isinstance(allowed, bool):
        raise _fail(source, case, f"{where}.allowed", "must be true or false")
    return Probe(str(src), str(dst), proto, port, allowed)


def load_cases(path: str | Path) -> list[Case]:
    """Cases from a file, or from every *.yaml file in a folder (sorted)."""
    path = Path(path)
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files:
        raise CaseError(f"{path}: no case files")
    cases: list[Case] = []
    names: set[str] = set()
    for file in files:
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise CaseError(f"{file}: cannot read: {e}") from None
        if not isinstance(raw, list):
            raise CaseError(f"{file}: a case file is a YAML list of cases")
        for i, item in enumerate(raw):
            case = parse_case(item, str(file), i)
            if case.name in names:
                raise CaseError(f"{file}: case {case.name}: name: used twice")
            names.add(case.name)
            cases.append(case)
    return cases


class Refused(Exception):
    """The dataplane cannot enforce a case's policies exactly; `reason` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def probe_flow(case: Case, probe: Probe) -> Flow:
    return wire_flow(case.addresses[probe.src], case.addresses[probe.dst], probe.proto,
                     probe.port)


def wire_flow(src: str, dst: str, proto: str, port: int | None) -> Flow:
    """The first packet of a lab probe, as the evaluator sees it: TCP or UDP to `port`,
    or an ICMP echo request, code 0 (ICMPv6's between IPv6 addresses). The source port
    is the kernel's ephemeral choice, unknown here."""
    if proto.upper() == "ICMP":
        v6 = ":" in src
        return Flow.make(src, dst, "ICMPv6" if v6 else "ICMP", icmp_type=128 if v6 else 8,
                         icmp_code=0)
    return Flow.make(src, dst, proto, port)
