"""Staged policies, preview and promote against each other and against the reference
evaluator, through a real server: for random worlds (enforced and staged policies, Set
and Delete, several tiers with Deny or Pass, both spellings of a tiered name, host
endpoints with labels, some observing) and flow records between known endpoints,

1. the preview's newly denied and newly allowed counts equal a hand computation with the
   evaluator on the store before and after the real promote of the same names;
2. the store after `POST /v1/promote` is what docs/server.md says promote does: the
   staged copies gone, Set writing the GlobalNetworkPolicy of the staged name (labels,
   annotations, spec without stagedAction), Delete and Set removing the enforced policy
   of the tier under either spelling, all at one new revision; a refusal (422 or 404)
   changes nothing, and the preview refuses alike;
3. when every staged policy is promoted, the staged verdict the agent records for a flow
   (`FlowAggregator._staged`) equals the evaluator's verdict on the store after promote.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.client import ApiError
from bulkhead.client.flows import send_flows
from bulkhead.model import API_VERSION, ENFORCEMENT_LABEL, OBSERVE, Snapshot, parse_resource
from bulkhead.model.flowlog import OBSERVE_STEP, FlowRecord
from bulkhead.observe.flows import Ends, FlowAggregator
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.semantics import effective_labels
from bulkhead.policy.trace import verdict_steps
from bulkhead.selector import parse as parse_selector
from tests.test_server_limits import apply, start
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401

WORLDS = int(os.environ.get("STAGE_WORLDS", "60"))
HOSTS = {f"h{i}": f"198.18.0.{10 + i}" for i in range(1, 5)}
LABELS = {"app": ("web", "db"), "zone": ("dmz", "lan")}
TIERS = ("ta", "tb")
BARES = ("a", "b", "c")
PORTS = (("TCP", 22), ("TCP", 80), ("TCP", 443), ("UDP", 53))
SERVER_OWNED = ("resourceVersion", "creationTimestamp", "uid", "generation")


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


# ------------------------------------------------------------------------- strategies
label_sets = st.fixed_dictionaries({}, optional={
    k: st.sampled_from(v) for k, v in LABELS.items()})


@st.composite
def selectors(draw: st.DrawFn) -> str:
    key = draw(st.sampled_from(sorted(LABELS)))
    value = draw(st.sampled_from(LABELS[key]))
    return draw(st.sampled_from(["all()", f"{key} == '{value}'", f"{key} != '{value}'",
                                 f"has({key})", f"!has({key})"]))


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    """Rules a record decides: no source ports, ICMP types or domains."""
    rule: dict[str, Any] = {"action": draw(st.sampled_from(
        ["Allow", "Allow", "Deny", "Deny", "Pass", "Log"]))}
    proto = draw(st.sampled_from([None, "TCP", "UDP"]))
    if proto:
        rule["protocol"] = proto
        if draw(st.booleans()):
            rule["destination"] = {"ports": draw(st.lists(
                st.sampled_from([22, 80, 443, 53, "1:100"]), min_size=1, max_size=2,
                unique=True))}
    if draw(st.integers(0, 2)) == 0:
        rule.setdefault("source", {})["selector"] = draw(selectors())
    if draw(st.integers(0, 4)) == 0:
        host = draw(st.sampled_from(sorted(HOSTS)))
        rule.setdefault("source", {})["nets"] = [f"{HOSTS[host]}/32"]
    if draw(st.integers(0, 3)) == 0:
        rule.setdefault("destination", {})["selector"] = draw(selectors())
    return rule


@st.composite
def policy_spec(draw: st.DrawFn, tier: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"tier": tier, "selector": draw(selectors())}
    order = draw(st.sampled_from([None, 1, 5, 10]))
    if order is not None:
        spec["order"] = order
    ingress = draw(st.lists(rules(), max_size=3))
    egress = draw(st.lists(rules(), max_size=2))
    if ingress:
        spec["ingress"] = ingress
    if egress:
        spec["egress"] = egress
    if draw(st.integers(0, 3)) == 0:
        spec["types"] = draw(st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    return spec


def spell(tier: str, bare: str, prefixed: bool) -> str:
    return f"{tier}.{bare}" if prefixed else bare


@st.composite
def worlds(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    tiers = ["default"]
    for t in TIERS[:draw(st.integers(0, 2))]:
        spec: dict[str, Any] = {"defaultAction": draw(st.sampled_from(["Deny", "Pass"]))}
        if draw(st.booleans()):
            spec["order"] = draw(st.sampled_from([10, 100]))
        docs.append(doc("Tier", t, spec))
        tiers.append(t)
    enforced: dict[str, str] = {}      # name -> tier
    for _ in range(draw(st.integers(0, 4))):
        tier, bare = draw(st.sampled_from(tiers)), draw(st.sampled_from(BARES))
        name = spell(tier, bare, draw(st.booleans()))
        if name in enforced:
            continue
        enforced[name] = tier
        docs.append(doc("GlobalNetworkPolicy", name, draw(policy_spec(tier)),
                        draw(label_sets)))
    staged: set[str] = set()
    for _ in range(draw(st.integers(1, 4))):
        tier, bare = draw(st.sampled_from(tiers)), draw(st.sampled_from(BARES))
        name = spell(tier, bare, draw(st.booleans()))
        if name in staged:
            continue
        staged.add(name)
        if draw(st.integers(0, 3)) == 0:
            spec = {"stagedAction": "Delete", "tier": tier}
        else:
            spec = draw(policy_spec(tier))
            if draw(st.booleans()):
                spec["stagedAction"] = "Set"
        docs.append(doc("StagedGlobalNetworkPolicy", name, spec, draw(label_sets),
                        {"why": "ticket"} if draw(st.booleans()) else None))
    profiles = [[], ["projectcalico-default-allow"], ["projectcalico-default-allow"]]
    if draw(st.integers(0, 2)) == 0:   # a profile of our own: labels, and maybe rules
        prof: dict[str, Any] = {"labelsToApply": draw(label_sets)}
        if draw(st.booleans()):
            prof["ingress"] = draw(st.lists(rules(), min_size=1, max_size=2))
        if draw(st.integers(0, 5)) == 0:
            prof["labelsToApply"] = {**prof["labelsToApply"], ENFORCEMENT_LABEL: OBSERVE}
        docs.append(doc("Profile", "prof", prof))
        profiles += [["prof"], ["prof", "projectcalico-default-allow"]]
    for host, ip in HOSTS.items():
        spec = {"node": host, "expectedIPs": [ip]}
        chosen = draw(st.sampled_from(profiles))
        if chosen:
            spec["profiles"] = chosen
        labels = draw(label_sets)
        if draw(st.integers(0, 5)) == 0:
            labels = {**labels, ENFORCEMENT_LABEL: OBSERVE}
        docs.append(doc("HostEndpoint", host, spec, labels))
    return docs


# ----------------------------------------------------------------------------- helpers
def export(server: ServerProcess) -> dict[tuple[str, str], dict[str, Any]]:
    items = server.conn.request("GET", "/v1/resources")["items"]
    return {(d["kind"], d["metadata"]["name"]): d for d in items}


def bare(d: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in d["metadata"].items() if k not in SERVER_OWNED}
    return {**d, "metadata": meta}


def snapshot_of(store: dict[tuple[str, str], dict[str, Any]]) -> Snapshot:
    return Snapshot.build(parse_resource(bare(d)) for d in store.values())


def expected_after(before: dict[tuple[str, str], dict[str, Any]], names: list[str]
                   ) -> dict[tuple[str, str], dict[str, Any]]:
    """What docs/server.md says promote leaves, by hand (not impact.promoted)."""
    out = {k: bare(d) for k, d in before.items()}
    for name in names:
        sp = before[("StagedGlobalNetworkPolicy", name)]
        tier = sp["spec"].get("tier", "default")
        b = name.removeprefix(f"{tier}.")
        for other in {name, b, f"{tier}.{b}"}:
            gnp = out.get(("GlobalNetworkPolicy", other))
            if gnp is not None and gnp["spec"].get("tier", "default") == tier:
                del out[("GlobalNetworkPolicy", other)]
        del out[("StagedGlobalNetworkPolicy", name)]
    for name in names:
        sp = bare(before[("StagedGlobalNetworkPolicy", name)])
        if sp["spec"].get("stagedAction") == "Delete":
            continue
        spec = {k: v for k, v in sp["spec"].items() if k != "stagedAction"}
        out[("GlobalNetworkPolicy", name)] = {**sp, "kind": "GlobalNetworkPolicy",
                                              "spec": spec}
    return out


def conflict(before: dict[tuple[str, str], dict[str, Any]], names: list[str]) -> bool:
    """Whether promote must refuse (docs/server.md): two names for one policy, one named
    while another staged policy stands for it too, or a promoted Set name held by an
    enforced policy of another tier."""
    keys: Counter[tuple[str, str]] = Counter()
    staged = [n for k, n in before if k == "StagedGlobalNetworkPolicy"]
    for name in names:     # named while another staged policy stands for the same policy
        tier = before[("StagedGlobalNetworkPolicy", name)]["spec"].get("tier", "default")
        b = name.removeprefix(f"{tier}.")
        if any(m != name and m not in names and m in (b, f"{tier}.{b}") and
               before[("StagedGlobalNetworkPolicy", m)]["spec"].get("tier", "default") ==
               tier for m in staged):
            return True
    for name in names:
        sp = before[("StagedGlobalNetworkPolicy", name)]
        tier = sp["spec"].get("tier", "default")
        keys[(tier, name.removeprefix(f"{tier}."))] += 1
        if sp["spec"].get("stagedAction") != "Delete":
            gnp = before.get(("GlobalNetworkPolicy", name))
            if gnp is not None and gnp["spec"].get("tier", "default") != tier:
                return True
    return any(n > 1 for n in keys.values())


def flows() -> list[Flow]:
    return [Flow.make(HOSTS[s], HOSTS[d], proto, port)
            for s in sorted(HOSTS) for d in sorted(HOSTS) if s != d for proto, port in PORTS]


def records(snapshot: Snapshot, end: float) -> list[tuple[FlowRecord, Flow]]:
    """The records the agents make of every flow, with the store's enforced policies."""
    evaluator = Evaluator(snapshot, Failsafes.off())
    ends = Ends(snapshot)
    out = []
    for n, f in enumerate(flows()):
        v = evaluator.evaluate(f)
        for reporter, side in (("src", v.egress), ("dst", v.ingress)):
            if side.endpoint is None or (reporter == "dst" and not v.egress.allowed):
                continue
            steps = verdict_steps(side) + ((OBSERVE_STEP,) if side.observed else ())
            stg = v.staged_egress if reporter == "src" else v.staged_ingress
            conns = 1 + n % 3
            out.append((FlowRecord(
                start=end - 5, end=end, node=side.endpoint, reporter=reporter,
                src=ends.at(ipaddress.ip_address(f.src)),
                dst=ends.at(ipaddress.ip_address(f.dst)), proto=f.protocol,
                dst_port=f.dst_port or 0, action=side.wire_action.lower(),
                enforced_trace=steps, staged_action=stg.action.lower(),
                staged_trace=verdict_steps(stg), connections=conns, started=conns), f))
    return out


