"""The impact preview's judge (`bulkhead.policy.impact`) against the reference evaluator:
for random policy sets (the differential test's strategies: tiers, order, Pass, Log,
nets, selectors, named ports, network sets, profiles, staged policies) and random flows
between their hosts, every record the agent would make of a flow (ends resolved as
`observe.flows.Ends` does) that the judge decides is decided as the evaluator decides
the flow, for the enforced policies and for the staged ones promoted, with some hosts in
observe mode. And the judge is
not vacuous: it decides most records, and says why when it does not.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkhead.model import API_VERSION, ENFORCEMENT_LABEL, OBSERVE, Snapshot, parse_resource
from bulkhead.model.flowlog import MAX_DOMAINS, OBSERVE_STEP, FlowRecord
from bulkhead.observe.flows import Ends
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.evaluate import DirectionVerdict
from bulkhead.policy.impact import Impact, Judgement, PromotionConflict, promoted
from bulkhead.policy.trace import verdict_steps
from tests.test_differential import (
    ALL_FLOWS,
    HOSTS,
    NAMED,
    V4,
    V6,
    label_sets,
    model_flow,
    policy_sets,
    rules,
    selectors,
)


def record_of(ends: Ends, f: Flow, reporter: str, verdict: DirectionVerdict,
              snooping: bool = True) -> FlowRecord:
    """The record the reporting agent makes of the flow: what happened on the wire, the
    decisions its table logged, the observe step when its endpoint observes, and (egress,
    an agent that snoops DNS) the names the destination was resolved from."""
    steps = verdict_steps(verdict) + ((OBSERVE_STEP,) if verdict.observed else ())
    names = tuple(sorted(f.dst_domains))[:MAX_DOMAINS] if snooping and reporter == "src" \
        else None
    return FlowRecord(
        start=0.0, end=1.0, node=verdict.endpoint or "", reporter=reporter,
        src=ends.at(f.src), dst=ends.at(f.dst), proto=f.protocol, dst_port=f.dst_port or 0,
        action=verdict.wire_action.lower(), enforced_trace=steps,
        staged_action=verdict.action.lower(), staged_trace=verdict_steps(verdict),
        connections=1, started=1, dst_domains=names)


def judged(evaluator: Evaluator, judges: dict[str, Impact], ends: Ends, f: Flow,
           snooping: bool = True
           ) -> Iterator[tuple[str, str, DirectionVerdict, FlowRecord, Judgement]]:
    """For each view (the enforced policies; the staged ones promoted) and each end with
    a host endpoint: the evaluator's verdict, the record its agent makes, the judgement."""
    verdict = evaluator.evaluate(f)
    for view, judge in judges.items():
        sides = ((verdict.egress, verdict.ingress) if view == "enforced" else
                 (verdict.staged_egress, verdict.staged_ingress))
        for reporter, side in zip(("src", "dst"), sides, strict=True):
            if side.endpoint is not None:
                record = record_of(ends, f, reporter, side, snooping)
                yield view, reporter, side, record, judge.judge(record)


def observing(docs: list[dict[str, Any]], hosts: set[str]) -> list[dict[str, Any]]:
    """The docs with the host endpoints of `hosts` labelled to observe mode."""
    out = []
    for d in docs:
        if d["kind"] == "HostEndpoint" and d["metadata"]["name"] in hosts:
            d = {**d, "metadata": {**d["metadata"], "labels": {
                **d["metadata"].get("labels", {}), ENFORCEMENT_LABEL: OBSERVE}}}
        out.append(d)
    return out


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, **({"labels": labels} if labels else {})},
            "spec": spec}


