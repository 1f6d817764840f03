"""bulkhead-agent's configuration: `/etc/bulkhead/agent.yaml` (or `--config`), then flags.

Every value is checked here, once, so the daemon never meets a bad one later: a problem
raises `ConfigError` naming the key (or flag) and what is wrong with it.

On Windows the defaults live under `%ProgramData%\\Bulkhead` (`agent.yaml`, `pki\\`,
`state\\`, `logs\\`) and the dataplane is Windows Firewall (docs/windows.md).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from bulkhead.defaults import SERVER_PORT
from bulkhead.model import ENFORCE, ENFORCEMENT_LABEL, ENFORCEMENT_MODES
from bulkhead.policy import DEFAULT_INBOUND, DEFAULT_OUTBOUND, FailsafePort, Failsafes

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The enforcers (docs/dataplane.md, docs/windows.md): nftables on Linux; on Windows,
# Windows Firewall on the host or HNS ACLs on HNS endpoints.
NFTABLES, WINDOWS_FIREWALL, HNS = "nftables", "windows-firewall", "hns"
DATAPLANES = (NFTABLES, WINDOWS_FIREWALL, HNS)


@dataclass(frozen=True)
class Paths:
    """Where the agent looks by default: its config file, its certificates, its state
    (the cache, the spools) and, on Windows, its log file (a service has no stderr;
    elsewhere "": logs go to stderr, which systemd keeps in the journal)."""

    config: str
    ca: str
    cert: str
    key: str
    state_dir: str
    log_dir: str
    dataplane: str


def default_paths(platform: str = sys.platform,
                  environ: Mapping[str, str] = os.environ) -> Paths:
    """The defaults of `platform` (`sys.platform`); Windows' from %ProgramData%."""
    if platform == "win32":
        root = PureWindowsPath(environ.get("ProgramData") or "C:\\ProgramData") / "Bulkhead"
        pki = root / "pki"
        return Paths(str(root / "agent.yaml"), str(pki / "ca.crt"), str(pki / "agent.crt"),
                     str(pki / "agent.key"), str(root / "state"), str(root / "logs"),
                     WINDOWS_FIREWALL)
    etc = PurePosixPath("/etc/bulkhead")
    return Paths(str(etc / "agent.yaml"), str(etc / "pki/ca.crt"), str(etc / "pki/agent.crt"),
                 str(etc / "pki/agent.key"), "/var/lib/bulkhead-agent", "", NFTABLES)


PATHS = default_paths()
DEFAULT_CONFIG = Path(PATHS.config)


class ConfigError(Exception):
    """A configuration value that cannot be used; `where` is the key or the flag."""

    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class FlowLogSettings:
    """`flowLogs` in agent.yaml (see docs/observability.md)."""

    flush_interval: float = 15.0
    inbound_group: int = 1          # NFLOG groups the table logs to
    outbound_group: int = 2
    spool_bytes: int = 64 << 20     # records kept on disk while the server is away
    max_connections: int = 100_000  # open connections followed for their counts
    max_records: int = 50_000       # records per flush interval
    # conntrack DESTROY events for each connection's last counters (else: the dumps
    # only); new connections ran at 0.88 of the rate without flow logs with them,
    # 1.01 without them (docs/benchmarks.md)
    conntrack_events: bool = False


@dataclass(frozen=True)
class DnsSettings:
    """`dns` in agent.yaml (see docs/dns.md): DNS snooping for domain policy and DNS
    logs, on unless `enabled: false`."""

    trusted_servers: tuple[str, ...] = ()   # (): the nameservers of /etc/resolv.conf
    group: int = 3                  # the NFLOG group DNS packets are logged to
    extra_ttl: float = 0.0          # seconds added to each answer's TTL (felix DNSExtraTTL)
    max_names: int = 50_000         # names the name cache holds (twice as many entries)
    save_interval: float = 60.0     # seconds between writes of the cache to the state dir
    # DelayDNSResponse: answers held until the domain sets hold their addresses (felix's
    # mode, without NFQUEUE: the agent sends them on); NoDelay: they pass at once.
    mode: str = "DelayDNSResponse"


