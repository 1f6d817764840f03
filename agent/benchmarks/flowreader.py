"""The agent's flow-log pipeline alone, for the dataplane benchmark's `bk-flows` receiver:
run inside the receiver's network namespace, it reads NFLOG and conntrack as the agent
does (`bulkhead.observe`), aggregates with staged verdicts, flushes every interval, and
on SIGTERM writes what it saw as JSON. Shipping to a server is left out (the server
benchmark measures ingest).

    flowreader.py RESOURCES.json NODE IFACE ADDRESS OUT.json [--flush 15]
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import signal
import sys
import time
from pathlib import Path

from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.render import FlowLogging
from bulkhead.model import Snapshot, parse_resource
from bulkhead.observe.conntrack import (
    Conntrack,
    ConntrackEvents,
    enable_accounting,
    enable_events,
)
from bulkhead.observe.flows import FlowAggregator, tracked_key
from bulkhead.observe.nflog import NflogSocket
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("resources", type=Path)
    p.add_argument("node")
    p.add_argument("iface")
    p.add_argument("address")
    p.add_argument("out", type=Path)
    p.add_argument("--flush", type=float, default=15.0, help="as the agent's flushInterval")
    p.add_argument("--events", action="store_true",
                   help="conntrack destroy events too (flowLogs.conntrackEvents)")
    args = p.parse_args()
    snapshot = Snapshot.build(parse_resource(d) for d in json.loads(args.resources.read_text()))
    plan = calculate(snapshot, args.node, {args.iface: [args.address]}, Failsafes())
    decisions = render(plan, flow_logs=FlowLogging()).decisions
    enable_accounting()
    if args.events:
        enable_events()
    aggregator = FlowAggregator(args.node, snapshot, decisions, Failsafes(), now=time.time())
    nflog = NflogSocket([1, 2])
    events = ConntrackEvents() if args.events else None
    conntrack = Conntrack()
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sel = selectors.DefaultSelector()
    sel.register(nflog.fileno(), selectors.EVENT_READ, "nflog")
    if events is not None:
        sel.register(events.fileno(), selectors.EVENT_READ, "events")
    stats = {"packets": 0, "records": 0, "flushes": 0, "flush_seconds_max": 0.0}
    print("ready", flush=True)
    began = time.monotonic()
    setup = resource.getrusage(resource.RUSAGE_SELF)
    next_flush = time.monotonic() + args.flush
    while not stopping:
        for selected, _ in sel.select(timeout=max(0.0, next_flush - time.monotonic())):
            if selected.data == "nflog":
                packets = nflog.read(5000)
                stats["packets"] += len(packets)
                for packet in packets:
                    aggregator.packet(packet)
            elif events is not None:
                now = time.time()
                for kind, entry in events.read(5000):
                    if kind == "destroy":
                        aggregator.ended(tracked_key(entry), entry, now)
        if time.monotonic() >= next_flush:
            started = time.perf_counter()
            now = time.time()
            aggregator.counts(((tracked_key(e), e) for e in conntrack.dump()), now)
            stats["records"] += len(aggregator.flush(now))
            stats["flushes"] += 1
            stats["flush_seconds_max"] = max(stats["flush_seconds_max"],
                                             time.perf_counter() - started)
            next_flush = time.monotonic() + args.flush
    usage = resource.getrusage(resource.RUSAGE_SELF)
    args.out.write_text(json.dumps({
        "cpu_seconds": usage.ru_utime + usage.ru_stime - setup.ru_utime - setup.ru_stime,
        "seconds": time.monotonic() - began,
        **stats, "connections_seen": aggregator.connections_seen,
        "nflog_overruns": nflog.overruns,
        "event_overruns": events.overruns if events is not None else 0,
        "dropped": aggregator.dropped,
        "max_rss_mib": usage.ru_maxrss / 1024}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