def hand_totals(pairs: list[tuple[FlowRecord, Flow]], before: Snapshot, after: Snapshot
                ) -> dict[str, dict[str, int]]:
    b, a = Evaluator(before, Failsafes.off()), Evaluator(after, Failsafes.off())
    out = {c: {"records": 0, "connections": 0}
           for c in ("newlyDenied", "newlyAllowed", "unchanged")}
    for r, f in pairs:
        vb, va = b.evaluate(f), a.evaluate(f)
        side_b = vb.egress if r.reporter == "src" else vb.ingress
        side_a = va.egress if r.reporter == "src" else va.ingress
        was, now = side_b.wire_action.lower(), side_a.wire_action.lower()
        change = "unchanged" if was == now else (
            "newlyDenied" if now == "deny" else "newlyAllowed")
        out[change]["records"] += 1
        out[change]["connections"] += r.connections
    return out


# ---------------------------------------------------------------------------- the test
def test_preview_promote_and_staged_verdicts_agree(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    apply(server, [doc("Tier", "keep", {"order": 9999})])
    base_revision = 1
    viewer = server.client("val", "viewer")
    tally: Counter[str] = Counter()
    clock = [time.time() - (WORLDS + 5) * 200]
    problems: list[str] = []

    @settings(max_examples=WORLDS, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])
    @given(worlds(), st.data())
    def check(docs: list[dict[str, Any]], data: st.DataObject) -> None:
        clock[0] += 200
        end = clock[0]
        server.conn.request("POST", "/v1/rollback", query={"revision": str(base_revision)})
        apply(server, docs)
        before = export(server)
        snap_before = snapshot_of(before)
        pairs = records(snap_before, end)
        by_node: dict[str, list[dict[str, Any]]] = {}
        for r, _ in pairs:
            by_node.setdefault(r.node, []).append(r.json())
        for node, recs in by_node.items():
            send_flows(server.client(node, "agent"), recs)
        all_staged = sorted(n for k, n in before if k == "StagedGlobalNetworkPolicy")
        names = data.draw(st.one_of(st.just(all_staged), st.lists(
            st.sampled_from(all_staged), min_size=1, unique=True).map(sorted)))
        everything = names == all_staged
        body: dict[str, Any] = {"promote": "all" if everything and data.draw(st.booleans())
                                else names, "until": end + 1, "hours": 1 / 60}
        enforce = data.draw(st.one_of(st.none(), selectors()))
        if enforce is not None:
            body["enforce"] = enforce
            tally["enforce"] += 1
        refused = conflict(before, names)
        try:
            answer = viewer.request("POST", "/v1/preview", body)
            previewed = None
        except ApiError as e:
            answer, previewed = None, e.status
        try:
            done = server.conn.request("POST", "/v1/promote", {"names": names})
            promoted_status = None
        except ApiError as e:
            done, promoted_status = None, e.status
        after = export(server)
        where = f"world {tally['worlds']}: names {names}\n{docs}"
        tally["worlds"] += 1
        if refused:
            tally["refused"] += 1
            if promoted_status != 422 or after != before:
                problems.append(f"promote should refuse (422, nothing changed), got "
                                f"{promoted_status}; {where}")
            if previewed != 422:
                problems.append(f"preview should refuse 422, got {previewed}; {where}")
            return
        if promoted_status is not None or previewed is not None:
            problems.append(f"refused: promote {promoted_status} preview {previewed}; "
                            f"{where}")
            return
        assert done is not None and answer is not None
        # (2) the store after promote, as documented
        want = expected_after(before, names)
        got = {k: bare(d) for k, d in after.items()}
        if got != want:
            diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got)
                    if want.get(k) != got.get(k)}
            problems.append(f"store after promote differs: {diff}; {where}")
        rev = done["revision"]
        for k, d in after.items():
            changed = k not in before or bare(before[k]) != bare(d)
            if changed and d["metadata"].get("resourceVersion") != str(rev):
                problems.append(f"{k} written at {d['metadata'].get('resourceVersion')}, "
                                f"not the promote's revision {rev}; {where}")
        # (1) the preview's counts, by hand with the evaluator on the stores
        snap_after = snapshot_of(after)
        if enforce is not None:   # the host endpoints it selects moved to enforce mode
            sel = parse_selector(enforce)
            moved = {**after}
            for k, d in after.items():
                hep = snap_after.host_endpoints.get(k[1]) if k[0] == "HostEndpoint" else None
                if hep is not None and sel.matches(effective_labels(snap_after, hep)):
                    labels = {**d["metadata"].get("labels", {}), ENFORCEMENT_LABEL: "enforce"}
                    moved[k] = {**d, "metadata": {**d["metadata"], "labels": labels}}
            snap_judged = snapshot_of(moved)
        else:
            snap_judged = snap_after
        hand = hand_totals(pairs, snap_before, snap_judged)
        totals = answer["totals"]
        tally["undecided"] += totals["undecided"]["records"]
        tally["denied"] += hand["newlyDenied"]["records"]
        tally["allowed"] += hand["newlyAllowed"]["records"]
        if totals["undecided"]["records"] == 0:
            for c in ("newlyDenied", "newlyAllowed", "unchanged"):
                if totals[c] != hand[c]:
                    problems.append(f"preview {c} {totals[c]} != hand {hand[c]}; {where}")
        # (3) staged verdicts the agent records, when every staged policy is promoted
        if everything:
            tally["staged-compared"] += 1
            agg = FlowAggregator("h1", snap_before, {}, Failsafes.off())
            ev = Evaluator(snap_after, Failsafes.off())
            for f in flows():
                va = ev.evaluate(f)
                for reporter, side in (("src", va.egress), ("dst", va.ingress)):
                    if side.endpoint is None:
                        continue
                    staged = agg._staged(f, reporter)
                    if staged.action != side.action.lower():
                        problems.append(
                            f"staged verdict {staged.action} {staged.trace} != after "
                            f"promote {side.action} {verdict_steps(side)} for {f} "
                            f"{reporter}; {where}")
                        return

    check()
    print(dict(tally))
    assert not problems, f"{len(problems)} problems; first:\n" + "\n\n".join(problems[:3])
    assert tally["staged-compared"] > WORLDS // 4
    assert tally["denied"] + tally["allowed"] > WORLDS