def test_decided_records_agree_with_the_evaluator() -> None:
    tally: Counter[str] = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(policy_sets(), st.lists(st.sampled_from(ALL_FLOWS), min_size=40, max_size=40,
                                   unique=True),
           st.sets(st.sampled_from(HOSTS), max_size=2))
    def check(docs: list[dict[str, Any]], flows: list[Any], observers: set[str]) -> None:
        snapshot = Snapshot.build(parse_resource(d) for d in observing(docs, observers))
        evaluator = Evaluator(snapshot, Failsafes.off())
        ends = Ends(snapshot)
        judges = {"enforced": Impact(snapshot), "promoted": Impact(promoted(snapshot))}
        for flow in flows:
            for view, reporter, side, record, got in judged(evaluator, judges, ends,
                                                            model_flow(flow)):
                if not got.decided:
                    assert got.why, (flow, record)
                    tally["undecided"] += 1
                    continue
                tally["decided"] += 1
                tally["observed"] += side.observed
                assert got.action == side.wire_action.lower(), (
                    f"{view} {reporter} {flow}: judged {got.action} {got.steps}, the "
                    f"evaluator says {side.summary()}")
                # The deciding step the evaluator reached is among the judge's.
                want = OBSERVE_STEP if side.observed else verdict_steps(side)[-1]
                assert want in got.steps, (got, side.summary())

    check()
    print(dict(tally))
    assert tally["decided"] > 3 * tally["undecided"], tally
    assert tally["observed"] > 0.05 * tally["decided"], tally


# Wider worlds than the kernel test can build: untracked and pre-DNAT policies, staged
# policies with rules of their own, overlapping network sets, host endpoints sharing
# addresses (with named ports), egress by domain name (rules' domains, network sets'
# allowedEgressDomains), and flows from and to addresses that are no endpoint, with
# source ports, ICMP types, SCTP and GRE, and the names their destination was resolved
# from.
EXTRA_V4 = ("198.18.0.200", "198.18.0.9", "198.19.1.1", "10.1.2.3", "8.8.8.8")
EXTRA_V6 = ("2001:2::99", "2001:db8::5", "2001:3::1")
EXTRA_NETS = {4: ("198.18.0.0/24", "198.18.0.200/32", "10.0.0.0/8", "198.18.0.12/30",
                  "198.16.0.0/12", "0.0.0.0/0"),
              6: ("2001:2::/64", "2001:2::99/128", "2001:db8::/32", "::/0")}
DOMAINS = ("api.example.com", "a.b.example.com", "example.com", "www.other.net")
# More names than a record keeps (MAX_DOMAINS, the first by name): a name after them that
# a pattern would take is cut from the record.
MANY = tuple(f"b{i:02d}.pool.org" for i in range(MAX_DOMAINS + 2))
PATTERNS = ("*.example.com", "example.com", "api.example.com", "www.*.net", "*.net")


