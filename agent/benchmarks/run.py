"""Foundations benchmarks: every figure a ratio (or a rate) measured side by side in one run.

    .venv/bin/python agent/benchmarks/run.py [--quick] [--json]

1. selector: compiled `Selector.matches` against a hand-written Python predicate for the
   same expression, over the same label sets (goal: within 1.5x).
2. evaluator: flows per second on a snapshot of 1,000 policies in 5 tiers and 10,000 host
   endpoints, without and with the trace, after the per-endpoint caches are warm.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.selector import parse

V3 = "projectcalico.org/v3"


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of `repeat` runs, in seconds: the least disturbed by other work."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_labels(rng: random.Random) -> dict[str, str]:
    labels = {"app": f"app{rng.randrange(100)}", "zone": rng.choice(
        ["dmz", "trusted", "restricted", "mgmt", "lab"]), "env": rng.choice(["prod", "dev"])}
    if rng.random() < 0.1:
        labels["quarantine"] = "true"
    return labels


def bench_selector(quick: bool) -> dict[str, Any]:
    rng = random.Random(1)
    label_sets = [random_labels(rng) for _ in range(2_000 if quick else 20_000)]
    text = "app == 'app7' || zone in {'trusted', 'restricted'} && !has(quarantine) && " \
           "env != 'dev'"
    selector = parse(text)

    def hand(labels: Mapping[str, str]) -> bool:
        return labels.get("app") == "app7" or (
            labels.get("zone") in {"trusted", "restricted"} and "quarantine" not in labels
            and labels.get("env") != "dev")

    assert [selector.matches(x) for x in label_sets] == [hand(x) for x in label_sets]
    matches = selector.matches
    t_compiled = best_of(lambda: [matches(x) for x in label_sets], 7)
    t_hand = best_of(lambda: [hand(x) for x in label_sets], 7)
    t_walk = best_of(lambda: [selector.tree.evaluate(x) for x in label_sets], 3)
    return {"selector": text, "label_sets": len(label_sets),
            "compiled_ns": 1e9 * t_compiled / len(label_sets),
            "hand_written_ns": 1e9 * t_hand / len(label_sets),
            "tree_walk_ns": 1e9 * t_walk / len(label_sets),
            "compiled_vs_hand_written": t_compiled / t_hand,
            "tree_walk_vs_hand_written": t_walk / t_hand}


def big_snapshot(n_policies: int, n_endpoints: int) -> tuple[Snapshot, list[str]]:
    rng = random.Random(3)
    docs: list[dict[str, Any]] = []
    for t in range(5):
        docs.append({"apiVersion": V3, "kind": "Tier", "metadata": {"name": f"tier{t}"},
                     "spec": {"order": 100 * (t + 1),
                              "defaultAction": "Pass" if t < 4 else "Deny"}})
    ips: list[str] = []
    base = int(ipaddress.ip_address("198.18.0.0"))
    for e in range(n_endpoints):
        ip = str(ipaddress.ip_address(base + 10 + e))
        ips.append(ip)
        docs.append({"apiVersion": V3, "kind": "HostEndpoint",
                     "metadata": {"name": f"host{e}", "labels": random_labels(rng)},
                     "spec": {"node": f"host{e}", "interfaceName": "*", "expectedIPs": [ip],
                              "profiles": ["projectcalico-default-allow"],
                              "ports": [{"name": "http", "protocol": "TCP", "port": 8080}]}})
    for p in range(n_policies):
        tier = f"tier{p % 5}"
        rules = []
        for r in range(5):
            rules.append({
                "action": rng.choice(["Allow", "Allow", "Deny", "Pass", "Log"]),
                "protocol": rng.choice(["TCP", "UDP"]),
                "source": {"selector": f"app == 'app{rng.randrange(100)}'"}
                if r % 2 else {"nets": [f"198.18.{rng.randrange(64)}.0/24"]},
                "destination": {"ports": [rng.choice([80, 443, "8000:8100", "http"])]},
            })
        selector = rng.choice([f"app == 'app{p % 100}'", "zone == 'dmz' && env == 'prod'",
                               f"app in {{'app{p % 100}', 'app{(p + 1) % 100}'}}"])
        docs.append({"apiVersion": V3, "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": f"{tier}.p{p}"},
                     "spec": {"tier": tier, "order": rng.choice([None, p]),
                              "selector": selector, "ingress": rules, "egress": rules}})
    return Snapshot.build(parse_resource(d) for d in docs), ips


def bench_evaluator(quick: bool) -> dict[str, Any]:
    n_pol, n_ep = (200, 2_000) if quick else (1_000, 10_000)
    started = time.perf_counter()
    snapshot, ips = big_snapshot(n_pol, n_ep)
    load_s = time.perf_counter() - started
    ev = Evaluator(snapshot, Failsafes())
    rng = random.Random(4)
    flows = [Flow.make(rng.choice(ips), rng.choice(ips), rng.choice(["TCP", "UDP"]),
                       rng.choice([80, 443, 8080, 8050, 22])) for _ in range(2_000 if quick
                                                                               else 20_000)]
    started = time.perf_counter()
    allowed = sum(ev.evaluate(f, trace=False).allowed for f in flows)   # fills the caches
    cold = time.perf_counter() - started
    warm = best_of(lambda: [ev.evaluate(f, trace=False) for f in flows], 3)
    traced = best_of(lambda: [ev.evaluate(f, trace=True) for f in flows], 1)
    return {"policies": n_pol, "endpoints": n_ep, "flows": len(flows),
            "allowed_share": allowed / len(flows), "snapshot_build_s": load_s,
            "cold_flows_per_s": len(flows) / cold, "warm_flows_per_s": len(flows) / warm,
            "traced_flows_per_s": len(flows) / traced, "traced_vs_untraced": traced / warm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {"selector": bench_selector(args.quick), "evaluator": bench_evaluator(args.quick)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    s, e = results["selector"], results["evaluator"]
    print(f"selector  compiled {s['compiled_ns']:.0f} ns, hand-written {s['hand_written_ns']:.0f}"
          f" ns, tree walk {s['tree_walk_ns']:.0f} ns per label set")
    print(f"          compiled / hand-written = {s['compiled_vs_hand_written']:.2f}  (goal <= 1.5)"
          f";  tree walk / hand-written = {s['tree_walk_vs_hand_written']:.2f}")
    print(f"evaluator {e['policies']} policies, {e['endpoints']} endpoints: "
          f"{e['warm_flows_per_s']:.0f} flows/s warm, {e['cold_flows_per_s']:.0f} cold, "
          f"{e['traced_flows_per_s']:.0f} with trace (traced / untraced time = "
          f"{e['traced_vs_untraced']:.1f}); snapshot built in {e['snapshot_build_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
