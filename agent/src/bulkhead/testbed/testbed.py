"""A testbed: a lab with bulkhead-server in its switch namespace and a bulkhead-agent in
every host, with real mutual TLS from `bulkhead pki`. The kernel conformance runner, the
differential and fault tests, the benchmarks and the demo all stand on it.

Agents reach the server at the lab's service address; tools in the root namespace (this
process, the CLI, Ansible) at the uplink address. Every agent keeps a failsafe to the
server's port, so no policy can cut it off from the store that would fix it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bulkhead import pki
from bulkhead.client import ApiError, Connection, Unreachable, resource_path, route
from bulkhead.defaults import SERVER_PORT
from bulkhead.lab import DEFAULT_NET4, SWITCH, Lab, LabError
from bulkhead.lab.processes import log_tail, stop
from bulkhead.model import KINDS
from bulkhead.policy import DEFAULT_INBOUND, DEFAULT_OUTBOUND

BIN = Path(sys.executable).parent
MANAGEMENT = "198.19.253.{}"   # hosts' management addresses, with management=True
MARKER = "bulkhead-testbed-marker"   # a network set whose every write is a new revision
AGENT_STOP_GRACE = 15.0  # seconds an agent has to stop on SIGTERM before SIGKILL
POLICY_KINDS = ("StagedGlobalNetworkPolicy", "GlobalNetworkPolicy", "HostEndpoint",
                "GlobalNetworkSet", "Profile", "Tier")  # the order to delete them in


class Testbed:
    def __init__(self, name: str, hosts: Sequence[str] | int, *, net4: str = DEFAULT_NET4,
                 failsafe_defaults: bool = True, management: bool = False,
                 agent_hosts: Sequence[str] | None = None,
                 agent_settings: Mapping[str, Any] | None = None) -> None:
        """`agent_hosts`: the hosts that run an agent (all of them by default); the
        others stand for machines outside the fleet, such as an Ansible controller.
        `agent_settings`: agent.yaml keys every agent gets (e.g. flowLogs)."""
        self.agent_settings = dict(agent_settings or {})
        self.lab = Lab(name, hosts, net4=net4)
        self.agent_hosts = list(self.lab.hosts if agent_hosts is None else agent_hosts)
        for host in self.agent_hosts:
            self.lab.host(host)
        self.management = management
        self.failsafe_defaults = failsafe_defaults
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._server: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None

    # -- paths ------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.lab.state_dir

    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def server_url(self) -> str:
        """Where the root namespace reaches the server."""
        return f"https://{self.lab.uplink_address}:{SERVER_PORT}"

    @property
    def agent_server_url(self) -> str:
        return f"https://{self.lab.service_address}:{SERVER_PORT}"

    # -- life cycle -------------------------------------------------------------------
    def up(self) -> Testbed:
        self.lab.up()
        try:
            if self.management:
                # Each host's first (primary) address: the source of its agent's
                # connection to the server, never moved by the cases that follow.
                self.lab.set_addresses_many({h: [MANAGEMENT.format(10 + i)]
                                             for i, h in enumerate(self.lab.hosts)})
            self._start_server()
            self.start_agents(self.failsafe_defaults)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        self.lab.down()
        self.agents.clear()
        self._server = None

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def _start_server(self) -> None:
        pki.init_ca(self.pki_dir)
        pki.issue(self.pki_dir, "server", server=True,
                  hosts=(self.lab.service_address, self.lab.uplink_address))
        pki.issue(self.pki_dir, "admin", role="admin")
        config = self.dir / "server.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"0.0.0.0:{SERVER_PORT}", "datastore": f"sqlite://{self.dir}/store.db",
            "tlsCert": str(self.pki_dir / "server.crt"),
            "tlsKey": str(self.pki_dir / "server.key"),
            "clientCA": str(self.pki_dir / "ca.crt"), "logLevel": "warning"}))
        self.start_server()

    def wait_server(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", route("readyz"))
                return
            except (Unreachable, ApiError):
                time.sleep(0.1)
        raise LabError("bulkhead-server did not become ready: "
                       f"{log_tail(self.dir / 'server.log')}")

    def stop_server(self) -> None:
        """Kill the server (agents keep enforcing what they have)."""
        if self._server is not None:
            stop(self._server, kill=True)
            self._server = None

    def start_server(self) -> None:
        """Start (or restart) the server from the config `up()` wrote."""
        config = self.dir / "server.yaml"
        self._server = self.lab.spawn(SWITCH, [str(BIN / "bulkhead-server"), "--config",
                                             str(config)], self.dir / "server.log")
        self.wait_server()

    # -- agents -----------------------------------------------------------------------
    def agent_config(self, host: str, failsafe_defaults: bool, **settings: Any) -> Path:
        """Write `host`'s agent.yaml; `settings` override its keys (e.g.
        heartbeatInterval=60)."""
        crt, key = pki.issue(self.pki_dir, host, role="agent")
        to_server = f"tcp:{self.lab.service_address}/32:{SERVER_PORT}"
        inbound = [str(f) for f in DEFAULT_INBOUND] if failsafe_defaults else []
        outbound = [str(f) for f in DEFAULT_OUTBOUND] if failsafe_defaults else []
        path = self.dir / f"agent-{host}.yaml"
        path.write_text(yaml.safe_dump({
            "server": self.agent_server_url, "node": host,
            "ca": str(self.pki_dir / "ca.crt"), "cert": str(crt), "key": str(key),
            "stateDir": str(self.dir / f"agent-{host}"),
            "failsafeInbound": inbound, "failsafeOutbound": [*outbound, to_server],
            "metricsListen": f"127.0.0.1:{9473}", "driftInterval": 2.0,
            "statusInterval": 5.0, "heartbeatInterval": 2.0, "logLevel": "info",
            **self.agent_settings, **settings}))
        return path

    def start_agent(self, host: str, failsafe_defaults: bool | None = None,
                    **settings: Any) -> None:
        fs = self.failsafe_defaults if failsafe_defaults is None else failsafe_defaults
        config = self.agent_config(host, fs, **settings)
        self.agents[host] = self.lab.spawn(
            host, [str(BIN / "bulkhead-agent"), "--config", str(config)],
            self.dir / f"agent-{host}.log")

    def stop_agent(self, host: str, kill: bool = False) -> None:
        proc = self.agents.pop(host, None)
        if proc is not None:
            stop(proc, AGENT_STOP_GRACE, kill=kill)

    def start_agents(self, failsafe_defaults: bool) -> None:
        """(Re)start the agent of every agent host, with Felix's default failsafe ports
        or with only the one to the server."""
        for host in list(self.agents):
            self.stop_agent(host)
        self.failsafe_defaults = failsafe_defaults
        for host in self.agent_hosts:
            self.start_agent(host, failsafe_defaults)

    # -- talking to the server --------------------------------------------------------
    def connection(self) -> Connection:
        if self._conn is None:
            self._conn = Connection(self.server_url, ca=str(self.pki_dir / "ca.crt"),
                                    cert=str(self.pki_dir / "admin.crt"),
                                    key=str(self.pki_dir / "admin.key"), timeout=30)
        return self._conn

    def request(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        return self.connection().request(method, path, body, **kw)

    def apply(self, docs: Iterable[Mapping[str, Any]]) -> int | None:
        """Apply resources (all or nothing); the store revision it made, None if nothing
        changed."""
        text = "\n---\n".join(json.dumps(d) for d in docs)
        answer = self.request("POST", route("apply"), raw=text.encode(),
                              content_type="application/yaml")
        return answer.get("revision") if isinstance(answer, dict) else None

    def replace_all(self, docs: Sequence[Mapping[str, Any]], marker: str) -> int:
        """Make the store hold exactly `docs` (plus a marker network set, written last, so
        the last write always happens and gives the revision agents must reach). Tiers
        go last: a tier is deleted once no policy is left in it, even one that `docs`
        keeps but moves to another tier."""
        keep = {(d["kind"], d["metadata"]["name"]) for d in docs}
        stale: dict[str, list[str]] = {}
        for kind in POLICY_KINDS:
            listing = self.request("GET", resource_path(kind))
            stale[kind] = [i["metadata"]["name"] for i in listing.get("items", [])
                           if (kind, i["metadata"]["name"]) not in keep
                           and i["metadata"]["name"] != MARKER]
        for kind in POLICY_KINDS:
            if kind != "Tier":
                for name in stale[kind]:
                    self.request("DELETE", resource_path(kind, name))
        tiers = [d for d in docs if d["kind"] == "Tier"]
        others = [d for d in docs if d["kind"] != "Tier"]
        for batch in (tiers, others):
            if batch:
                self.apply(batch)
        for name in stale["Tier"]:
            self.request("DELETE", resource_path("Tier", name))
        revision = self.apply([{"apiVersion": "projectcalico.org/v3",
                                "kind": "GlobalNetworkSet",
                                "metadata": {"name": MARKER,
                                             "labels": {"bulkhead.io/step": marker}},
                                "spec": {}}])
        assert revision is not None  # the marker changed
        return revision

    def enforce(self, docs: Sequence[Mapping[str, Any]], marker: str,
                timeout: float = 30.0) -> int:
        """Make the store hold exactly `docs` and wait until every agent enforces them;
        the revision they reached."""
        revision = self.replace_all(docs, marker)
        self.wait_converged(revision, timeout=timeout)
        return revision

    def node_status(self, host: str) -> dict[str, Any]:
        """What `host`'s agent last reported ({} before its first report)."""
        for entry in self.nodes()["nodes"]:
            if entry["node"] == host:
                return dict(entry)
        return {}

    def table(self, host: str, timed: bool = False) -> str | None:
        """`nft list table inet bulkhead` in `host`; None when the table is absent. The
        elements of sets with timeouts (DNS: the domain sets and the hold set, which the
        agent changes by itself, and whose `expires` change every moment) are left out
        unless `timed`."""
        done = self.lab.run(host, ["nft", "list", "table", "inet", "bulkhead"])
        if done.returncode != 0:
            return None
        return done.stdout if timed else without_timed_elements(done.stdout)

    def agent_metrics(self, host: str) -> dict[str, float]:
        """The agent's /metrics in `host` (its own loopback), as name{labels} -> value."""
        fetch = ("import urllib.request as u; print(u.urlopen("
                 "'http://127.0.0.1:9473/metrics', timeout=5).read().decode())")
        done = self.lab.run(host, [sys.executable, "-c", fetch], timeout=30)
        if done.returncode != 0:
            raise LabError(f"{host}: agent metrics not served: {done.stderr.strip()[-300:]}")
        out: dict[str, float] = {}
        for line in done.stdout.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def nodes(self, revision: int | None = None) -> dict[str, Any]:
        query = {"revision": str(revision)} if revision is not None else None
        answer: dict[str, Any] = self.request("GET", route("nodes"), query=query)
        return answer

    def wait_converged(self, revision: int, hosts: Iterable[str] | None = None,
                       timeout: float = 30.0) -> float:
        """Wait until the agent of every (given) agent host enforces `revision`; seconds
        waited."""
        wanted = set(hosts if hosts is not None else self.agent_hosts)
        start = time.monotonic()
        while True:
            nodes = {n["node"]: n for n in self.nodes(revision)["nodes"]}
            behind = sorted(h for h in wanted
                            if not nodes.get(h, {}).get("converged", False))
            if not behind:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                detail = {h: nodes.get(h, {}) for h in behind[:3]}
                raise LabError(f"agents {behind} did not reach revision {revision} in "
                               f"{timeout:.0f} s: {detail}; last agent log: "
                               f"{log_tail(self.dir / f'agent-{behind[0]}.log', 5)}")
            time.sleep(0.02)


def without_timed_elements(listing: str) -> str:
    """An `nft list` text without the `elements = { ... }` of sets flagged `timeout`."""
    out: list[str] = []
    timed = skipping = False
    for line in listing.splitlines(keepends=True):
        stripped = line.strip()
        if skipping:
            skipping = not stripped.endswith("}")
            continue
        if stripped.startswith("set ") or stripped.startswith("map "):
            timed = False
        elif stripped.startswith("flags ") and "timeout" in stripped:
            timed = True
        elif timed and stripped.startswith("elements = {"):
            skipping = not stripped.endswith("}")
            continue
        out.append(line)
    return "".join(out)


assert set(POLICY_KINDS) == set(KINDS)