@st.composite
def wide_worlds(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for d in draw(policy_sets()):
        if d["kind"] == "GlobalNetworkPolicy" and draw(st.integers(0, 3)) == 0:
            spec = {**d["spec"], "applyOnForward": True}
            if draw(st.booleans()):
                spec["doNotTrack"] = True
            else:
                spec.pop("egress", None)
                spec["preDNAT"] = True
                if "types" in spec:
                    spec["types"] = ["Ingress"]
            d = {**d, "spec": spec}
        if d["kind"] == "StagedGlobalNetworkPolicy" and draw(st.booleans()):
            spec = {"tier": d["spec"]["tier"], "selector": draw(selectors(1)),
                    "ingress": draw(st.lists(rules(), min_size=1, max_size=3))}
            if egress := draw(st.lists(rules(), max_size=3)):
                spec["egress"] = egress
            d = {**d, "spec": spec}
        out.append(d)
    for i in range(draw(st.integers(0, 3))):
        family = draw(st.sampled_from([4, 6]))
        nets = draw(st.lists(st.sampled_from(EXTRA_NETS[family]), min_size=1, max_size=2,
                             unique=True))
        out.append(doc("GlobalNetworkSet", f"xs{i}", {"nets": nets}, draw(label_sets)))
    for i in range(draw(st.integers(0, 2))):
        ips = draw(st.lists(st.sampled_from([V4["h1"], V4["h2"], V6["h1"], "198.18.0.200"]),
                            min_size=1, max_size=2, unique=True))
        name = draw(st.sampled_from(["a0", "zz"])) + str(i)
        spec: dict[str, Any] = {"node": name, "expectedIPs": ips}
        ports = [{"name": n, "protocol": p, "port": port} for n, options in NAMED.items()
                 for p, port in [draw(st.sampled_from([("", 0), *options]))] if p]
        if ports:
            spec["ports"] = ports
        if draw(st.booleans()):
            spec["profiles"] = ["projectcalico-default-allow"]
        out.append(doc("HostEndpoint", name, spec, draw(label_sets)))
    patterns = st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2, unique=True)
    for i in range(draw(st.integers(0, 2))):
        # An egress Allow by name, or by a selector that may take the sets below.
        target = {"domains": draw(patterns)} if draw(st.booleans()) else \
            {"selector": draw(selectors(1))}
        rule: dict[str, Any] = {"action": "Allow", "destination": target}
        if draw(st.booleans()):
            rule = {**rule, "protocol": "TCP", "destination": {**target, "ports": [443]}}
        egress = [rule, *([{"action": "Deny"}] if draw(st.booleans()) else [])]
        kind = draw(st.sampled_from(["GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"]))
        out.append(doc(kind, f"dom{i}", {"tier": "default", "selector": draw(selectors(1)),
                                         "order": draw(st.sampled_from([1, 3, 10])),
                                         "types": ["Egress"], "egress": egress}))
    for i in range(draw(st.integers(0, 2))):
        set_spec: dict[str, Any] = {"allowedEgressDomains": draw(patterns)}
        if draw(st.booleans()):
            set_spec["nets"] = [draw(st.sampled_from(EXTRA_NETS[4]))]
        out.append(doc("GlobalNetworkSet", f"ds{i}", set_spec, draw(label_sets)))
    return out


@st.composite
def wide_flows(draw: st.DrawFn) -> Flow:
    family = draw(st.sampled_from([4, 6]))
    pool = [*V4.values(), *EXTRA_V4] if family == 4 else [*V6.values(), *EXTRA_V6]
    src, dst = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
    proto = draw(st.sampled_from(["TCP", "UDP", "ICMP", 132, 47]))
    names = frozenset(draw(st.lists(st.sampled_from(DOMAINS), max_size=2, unique=True)))
    if draw(st.integers(0, 5)) == 5:
        names |= frozenset(MANY[:draw(st.integers(MAX_DOMAINS - 1, len(MANY)))])
    if proto == "ICMP":
        return Flow.make(src, dst, "ICMP" if family == 4 else "ICMPv6",
                         icmp_type=draw(st.sampled_from([None, 0, 8, 128, 129])),
                         icmp_code=draw(st.sampled_from([None, 0, 1])), domains=names)
    if proto == 47:
        return Flow.make(src, dst, 47, domains=names)
    return Flow.make(src, dst, proto, draw(st.sampled_from([22, 80, 443, 5432, 8080])),
                     src_port=draw(st.sampled_from([None, 1000, 40000])), domains=names)


