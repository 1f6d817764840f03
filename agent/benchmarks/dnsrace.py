"""Domain policy's race: how long from a DNS answer reaching the host to its address
being in the kernel's domain set, and how often a client that connects at once (no
delay mode: this kernel has no NFQUEUE to hold the answer) loses its first packet.

    .venv/bin/python agent/benchmarks/dnsrace.py [--names 300] [--json]
    .venv/bin/python agent/benchmarks/dnsrace.py --names 20     # smoke

One lab (`dnsbench`): `client` holds Bulkhead's table (egress: TCP 8080 allowed to
`*.bench.example` by name, everything else denied but the failsafe ports, DNS among
them) and runs the agent's snooper (`bulkhead.agent.dns.DnsSnooper`, the same code the
agent runs, here in this process, reading the client's NFLOG group); `resolver` runs
the lab's DNS server (`bulkhead.lab.dnsd`); `target` listens on TCP 8080 at one address
per name (198.18.2.0/24, 198.18.3.0/24 ...). A program in the client resolves
`n<i>.bench.example` and connects to the answer's address at once, one name after the
other, each name new (so each answer must add an element).

Figures:
- answer -> kernel: from the kernel's timestamp of the answer at the input hook to the
  netlink acknowledgement of its element (the snooper's own measurement), p50, p99, max;
- the client's connect time after the answer, p50, p99: a first SYN judged before the
  element was there is dropped and sent again after 1 s, so a connect of 0.9 s or more
  counts as raced;
- raced: how many of the names lost the race.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bulkhead.agent.config import DnsSettings
from bulkhead.agent.dns import DnsSnooper, percentile
from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.dataplane.nftables.render import DnsSnooping
from bulkhead.lab import Lab
from bulkhead.model import API_VERSION, Snapshot, parse_resource
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate

PORT = 8080
CLIENT, RESOLVER, TARGET = "client", "resolver", "target"

# Run in the client's namespace: resolve each name, connect at once, time it.
CLIENT_PROGRAM = r"""
import json, socket, sys, time
import dns.message, dns.query
server, names, port = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
out = []
for name in names:
    q = dns.message.make_query(name, "A")
    t0 = time.monotonic()
    r = dns.query.udp(q, server, timeout=2)
    answered = time.monotonic()
    address = [rd.address for rr in r.answer for rd in rr][0]
    s = socket.socket()
    s.settimeout(4)
    try:
        s.connect((address, port))
        ok = True
    except OSError:
        ok = False
    done = time.monotonic()
    s.close()
    out.append({"name": name, "address": address, "resolve_s": answered - t0,
                "connect_s": done - answered, "ok": ok})