@dataclass
class AgentConfig:
    server: str = f"https://localhost:{SERVER_PORT}"
    node: str = field(default_factory=socket.gethostname)
    ca: str = PATHS.ca
    cert: str = PATHS.cert
    key: str = PATHS.key
    state_dir: str = PATHS.state_dir
    failsafe_inbound: tuple[FailsafePort, ...] = DEFAULT_INBOUND
    failsafe_outbound: tuple[FailsafePort, ...] = DEFAULT_OUTBOUND
    log_level: str = "info"
    metrics_listen: str = "127.0.0.1:9473"   # "" disables /metrics
    drift_interval: float = 30.0             # seconds between drift checks
    status_interval: float = 60.0            # seconds between status reports
    heartbeat_interval: float = 10.0         # the server's heartbeat on the watch stream
    flow_logs: FlowLogSettings | None = None  # None: flow logs off
    # The mode of this node's endpoints without the enforcement label (observe: nothing
    # is blocked, everything is logged as the policies decide; docs/policy.md).
    enforcement: str = ENFORCE
    dns: DnsSettings | None = field(default_factory=DnsSettings)   # None: no snooping
    # Who enforces: nftables (Linux), windows-firewall or hns (Windows; no flow logs, no
    # DNS snooping there: both read NFLOG and conntrack).
    dataplane: str = PATHS.dataplane

    @property
    def failsafes(self) -> Failsafes:
        return Failsafes(self.failsafe_inbound, self.failsafe_outbound)

    @property
    def heartbeat_timeout(self) -> float:
        """No line on the watch stream for this long: the stream is dead."""
        return 3 * self.heartbeat_interval + 1.0

    def metrics_address(self) -> tuple[str, int] | None:
        return _host_port("metricsListen", self.metrics_listen) if self.metrics_listen \
            else None


# The config file's keys (camelCase, as the server's) and the attributes they set.
KEYS: dict[str, str] = {
    "server": "server", "node": "node", "ca": "ca", "cert": "cert", "key": "key",
    "stateDir": "state_dir", "failsafeInbound": "failsafe_inbound",
    "failsafeOutbound": "failsafe_outbound", "logLevel": "log_level",
    "metricsListen": "metrics_listen", "driftInterval": "drift_interval",
    "statusInterval": "status_interval", "heartbeatInterval": "heartbeat_interval",
    "flowLogs": "flow_logs", "enforcement": "enforcement", "dns": "dns",
    "dataplane": "dataplane",
}
FLAGS: dict[str, str] = {attr: "--" + attr.replace("_", "-") for attr in KEYS.values()
                         if attr not in ("flow_logs", "dns")}
# flowLogs: {enabled, flushInterval, inboundGroup, outboundGroup, spoolBytes,
# maxConnections, maxRecords}; every key but `enabled` optional.
FLOW_LOG_KEYS: dict[str, tuple[str, int, int]] = {   # key -> (attribute, min, max)
    "inboundGroup": ("inbound_group", 0, 65535),
    "outboundGroup": ("outbound_group", 0, 65535),
    "spoolBytes": ("spool_bytes", 1 << 20, 1 << 40),
    "maxConnections": ("max_connections", 100, 10_000_000),
    "maxRecords": ("max_records", 100, 1_000_000),
}


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """The file at `path` (none: defaults only), then `overrides` (attribute -> value;
    None means not given). Raises ConfigError."""
    config = AgentConfig()
    given: set[str] = set()
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"config {path}", e.strerror or str(e)) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {path}", f"not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path}", f"not YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path}", "must be a mapping of keys to values")
        for key, value in data.items():
            if key not in KEYS:
                raise ConfigError(f"config {path}: {key}",
                                  f"unknown key (known: {', '.join(KEYS)})")
            _set(config, KEYS[key], value, f"config {path}: {key}")
            given.add(KEYS[key])
    for attr, value in (overrides or {}).items():
        if value is not None:
            _set(config, attr, value, FLAGS[attr])
    if config.dataplane != NFTABLES:
        _without_netfilter(config, given, f"config {path}")
    flows, dns = config.flow_logs, config.dns
    if flows and dns and dns.group in (flows.inbound_group, flows.outbound_group):
        raise ConfigError(f"config {path}: dns.nflogGroup",
                          f"{dns.group} is a flow-log group; DNS needs a group of its own")
    return config


