"""Agent footprint: the memory and CPU of a real bulkhead-agent, idle and under churn, at
1,000 policies and 10,000 host endpoints (issue 23; goal: <= 64 MiB RSS, <= 0.01 core
idle; calico-node uses 240-270 MiB and 0.12-0.17 of a core, felix alone about 90 MB).

    .venv/bin/python agent/benchmarks/footprint.py [--json]
    .venv/bin/python agent/benchmarks/footprint.py --policies 20 --heps 50 --elements 100 \\
        --selecting 4 --idle-seconds 3 --churn-seconds 2 --json          # smoke

One lab (`fprint`, one host `node`) from the testbed: bulkhead-server (SQLite store) in the
switch namespace, bulkhead-agent in the host, enforcing with nftables. The agent runs with
the defaults a user gets (driftInterval 30 s, statusInterval 60 s, heartbeatInterval 10 s,
logLevel info, DNS snooping on, flow logs off; `--flow-logs` turns them on), plus the
testbed's failsafe to the server. The store is apply.py's: `--heps` host endpoints on other
nodes (labels app=web0..9), `--selecting` network sets of `--elements` addresses in all,
`--policies` policies of which `--selecting` select this node's own host endpoint (each
allows one network set and one app group in), the rest select endpoints elsewhere.

After the agent reports the last revision applied (and `--settle` seconds more):
- idle: `--idle-seconds` with nothing written. RSS (VmRSS, sampled every second, the
  median is `rss_mib`) and CPU: utime + stime of the agent and of its children (reaped
  ones through cutime + cstime, live ones read directly) over the window, / wall time =
  cores (`idle_core`).
- churn: for `--churn-seconds`, a write every 1/`--churn-rate` s, alternately a label
  change of one host endpoint (app=web1 <-> app=cache: its address leaves one set and
  joins none) and one address of a network set replaced and put back; then until the
  agent reports the last one applied. RSS sampled after each write, CPU over the whole
  phase (`churn_core`), and the peak (VmHWM) at the end (`peak_rss_mib`).
The lab, the server and the agent are removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bulkhead.testbed import Testbed

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # agent/, for tests.procs
from tests.procs import run_main

from apply import peer, resources

HOST = "node"
MIB = 1024.0
CHUNK = 2_000          # documents per POST /v1/apply (the server takes 8 MiB a body)
TICK = os.sysconf("SC_CLK_TCK")
# What a user runs with (agent/src/bulkhead/agent/config.py), where the testbed's own
# settings differ (it checks drift every 2 s, reports every 5 s, heartbeats every 2 s).
USER_DEFAULTS: dict[str, Any] = {"driftInterval": 30.0, "statusInterval": 60.0,
                                 "heartbeatInterval": 10.0, "logLevel": "info"}


# --------------------------------------------------------------------------- /proc
def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and Threads of `pid` ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[name] = int(value.split()[0])
    return out


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (field 3 on); [] when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of `pid`, its reaped children and its live descendants, in seconds."""
    fields = stat_fields(pid)
    if not fields:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])   # utime stime cutime cstime
    for kid in children(pid):
        kf = stat_fields(kid)
        if kf:
            ticks += int(kf[11]) + int(kf[12])
    return ticks / TICK


def rss_mib(pid: int) -> float:
    """RSS of `pid` and its live descendants, MiB."""
    total = status_kib(pid).get("VmRSS", 0)
    for kid in children(pid):
        total += status_kib(kid).get("VmRSS", 0)
    return total / MIB


# --------------------------------------------------------------------------- the store
def store(args: argparse.Namespace, address: str) -> list[dict[str, Any]]:
    """apply.py's store, its first host endpoint made this lab host's own."""
    docs = resources(args.policies, args.elements, args.selecting, False, args.heps)
    own = docs[0]
    assert own["metadata"]["name"] == "receiver"
    own["spec"] = {**own["spec"], "node": HOST, "interfaceName": "*", "expectedIPs": [address]}
    return docs


def load(bed: Testbed, docs: Sequence[dict[str, Any]], timeout: float) -> tuple[int, float]:
    """Write `docs` in chunks and wait until the agent has applied the last revision:
    (that revision, seconds from the first write to the agent's report)."""
    start = time.monotonic()
    revision: int | None = None
    for i in range(0, len(docs), CHUNK):
        revision = bed.apply(docs[i:i + CHUNK]) or revision
    if revision is None:
        raise RuntimeError("the store did not change")
    bed.wait_converged(revision, timeout=timeout)
    return revision, time.monotonic() - start


