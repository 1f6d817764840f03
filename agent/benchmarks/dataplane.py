"""Dataplane cost: new TCP connections per second and established throughput between two
lab hosts, with four rulesets in the receiver, side by side in one run.

    .venv/bin/python agent/benchmarks/dataplane.py [--rounds 40] [--json]
    .venv/bin/python agent/benchmarks/dataplane.py --policies 20 --elements 200 \\
        --selecting 4 --naive-rules 200 --rounds 1 --stream-rounds 1 --seconds 0.3  # smoke

One lab (`bench`: a client and four receivers, each receiver a network namespace of its
own holding one ruleset, loaded once):
  none      no ruleset at all;
  floor     the stateful floor: `ct state established,related accept; tcp dport N accept;
            drop` in the input hook;
  bulkhead  Bulkhead's table for the receiver's node, calculated from resources
            (`bulkhead.policy.plan`), rendered (`bulkhead.dataplane.nftables.render`) and
            loaded by the agent's applier: 1,000 policies, 100 of them selecting the
            receiver, their rules naming GlobalNetworkSets of 100,000 addresses in all;
  naive     the same meaning as one rule per (address, port), the way Ansible firewall
            roles write it (`ip saddr A tcp dport P accept`), the client's rule last.
Meaning, in `bulkhead` and `naive`: the client may reach TCP N; each listed address may
reach only its own list's port (6000 + list number), not N; the rest is dropped (the
floor lets anyone reach N). Probes check each receiver's meaning on the wire before
anything is timed. `--diagnose` adds two receivers with Bulkhead's table taken apart.
`--flow-logs` adds `bk-flows`: Bulkhead's table rendered with flow logs (every decision
counted and logged to NFLOG), read by the agent's flow pipeline (flowreader.py: NFLOG,
conntrack, the aggregator with staged verdicts) in that receiver; its figures are the
connection rate against `bulkhead` (goal at least 0.9) and the connections the reader
missed out of those made. `--dns` adds `bk-dns`: Bulkhead's table with DNS snooping (the
rules that log DNS to and from the trusted resolvers and hold answers, first in the input
and output chains); its figure is the connection rate against `bulkhead`: what snooping costs
traffic that is not DNS. `--ten-x` adds `bk-10x`: Bulkhead's table at ten times the run's
sizes (10,000 policies, 1,000 selecting the receiver, 1,000,000 addresses by default; the
same meaning), side by side with `bulkhead`; with each table the kernel memory it took
(kernelmem.py). `--size 10x` runs the whole benchmark at ten times the default sizes
instead (the naive table keeps --naive-rules rules).

The load is a C program (tcpbench.c, compiled here with gcc): an epoll loop of
non-blocking connects closed with a reset (no TIME_WAIT), against an accept-and-close
server; and streams written for a bounded time into a sink. One client run takes the
receivers in turn, a short slice each (none, floor, bulkhead, naive, none, ...), so the
load of whatever else runs on the machine hits all four alike. Figures: each receiver's
best and median slice, their ratios to `none` (and Bulkhead's to `floor`: the goal is at
least 0.9), and the ratios within each cycle of slices, median and quartiles over the
cycles: on a loaded machine these are the ones to quote (the best slice is whichever
receiver happened to run in an idle moment).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bulkhead.dataplane.nftables import Ruleset, render
from bulkhead.dataplane.nftables.apply import ApplyResult, NftApplier
from bulkhead.dataplane.nftables.render import DnsSnooping, FlowLogging
from bulkhead.lab import Lab, LabError, ProbeSpec
from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import NodePlan, calculate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # agent/, for tests.procs
from tests.procs import run_main, stop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernelmem, beside this file
from kernelmem import describe, measured

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "tcpbench.c"
V3 = "projectcalico.org/v3"
PORT = 5001                     # the port the client may reach
LIST_PORT = 6000                # list i may reach LIST_PORT + i
CONFIGS = ("none", "floor", "bulkhead", "naive")
# --diagnose: Bulkhead's table taken apart, to see which part of the walk costs what.
DIAGNOSTIC = ("bk-noout",    # without the output hook chain (the floor has none)
              "bk-small")    # the receiver's verdict map cut down to the client's element
FLOWS = "bk-flows"              # --flow-logs: Bulkhead's table with flow logs, and a reader
DNS = "bk-dns"                  # --dns: Bulkhead's table with DNS snooping rules
TENX = "bk-10x"                 # --ten-x: Bulkhead's table at ten times the sizes
# --size: (policies, addresses in network sets, policies selecting the receiver).
SIZES = {"1x": (1_000, 100_000, 100), "10x": (10_000, 1_000_000, 1_000)}
CLIENT = "client"
# Listed addresses: every other address of 198.18.64.0-198.19.191.255 (inside the lab's
# 198.18.0.0/15, away from the hosts at 198.18.0.10+, the uplinks and the service address).
# Never two neighbours in one list, so no list collapses into a CIDR.
LIST_BASE = int(ipaddress.IPv4Address("198.18.64.0"))
LIST_SLOTS = 49_152


def listed(i: int, j: int, per_list: int) -> str:
    """Address j of list i."""
    return str(ipaddress.IPv4Address(LIST_BASE + 2 * ((i * per_list + j) % LIST_SLOTS)))


def resources(policies: int, elements: int, selecting: int, client_ip: str, recv_ip: str
              ) -> list[dict[str, Any]]:
    """The store: the receiver's and the client's host endpoints, `selecting` network sets
    of `elements` addresses in all, and `policies` policies of which `selecting` select the
    receiver (in order; the last one also lets the client in on PORT)."""
    per_list = elements // selecting
    docs: list[dict[str, Any]] = [
        {"apiVersion": V3, "kind": "HostEndpoint",
         "metadata": {"name": "receiver", "labels": {"role": "db"}},
         "spec": {"node": "receiver", "interfaceName": "eth0", "expectedIPs": [recv_ip]}},
        {"apiVersion": V3, "kind": "HostEndpoint",
         "metadata": {"name": "client", "labels": {"role": "client"}},
         "spec": {"node": "client", "interfaceName": "eth0", "expectedIPs": [client_ip]}}]
    for i in range(selecting):
        docs.append({"apiVersion": V3, "kind": "GlobalNetworkSet",
                     "metadata": {"name": f"list-{i}", "labels": {"list": f"l{i}"}},
                     "spec": {"nets": [listed(i, j, per_list) for j in range(per_list)]}})
    for i in range(policies):
        rules: list[dict[str, Any]] = [{
            "action": "Allow", "protocol": "TCP",
            "source": {"selector": f"list == 'l{i % selecting}'"},
            "destination": {"ports": [LIST_PORT + i % selecting]}}]
        if i == selecting - 1:
            rules.append({"action": "Allow", "protocol": "TCP",
                          "source": {"selector": "role == 'client'"},
                          "destination": {"ports": [PORT]}})
        # The other policies select endpoints of other nodes: calculated, not rendered here.
        selector = "role == 'db'" if i < selecting else f"role == 'svc{i}'"
        docs.append({"apiVersion": V3, "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": f"p{i:04d}"},
                     "spec": {"order": i, "selector": selector, "ingress": rules}})
    return docs


def floor_script() -> str:
    return ("table inet floor {\n\tchain input {\n"
            "\t\ttype filter hook input priority filter; policy accept;\n"
            "\t\tct state established,related accept\n"
            f"\t\ttcp dport {PORT} accept\n\t\tdrop\n\t}}\n}}\n")


def naive_script(rules: int, elements: int, selecting: int, client_ip: str) -> str:
    """One rule per listed address and its port, `rules` of them taken evenly from every
    list (the first address of each list included), the client's rule last."""
    per_list = elements // selecting
    take = max(1, rules // selecting)
    lines = [f"\t\tip saddr {listed(i, j, per_list)} tcp dport {LIST_PORT + i} accept"
             for i in range(selecting) for j in range(min(take, per_list))]
    return ("table inet naive {\n\tchain input {\n"
            "\t\ttype filter hook input priority filter; policy accept;\n"
            "\t\tct state established,related accept\n" + "\n".join(lines) + "\n"
            f"\t\tip saddr {client_ip} tcp dport {PORT} accept\n\t\tdrop\n\t}}\n}}\n")


def variants(ruleset: Ruleset, client_ip: str) -> dict[str, Ruleset]:
    """Bulkhead's table without its output chain, and with its verdict maps holding only
    the client's elements (the same chains, so the same walk, over a tiny map)."""
    noout = Ruleset(ruleset.table, dict(ruleset.sets),
                    {n: c for n, c in ruleset.chains.items() if n != "output"})
    small_sets = {n: dataclasses.replace(x, elements=tuple(
                      e for e in x.elements if f" {client_ip} " in f" {e} "))
                  if n.startswith("m") else x for n, x in ruleset.sets.items()}
    small = Ruleset(ruleset.table, small_sets, dict(ruleset.chains))
    return {"bk-noout": noout, "bk-small": small}


def build_tool(out_dir: Path) -> Path:
    exe = out_dir / "tcpbench"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(C_SOURCE)], check=True,
                   capture_output=True, text=True, timeout=120)
    return exe


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


