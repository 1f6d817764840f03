"""Impact preview benchmark: how many groups of stored flow records `POST /v1/preview`
judges a second, SQLite and ClickHouse (chdb) side by side in one run.

    .venv/bin/python agent/benchmarks/preview.py [--records 200000] [--groups 20000]
        [--endpoints 2000] [--policies 1000] [--json]

A fleet of `--endpoints` host endpoints (labels app, zone, env; one IPv4 and one IPv6
address each) and `--policies` policies in 5 tiers (each selects one app, allows a few
others' apps on two ports, then the tier denies the rest or passes; about one in four
staged) is built from a fixed seed; `--records` records with `--groups` distinct keys
(reporter, ends, port, action, trace) are stored in the last hour. The preview of every
staged policy promoted is then computed as the server computes it
(`bulkhead.server.preview.preview`): the store's grouping query, then the judging of each
group. Figures, best of `--repeat`: the grouping query, the judging, groups judged a
second, and the share of groups decided.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bulkhead.model import API_VERSION, Snapshot, parse_resource
from bulkhead.model.flowlog import End, FlowRecord, step
from bulkhead.policy.impact import Impact, proposed_state
from bulkhead.server.preview import PreviewRequest, preview
from bulkhead.store.flowlog import FlowQuery, FlowStore
from bulkhead.store.flowlog.sqlite import SQLiteFlowStore

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import best_of  # noqa: E402  (benchmarks/run.py, this script's folder)

TIERS = 5
APPS, ZONES, ENVS = 50, 4, 2
PORTS = (22, 80, 443, 5432, 8080, 9092)


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def fleet(endpoints: int, policies: int, rng: random.Random) -> list[dict[str, Any]]:
    docs = [doc("Tier", f"t{i}", {"order": 100 * (i + 1),
                                  "defaultAction": "Pass" if i < TIERS - 1 else "Deny"})
            for i in range(TIERS)]
    for n in range(endpoints):
        labels = {"app": f"app{n % APPS}", "zone": f"z{n % ZONES}", "env": f"e{n % ENVS}"}
        docs.append(doc("HostEndpoint", f"hep-{n}", {
            "node": f"hep-{n}", "expectedIPs": [f"198.18.{n // 250}.{n % 250 + 1}",
                                                f"2001:2::{n + 1:x}"],
            "profiles": ["projectcalico-default-allow"]}, labels))
    for p in range(policies):
        tier = f"t{p % TIERS}"
        allowed = sorted(rng.sample(range(APPS), 3))
        spec = {"tier": tier, "order": p, "selector": f"app == 'app{p % APPS}'",
                "types": ["Ingress"], "ingress": [
                    {"action": "Allow", "protocol": "TCP",
                     "source": {"selector": "app in {" + ", ".join(
                         f"'app{a}'" for a in allowed) + "}"},
                     "destination": {"ports": list(rng.sample(PORTS, 2))}},
                    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [22]}}]}
        kind = "StagedGlobalNetworkPolicy" if p % 4 == 0 else "GlobalNetworkPolicy"
        docs.append(doc(kind, f"{tier}.p{p}", spec))
    return docs


def records(snapshot: Snapshot, count: int, groups: int, rng: random.Random,
            now: float) -> list[FlowRecord]:
    heps = sorted(snapshot.host_endpoints.values(), key=lambda h: h.name)
    keys = []
    for _ in range(groups):
        src, dst = rng.sample(heps, 2)
        keys.append((src, dst, rng.choice(PORTS), rng.random() < 0.1))
    out = []
    for i in range(count):
        src, dst, port, denied = keys[i % groups]
        action = "deny" if denied else "allow"
        trace = (step("t4", "end-of-tier", None, "deny") if denied else
                 step("profile", "projectcalico-default-allow", 0, "allow"),)
        end = now - rng.uniform(60, 3000)
        out.append(FlowRecord(
            start=end - 10, end=end, node=dst.name, reporter="dst",
            src=End("hep", src.name, dict(src.labels)), dst=End("hep", dst.name,
                                                                dict(dst.labels)),
            proto=6, dst_port=port, action=action, enforced_trace=trace,
            staged_action=action, staged_trace=trace, connections=1, started=1))
    return out


def measure(store: FlowStore, resources: list[Any], repeat: int, now: float
            ) -> dict[str, float]:
    proposed, names = proposed_state(resources, [], "all")
    current = Snapshot.build(resources)
    request = PreviewRequest(hours=1.0, limit=100)
    window = FlowQuery(since=now - 3600, until=now)
    grouping = best_of(lambda: store.groups(window, 100_000), repeat)
    page = store.groups(window, 100_000)

    def judge_all() -> None:
        judge = Impact(proposed, current)
        for row in page.groups:
            judge.judge(row.record)

    judging = best_of(judge_all, repeat)
    whole = best_of(lambda: preview(store, proposed, request, now, names, current), repeat)
    answer = preview(store, proposed, request, now, names, current)
    judged = answer["examined"]["groups"]
    return {"groups": judged, "grouping_ms": round(grouping * 1000, 1),
            "judging_ms": round(judging * 1000, 1), "preview_ms": round(whole * 1000, 1),
            "groups_per_s": round(judged / judging) if judging else 0.0,
            "decided_share": round(1 - answer["totals"]["undecided"]["records"] /
                                   max(1, answer["examined"]["records"]), 3),
            "newly_denied_connections": answer["totals"]["newlyDenied"]["connections"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--groups", type=int, default=20_000)
    parser.add_argument("--endpoints", type=int, default=2_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(20)
    now = time.time()
    docs = fleet(args.endpoints, args.policies, rng)
    resources = [parse_resource(d) for d in docs]
    snapshot = Snapshot.build(resources)
    rows = records(snapshot, args.records, args.groups, rng, now)
    out: dict[str, Any] = {"records": args.records, "groups": args.groups,
                           "endpoints": args.endpoints, "policies": args.policies}
    with tempfile.TemporaryDirectory(prefix="bulkhead-preview-bench-") as tmp:
        stores: dict[str, FlowStore] = {"sqlite": SQLiteFlowStore(Path(tmp) / "f.sqlite")}
        try:
            from bulkhead.store.flowlog.clickhouse import (
                ClickHouseFlowStore,
                ClickHouseSettings,
            )
            stores["clickhouse"] = ClickHouseFlowStore(ClickHouseSettings(
                dsn=f"chdb://{tmp}/chdb", table="flows_preview"))
        except ImportError:
            print("clickhouse-connect/chdb not installed: SQLite only", file=sys.stderr)
        for name, store in stores.items():
            for i in range(0, len(rows), 5_000):
                store.insert(rows[i:i + 5_000])
            out[name] = measure(store, resources, args.repeat, now)
            store.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name in ("sqlite", "clickhouse"):
            if name in out:
                print(name, out[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
