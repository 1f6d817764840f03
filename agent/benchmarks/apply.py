"""Apply cost: what the agent pays to put a ruleset in the kernel, side by side in one run.

    .venv/bin/python agent/benchmarks/apply.py [--repeat 5] [--json]
    .venv/bin/python agent/benchmarks/apply.py --policies 20 --elements 200 --selecting 4 \\
        --repeat 1 --json          # smoke
    .venv/bin/python agent/benchmarks/apply.py --size 10x --repeat 3   # ten times the scale
    .venv/bin/python agent/benchmarks/apply.py --scale 100 10000 100000 --changes 200

The store: one endpoint (`receiver`, node n1) and `--policies` policies, `--selecting` of
them selecting it; each of those allows one GlobalNetworkSet (`--elements` addresses over
all sets) to its own port and one group of host endpoints (1,000 on other nodes, labels
app=web0..9) to port 80. The other policies select endpoints of other nodes. Everything
runs in a throwaway network namespace (`ip netns add`); the root namespace's ruleset is
never read or written.

1. Full apply: calculate + render + `NftApplier.apply` of the whole table (the agent's
   path: `nft -f`, then the generation and the terse listing it keeps for drift checks),
   against `nft -f` of the same rendered file alone (goal: render + apply within 1.5x).
2. Label change: one host endpoint's labels change (app=web1 -> app=cache), so its
   address leaves one selector's elements. The applier sends that change as one netlink
   batch, against the full apply (goal: under 5% of it) and against the same element
   change sent by `nft -f` (the applier with netlink off), which reads the kernel's
   whole state first. The change is applied back and forth; each figure is the best of
   `--repeat` (the least disturbed by other work on the machine).
3. Kernel memory: what loading the table into the fresh namespace took (kernelmem.py: the
   memory cgroup's kernel charge and /proc/meminfo, before and after the first `nft -f`).
4. A fresh process (spawned) that does what an agent starting up does: builds the store,
   calculates, renders and applies the table into a namespace of its own; its stage
   times and its peak RSS.
5. The agent's own path for one change, event received -> kernel holds it
   (`label_change_end_to_end_ms`), at 1,000 peers and at each `--scale` fleet size: every
   size's agent is set up first, then `--changes` label changes and as many network set
   changes at each size, interleaved round by round; per size the median and spread,
   and the flatness figure, the largest median over the smallest (issue 23: <= 1.2),
   and the same paired: per size the median over the rounds of its change's time over
   the smallest fleet's in the same round.

`--size 10x` is ten times the default sizes: 10,000 policies, 1,000 selecting the
endpoint, 1,000,000 addresses (issue 23); explicit flags override a preset's size.
`--fresh-only` measures only 4 (the agent's start, the figure the 10x goal is about),
`--repeat` times, and reports each stage's best: at 10x the whole run takes minutes
(`nft -f` element changes read a million elements back each time).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bulkhead.dataplane.nftables import Ruleset, render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernelmem import describe, measured  # a module beside this one

V3 = "projectcalico.org/v3"
NODE = "n1"
PEERS = 1_000
# Addresses: network sets from 198.18.64.0 (every other address, so no two merge into a
# CIDR), peers from 198.18.8.0, the receiver at 198.18.0.10 (benchmarking range).
LIST_BASE = int(ipaddress.IPv4Address("198.18.64.0"))
PEER_BASE = int(ipaddress.IPv4Address("198.18.8.0"))
# --size: (policies, addresses in network sets, policies selecting the endpoint).
SIZES = {"1x": (1_000, 100_000, 100), "10x": (10_000, 1_000_000, 1_000)}


def resources(policies: int, elements: int, selecting: int, moved: bool,
              peers: int = PEERS) -> list[dict[str, Any]]:
    """The store; `moved` gives peer 1 the label app=cache instead of app=web1."""
    per_list = max(1, elements // selecting)
    docs: list[dict[str, Any]] = [
        {"apiVersion": V3, "kind": "HostEndpoint",
         "metadata": {"name": "receiver", "labels": {"role": "db"}},
         "spec": {"node": NODE, "interfaceName": "eth0", "expectedIPs": ["198.18.0.10"],
                  "profiles": ["projectcalico-default-allow"]}}]
    for p in range(peers):
        docs.append(peer(p, "cache" if moved and p == 1 else f"web{p % 10}"))
    for i in range(selecting):
        nets = [str(ipaddress.IPv4Address(LIST_BASE + 2 * (i * per_list + j)))
                for j in range(per_list)]
        docs.append({"apiVersion": V3, "kind": "GlobalNetworkSet",
                     "metadata": {"name": f"list-{i}", "labels": {"list": f"l{i}"}},
                     "spec": {"nets": nets}})
    for i in range(policies):
        rules = [{"action": "Allow", "protocol": "TCP",
                  "source": {"selector": f"list == 'l{i % selecting}'"},
                  "destination": {"ports": [6000 + i % selecting]}},
                 {"action": "Allow", "protocol": "TCP",
                  "source": {"selector": f"app == 'web{i % 10}'"},
                  "destination": {"ports": [80]}}]
        selector = "role == 'db'" if i < selecting else f"role == 'svc{i}'"
        docs.append({"apiVersion": V3, "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": f"p{i:04d}"},
                     "spec": {"order": i, "selector": selector, "ingress": rules}})
    return docs


def peer(p: int, app: str) -> dict[str, Any]:
    """Host endpoint number `p` on another node (addresses from 198.18.8.0 on)."""
    return {"apiVersion": V3, "kind": "HostEndpoint",
            "metadata": {"name": f"peer-{p:04d}", "labels": {"app": app}},
            "spec": {"node": f"node-{p}", "interfaceName": "eth0",
                     "expectedIPs": [str(ipaddress.IPv4Address(PEER_BASE + p))]}}


def snapshot(args: argparse.Namespace, moved: bool) -> Snapshot:
    return Snapshot.build(parse_resource(d) for d in resources(
        args.policies, args.elements, args.selecting, moved))


@contextmanager
def scratch_netns() -> Iterator[str]:
    name = f"bh-apply-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def full_replace(ns: str, ruleset: Callable[[], Ruleset]) -> float:
    """Seconds to make `ruleset()` and apply it with an applier that knows nothing yet."""
    applier = NftApplier(netns=ns)
    start = time.perf_counter()
    applier.apply(ruleset())
    return time.perf_counter() - start


class AgentPath:
    """One agent's own path for one change, event received -> kernel holds it, at a
    fleet of `peers` host endpoints elsewhere: the desired state takes the watch event
    (`DesiredState.apply`), builds the snapshot from the last one (`changes`), and the
    Linux enforcer folds the change into the kept plan, renders with what the last render
    kept and sends the element change (`NftablesEnforcer.enforce`), in a scratch network
    namespace of its own (entered on `stack`). Each change runs with the cycle collector
    held off as in the daemon (`memory.collector_paused`; the clock stops when the kernel
    holds the change, before the collections it made due).
    Two changes, each there and back: peer 1's label (app=web1 <-> app=cache), and one
    address of a network set (its first net <-> 198.18.255.254)."""

    def __init__(self, args: argparse.Namespace, peers: int, stack: ExitStack) -> None:
        from bulkhead.agent.nft_enforcer import NftablesEnforcer
        from bulkhead.agent.sync import DesiredState

        docs = resources(args.policies, args.elements, args.selecting, False, peers)
        self.host_endpoints = peers + 1
        self.state = DesiredState()
        self.state.replace(docs)
        netset = next(d for d in docs if d["kind"] == "GlobalNetworkSet")
        self.changes = {
            "label": [peer(1, "cache"), peer(1, "web1")],
            "netset": [{**netset, "spec": {"nets": ["198.18.255.254",
                                                    *netset["spec"]["nets"][1:]]}},
                       netset]}
        self.times: dict[str, list[float]] = {what: [] for what in self.changes}
        ns = stack.enter_context(scratch_netns())
        self.enforcer = NftablesEnforcer(NODE, Failsafes(), applier=NftApplier(netns=ns),
                                         interfaces=lambda: {"eth0": ["198.18.0.10"]})
        snap, errors, _ = self.state.changes()
        assert not errors, errors
        start = time.perf_counter()
        self.enforcer.enforce(snap, 1)
        self.full_apply_s = time.perf_counter() - start
        self.revision = 1

    def change(self, what: str) -> None:
        """The next change of kind `what` (there, then back), timed."""
        from bulkhead.agent.memory import collector_paused

        times = self.times[what]
        doc = self.changes[what][len(times) % 2]
        self.revision += 1
        event = {"type": "MODIFIED", "kind": doc["kind"], "name": doc["metadata"]["name"],
                 "object": doc}
        start = time.perf_counter()
        # The daemon holds the cycle collector off over the same steps
        # (memory.collector_paused); what that makes due runs after the kernel holds the
        # change, so the clock stops inside.
        with collector_paused():
            self.state.apply([event])
            snap, _, changed = self.state.changes()
            report = self.enforcer.enforce(snap, self.revision, changed)
            times.append(time.perf_counter() - start)
        if report.full or not report.changed:
            raise SystemExit(f"the {what} change did not go as an element change")

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host_endpoints": self.host_endpoints,
                               "full_apply_s": self.full_apply_s}
        for what, times in self.times.items():
            out[f"{what}_ms"] = spread(times)
        out["incremental"] = self.enforcer.calculator.incremental
        out["from_scratch"] = self.enforcer.calculator.full
        return out


def spread(times: list[float]) -> dict[str, float]:
    """Median, p10, p90, p99, least and most of `times` (seconds), in milliseconds."""
    ordered = sorted(times)

    def at(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"median": at(0.5), "p10": at(0.1), "p90": at(0.9), "p99": at(0.99),
            "min": 1000 * ordered[0], "max": 1000 * ordered[-1], "changes": len(ordered)}


def end_to_end(args: argparse.Namespace, fleets: list[int]) -> dict[str, Any]:
    """The agent's path (`AgentPath`) at each fleet size, every agent set up first and
    the changes interleaved: round after round, one change at each size, in an order
    that turns by one place each round, so a burst of other work on the machine lands on
    every size alike instead of on the size measured at that moment (measured one size
    after the other, the medians moved by up to 2x between runs). `--changes` changes
    of each kind at each size; per size the median and spread. The flatness figure: the
    largest median over the smallest, per kind (goal: at most 1.2); and paired, the
    largest over the smallest of each size's median ratio to the smallest fleet in the
    same round."""
    from bulkhead.agent.memory import settle

    with ExitStack() as stack:
        agents = [AgentPath(args, peers, stack) for peers in fleets]
        settle()          # as the daemon does after an apply from scratch
        for what in ("label", "netset"):
            for r in range(args.changes):
                turn = r % len(agents)
                for agent in agents[turn:] + agents[:turn]:
                    agent.change(what)
        results = [a.result() for a in agents]
        flat = {}
        smallest = min(agents, key=lambda a: a.host_endpoints)
        for what in ("label", "netset"):
            medians = [r[f"{what}_ms"]["median"] for r in results]
            # Paired: each round's time at a size over the same round's at the smallest
            # fleet (the two a few milliseconds apart), the median over the rounds; load
            # that changes slower than a round cancels out.
            paired = [median([t / base for t, base in zip(a.times[what],
                                                          smallest.times[what],
                                                          strict=True)])
                      for a in agents]
            flat[what] = {
                "largest_over_smallest_median": max(medians) / min(medians),
                "paired_over_smallest": {str(a.host_endpoints): p
                                         for a, p in zip(agents, paired, strict=True)},
                "largest_over_smallest_paired": max(paired) / min(paired)}
    return {"sizes": results, "flatness": flat}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def fresh_apply(policies: int, elements: int, selecting: int) -> dict[str, float]:
    """In a process of its own: what an agent starting up does with the store (build the
    snapshot, calculate, render, apply into an empty namespace); the seconds of each
    stage and the process's peak RSS."""
    start = time.perf_counter()
    snap = Snapshot.build(parse_resource(d) for d in resources(
        policies, elements, selecting, False))
    built = time.perf_counter()
    plan = calculate(snap, NODE, {"eth0": ["198.18.0.10"]}, Failsafes())
    planned = time.perf_counter()
    ruleset = render(plan)
    rendered = time.perf_counter()
    with scratch_netns() as ns:
        NftApplier(netns=ns).apply(ruleset)
        applied = time.perf_counter()
    return {"build_s": built - start, "calculate_s": planned - built,
            "render_s": rendered - planned, "apply_s": applied - rendered,
            "calculate_render_apply_s": applied - built,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_fresh_process(args: argparse.Namespace) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        found: dict[str, float] = pool.apply(
            fresh_apply, (args.policies, args.elements, args.selecting))
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    snaps = {False: snapshot(args, False), True: snapshot(args, True)}
    failsafes = Failsafes()
    interfaces = {"eth0": ["198.18.0.10"]}

    def agent_render(moved: bool) -> Ruleset:
        return render(calculate(snaps[moved], NODE, interfaces, failsafes))

    calc_s = min(timed(lambda: calculate(snaps[False], NODE, interfaces, failsafes))
                 for _ in range(args.repeat))
    plan = calculate(snaps[False], NODE, interfaces, failsafes)
    render_s = min(timed(lambda: render(plan)) for _ in range(args.repeat))
    rulesets = {m: agent_render(m) for m in (False, True)}
    added, removed = rulesets[True].element_changes(rulesets[False])
    if rulesets[True].structure() != rulesets[False].structure() or not (added or removed):
        raise SystemExit("the label change did not come out as an element change")
    script = rulesets[False].script()
    with scratch_netns() as ns:
        prefix = ["ip", "netns", "exec", ns]

        def nft_f() -> None:
            subprocess.run([*prefix, "nft", "-f", "-"], input=script, text=True, check=True)

        # The table exists from here on: every full apply below replaces it.
        kernel_memory = measured(nft_f)
        full_nft: list[float] = []
        full_apply: list[float] = []
        full_agent: list[float] = []
        for _ in range(args.repeat):
            full_nft.append(timed(nft_f))
            # A fresh applier each time: it knows nothing, so it replaces the whole table.
            full_apply.append(full_replace(ns, lambda: rulesets[False]))
            full_agent.append(full_replace(ns, lambda: agent_render(False)))
        # Element updates, back and forth, by netlink and by nft -f.
        via_netlink: list[float] = []
        via_nft: list[float] = []
        for netlink, times in ((True, via_netlink), (False, via_nft)):
            applier = NftApplier(netns=ns, netlink=netlink)
            applier.apply(rulesets[False])
            for i in range(2 * args.repeat):
                target = rulesets[i % 2 == 0]
                start = time.perf_counter()
                result = applier.apply(target)
                times.append(time.perf_counter() - start)
                expected = "netlink" if netlink else "nft"
                if result.full or result.via != expected:
                    raise SystemExit(f"expected an element update via {expected}, got {result}")
        label_end_to_end: list[float] = []
        applier = NftApplier(netns=ns)
        applier.apply(rulesets[False])
        for i in range(2 * args.repeat):
            start = time.perf_counter()
            applier.apply(agent_render(i % 2 == 0))
            label_end_to_end.append(time.perf_counter() - start)
        elements = sum(len(s.elements) for s in rulesets[False].sets.values())
    fresh = in_fresh_process(args)
    measured_e2e = end_to_end(args, [PEERS, *args.scale])
    end = measured_e2e["sizes"][0]
    nft_s, apply_s, agent_s = min(full_nft), min(full_apply), min(full_agent)
    netlink_s, nft_elem_s = min(via_netlink), min(via_nft)
    return {
        "sizes": {"policies": args.policies, "selecting": args.selecting,
                  "set_elements": elements, "element_changes": len(added) + len(removed),
                  **rulesets[False].counts()},
        "full": {"nft_f_s": nft_s, "apply_s": apply_s, "render_s": render_s,
                 "calculate_s": calc_s, "calculate_render_apply_s": agent_s,
                 "render_apply_vs_nft_f": (render_s + apply_s) / nft_s,
                 "calculate_render_apply_vs_nft_f": agent_s / nft_s},
        "label_change": {"netlink_s": netlink_s, "nft_f_s": nft_elem_s,
                         "netlink_vs_full_apply": netlink_s / apply_s,
                         "netlink_vs_nft_f": netlink_s / nft_elem_s,
                         "nft_f_vs_full_apply": nft_elem_s / apply_s,
                         "calculate_render_apply_s": min(label_end_to_end),
                         "calculate_render_apply_vs_full": min(label_end_to_end) / agent_s},
        "kernel_memory": kernel_memory,
        "fresh_process": fresh,
        "label_change_end_to_end_ms": end["label_ms"]["median"],
        "netset_change_end_to_end_ms": end["netset_ms"]["median"],
        "end_to_end": measured_e2e["sizes"],
        "end_to_end_flatness": measured_e2e["flatness"],
        "load": os.getloadavg(),
    }


def fresh_line(f: dict[str, float]) -> str:
    return (f"fresh process: build {f['build_s']:.2f} s, calculate {f['calculate_s']:.2f} s, "
            f"render {f['render_s']:.2f} s, apply {f['apply_s']:.2f} s (calculate + render + "
            f"apply {f['calculate_render_apply_s']:.2f} s, goal at 10x <= 5 s); peak RSS "
            f"{f['peak_rss_mib']:.0f} MiB")


def fresh_report(r: dict[str, Any]) -> str:
    s = r["sizes"]
    return (f"store: {s['policies']} policies ({s['selecting']} selecting the endpoint), "
            f"{s['elements']} addresses in network sets; load {r['load'][0]:.2f}\n"
            + fresh_line(r["fresh_process"]))


def report(r: dict[str, Any]) -> str:
    s, f, c = r["sizes"], r["full"], r["label_change"]
    return "\n".join([
        f"table: {s['policies']} policies ({s['selecting']} selecting the endpoint), "
        f"{s['set_elements']} set elements, {s['chains']} chains, {s['rules']} rules, "
        f"{s['sets']} sets; load {r['load'][0]:.2f}",
        f"full    nft -f of the rendered file {f['nft_f_s']:.3f} s; applier {f['apply_s']:.3f} s;"
        f" render {f['render_s']:.3f} s; calculate {f['calculate_s']:.3f} s",
        f"        (render + apply) / nft -f = {f['render_apply_vs_nft_f']:.2f}  (goal <= 1.5);"
        f"  (calculate + render + apply) / nft -f = {f['calculate_render_apply_vs_nft_f']:.2f}",
        f"label   {s['element_changes']} elements: netlink batch {1000 * c['netlink_s']:.1f} ms,"
        f" nft -f {1000 * c['nft_f_s']:.1f} ms",
        f"        netlink / full apply = {100 * c['netlink_vs_full_apply']:.2f}%  (goal < 5%);"
        f"  netlink / nft -f = {c['netlink_vs_nft_f']:.3f};"
        f"  nft -f / full apply = {100 * c['nft_f_vs_full_apply']:.1f}%",
        f"        with calculate + render: {c['calculate_render_apply_s']:.3f} s = "
        f"{100 * c['calculate_render_apply_vs_full']:.0f}% of calculate + render + full apply",
        describe(r["kernel_memory"], s["set_elements"]),
        fresh_line(r["fresh_process"]),
        *(f"agent   {e['host_endpoints']} host endpoints: event -> kernel, label change "
          f"{e['label_ms']['median']:.2f} ms (p10-p90 {e['label_ms']['p10']:.2f}-"
          f"{e['label_ms']['p90']:.2f}), network set change {e['netset_ms']['median']:.2f} ms"
          f" (p10-p90 {e['netset_ms']['p10']:.2f}-{e['netset_ms']['p90']:.2f}); "
          f"{e['label_ms']['changes']} changes of each; full apply {e['full_apply_s']:.2f} s"
          f"  (goal <= 20 ms)" for e in r["end_to_end"]),
        *(f"flat    {what} change, largest / smallest median over the sizes: "
          f"{f['largest_over_smallest_median']:.2f}; paired (each round against the "
          f"smallest fleet's change of that round, median): "
          f"{f['largest_over_smallest_paired']:.2f}  (goal <= 1.2)"
          for what, f in r["end_to_end_flatness"].items()),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1x",
                        help="1x: 1,000 policies, 100 selecting, 100,000 addresses; "
                             "10x: ten times each")
    parser.add_argument("--policies", type=int)
    parser.add_argument("--elements", type=int)
    parser.add_argument("--selecting", type=int)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fresh-only", action="store_true",
                        help="measure only the agent's start in a fresh process (best of "
                             "--repeat; peak RSS: the largest)")
    parser.add_argument("--changes", type=int, default=100,
                        help="changes of each kind at each size for the agent's path "
                             "(interleaved over the sizes)")
    parser.add_argument("--scale", type=int, nargs="*", default=[],
                        help="also measure the agent's path with this many host endpoints "
                             "elsewhere (e.g. 100 10000 100000)")
    args = parser.parse_args()
    for name, value in zip(("policies", "elements", "selecting"), SIZES[args.size],
                           strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.fresh_only:
        runs = [in_fresh_process(args) for _ in range(args.repeat)]
        fresh = {key: min(r[key] for r in runs) for key in runs[0]}
        fresh["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
        out = {"sizes": {"policies": args.policies, "selecting": args.selecting,
                         "elements": args.elements},
               "fresh_process": fresh, "load": os.getloadavg()}
        print(json.dumps(out, indent=2) if args.json else fresh_report(out))
        return 0
    results = run(args)
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