def test_decided_records_agree_in_wider_worlds() -> None:
    tally: Counter[str] = Counter()

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(wide_worlds(), st.lists(wide_flows(), min_size=30, max_size=30),
           st.sets(st.sampled_from(HOSTS), max_size=1), st.booleans())
    def check(docs: list[dict[str, Any]], flows: list[Flow], observers: set[str],
              snooping: bool) -> None:
        snapshot = Snapshot.build(parse_resource(d) for d in observing(docs, observers))
        evaluator = Evaluator(snapshot, Failsafes.off())
        ends = Ends(snapshot)
        judges = {"enforced": Impact(snapshot, snapshot)}
        try:
            judges["promoted"] = Impact(promoted(snapshot), snapshot)
        except PromotionConflict:
            tally["conflict"] += 1
        for f in flows:
            for view, reporter, side, record, got in judged(evaluator, judges, ends, f,
                                                            snooping):
                tally["decided" if got.decided else "undecided"] += 1
                if got.decided and record.dst_domains and any(
                        s.startswith("default|dom") and s.endswith("allow")
                        for s in got.steps):
                    tally["allowed by name"] += 1
                if got.decided and side.decided_by == "rule" and side.action == "Allow" \
                        and "(by name)" in side.steps[-1].text:
                    tally["allowed through a set, by name"] += 1
                if record.dst_domains is not None and len(f.dst_domains) > MAX_DOMAINS:
                    tally["cut" if not got.decided else "cut, decided"] += 1
                assert not got.decided or got.action == side.wire_action.lower(), (
                    f"{view} {reporter} {f}: judged {got}, the evaluator says "
                    f"{side.summary()}")

    check()
    print(dict(tally))
    assert tally["decided"] > 2 * tally["undecided"], tally
    # Not vacuous: some records are allowed by a rule's domains, some through a network
    # set a selector took by its allowedEgressDomains.
    assert tally["allowed by name"] > 20, tally
    assert tally["allowed through a set, by name"] > 5, tally
    assert tally["cut"] > 0 and tally["cut, decided"] > 0, tally


def test_what_records_cannot_decide_is_undecided_with_the_reason() -> None:
    docs = [
        doc("HostEndpoint", "web", {"node": "web", "expectedIPs": ["198.18.0.10",
                                                                   "2001:2::10"]},
            {"app": "web"}),
        doc("HostEndpoint", "db", {"node": "db", "expectedIPs": ["198.18.0.11"]},
            {"app": "db"}),
        doc("GlobalNetworkPolicy", "db", {
            "selector": "app == 'db'", "types": ["Ingress"], "ingress": [
                {"action": "Deny", "protocol": "TCP", "source": {"ports": [1000]}},
                {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.18.0.0/16"]},
                 "destination": {"ports": [5432]}},
                {"action": "Deny", "protocol": "ICMP", "icmp": {"type": 8}},
                {"action": "Allow", "protocol": "ICMP"}]}),
        doc("GlobalNetworkPolicy", "web", {
            "selector": "app == 'web'", "types": ["Ingress"], "ingress": [
                {"action": "Allow", "protocol": "TCP", "source": {"nets": ["198.18.0.0/16"]}},
            ]}),
    ]
    snapshot = Snapshot.build(parse_resource(d) for d in docs)
    judge = Impact(snapshot)
    ends = Ends(snapshot)

    def record(src: str, dst: str, proto: int, port: int) -> FlowRecord:
        node = ends.at(ipaddress.ip_address(dst)).name
        return FlowRecord(0.0, 1.0, node, "dst", ends.at(ipaddress.ip_address(src)),
                          ends.at(ipaddress.ip_address(dst)), proto, port, "allow", (),
                          "allow", ())

    # A source port rule first: whatever comes after, it could have matched.
    got = judge.judge(record("198.18.0.10", "198.18.0.11", 6, 5432))
    assert not got.decided and any("source port" in w for w in got.why), got
    # ICMP type not kept: the Deny of echo requests may or may not have matched.
    got = judge.judge(record("198.19.0.1", "198.18.0.11", 1, 0))
    assert not got.decided and any("ICMP type" in w for w in got.why), got
    # An address end is exact: outside the nets, the tier denies it.
    got = judge.judge(record("198.19.0.1", "198.18.0.10", 6, 80))
    assert got.action == "deny" and got.steps == ("default|end-of-tier|-|deny",), got
    got = judge.judge(record("198.18.7.7", "198.18.0.10", 6, 80))
    assert got.action == "allow" and got.steps == ("default|web|0|allow",), got
    # web is dual-stack: from web itself, only one of its addresses is in the nets.
    got = judge.judge(record("198.18.0.10", "198.18.0.10", 6, 80))
    assert not got.decided and any("some of its addresses" in w for w in got.why), got
    # A host endpoint the proposed state no longer has: not guessed.
    gone = Impact(Snapshot.build(parse_resource(d) for d in docs[1:]))
    got = gone.judge(record("198.19.0.1", "198.18.0.10", 6, 80))
    assert not got.decided and "not in the proposed state" in got.why[0], got