class Bench:
    def __init__(self, lab: Lab, tool: Path, logs: Path, args: argparse.Namespace,
                 receivers: Sequence[str]) -> None:
        self.lab = lab
        self.receivers = tuple(receivers)
        self.tool = str(tool)
        self.logs = logs
        self.args = args
        self._spawns = 0
        self.resources_file = logs / "resources.json"
        self.reader: subprocess.Popen[bytes] | None = None

    def start_reader(self) -> Path:
        """The flow pipeline in the bk-flows receiver, once it reads; where its JSON goes."""
        out, log = self.logs / "flowreader.json", self.logs / "flowreader.log"
        self.reader = self.lab.spawn(FLOWS, [
            sys.executable, str(HERE / "flowreader.py"), str(self.resources_file), "receiver",
            "eth0", f"{self.lab.address('bulkhead')}/15", str(out),
            *(["--events"] if self.args.conntrack_events else [])], log)
        deadline = time.monotonic() + 120
        while "ready" not in (log.read_text() if log.exists() else ""):
            if self.reader.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"flowreader did not start: "
                               f"{log.read_text() if log.exists() else '(no log)'}")
            time.sleep(0.05)
        return out

    def stop_reader(self, out: Path) -> dict[str, Any]:
        if self.reader is not None:
            stop(self.reader, grace=30)
            self.reader = None
        if not out.exists():
            raise LabError("flowreader wrote nothing: "
                           f"{(self.logs / 'flowreader.log').read_text()[-2000:]}")
        found: dict[str, Any] = json.loads(out.read_text())
        return found

    def nft_load(self, host: str, script: str, timeout: float) -> float:
        start = time.perf_counter()
        done = self.lab.run(host, ["nft", "-f", "-"], input=script, timeout=timeout)
        if done.returncode != 0:
            raise LabError(f"nft refused the {host} ruleset: {done.stderr[:2000]}")
        return time.perf_counter() - start

    def server(self, host: str, mode: str, seconds: float) -> subprocess.Popen[bytes]:
        """tcpbench accept|sink in `host`, once it listens."""
        self._spawns += 1
        log = self.logs / f"{host}-{mode}-{self._spawns}.log"
        proc = self.lab.spawn(host, [self.tool, mode, str(PORT), f"{seconds:.1f}"], log)
        deadline = time.monotonic() + 10
        while "ready" not in (log.read_text() if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"tcpbench {mode} in {host} did not start: "
                               f"{log.read_text() if log.exists() else '(no log)'}")
            time.sleep(0.01)
        return proc

    def client(self, argv: Sequence[str], bound: float) -> list[dict[str, Any]]:
        done = self.lab.run(CLIENT, [self.tool, *argv], timeout=bound)
        if done.returncode != 0:
            raise LabError(f"tcpbench {' '.join(argv)}: {done.stderr.strip()}")
        slices: list[dict[str, Any]] = json.loads(done.stdout)["slices"]
        return slices

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        stop(proc, grace=5)

    def phase(self, mode: str, argv: Sequence[str], seconds: float) -> list[dict[str, Any]]:
        """Servers (`accept` or `sink`) in every receiver, then one client run that takes
        the receivers in turn, slice by slice; the slices, each named by its receiver."""
        rounds = self.args.rounds if mode == "accept" else self.args.stream_rounds
        slices = rounds * len(self.receivers)
        # A slice may run over by a handshake timeout (1 s) or a drain (5 s).
        bound = slices * (seconds + (6 if mode == "sink" else 2)) + 30
        servers = [self.server(host, mode, bound) for host in self.receivers]
        try:
            got = self.client([*argv, str(PORT), str(seconds), str(slices),
                               *self._limits(mode),
                               *(self.lab.address(h) for h in self.receivers)], bound)
        finally:
            for proc in servers:
                self._stop(proc)
        for one in got:
            one["receiver"] = self.receivers[one.pop("target")]
        return got

    def _limits(self, mode: str) -> list[str]:
        if mode == "accept":
            return [str(self.args.max_connections), str(self.args.inflight)]
        return []

    def connection_rates(self) -> list[dict[str, Any]]:
        got = self.phase("accept", ["connect"], self.args.seconds)
        for one in got:
            one["per_s"] = one["connections"] / one["seconds"]
        return got

    def throughputs(self) -> list[dict[str, Any]]:
        got = self.phase("sink", ["stream"], self.args.stream_seconds)
        for one in got:
            one["gbit_s"] = one["bytes"] * 8 / one["seconds"] / 1e9
        return got


