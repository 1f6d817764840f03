"""Flow logs under a flood of new connections, with the real processes: how many
connections' records reach the server, what the agent counts as dropped, and the agent's
memory while it keeps up.

    .venv/bin/python agent/benchmarks/flowflood.py [--seconds 20] [--json]

One lab (`flood`: a client and a receiver), bulkhead-server and an agent in the receiver
with flow logs on (flushInterval 15 s, the default; `--flush`). The client opens and
resets TCP connections to the receiver as fast as it can (tcpbench.c, `connect`, 32 in
flight) for `--seconds`;
every connection is allowed by a policy, so each is one first packet logged and one
conntrack entry. Then the server is asked for the receiver's records of that port until
their `started` add up to what the client made (or a deadline): lost = made - stored.
The agent's peak RSS (VmHWM) and its flow-log counters (kernel overruns, drops at caps,
spool) are read at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bulkhead.api import route
from bulkhead.model import API_VERSION
from bulkhead.testbed import Testbed

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # agent/, for tests.procs
from tests.procs import run_main, stop

from dataplane import build_tool

PORT = 5001
HOSTS = ("client", "recv")


def resources(client_ip: str, recv_ip: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": API_VERSION, "kind": "HostEndpoint",
         "metadata": {"name": "recv", "labels": {"role": "db"}},
         "spec": {"node": "recv", "interfaceName": "*", "expectedIPs": [recv_ip]}},
        {"apiVersion": API_VERSION, "kind": "HostEndpoint",
         "metadata": {"name": "client", "labels": {"role": "client"}},
         "spec": {"node": "client", "interfaceName": "*", "expectedIPs": [client_ip]}},
        {"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
         "metadata": {"name": "db"},
         "spec": {"selector": "role == 'db'", "ingress": [
             {"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'client'"},
              "destination": {"ports": [PORT]}}], "egress": [{"action": "Allow"}]}},
    ]


def stored(bed: Testbed) -> int:
    answer = bed.request("GET", route("flows"), query={
        "since": "0", "node": "recv", "reporter": "dst", "limit": "10000"})
    return sum(int(r["started"]) for r in answer["flows"] if r["dst_port"] == PORT)


def memory(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="bulkhead-flowflood-") as tmp_name:
        tmp = Path(tmp_name)
        tool = str(build_tool(tmp))
        flow_logs = {"enabled": True, "flushInterval": args.flush,
                     "conntrackEvents": args.conntrack_events}
        with Testbed(args.lab, list(HOSTS), failsafe_defaults=False, agent_hosts=["recv"],
                     agent_settings={"flowLogs": flow_logs}) as bed:
            lab = bed.lab
            bed.enforce(resources(lab.address("client"), lab.address("recv")), "flood")
            agent = bed.agents["recv"]
            before = memory(agent.pid)
            bound = args.seconds + 60
            server = lab.spawn("recv", [tool, "accept", str(PORT), str(bound)],
                               tmp / "accept.log")
            deadline = time.monotonic() + 10
            while "ready" not in ((tmp / "accept.log").read_text()
                                  if (tmp / "accept.log").exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError("tcpbench accept did not start")
                time.sleep(0.01)
            try:
                done = lab.run("client", [tool, "connect", str(PORT), str(args.seconds), "1",
                                          "100000000", "32", lab.address("recv")],
                               timeout=bound)
            finally:
                stop(server, grace=5)
            made = sum(int(s["connections"]) for s in json.loads(done.stdout)["slices"])
            start = time.monotonic()
            got = 0
            while time.monotonic() - start < args.wait:
                got = stored(bed)
                if got >= made:
                    break
                time.sleep(1.0)
            metrics = bed.agent_metrics("recv")
            after = memory(agent.pid)
    counters = {k.split('"')[1]: v for k, v in metrics.items()
                if k.startswith("bulkhead_agent_flow_logs{")}
    results.update({
        "connections_made": made, "connections_stored": got, "lost": max(0, made - got),
        "per_s": made / args.seconds, "seconds_to_store": time.monotonic() - start,
        "agent_rss_mib_before": before.get("VmRSS"), "agent_rss_mib_after": after.get("VmRSS"),
        "agent_peak_rss_mib": after.get("VmHWM"), "agent_counters": counters,
        "loadavg_after": os.getloadavg()})
    return results


def report(r: dict[str, Any]) -> str:
    c = r["agent_counters"]
    dropped = {k: v for k, v in c.items() if k.startswith("flowDropped") and v}
    return "\n".join([
        f"flow logs under a flood, {r['date']}, load {r['loadavg_before'][0]:.2f} -> "
        f"{r['loadavg_after'][0]:.2f}",
        f"  {r['connections_made']} connections in {r['seconds']:.0f} s "
        f"({r['per_s']:.0f}/s), {r['connections_stored']} in the server's records "
        f"{r['seconds_to_store']:.1f} s later: lost {r['lost']}",
        f"  agent RSS {r['agent_rss_mib_before']:.0f} MiB before, "
        f"{r['agent_rss_mib_after']:.0f} MiB after, peak {r['agent_peak_rss_mib']:.0f} MiB",
        f"  NFLOG overruns {c.get('flowNflogOverruns', 0):.0f}, conntrack overruns "
        f"{c.get('flowConntrackOverruns', 0):.0f}, dropped at caps {dropped or 'none'}, "
        f"records sent {c.get('flowRecordsSent', 0):.0f}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="the flood's length")
    parser.add_argument("--flush", type=float, default=15.0,
                        help="the agent's flushInterval (its conntrack dump comes as often)")
    parser.add_argument("--conntrack-events", action="store_true",
                        help="the agent takes conntrack destroy events too")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the records to reach the server")
    parser.add_argument("--lab", default="flood", help="lab name (not starting with t)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    run_main(main)   # SIGTERM unwinds the `with`: the lab is removed