def test_ends_the_proposal_moves_or_shares_are_not_guessed() -> None:
    """Against the store as it is (`current`), an end the proposed state readdresses or
    drops is unknown, and a reporting endpoint that moves or shares an address is
    undecided: which packets it would see is not known."""
    web = doc("HostEndpoint", "web", {"node": "web", "expectedIPs": ["198.18.0.10"]},
              {"app": "web"})
    db = doc("HostEndpoint", "db", {"node": "db", "expectedIPs": ["198.18.0.11"]},
             {"app": "db"})
    allow_web = doc("GlobalNetworkPolicy", "db", {
        "selector": "app == 'db'", "types": ["Ingress"],
        "ingress": [{"action": "Allow", "source": {"selector": "app == 'web'"}}]})
    current = Snapshot.build(parse_resource(d) for d in (web, db, allow_web))
    ends = Ends(current)
    record = FlowRecord(0.0, 1.0, "db", "dst", ends.at(ipaddress.ip_address("198.18.0.10")),
                        ends.at(ipaddress.ip_address("198.18.0.11")), 6, 80, "allow", (),
                        "allow", ())
    assert Impact(current, current).judge(record).action == "allow"

    def judged(*docs: dict[str, Any]) -> Any:
        proposed = Snapshot.build(parse_resource(d) for d in docs)
        return Impact(proposed, current).judge(record)

    moved_web = {**web, "spec": {**web["spec"], "expectedIPs": ["198.18.0.20"]}}
    got = judged(moved_web, db, allow_web)
    assert not got.decided and "not placed by the proposed state" not in str(got.why) and \
        any("selector" in w for w in got.why), got
    got = judged(db, allow_web)                      # web gone: any labels may be there
    assert not got.decided, got
    moved_db = {**db, "spec": {**db["spec"], "expectedIPs": ["198.18.0.21"]}}
    got = judged(web, moved_db, allow_web)
    assert not got.decided and "other addresses" in got.why[0], got
    twin = doc("HostEndpoint", "a-db", {"node": "db", "expectedIPs": ["198.18.0.11"]},
               {"app": "other"})
    got = judged(web, db, twin, allow_web)
    assert not got.decided and "shares an address with a-db" in got.why[0], got


def test_domain_rules_are_decided_from_the_names_a_record_gives() -> None:
    """A `domains` rule, and a selector taking a network set by its allowedEgressDomains,
    are decided from the record's `dst_domains`: not when the record does not give them,
    nor when its list is full (it may have been cut) and matches nothing."""
    docs = [
        doc("HostEndpoint", "web", {"node": "web", "expectedIPs": ["198.18.0.10"]},
            {"app": "web"}),
        doc("GlobalNetworkSet", "saas", {"allowedEgressDomains": ["*.saas.net"]},
            {"egress": "saas"}),
        doc("GlobalNetworkPolicy", "web-out", {
            "selector": "app == 'web'", "types": ["Egress"], "egress": [
                {"action": "Allow", "destination": {"domains": ["api.example.com"]}},
                {"action": "Allow", "destination": {"selector": "egress == 'saas'"}}]}),
    ]
    snapshot = Snapshot.build(parse_resource(d) for d in docs)
    judge = Impact(snapshot)
    ends = Ends(snapshot)

    def record(names: list[str] | None, reporter: str = "src") -> FlowRecord:
        return FlowRecord(0.0, 1.0, "web", reporter, ends.at(ipaddress.ip_address(
            "198.18.0.10")), ends.at(ipaddress.ip_address("203.0.113.9")), 6, 443, "allow",
            (), "allow", (), dst_domains=None if names is None else tuple(names))

    assert judge.judge(record(["api.example.com"])).steps == ("default|web-out|0|allow",)
    assert judge.judge(record(["x.y.saas.net"])).steps == ("default|web-out|1|allow",)
    got = judge.judge(record([]))
    assert got.action == "deny" and got.steps == ("default|end-of-tier|-|deny",), got
    got = judge.judge(record(["example.com", "saas.net"]))   # no pattern takes these
    assert got.action == "deny", got
    got = judge.judge(record(None))
    assert not got.decided and any("domain names (the reporting agent did not say" in w
                                   for w in got.why), got
    full = [f"n{i:02d}.example.org" for i in range(MAX_DOMAINS)]
    got = judge.judge(record(full))
    assert not got.decided and any(f"keeps only the first {MAX_DOMAINS}" in w
                                   for w in got.why), got
    assert judge.judge(record([*full[:-1], "api.example.com"])).action == "allow"