def churn_docs(docs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The churn's writes, in turn: a label change and back, a network set change and
    back."""
    netset = next(d for d in docs if d["kind"] == "GlobalNetworkSet")
    nets = netset["spec"]["nets"]
    changed = {**netset, "spec": {"nets": ["198.19.250.254", *nets[1:]]}}
    return [[peer(1, "cache")], [changed], [peer(1, "web1")], [netset]]


# --------------------------------------------------------------------------- phases
def idle(pid: int, seconds: float) -> dict[str, Any]:
    samples: list[float] = []
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    end = t0 + seconds
    while True:
        samples.append(rss_mib(pid))
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return {"seconds": t1 - t0, "cpu_s": cpu1 - cpu0, "core": (cpu1 - cpu0) / (t1 - t0),
            "rss_mib": statistics.median(samples), "rss_max_mib": max(samples),
            "rss_min_mib": min(samples), "samples": len(samples)}


def churn(bed: Testbed, pid: int, docs: Sequence[dict[str, Any]], seconds: float,
          rate: float, timeout: float) -> dict[str, Any]:
    writes = churn_docs(docs)
    count = max(1, int(seconds * rate))
    samples: list[float] = []
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    revision: int | None = None
    latencies: list[float] = []
    for i in range(count):
        due = t0 + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        w0 = time.monotonic()
        revision = bed.apply(writes[i % len(writes)]) or revision
        latencies.append(time.monotonic() - w0)
        samples.append(rss_mib(pid))
    if revision is None:
        raise RuntimeError("the churn changed nothing")
    last_write = time.monotonic()
    bed.wait_converged(revision, timeout=timeout)
    samples.append(rss_mib(pid))
    cpu1, t1 = cpu_seconds(pid), time.monotonic()
    return {"writes": count, "rate_per_s": count / (last_write - t0 + 1e-9) if count > 1
            else rate, "seconds": t1 - t0, "converged_after_last_write_s": t1 - last_write,
            "cpu_s": cpu1 - cpu0, "core": (cpu1 - cpu0) / (t1 - t0),
            "rss_mib": statistics.median(samples), "rss_max_mib": max(samples),
            "write_ms_median": 1000 * statistics.median(latencies)}


def agent_counts(bed: Testbed) -> dict[str, Any]:
    """The agent's own metrics but the per-rule hit counters (read outside the measured
    windows: the read is a request the agent answers)."""
    try:
        metrics = bed.agent_metrics(HOST)
    except Exception as e:   # the figures stand without them
        return {"error": str(e)}
    return {k: v for k, v in metrics.items()
            if not k.startswith("bulkhead_agent_rule_hits_total")}


# --------------------------------------------------------------------------- tracemalloc
# The agent's own entry point with tracemalloc on: SIGUSR2 dumps a snapshot to the file
# named by the first argument (the agent's flags follow). The agent is not changed.
TRACED_AGENT = """
import signal, sys, tracemalloc
path = sys.argv.pop(1)
tracemalloc.start({frames})
signal.signal(signal.SIGUSR2, lambda *_: tracemalloc.take_snapshot().dump(path))
from bulkhead.agent.main import main
sys.exit(main())
"""


def start_traced_agent(bed: Testbed, settings: dict[str, Any], dump: Path,
                       frames: int) -> subprocess.Popen[bytes]:
    """Replace the testbed's agent by one under tracemalloc (same config and log)."""
    bed.stop_agent(HOST)
    config = bed.agent_config(HOST, bed.failsafe_defaults, **settings)
    proc = bed.lab.spawn(HOST, [sys.executable, "-c", TRACED_AGENT.format(frames=frames),
                                str(dump), "--config", str(config)],
                         bed.dir / f"agent-{HOST}.log")
    bed.agents[HOST] = proc
    return proc


def take_snapshot(pid: int, dump: Path, timeout: float = 120.0) -> tracemalloc.Snapshot:
    dump.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    size = -1
    while True:   # written when its size stops growing
        time.sleep(0.5)
        now = dump.stat().st_size if dump.exists() else -1
        if now > 0 and now == size:
            return tracemalloc.Snapshot.load(str(dump))
        if time.monotonic() > deadline:
            raise RuntimeError("the agent wrote no tracemalloc snapshot")
        size = now