def _without_netfilter(config: AgentConfig, given: set[str], where: str) -> None:
    """Flow logs and DNS snooping read NFLOG and conntrack, which only the nftables
    dataplane has: on by default, they are turned off; asked for, they are refused."""
    if config.flow_logs is not None:
        raise ConfigError(f"{where}: flowLogs", f"flow logs need the nftables dataplane "
                          f"(NFLOG, conntrack); dataplane {config.dataplane} has none: "
                          "leave flowLogs out or set enabled: false")
    if config.dns is not None and "dns" in given:
        raise ConfigError(f"{where}: dns", f"DNS snooping needs the nftables dataplane "
                          f"(NFLOG); dataplane {config.dataplane} has none: leave dns out "
                          "or set enabled: false")
    config.dns = None


def _set(config: AgentConfig, attr: str, value: Any, where: str) -> None:
    kinds = {f.name: f.type for f in fields(AgentConfig)}
    kind = kinds[attr]
    if attr in ("failsafe_inbound", "failsafe_outbound"):
        setattr(config, attr, _failsafes(value, where))
    elif attr == "flow_logs":
        config.flow_logs = _flow_logs(value, where)
    elif attr == "dns":
        config.dns = _dns(value, where)
    elif kind == "float":
        setattr(config, attr, _seconds(value, where))
    else:
        if value is None or isinstance(value, dict | list | bool):
            raise ConfigError(where, f"must be a string, not {value!r}")
        text = str(value).strip()
        setattr(config, attr, _check_string(attr, text, where))


def _check_string(attr: str, text: str, where: str) -> str:
    if attr == "server":
        url = urlsplit(text)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(where, f"{text!r}: expected https://HOST[:PORT]")
        try:
            url.port  # noqa: B018 (raises on a bad port)
        except ValueError as e:
            raise ConfigError(where, f"{text!r}: {e}") from None
    elif attr == "node":
        if not text or any(c.isspace() or c == "/" for c in text):
            raise ConfigError(where, f"{text!r}: a node name is one word without '/'")
    elif attr == "log_level":
        if text.lower() not in LOG_LEVELS:
            raise ConfigError(where, f"{text!r}: expected one of {', '.join(LOG_LEVELS)}")
        text = text.lower()
    elif attr == "metrics_listen":
        if text:
            _host_port(where, text)
    elif attr == "dataplane":
        if text not in DATAPLANES:
            raise ConfigError(where, f"{text!r}: expected one of {', '.join(DATAPLANES)}")
    elif attr == "enforcement":
        if text not in ENFORCEMENT_MODES:
            raise ConfigError(where, f"{text!r}: expected enforce or observe (the mode of "
                              f"endpoints without the {ENFORCEMENT_LABEL} label)")
    elif not text:
        raise ConfigError(where, "must not be empty")
    return text