def test_promoting_thousands_costs_their_sum_not_their_product(monkeypatch: Any) -> None:
    """A viewer's preview may bring 5,000 staged policies over 5,000 policies: pairing
    each staged policy with the policy of its tier and bare name reads every policy's
    bare name once, not once per staged policy (25 million reads took 18 s), and the
    state is what promoting each one by one gives."""
    from bulkhead.model import resources

    docs = []
    for i in range(2000):
        docs.append({"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
                     "metadata": {"name": f"p{i}"}, "spec": {"order": i}})
        docs.append({"apiVersion": API_VERSION, "kind": "StagedGlobalNetworkPolicy",
                     "metadata": {"name": f"p{i}" if i % 2 else f"new{i}"},
                     "spec": {"order": i + 0.5}})
    snapshot = Snapshot.build(parse_resource(d) for d in docs)
    reads = Counter[str]()
    bare = resources.GlobalNetworkPolicy.bare_name

    def counted(self: Any) -> str:
        reads["bare_name"] += 1
        return bare.fget(self)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(resources.GlobalNetworkPolicy, "bare_name", property(counted))
    after = promoted(snapshot)
    assert reads["bare_name"] <= 3 * 4000, reads
    assert not after.staged and len(after.policies) == 3000   # 1,000 replaced, 1,000 new
    assert after.policies["p1"].spec.order == 1.5 and after.policies["new0"].spec.order == 0.5


def test_an_unknown_ip_version_says_why() -> None:
    """Between two dual-stack host endpoints a record may be of either IP version: the
    reason says so, not that no address of an end is known."""
    from bulkhead.model import DEFAULT_ALLOW_PROFILE
    from bulkhead.model.flowlog import End

    def hep(name: str, ips: list[str]) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "HostEndpoint",
                "metadata": {"name": name, "labels": {"app": name}},
                "spec": {"node": name, "interfaceName": "*", "expectedIPs": ips,
                         "profiles": [DEFAULT_ALLOW_PROFILE]}}

    heps = [hep("a", ["198.18.0.10", "2001:2::10"]), hep("b", ["198.18.0.11", "2001:2::11"])]
    policy = {"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
              "metadata": {"name": "v6"},
              "spec": {"selector": "app == 'b'", "ingress": [
                  {"action": "Deny", "protocol": "ICMPv6"}, {"action": "Allow"}]}}
    current = Snapshot.build(parse_resource(d) for d in heps)
    proposed = Snapshot.build(parse_resource(d) for d in [*heps, policy])
    trace = ("profile|projectcalico-default-allow|0|allow",)
    record = FlowRecord(0.0, 1.0, "b", "dst", End("hep", "a"), End("hep", "b"), 58, 0,
                        "allow", trace, "allow", trace, 1, 1)
    got = Impact(proposed, current).judge(record)
    assert not got.decided
    assert got.why == ("the IP version (records do not keep it, and both ends have IPv4 "
                       "and IPv6 addresses)",)