def breakdown(snap: tracemalloc.Snapshot, top: int) -> dict[str, Any]:
    """Where the live Python memory was allocated: by line, by file, and by the deepest
    bulkhead frame of each allocation (the agent's code that asked for it, whichever
    library did the allocating)."""
    src = str(Path(__file__).resolve().parents[1] / "src") + os.sep

    def short(name: str) -> str:
        return name[len(src):] if name.startswith(src) else \
            name.rsplit("site-packages" + os.sep, 1)[-1]

    by_line = snap.statistics("lineno")
    by_file = snap.statistics("filename")
    owners: dict[str, list[int]] = {}
    for stat in snap.statistics("traceback"):
        if any(f.filename.startswith("<frozen importlib") for f in stat.traceback):
            where = "(importing modules)"
        else:
            frame = next((f for f in reversed(stat.traceback)   # the most recent first
                          if f.filename.startswith(src)), stat.traceback[-1])
            where = f"{short(frame.filename)}:{frame.lineno}"
        entry = owners.setdefault(where, [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    ranked = sorted(owners.items(), key=lambda kv: -kv[1][0])
    files: dict[str, int] = {}
    for where, (size, _) in owners.items():
        files[where.rsplit(":", 1)[0]] = files.get(where.rsplit(":", 1)[0], 0) + size
    return {
        "traced_mib": sum(s.size for s in by_file) / MIB / 1024,
        "by_file": [{"file": short(str(s.traceback[0].filename)),
                     "mib": s.size / MIB / 1024, "blocks": s.count} for s in by_file[:top]],
        "by_line": [{"line": f"{short(s.traceback[0].filename)}:{s.traceback[0].lineno}",
                     "mib": s.size / MIB / 1024, "blocks": s.count} for s in by_line[:top]],
        "by_bulkhead_caller": [{"line": k, "mib": v[0] / MIB / 1024, "blocks": v[1]}
                               for k, v in ranked[:top]],
        "by_bulkhead_file": [{"file": k, "mib": v / MIB / 1024} for k, v in
                             sorted(files.items(), key=lambda kv: -kv[1])[:top]]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = dict(USER_DEFAULTS)
    if args.flow_logs:
        settings["flowLogs"] = {"enabled": True}
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "sizes": {"policies": args.policies, "host_endpoints": args.heps + 1,
                  "network_sets": args.selecting, "set_addresses": args.elements,
                  "selecting_node": args.selecting},
        "settings": settings}
    with Testbed(args.lab, [HOST], agent_hosts=[HOST], agent_settings=settings) as bed:
        dump = bed.dir / "agent.tracemalloc"
        proc = (start_traced_agent(bed, settings, dump, args.tracemalloc)
                if args.tracemalloc else bed.agents[HOST])
        pid = proc.pid
        # An empty store (but the marker) applied: the agent's baseline.
        bed.wait_converged(bed.replace_all([], "empty"), timeout=args.timeout)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not args.tracemalloc and \
                not any(part.endswith(b"bulkhead-agent") for part in cmdline[1:2]):
            raise RuntimeError(f"pid {pid} is not the agent: {cmdline!r}")
        results["rss_start_mib"] = rss_mib(pid)
        docs = store(args, bed.lab.address(HOST))
        revision, load_s = load(bed, docs, args.timeout)
        results["load"] = {"revision": revision, "documents": len(docs),
                           "write_and_apply_s": load_s}
        results["rss_after_load_mib"] = rss_mib(pid)
        time.sleep(args.settle)
        quiet = idle(pid, args.idle_seconds)
        mem = status_kib(pid)
        results["idle"] = {**quiet, "rss_anon_mib": mem.get("RssAnon", 0) / MIB,
                           "rss_file_mib": mem.get("RssFile", 0) / MIB,
                           "threads": mem.get("Threads", 0),
                           "children": len(children(pid))}
        if args.tracemalloc:
            results["tracemalloc"] = breakdown(take_snapshot(pid, dump), args.top)
        if args.churn_seconds > 0:
            results["churn"] = churn(bed, pid, docs, args.churn_seconds, args.churn_rate,
                                     args.timeout)
        peak = status_kib(pid).get("VmHWM", 0) / MIB
        results["agent_metrics"] = agent_counts(bed)
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
    results.update({
        "rss_mib": results["idle"]["rss_mib"], "idle_core": results["idle"]["core"],
        "peak_rss_mib": peak,
        "churn_core": results["churn"]["core"] if "churn" in results else None,
        "churn_rss_mib": results["churn"]["rss_max_mib"] if "churn" in results else None,
        "loadavg_after": os.getloadavg(),
        "goal": {"rss_mib": 64, "idle_core": 0.01}})
    return results


def report(r: dict[str, Any]) -> str:
    s, i = r["sizes"], r["idle"]
    lines = [
        f"agent footprint, {r['date']}, load {r['loadavg_before'][0]:.2f} -> "
        f"{r['loadavg_after'][0]:.2f}",
        f"  store: {s['policies']} policies ({s['selecting_node']} select this node), "
        f"{s['host_endpoints']} host endpoints, {s['network_sets']} network sets of "
        f"{s['set_addresses']} addresses; written and applied in "
        f"{r['load']['write_and_apply_s']:.1f} s",
        f"  RSS with an empty store {r['rss_start_mib']:.1f} MiB, after the load "
        f"{r['rss_after_load_mib']:.1f} MiB",
        f"  idle  {i['seconds']:.0f} s: RSS {r['rss_mib']:.1f} MiB (anon "
        f"{i['rss_anon_mib']:.1f}, file {i['rss_file_mib']:.1f}; goal <= 64), CPU "
        f"{r['idle_core']:.4f} core (goal <= 0.01), {i['threads']} threads",
    ]
    c = r.get("churn")
    if c:
        lines.append(
            f"  churn {c['writes']} writes in {c['seconds']:.0f} s ({c['rate_per_s']:.1f}/s):"
            f" RSS {c['rss_mib']:.1f} MiB (max {c['rss_max_mib']:.1f}), CPU "
            f"{c['core']:.3f} core, converged {c['converged_after_last_write_s']:.2f} s "
            "after the last write")
    lines.append(f"  peak RSS (VmHWM) {r['peak_rss_mib']:.1f} MiB; calico-node: "
                 "240-270 MiB, 0.12-0.17 core")
    t = r.get("tracemalloc")
    if t:
        lines.append(f"  tracemalloc: {t['traced_mib']:.1f} MiB of Python objects live; "
                     "by the agent's line that asked for them:")
        lines.extend(f"    {e['mib']:7.2f} MiB {e['blocks']:8d} blocks  {e['line']}"
                     for e in t["by_bulkhead_caller"])
        lines.append("  by the agent's file that asked for them:")
        lines.extend(f"    {e['mib']:7.2f} MiB  {e['file']}" for e in t["by_bulkhead_file"])
        lines.append("  by file that allocated:")
        lines.extend(f"    {e['mib']:7.2f} MiB {e['blocks']:8d} blocks  {e['file']}"
                     for e in t["by_file"])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--heps", type=int, default=10_000,
                        help="host endpoints on other nodes (this node's own is one more)")
    parser.add_argument("--elements", type=int, default=10_000,
                        help="addresses in all the network sets")
    parser.add_argument("--selecting", type=int, default=100,
                        help="policies selecting this node (and network sets)")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--churn-seconds", type=float, default=30.0)
    parser.add_argument("--churn-rate", type=float, default=5.0, help="writes per second")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the agent's report and the idle window")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds the agent may take to apply a revision")
    parser.add_argument("--flow-logs", action="store_true", help="turn flow logs on")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="run the agent under tracemalloc (FRAMES frames a trace) and "
                        "report where its memory was allocated at the end of the idle "
                        "window; its RSS and CPU figures are then tracemalloc's too")
    parser.add_argument("--top", type=int, default=25, help="lines of the breakdown")
    parser.add_argument("--lab", default="fprint", help="lab name (not starting with t)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if min(args.policies, args.heps, args.elements, args.selecting) < 1 \
            or args.selecting > args.policies or args.churn_rate <= 0:
        parser.error("sizes must be >= 1, --selecting <= --policies, --churn-rate > 0")
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    run_main(main)   # SIGTERM unwinds the `with`: the lab is removed