def load_rulesets(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    lab = bench.lab
    client_ip = lab.address(CLIENT)
    info: dict[str, Any] = {}
    info["floor"] = {"load_s": bench.nft_load("floor", floor_script(), 60)}

    recv_ip = lab.address("bulkhead")
    info["bulkhead"], plan, ruleset = load_bulkhead(
        lab, "bulkhead", args.policies, args.elements, args.selecting)
    if args.ten_x:
        info[TENX] = load_bulkhead(lab, TENX, 10 * args.policies, 10 * args.elements,
                                   10 * args.selecting)[0]

    if args.flow_logs:
        docs = resources(args.policies, args.elements, args.selecting, client_ip, recv_ip)
        logged = render(plan, flow_logs=FlowLogging())
        flows_applied = NftApplier(netns=lab.ns(FLOWS)).apply(logged)
        bench.resources_file.write_text(json.dumps(docs))
        info[FLOWS] = {"apply_s": flows_applied.seconds, "counts": logged.counts(),
                       "decisions": len(logged.decisions)}

    if args.dns:
        snooped = render(plan, dns=DnsSnooping(("198.18.0.53", "2001:2::53", "127.0.0.53"),
                                               hold=True))
        dns_applied = NftApplier(netns=lab.ns(DNS)).apply(snooped)
        info[DNS] = {"apply_s": dns_applied.seconds, "counts": snooped.counts(),
                     "snoop_rules": [r for r in snooped.chains["input"].rules
                                     if "dns" in r]}

    if args.diagnose:
        for host, variant in variants(ruleset, client_ip).items():
            info[host] = {"load_s": bench.nft_load(host, variant.script(), 300),
                          "counts": variant.counts()}

    script = naive_script(args.naive_rules, args.elements, args.selecting, client_ip)
    rules = script.count("tcp dport")
    info["naive"] = {"rules": rules, "load_s": bench.nft_load("naive", script, 900)}
    return info


def load_bulkhead(lab: Lab, host: str, policies: int, elements: int, selecting: int
                  ) -> tuple[dict[str, Any], NodePlan, Ruleset]:
    """Bulkhead's table for `host` (the receiver), calculated from the store, rendered and
    loaded by the agent's applier into the host's namespace, which held no table before:
    what each stage took, and the kernel memory of the load."""
    recv_ip = lab.address(host)
    start = time.perf_counter()
    snapshot = Snapshot.build(parse_resource(d) for d in resources(
        policies, elements, selecting, lab.address(CLIENT), recv_ip))
    built = time.perf_counter()
    plan = calculate(snapshot, "receiver", {"eth0": [f"{recv_ip}/15"]}, Failsafes())
    planned = time.perf_counter()
    ruleset = render(plan)
    rendered = time.perf_counter()
    applier = NftApplier(netns=lab.ns(host))
    applied: list[ApplyResult] = []
    memory = measured(lambda: applied.append(applier.apply(ruleset)))
    # (Only the default table's: `nft` reads every element to list, a minute at 10x.)
    listing = lab.run(host, ["nft", "-t", "list", "ruleset"]).stdout if host == "bulkhead" \
        else ""
    return {
        "policies": len(snapshot.policies),
        "policies_selecting_receiver": sum(
            len(t.policies) for ep in plan.endpoints for t in ep.ingress.tiers),
        "network_set_addresses": sum(len(n.nets) for n in snapshot.network_sets.values()),
        "build_s": built - start, "plan_s": planned - built, "render_s": rendered - planned,
        "apply_s": applied[0].seconds, "counts": ruleset.counts(), "kernel_memory": memory,
        "input_chain": list(ruleset.chains["input"].rules), "listing_terse": listing,
    }, plan, ruleset


def check_meaning(lab: Lab, args: argparse.Namespace, receivers: Sequence[str]
                  ) -> dict[str, dict[str, str]]:
    """Probe each receiver from the client's address and from a listed address, on PORT
    and on list 0's port, and check the outcomes against the meaning of the rulesets."""
    per_list = args.elements // args.selecting
    outsider = listed(0, 0, per_list)
    client_ip = lab.address(CLIENT)
    lab.set_addresses(CLIENT, [client_ip, outsider])
    try:
        for host in receivers:
            lab.listen(host, tcp=[PORT, LIST_PORT])
        cases = [(f"{who} -> {port}", host, src, port) for host in receivers
                 for who, src in (("client", client_ip), ("listed", outsider))
                 for port in (PORT, LIST_PORT)]
        results = lab.probe_many([ProbeSpec(CLIENT, lab.address(host), "tcp", port,
                                            timeout=0.5, src_ip=src)
                                  for _, host, src, port in cases])
    finally:
        for host in receivers:
            lab.listen(host, replace=True)
        lab.set_addresses(CLIENT, [client_ip])
    seen: dict[str, dict[str, str]] = {h: {} for h in receivers}
    for (what, host, _, _), result in zip(cases, results, strict=True):
        seen[host][what] = result.outcome
    to_port, to_list = f"-> {PORT}", f"-> {LIST_PORT}"
    allowed = {"none": {f"client {to_port}", f"client {to_list}", f"listed {to_port}",
                        f"listed {to_list}"},
               "floor": {f"client {to_port}", f"listed {to_port}"},
               "bulkhead": {f"client {to_port}", f"listed {to_list}"},
               "naive": {f"client {to_port}", f"listed {to_list}"},
               "bk-noout": {f"client {to_port}", f"listed {to_list}"},
               FLOWS: {f"client {to_port}", f"listed {to_list}"},
               DNS: {f"client {to_port}", f"listed {to_list}"},
               TENX: {f"client {to_port}", f"listed {to_list}"},
               "bk-small": {f"client {to_port}"}}
    wrong = [f"{host}: {what} {outcome}" for host, got in seen.items()
             for what, outcome in got.items() if (outcome == "open") != (what in allowed[host])]
    if wrong:
        raise LabError("a ruleset does not mean what it should: " + "; ".join(wrong))
    return seen


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "kernel": os.uname().release,
        "sizes": {"policies": args.policies, "elements": args.elements,
                  "selecting": args.selecting, "naive_rules": args.naive_rules,
                  "rounds": args.rounds, "seconds": args.seconds,
                  "stream_rounds": args.stream_rounds,
                  "stream_seconds": args.stream_seconds, "inflight": args.inflight}}
    receivers = (*CONFIGS, *(DIAGNOSTIC if args.diagnose else ()),
                 *((FLOWS,) if args.flow_logs else ()), *((DNS,) if args.dns else ()),
                 *((TENX,) if args.ten_x else ()))
    results["receivers"] = receivers
    with tempfile.TemporaryDirectory(prefix="bulkhead-dataplane-") as tmp_name:
        tmp = Path(tmp_name)
        tool = build_tool(tmp)
        with Lab(args.lab, [CLIENT, *receivers]) as lab:
            bench = Bench(lab, tool, tmp, args, receivers)
            results["rulesets"] = load_rulesets(bench, args)
            out = bench.start_reader() if args.flow_logs else None
            results["meaning"] = check_meaning(lab, args, receivers)
            conn = bench.connection_rates()
            stream = bench.throughputs()
            if out is not None:
                results["flow_reader"] = bench.stop_reader(out)
    results["connection_slices"] = conn
    results["stream_slices"] = stream

    def per(slices: list[dict[str, Any]], key: str, host: str) -> list[float]:
        return [float(x[key]) for x in slices if x["receiver"] == host]

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    # The best slice is the one least disturbed by other work on the machine (the
    # project's convention for timings); the median says how typical it is.
    pick: dict[str, Callable[[Sequence[float]], float]] = {"best": max, "median": median}
    for stat, fn in pick.items():
        rate = {h: fn(per(conn, "per_s", h)) for h in receivers}
        gbit = {h: fn(per(stream, "gbit_s", h)) for h in receivers}
        results.setdefault("conn_per_s", {})[stat] = rate
        results.setdefault("throughput_gbit_s", {})[stat] = gbit
        results.setdefault("ratios", {})[stat] = {
            "conn_vs_none": {h: ratio(rate[h], rate["none"]) for h in receivers},
            "throughput_vs_none": {h: ratio(gbit[h], gbit["none"]) for h in receivers},
            "bulkhead_vs_floor_conn": ratio(rate["bulkhead"], rate["floor"]),
            "bulkhead_vs_floor_throughput": ratio(gbit["bulkhead"], gbit["floor"]),
            "bulkhead_vs_naive_conn": ratio(rate["bulkhead"], rate["naive"])}
    # Ratios within each cycle (one slice per receiver, back to back): drift in the
    # machine's load between cycles cancels out. Median and quartiles over the cycles.
    cycles = [dict(zip(receivers, c, strict=True))
              for c in zip(*(per(conn, "per_s", h) for h in receivers), strict=True)]
    pairs = [*((h, "none") for h in receivers[1:]), ("bulkhead", "floor"),
             ("bulkhead", "naive"), *((h, "floor") for h in receivers[len(CONFIGS):]),
             *(((FLOWS, "bulkhead"),) if args.flow_logs else ()),
             *(((DNS, "bulkhead"),) if args.dns else ()),
             *(((TENX, "bulkhead"),) if args.ten_x else ())]
    per_cycle = {f"{a}/{b}": [ratio(c[a], c[b]) for c in cycles] for a, b in pairs}
    results["ratios"]["per_cycle"] = {
        name: {"p25": quantile(values, 0.25), "median": median(values),
               "p75": quantile(values, 0.75)} for name, values in per_cycle.items()}
    results["ratios"]["bulkhead_vs_floor_conn_per_cycle"] = per_cycle["bulkhead/floor"]
    results["failed_connections"] = {h: sum(int(x["failed"]) for x in conn
                                            if x["receiver"] == h) for h in receivers}
    if args.flow_logs:
        made = sum(int(x["connections"]) for x in conn if x["receiver"] == FLOWS)
        seen = results["flow_reader"]["connections_seen"]
        # The reader also saw the meaning probes and the stream phase's connections.
        results["flow_logs"] = {"connections_made": made, "connections_seen": seen,
                                "missed": max(0, made - seen),
                                "missed_share": max(0, made - seen) / made if made else 0.0}
    results["loadavg_after"] = os.getloadavg()
    return results