print(json.dumps(out))
"""


def target_address(i: int) -> str:
    return f"198.18.{2 + i // 250}.{1 + i % 250}"


def resources(client_ip: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": API_VERSION, "kind": "HostEndpoint",
         "metadata": {"name": CLIENT, "labels": {"app": "client"}},
         "spec": {"node": CLIENT, "interfaceName": "*", "expectedIPs": [client_ip]}},
        {"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
         "metadata": {"name": "by-name"},
         "spec": {"selector": "app == 'client'", "types": ["Egress"], "egress": [
             {"action": "Allow", "protocol": "TCP",
              "destination": {"domains": ["*.bench.example"], "ports": [PORT]}}]}}]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "kernel": os.uname().release, "names": args.names}
    names = [f"n{i}.bench.example" for i in range(args.names)]
    with tempfile.TemporaryDirectory(prefix="bulkhead-dns-") as tmp_name, \
            Lab(args.lab, [CLIENT, RESOLVER, TARGET]) as lab:
        tmp = Path(tmp_name)
        resolver_ip = lab.address(RESOLVER)
        zone = {name: {"A": [target_address(i)], "ttl": 300} for i, name in enumerate(names)}
        (tmp / "zone.json").write_text(json.dumps(zone))
        lab.spawn(RESOLVER, [sys.executable, "-m", "bulkhead.lab.dnsd", "--zone",
                             str(tmp / "zone.json"), "--listen", resolver_ip],
                  tmp / "dnsd.log")
        lab.set_addresses(TARGET, [lab.address(TARGET),
                                   *(target_address(i) for i in range(args.names))])
        lab.listen(TARGET, tcp=[PORT])
        settings = DnsSettings(trusted_servers=(resolver_ip,))
        snoop = DnsSnooping((resolver_ip,))
        plan = calculate(Snapshot.build(parse_resource(d) for d in resources(
            lab.address(CLIENT))), CLIENT, {}, Failsafes())
        ruleset = render(plan, dns=snoop)
        ns = lab.ns(CLIENT)
        snooper = DnsSnooper(settings, snoop, tmp, netns=ns)
        applier = NftApplier(netns=ns)
        applier.timed = snooper.timed
        applier.apply(ruleset)
        snooper.applied(ruleset.domain_sets, full=True)
        stop = threading.Event()
        loop_ready = threading.Event()

        def reader() -> None:
            async def main() -> None:
                task = asyncio.create_task(snooper.run(stop.is_set))
                loop_ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.05)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            asyncio.run(main())

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        loop_ready.wait(10)
        time.sleep(0.2)   # the NFLOG group bound before the first answer
        # Nothing is open before the answers: one probe to a name's address is dropped.
        before = lab.probe(CLIENT, target_address(0), "tcp", PORT, timeout=0.5)
        results["before_answer"] = before.outcome
        done = lab.run(CLIENT, [sys.executable, "-c", CLIENT_PROGRAM, resolver_ip,
                                json.dumps(names), str(PORT)], timeout=60 + 6 * args.names)
        stop.set()
        thread.join(30)
        snooper.close()
        if done.returncode != 0:
            raise RuntimeError(f"client program failed: {done.stderr[-800:]}")
        rows = json.loads(done.stdout)
        latencies = list(snooper.latencies)
        counters = snooper.stats()
    connects = [r["connect_s"] for r in rows]
    raced = [r for r in rows if r["connect_s"] >= 0.9 or not r["ok"]]
    results.update({
        "answers_read": counters["dnsAnswers"],
        "elements_written": counters["dnsElementsWritten"],
        "answer_to_kernel_ms": {
            "samples": len(latencies),
            "p50": 1000 * (percentile(latencies, 0.5) or 0.0),
            "p99": 1000 * (percentile(latencies, 0.99) or 0.0),
            "max": 1000 * max(latencies, default=0.0)},
        "connect_ms": {"p50": 1000 * (percentile(connects, 0.5) or 0.0),
                       "p99": 1000 * (percentile(connects, 0.99) or 0.0)},
        "failed": sum(1 for r in rows if not r["ok"]),
        "raced": len(raced), "raced_share": len(raced) / len(rows) if rows else 0.0,
        "loadavg_after": os.getloadavg()})
    return results


def report(r: dict[str, Any]) -> str:
    a, c = r["answer_to_kernel_ms"], r["connect_ms"]
    return "\n".join([
        f"dns, {r['date']}, load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
        f"{r['names']} names, each resolved then connected to at once",
        f"before any answer: a connection to a name's address is {r['before_answer']}",
        f"answers read {r['answers_read']}, elements written {r['elements_written']}",
        f"answer -> element in the kernel: p50 {a['p50']:.2f} ms, p99 {a['p99']:.2f} ms, "
        f"max {a['max']:.2f} ms ({a['samples']} samples)",
        f"connect after the answer: p50 {c['p50']:.2f} ms, p99 {c['p99']:.2f} ms",
        f"raced (first SYN dropped, sent again after 1 s): {r['raced']} of {r['names']} "
        f"({r['raced_share']:.1%}); failed {r['failed']}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=300,
                        help="names resolved and connected to (at most 2,000)")
    parser.add_argument("--lab", default="dnsbench", help="lab name (not starting with t)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.names <= 2000:
        parser.error("--names: 1 to 2000")
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
