"""Convergence: the time from a write on bulkhead-server to the rule being enforced in
the kernel of every lab host, with a real agent per host.

    .venv/bin/python agent/benchmarks/convergence.py [--hosts 20] [--writes 20] [--json]
    .venv/bin/python agent/benchmarks/convergence.py --hosts 2 --writes 2 --json  # smoke

A testbed (`bulkhead.testbed`, lab `conv`): bulkhead-server in the switch namespace,
a bulkhead-agent in each of N hosts, mutual TLS throughout. Every host is a HostEndpoint
(eth0) selected by one policy: Allow TCP PORT from the GlobalNetworkSet `conv-src`. Each
write replaces that set's one address with a new one (198.18.1.k), so each agent changes
a set element in its kernel. The clock starts when the write is sent; per host it stops
when the kernel commits the transaction that adds the new address, as `nft monitor` in
that host's namespace reports it (the netlink event the kernel sends at commit). Also
measured: when the server's /v1/nodes first shows every agent at the write's revision
(what agents report, polled every 50 ms over one keep-alive connection). After each
write, probes from the new address (held by the first host) to every other host check
that the port is open on the wire. Writes are spaced so they never overlap.

Figures: p50/p99 over writes of the time until every host enforces the write, p50/p99
over (host, write) of each host's own time, the same for the reported status, and the
agents' own apply times from their logs. The first write after the endpoints come under
policy is reported apart (`first_write`), not counted: the agent reopens its watch then.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import ipaddress
import json
import os
import random
import re
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bulkhead.lab import LabError, ProbeSpec
from bulkhead.testbed import Testbed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # agent/, for tests.procs
from tests.procs import stop

V3 = "projectcalico.org/v3"
PORT = 7000
SET_NAME = "conv-src"
STATUS_POLL = 0.05


def marker(k: int) -> str:
    """The address write k puts in the set: 198.18.1.1, .2, ... (198.18.1.0 at first)."""
    return str(ipaddress.IPv4Address("198.18.1.0") + k + 1)


def netset(k: int) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": "GlobalNetworkSet",
            "metadata": {"name": SET_NAME, "labels": {"conv": "src"}},
            "spec": {"nets": [f"{marker(k)}/32"]}}


def base_resources(tb: Testbed) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": V3, "kind": "HostEndpoint",
         "metadata": {"name": host, "labels": {"bench": "conv"}},
         "spec": {"node": host, "interfaceName": "eth0",
                  "expectedIPs": [tb.lab.address(host)],
                  "profiles": ["projectcalico-default-allow"]}}
        for host in tb.lab.hosts]
    docs.append({"apiVersion": V3, "kind": "GlobalNetworkPolicy",
                 "metadata": {"name": "conv"},
                 "spec": {"selector": "bench == 'conv'", "ingress": [
                     {"action": "Allow", "protocol": "TCP",
                      "source": {"selector": "conv == 'src'"},
                      "destination": {"ports": [PORT]}}]}})
    docs.append(netset(-1))
    return docs


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile, nearest rank (p99 of 20 values is the largest)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


class KernelWatch:
    """`nft monitor` in every host: when each address was committed in each host's kernel."""

    ELEMENT = re.compile(r"^add element inet bulkhead \S+ \{(.*)\}")
    ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")

    def __init__(self, tb: Testbed) -> None:
        self.seen: dict[str, dict[str, float]] = {h: {} for h in tb.lab.hosts}
        self.procs: list[subprocess.Popen[str]] = []
        self.threads: list[threading.Thread] = []
        for host in tb.lab.hosts:
            proc = subprocess.Popen(["ip", "netns", "exec", tb.lab.ns(host), "nft", "monitor"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1)
            self.procs.append(proc)
            thread = threading.Thread(target=self._read, args=(host, proc), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _read(self, host: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        pending: list[str] = []
        for line in proc.stdout:
            found = self.ELEMENT.match(line)
            if found:
                pending += self.ADDRESS.findall(found.group(1))
            elif line.startswith("# new generation"):
                now = time.perf_counter()   # the transaction is committed
                for address in pending:
                    self.seen[host].setdefault(address, now)
                pending.clear()

    def explain(self, tb: Testbed, host: str, address: str) -> str:
        """Why `host` looks behind: its monitor, its kernel's table, its agent's log."""
        proc = self.procs[list(self.seen).index(host)]
        listing = tb.lab.run(host, ["nft", "list", "table", "inet", "bulkhead"]).stdout
        log = tb.dir / f"agent-{host}.log"
        tail = log.read_text().splitlines()[-3:] if log.exists() else []
        return (f"{host}: monitor {'running' if proc.poll() is None else 'exited'}, "
                f"{address} {'in' if address in listing else 'not in'} the kernel's table, "
                f"agent log: {' | '.join(tail)}")

    def when(self, host: str, address: str) -> float | None:
        return self.seen[host].get(address)

    def close(self) -> None:
        stop(*self.procs, grace=5)


class Api:
    """One keep-alive HTTPS connection to the server, as the admin (a new TLS handshake
    per status poll would load the machine the agents run on)."""

    def __init__(self, tb: Testbed) -> None:
        ctx = ssl.create_default_context(cafile=str(tb.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(tb.pki_dir / "admin.crt"), str(tb.pki_dir / "admin.key"))
        self.host = tb.lab.uplink_address
        self.port = int(tb.server_url.rsplit(":", 1)[1])
        self.ctx = ctx
        self.conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=data,
                                  headers={"Content-Type": "application/json"})
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPSConnection(self.host, self.port,
                                                        context=self.ctx, timeout=30)
                if attempt:
                    raise
        if resp.status >= 300:
            raise LabError(f"{method} {path}: {resp.status} {payload[:500]!r}")
        return json.loads(payload) if payload else None

    def close(self) -> None:
        self.conn.close()


def one_write(tb: Testbed, api: Api, watch: KernelWatch, k: int, timeout: float
              ) -> dict[str, Any]:
    address = marker(k)
    hosts = list(tb.lab.hosts)
    start = time.perf_counter()
    stored = api.call("PUT", f"/v1/resources/GlobalNetworkSet/{SET_NAME}", netset(k))
    acked = time.perf_counter()
    revision = int(stored["metadata"]["resourceVersion"])
    status_at: float | None = None
    while True:
        now = time.perf_counter()
        if status_at is None and api.call(
                "GET", f"/v1/nodes?revision={revision}").get("converged"):
            status_at = time.perf_counter()
        if status_at is not None and all(watch.when(h, address) is not None for h in hosts):
            break
        if now - start > timeout:
            behind = [h for h in hosts if watch.when(h, address) is None]
            raise LabError(f"write {k} ({address}, revision {revision}) not enforced within "
                           f"{timeout:.0f} s; status {'converged' if status_at else 'behind'}; "
                           f"kernel behind on {behind[:5]}: "
                           + "; ".join(watch.explain(tb, h, address) for h in behind[:3]))
        time.sleep(STATUS_POLL)
    kernel = {h: (watch.when(h, address) or 0.0) - start for h in hosts}
    return {"write": k, "address": address, "revision": revision,
            "api_ms": 1000 * (acked - start), "kernel_ms": {h: 1000 * v for h, v in kernel.items()},
            "all_kernel_ms": 1000 * max(kernel.values()),
            "status_ms": 1000 * (status_at - start)}


def verify(tb: Testbed, k: int) -> None:
    """The new address reaches PORT on every other host; the previous one no longer does."""
    first, *others = list(tb.lab.hosts)
    if not others:
        return
    probes = [ProbeSpec(first, tb.lab.address(h), "tcp", PORT, timeout=1.0, src_ip=src)
              for src in (marker(k), marker(k - 1)) for h in others]
    results = tb.lab.probe_many(probes)
    wrong = [f"{r.spec.src_ip} -> {r.spec.dst}: {r.outcome}" for r in results
             if (r.outcome == "open") != (r.spec.src_ip == marker(k))]
    if wrong:
        raise LabError(f"after write {k}, the wire disagrees: {'; '.join(wrong[:5])}")


def agent_applies(tb: Testbed, since: int) -> dict[str, Any]:
    """From the agents' logs: their applies from revision `since` on, how many replaced
    the whole table, and how long an apply took inside the agent (p50, p99)."""
    seconds: list[float] = []
    full = 0
    for host in tb.lab.hosts:
        log = tb.dir / f"agent-{host}.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "applied" and int(record.get("revision", 0)) >= since:
                seconds.append(1000 * float(record.get("seconds", 0.0)))
                full += bool(record.get("full"))
    return {"applies": len(seconds), "full": full, "p50_ms": pct(seconds, 50),
            "p99_ms": pct(seconds, 99)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "hosts": args.hosts, "writes": args.writes}
    rng = random.Random(4)
    hosts = [f"h{i + 1}" for i in range(args.hosts)]
    started = time.perf_counter()
    with Testbed(args.lab, hosts) as tb:
        results["testbed_up_s"] = time.perf_counter() - started
        first = hosts[0]
        tb.lab.set_addresses(first, [tb.lab.address(first),
                                     *(marker(k) for k in range(-1, args.writes + 1))])
        for host in hosts:
            tb.lab.listen(host, tcp=[PORT])
        revision = tb.apply(base_resources(tb))
        assert revision is not None
        tb.wait_converged(revision, timeout=120)
        watch = KernelWatch(tb)
        api = Api(tb)
        writes: list[dict[str, Any]] = []
        try:
            time.sleep(1.0)   # every monitor subscribed
            # Write 0 is the first change after the endpoints came under policy: not
            # counted, reported on its own (see first_write in the docs).
            for k in range(args.writes + 1):
                done = one_write(tb, api, watch, k, args.timeout)
                if k == 0:
                    results["first_write"] = done
                else:
                    writes.append(done)
                verify(tb, k)
                time.sleep(args.gap + rng.uniform(0, args.gap))
            results["agent_applies"] = agent_applies(tb, writes[0]["revision"] if writes else 0)
        finally:
            api.close()
            watch.close()
    per_host = [v for w in writes for v in w["kernel_ms"].values()]
    every = [w["all_kernel_ms"] for w in writes]
    status = [w["status_ms"] for w in writes]
    results["kernel_every_host_ms"] = {"p50": pct(every, 50), "p99": pct(every, 99),
                                       "max": max(every)}
    results["kernel_per_host_ms"] = {"p50": pct(per_host, 50), "p99": pct(per_host, 99)}
    results["status_every_host_ms"] = {"p50": pct(status, 50), "p99": pct(status, 99)}
    results["api_write_ms"] = {"p50": pct([w["api_ms"] for w in writes], 50)}
    results["every_host_mean_ms"] = statistics.fmean(every)
    results["write_details"] = writes
    results["loadavg_after"] = os.getloadavg()
    return results


def report(r: dict[str, Any]) -> str:
    k, h, s = r["kernel_every_host_ms"], r["kernel_per_host_ms"], r["status_every_host_ms"]
    a = r["agent_applies"]
    return "\n".join([
        f"convergence, {r['date']}, load {r['loadavg_before'][0]:.2f}: {r['hosts']} agents, "
        f"{r['writes']} writes (testbed up in {r['testbed_up_s']:.1f} s)",
        f"  enforced in every host's kernel: p50 {k['p50']:.0f} ms, p99 {k['p99']:.0f} ms",
        f"  each host's kernel:              p50 {h['p50']:.0f} ms, p99 {h['p99']:.0f} ms",
        f"  every agent reports it (status): p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms",
        f"  the write itself (HTTPS PUT):    p50 {r['api_write_ms']['p50']:.0f} ms",
        f"  an apply inside the agent:       p50 {a['p50_ms']:.0f} ms, p99 {a['p99_ms']:.0f} ms "
        f"({a['applies']} applies, {a['full']} of them whole-table)",
        f"  (not counted: the first write after the endpoints came under policy reached "
        f"every kernel in {r['first_write']['all_kernel_ms']:.0f} ms)"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5,
                        help="seconds between writes (plus up to as much again, at random)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per write")
    parser.add_argument("--lab", default="conv", help="lab name (not starting with t)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.writes <= 500 or args.hosts < 1:
        parser.error("--writes must be 1..500 and --hosts at least 1")
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)   # unwinds the `with`: the lab is removed


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.exit(main())