def _host_port(where: str, text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(where, f"{text!r}: expected HOST:PORT, or \"\" to turn it off")
    return host.strip("[]") or "127.0.0.1", int(port)


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(where, f"must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(where, f"must be a number of seconds, not {value!r}") from None
    if not 0 < seconds < 86400 * 365:
        raise ConfigError(where, f"{value!r}: must be more than 0 seconds")
    return seconds


def _enabled(value: Any, where: str, known: Sequence[str], default: bool,
             example: str) -> bool:
    """A section that can be turned off: a mapping of known keys; its `enabled` flag."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"must be a mapping ({example}, ...)")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
    enabled = value.get("enabled", default)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}.enabled", f"must be true or false, not {enabled!r}")
    return enabled


def _integers(value: dict[str, Any], where: str,
              keys: Mapping[str, tuple[str, int, int]]) -> dict[str, int]:
    """The integer keys given (key -> (attribute, min, max)), checked, by attribute."""
    out = {}
    for key, (attr, lo, hi) in keys.items():
        if key in value:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, int) or not lo <= number <= hi:
                raise ConfigError(f"{where}.{key}", f"{number!r}: must be an integer from "
                                  f"{lo} to {hi}")
            out[attr] = number
    return out


def _flow_logs(value: Any, where: str) -> FlowLogSettings | None:
    known = ("enabled", "flushInterval", "conntrackEvents", *FLOW_LOG_KEYS)
    if not _enabled(value, where, known, False, "enabled: true, flushInterval: 15"):
        return None
    settings: dict[str, Any] = {}
    events = value.get("conntrackEvents", False)
    if not isinstance(events, bool):
        raise ConfigError(f"{where}.conntrackEvents", f"must be true or false, not {events!r}")
    if events:
        settings["conntrack_events"] = True
    if "flushInterval" in value:
        seconds = _seconds(value["flushInterval"], f"{where}.flushInterval")
        if not 1 <= seconds <= 3600:
            raise ConfigError(f"{where}.flushInterval", f"{seconds:g}: must be 1 to 3600 s")
        settings["flush_interval"] = seconds
    settings.update(_integers(value, where, FLOW_LOG_KEYS))
    result = FlowLogSettings(**settings)
    if result.inbound_group == result.outbound_group:
        raise ConfigError(f"{where}.outboundGroup", "must differ from inboundGroup")
    return result


DNS_KEYS = ("enabled", "mode", "trustedServers", "nflogGroup", "extraTTL", "maxNames",
            "cacheSaveInterval")
DNS_MODES = ("DelayDNSResponse", "NoDelay")


def _dns(value: Any, where: str) -> DnsSettings | None:
    if not _enabled(value, where, DNS_KEYS, True, "trustedServers: [...], extraTTL: 0"):
        return None
    settings: dict[str, Any] = {}
    if "mode" in value:
        if value["mode"] not in DNS_MODES:
            raise ConfigError(f"{where}.mode", f"{value['mode']!r}: expected one of "
                              f"{', '.join(DNS_MODES)}")
        settings["mode"] = value["mode"]
    if "trustedServers" in value:
        servers = value["trustedServers"]
        if not isinstance(servers, list) or not servers:
            raise ConfigError(f"{where}.trustedServers", "must be a non-empty list of IP "
                              "addresses (leave it out for resolv.conf's nameservers)")
        out = []
        for i, item in enumerate(servers):
            try:
                # A zone (fe80::1%eth0) cannot be matched by nftables: the address alone.
                out.append(str(ipaddress.ip_address(str(item).strip().split("%", 1)[0])))
            except ValueError:
                raise ConfigError(f"{where}.trustedServers[{i}]",
                                  f"{item!r} is not an IP address") from None
        settings["trusted_servers"] = tuple(dict.fromkeys(out))
    settings.update(_integers(value, where, {"nflogGroup": ("group", 0, 65535),
                                             "maxNames": ("max_names", 100, 10_000_000)}))
    if "extraTTL" in value:
        extra = value["extraTTL"]
        if isinstance(extra, bool) or not isinstance(extra, int | float) \
                or not 0 <= extra <= 86400:
            raise ConfigError(f"{where}.extraTTL", f"{extra!r}: must be 0 to 86400 seconds")
        settings["extra_ttl"] = float(extra)
    if "cacheSaveInterval" in value:
        seconds = _seconds(value["cacheSaveInterval"], f"{where}.cacheSaveInterval")
        if not 1 <= seconds <= 3600:
            raise ConfigError(f"{where}.cacheSaveInterval", f"{seconds:g}: must be 1 to 3600 s")
        settings["save_interval"] = seconds
    return DnsSettings(**settings)


def _failsafes(value: Any, where: str) -> tuple[FailsafePort, ...]:
    """A YAML list, or a comma-separated string (`tcp:22,udp:68`); empty means none."""
    if isinstance(value, str):
        items: list[Any] = [p for p in (s.strip() for s in value.split(",")) if p]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(where, "must be a list of protocol:port strings (e.g. tcp:22), "
                          f"not {value!r}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(f"{where}[{i}]", f"must be a string like tcp:22, not {item!r}")
        try:
            out.append(FailsafePort.parse(item.strip()))
        except ValueError as e:
            raise ConfigError(f"{where}[{i}]", str(e)) from None
    return tuple(out)

