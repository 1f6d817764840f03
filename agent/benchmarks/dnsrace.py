"""Domain policy's race, in both modes side by side in one run: how long from a DNS
answer reaching the host to its address being in the kernel's domain set, how often a
client that connects at once loses its first packet, and what holding the answer costs.

    .venv/bin/python agent/benchmarks/dnsrace.py [--names 300] [--json]
    .venv/bin/python agent/benchmarks/dnsrace.py --names 20     # smoke

One lab (`dnsbench`): `client` holds Bulkhead's table (egress: TCP 8080 allowed to
`*.bench.example` by name, everything else denied but the failsafe ports, DNS among
them) and runs the agent's snooper (`bulkhead.agent.dns.DnsSnooper`, the same code the
agent runs, here in this process, reading the client's NFLOG group); `resolver` runs
the lab's DNS server (`bulkhead.lab.dnsd`); `target` listens on TCP 8080 at one address
per name (198.18.2.0/24 on). A program in the client resolves each name and connects to
the answer's address at once, one name after the other, each name new (so each answer
must add an element). First in `NoDelay` mode (the answer passes while the agent writes
the element), then in `DelayDNSResponse` (the table holds the answer, the agent sends it
on once the element is written), with names of their own.

Figures, per mode:
- answer -> kernel: from the kernel's timestamp of the answer at the input hook to the
  netlink acknowledgement of its element (the snooper's own measurement), p50, p99, max;
- answer held: from that timestamp to the answer sent on (DelayDNSResponse);
- the client's resolve time (query to answer) and connect time after the answer, p50,
  p99: a first SYN judged before the element was there is dropped and sent again after
  1 s, so a connect of 0.9 s or more counts as raced;
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
from bulkhead.agent.dns import DnsSnooper, percentile, snooping
from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.apply import NftApplier
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


def target_address(name: str) -> str:
    """n<i>.m<m>.bench.example -> 198.18.<2 + (m * 2000 + i) // 250>.<...>"""
    i, m = int(name.split(".")[0][1:]), int(name.split(".")[1][1:])
    k = m * 2000 + i
    return f"198.18.{2 + k // 250}.{1 + k % 250}"


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


MODES = ("NoDelay", "DelayDNSResponse")