def report(results: dict[str, Any]) -> str:
    rs = results["rulesets"]
    lines = [f"dataplane, {results['date']}, load {results['loadavg_before'][0]:.2f} -> "
             f"{results['loadavg_after'][0]:.2f}, {results['sizes']['rounds']} cycles of one "
             f"slice per receiver",
             *(f"{h} ruleset: {rs[h]['policies']} policies, "
               f"{rs[h]['policies_selecting_receiver']} selecting the receiver, "
               f"{rs[h]['network_set_addresses']} addresses; counts {rs[h]['counts']}; plan "
               f"{rs[h]['plan_s']:.1f} s, render {rs[h]['render_s']:.1f} s, apply "
               f"{rs[h]['apply_s']:.1f} s\n  "
               + describe(rs[h]['kernel_memory'], rs[h]['counts'].get('elements', 0))
               for h in ("bulkhead", TENX) if h in rs),
             f"naive ruleset: {rs['naive']['rules']} rules, loaded in "
             f"{rs['naive']['load_s']:.1f} s; floor loaded in {rs['floor']['load_s']:.2f} s"]
    for stat in ("best", "median"):
        conn, gbit = results["conn_per_s"][stat], results["throughput_gbit_s"][stat]
        ratios = results["ratios"][stat]
        lines.append(f"{stat} slice:")
        for h in results["receivers"]:
            lines.append(f"  {h:<9} {conn[h]:>9.0f} conn/s ({ratios['conn_vs_none'][h]:.2f} of "
                         f"none)   {gbit[h]:>6.2f} Gbit/s "
                         f"({ratios['throughput_vs_none'][h]:.2f})")
        lines.append(f"  bulkhead / floor: {ratios['bulkhead_vs_floor_conn']:.2f} of the "
                     f"connection rate (goal >= 0.9), "
                     f"{ratios['bulkhead_vs_floor_throughput']:.2f} of the throughput; "
                     f"bulkhead / naive: {ratios['bulkhead_vs_naive_conn']:.1f}x the "
                     f"connection rate")
    lines.append("connection rate, ratio within each cycle (median [p25-p75] of "
                 f"{results['sizes']['rounds']} cycles):")
    for name, q in results["ratios"]["per_cycle"].items():
        goal = "   goal >= 0.9" if name in ("bulkhead/floor", f"{TENX}/floor",
                                          f"{FLOWS}/bulkhead",
                                          f"{DNS}/bulkhead") else ""
        lines.append(f"  {name:<15} {q['median']:>7.2f} [{q['p25']:.2f}-{q['p75']:.2f}]{goal}")
    if "flow_logs" in results:
        fl, reader = results["flow_logs"], results["flow_reader"]
        lines.append(f"flow logs: {fl['connections_made']} connections made to {FLOWS} in the "
                     f"rate slices, {fl['connections_seen']} seen by the reader (missed "
                     f"{fl['missed']}, {fl['missed_share']:.1%}); NFLOG overruns "
                     f"{reader['nflog_overruns']}, aggregator drops {reader['dropped']}, "
                     f"{reader['records']} records in {reader['flushes']} flushes, reader RSS "
                     f"{reader['max_rss_mib']:.0f} MiB, CPU {reader['cpu_seconds']:.0f} s in "
                     f"{reader['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1x",
                        help="1x: 1,000 policies, 100 selecting, 100,000 addresses; "
                             "10x: ten times each")
    parser.add_argument("--policies", type=int)
    parser.add_argument("--elements", type=int,
                        help="addresses in the network sets the receiver's policies name")
    parser.add_argument("--selecting", type=int,
                        help="policies (and network sets) on the receiver's path")
    parser.add_argument("--naive-rules", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=40,
                        help="connection-rate cycles: one slice per receiver each, in turn")
    parser.add_argument("--seconds", type=float, default=0.4,
                        help="a connection-rate slice")
    parser.add_argument("--stream-rounds", type=int, default=10, help="stream cycles")
    parser.add_argument("--stream-seconds", type=float, default=0.5, help="a stream slice")
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--max-connections", type=int, default=2_000_000)
    parser.add_argument("--diagnose", action="store_true",
                        help="two more receivers: Bulkhead's table without its output chain, "
                             "and with a verdict map of the client's element only")
    parser.add_argument("--flow-logs", action="store_true",
                        help="one more receiver: Bulkhead's table with flow logs, read by the "
                             "agent's flow pipeline")
    parser.add_argument("--conntrack-events", action="store_true",
                        help="with --flow-logs: the reader takes conntrack destroy events too")
    parser.add_argument("--dns", action="store_true",
                        help="add bk-dns: Bulkhead's table with DNS snooping rules")
    parser.add_argument("--ten-x", action="store_true",
                        help=f"add {TENX}: Bulkhead's table at ten times the sizes")
    parser.add_argument("--lab", default="bench", help="lab name (not starting with t)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name, value in zip(("policies", "elements", "selecting"), SIZES[args.size],
                           strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ten_x and 10 * args.selecting > 1000:
        parser.error("--ten-x needs --selecting of at most 100 (ports 6000-6999)")
    if not 1 <= args.selecting <= min(args.policies, 1000):
        parser.error("--selecting must be 1..min(--policies, 1000)")
    if args.elements < args.selecting:
        parser.error("--elements must be at least --selecting")
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(report(results))
    return 0


if __name__ == "__main__":
    run_main(main)   # SIGTERM unwinds the `with`: the lab is removed