def measure(lab: Lab, tmp: Path, mode: str, names: list[str]) -> dict[str, Any]:
    """One mode: the client's table rendered for it, a snooper reading, the client's
    resolve-and-connect loop over `names`."""
    resolver_ip = lab.address(RESOLVER)
    settings = DnsSettings(trusted_servers=(resolver_ip,), mode=mode)
    snoop = snooping(settings)
    plan = calculate(Snapshot.build(parse_resource(d) for d in resources(
        lab.address(CLIENT))), CLIENT, {}, Failsafes())
    ruleset = render(plan, dns=snoop)
    ns = lab.ns(CLIENT)
    state = tmp / mode
    state.mkdir()
    snooper = DnsSnooper(settings, snoop, state, netns=ns)
    applier = NftApplier(netns=ns)
    applier.timed = snooper.timed
    applier.apply(ruleset)
    snooper.applied(ruleset.domain_sets, full=True)
    stop = threading.Event()
    started = threading.Event()

    def reader() -> None:
        async def main() -> None:
            task = asyncio.create_task(snooper.run(stop.is_set))
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        asyncio.run(main())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    started.wait(10)
    deadline = time.monotonic() + 10
    while snoop.hold and not snooper.holding and time.monotonic() < deadline:
        time.sleep(0.05)   # holding starts with the first renewal
    # Nothing is open before the answers: a probe to a name's address is dropped.
    before = lab.probe(CLIENT, target_address(names[0]), "tcp", PORT, timeout=0.5).outcome
    done = lab.run(CLIENT, [sys.executable, "-c", CLIENT_PROGRAM, resolver_ip,
                            json.dumps(names), str(PORT)], timeout=60 + 6 * len(names))
    stop.set()
    thread.join(30)
    snooper.close()
    if done.returncode != 0:
        raise RuntimeError(f"client program failed ({mode}): {done.stderr[-800:]}")
    rows = json.loads(done.stdout)
    latencies, held = list(snooper.latencies), list(snooper.held)
    counters = snooper.stats()
    connects = [r["connect_s"] for r in rows]
    raced = [r for r in rows if r["connect_s"] >= 0.9 or not r["ok"]]

    def ms(values: list[float], fraction: float) -> float:
        return 1000 * (percentile(values, fraction) or 0.0)

    return {
        "names": len(names), "before_answer": before,
        "answers_read": counters["dnsAnswers"],
        "elements_written": counters["dnsElementsWritten"],
        "released": counters["dnsReleased"],
        "answer_to_kernel_ms": {"samples": len(latencies), "p50": ms(latencies, 0.5),
                                "p99": ms(latencies, 0.99),
                                "max": 1000 * max(latencies, default=0.0)},
        "answer_held_ms": {"samples": len(held), "p50": ms(held, 0.5), "p99": ms(held, 0.99)},
        "resolve_ms": {"p50": ms([r["resolve_s"] for r in rows], 0.5),
                       "p99": ms([r["resolve_s"] for r in rows], 0.99)},
        "connect_ms": {"p50": ms(connects, 0.5), "p99": ms(connects, 0.99)},
        "failed": sum(1 for r in rows if not r["ok"]),
        "raced": len(raced), "raced_share": len(raced) / len(rows) if rows else 0.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "kernel": os.uname().release, "names": args.names}
    names = {mode: [f"n{i}.m{m}.bench.example" for i in range(args.names)]
             for m, mode in enumerate(MODES)}
    everything = [n for mode in MODES for n in names[mode]]
    with tempfile.TemporaryDirectory(prefix="bulkhead-dns-") as tmp_name, \
            Lab(args.lab, [CLIENT, RESOLVER, TARGET]) as lab:
        tmp = Path(tmp_name)
        resolver_ip = lab.address(RESOLVER)
        zone = {name: {"A": [target_address(name)], "ttl": 300} for name in everything}
        (tmp / "zone.json").write_text(json.dumps(zone))
        lab.spawn(RESOLVER, [sys.executable, "-m", "bulkhead.lab.dnsd", "--zone",
                             str(tmp / "zone.json"), "--listen", resolver_ip],
                  tmp / "dnsd.log")
        lab.set_addresses(TARGET, [lab.address(TARGET),
                                   *sorted({target_address(n) for n in everything})])
        lab.listen(TARGET, tcp=[PORT])
        results["modes"] = {mode: measure(lab, tmp, mode, names[mode]) for mode in MODES}
    results["loadavg_after"] = os.getloadavg()
    return results


def report(r: dict[str, Any]) -> str:
    lines = [f"dns, {r['date']}, load {r['loadavg_before'][0]:.2f} -> "
             f"{r['loadavg_after'][0]:.2f}, {r['names']} names a mode, each resolved then "
             "connected to at once"]
    for mode, m in r["modes"].items():
        a, h, c = m["answer_to_kernel_ms"], m["answer_held_ms"], m["connect_ms"]
        lines += [
            f"{mode}: before any answer a connection is {m['before_answer']}; answers "
            f"{m['answers_read']}, elements {m['elements_written']}, released {m['released']}",
            f"  answer -> element in the kernel: p50 {a['p50']:.2f} ms, p99 {a['p99']:.2f} "
            f"ms, max {a['max']:.2f} ms",
            f"  answer held (arrival -> sent on): p50 {h['p50']:.2f} ms, p99 {h['p99']:.2f} ms"
            if h["samples"] else "  answers not held",
            f"  resolve p50 {m['resolve_ms']['p50']:.2f} ms, p99 {m['resolve_ms']['p99']:.2f} "
            f"ms; connect after the answer p50 {c['p50']:.2f} ms, p99 {c['p99']:.2f} ms",
            f"  raced (first SYN dropped, sent again after 1 s): {m['raced']} of {m['names']} "
            f"({m['raced_share']:.1%}); failed {m['failed']}"]
    return "\n".join(lines)


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
