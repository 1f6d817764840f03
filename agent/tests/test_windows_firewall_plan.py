"""Windows Firewall over whole plans: for random snapshots (tiers, order, Pass, Log,
negations, nets, ports, named ports, profiles, observe mode) and random packets, the
fake Windows Firewall over `firewall.compile(flatten(...))` decides as the reference
evaluator, on every host endpoint and in both directions (issue 24's property test for
this backend; tests/test_windows_hns.py is HNS's)."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import yaml
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.agent.win_enforcer import compile_plan
from bulkhead.dataplane.windows import firewall
from bulkhead.dataplane.windows.fake_firewall import FakeFirewall
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.dataplane.windows.rules import FirewallRule
from bulkhead.model import INGRESS
from tests.test_differential import HOSTS as HOST_NAMES
from tests.windowsfixture import DIRECTIONS, check_backend, endpoint, worlds

EXAMPLES = 20


def test_fake_firewall_over_compiled_plans_decides_as_the_evaluator() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate])   # no shrinking: a failure shows the example drawn
    @given(worlds(refusals=False), st.data())
    def check(world: Any, data: st.DataObject) -> None:
        for host in HOST_NAMES:
            plan = world.plan(host)
            ep = endpoint(plan, host)
            if ep is None:
                continue
            rules: list[FirewallRule] = []
            try:
                for direction in DIRECTIONS:
                    rules += firewall.compile(flatten(plan, ep, direction), direction,
                                              f"{host}-{direction.lower()}")
            except Unsupported as e:
                # Windows Firewall writes ports for TCP and UDP only.
                assert e.field.endswith("ports"), e
                seen["refused"] += 1
                continue
            seen["rules"] += len(rules)
            check_backend(world, data, host, FakeFirewall(rules), seen)

    check()
    print(dict(seen))
    assert seen["allowed"] > 200 and seen["denied"] > 200, seen


# ---------------------------------------------------------------- one targeted world
# What the random worlds do not draw: a host endpoint with several addresses of one
# family (and packets to each), named ports on both sides of one rule (a name with a TCP
# and a UDP port), a tier whose only policy is Egress (empty for ingress), Pass in a
# profile, notPorts under Pass, ipVersion, notProtocol and a notNets source.
def _doc(kind: str, name: str, spec: dict[str, Any],
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind,
            "metadata": {"name": name, **({"labels": labels} if labels else {})}, "spec": spec}


A1, A2, A6, PEER4, PEER6 = "198.18.0.1", "198.18.0.2", "2001:2::1", "198.18.1.9", "2001:2::9"
TARGETED = [
    _doc("HostEndpoint", "h1", {
        "node": "h1", "interfaceName": "eth0", "expectedIPs": [A1, A2, A6],
        "profiles": ["prof"],
        "ports": [{"name": "web", "port": 8080, "protocol": "TCP"},
                  {"name": "web", "port": 8081, "protocol": "UDP"}]}, {"role": "web"}),
    _doc("HostEndpoint", "p", {
        "node": "p", "expectedIPs": [PEER4, PEER6],
        "ports": [{"name": "web", "port": 9090, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "protocol": "UDP"}]}, {"role": "peer"}),
    _doc("Tier", "t1", {"order": 10}),
    _doc("Tier", "t2", {"order": 20}),
    _doc("GlobalNetworkPolicy", "t1.eg", {
        "tier": "t1", "selector": "role == 'web'", "types": ["Egress"],
        "egress": [{"action": "Pass", "protocol": "UDP"},
                   {"action": "Deny", "protocol": "TCP",
                    "destination": {"notPorts": [80, "9000:9100"]}}]}),
    _doc("GlobalNetworkPolicy", "t2.in", {
        "tier": "t2", "selector": "role == 'web'", "types": ["Ingress"],
        "ingress": [{"action": "Allow", "source": {"selector": "role == 'peer'",
                                                   "ports": ["web", "dns"]},
                     "destination": {"ports": ["web"]}},
                    {"action": "Deny", "protocol": "TCP", "destination": {"nets": [A2 + "/32"],
                                                                          "ports": [80]}},
                    {"action": "Pass", "protocol": "UDP", "destination": {"notPorts": [53]}},
                    {"action": "Allow", "notProtocol": "UDP",
                     "source": {"notNets": ["198.18.1.0/24"]}},
                    {"action": "Deny", "ipVersion": 4, "notProtocol": "UDP"}]}),
    _doc("Profile", "prof", {
        "ingress": [{"action": "Allow", "protocol": "UDP", "source": {"ports": ["dns"]}},
                    {"action": "Pass"}, {"action": "Allow", "ipVersion": 6}],
        "egress": [{"action": "Allow", "ipVersion": 4}, {"action": "Pass", "protocol": "TCP"},
                   {"action": "Allow"}]}),
]


def test_a_targeted_world_decides_as_the_evaluator_on_both_backends() -> None:
    import ipaddress

    from bulkhead.dataplane.windows import hns
    from bulkhead.dataplane.windows.fake_hns import FakeHns
    from bulkhead.model import EGRESS, Snapshot, parse_resource
    from bulkhead.policy import Evaluator, Failsafes, Flow
    from bulkhead.policy.plan import calculate

    snapshot = Snapshot.build(parse_resource(d) for d in TARGETED)
    failsafes = Failsafes.off()
    evaluator = Evaluator(snapshot, failsafes)
    plan = calculate(snapshot, "h1", {"eth0": [A1, A2, A6]}, failsafes)
    ep = endpoint(plan, "h1")
    assert ep is not None
    fw: list[FirewallRule] = []
    acls = []
    for direction in DIRECTIONS:
        fw += firewall.compile(flatten(plan, ep, direction), direction, f"h1-{direction}")
        acls += hns.compile(flatten(plan, ep, direction, neighbour_discovery=False),
                            direction, "h1")
    fakes = {"firewall": FakeFirewall(fw), "hns": FakeHns(acls)}
    seen: Counter[str] = Counter()
    for direction in (INGRESS, EGRESS):
        for local in (A1, A2, A6):
            for remote in ((PEER4, "198.19.0.1") if ":" not in local else (PEER6, "2001:2::77")):
                for protocol in (6, 17, 47):
                    ports = (53, 80, 8080, 8081, 9050, 9090) if protocol != 47 else (None,)
                    for local_port in ports:
                        for remote_port in ports:
                            lo, re_ = ipaddress.ip_address(local), ipaddress.ip_address(remote)
                            src, dst = (re_, lo) if direction == INGRESS else (lo, re_)
                            sport, dport = ((remote_port, local_port) if direction == INGRESS
                                            else (local_port, remote_port))
                            verdict = evaluator.evaluate(
                                Flow(src, dst, protocol, dport, sport, None, None), trace=False)
                            want = (verdict.ingress if direction == INGRESS
                                    else verdict.egress).allowed
                            for name, fake in fakes.items():
                                got = fake.allows(direction, lo.version, protocol, int(lo),
                                                  int(re_), local_port, remote_port, None)
                                assert got == want, (name, direction, local, remote, protocol,
                                                     local_port, remote_port)
                            seen["allowed" if want else "denied"] += 1
    assert seen["allowed"] > 100 and seen["denied"] > 100, seen


# ------------------------------------------- an endpoint on every interface beside others
STAR_BESIDE_ETH0 = """
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: a-eth0}
spec: {node: n1, interfaceName: eth0, expectedIPs: [198.18.0.10],
       profiles: [projectcalico-default-allow]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: b-star}
spec: {node: n1, interfaceName: "*", expectedIPs: [198.18.0.12]}
"""


def test_an_endpoint_on_every_interface_beside_a_named_one_is_refused() -> None:
    """On Linux an interface's own endpoint decides its traffic and the `*` endpoint
    only the other interfaces' (render.py: the vmap, then the `*` chain). A Windows
    Firewall rule without an interface alias applies on every interface, and Block beats
    Allow: b-star's rules would block on eth0 what a-eth0's profile allows. Refused
    (naming both) rather than enforced differently from the evaluator."""
    from bulkhead.model import Snapshot, parse_resource
    from bulkhead.policy import Evaluator, Failsafes, Flow
    from bulkhead.policy.plan import calculate

    snapshot = Snapshot.build(parse_resource(d) for d in yaml.safe_load_all(STAR_BESIDE_ETH0))
    plan = calculate(snapshot, "n1", {"eth0": ["198.18.0.10"], "eth1": ["198.18.0.12"]},
                     Failsafes.off())
    verdict = Evaluator(snapshot, Failsafes.off()).evaluate(
        Flow.make("198.18.0.99", "198.18.0.10", "TCP", 80, src_port=40000))
    assert verdict.ingress.allowed
    try:
        rules = compile_plan(plan)
    except Unsupported as e:
        assert e.where == "HostEndpoint b-star" and e.field == "interfaceName", e
        assert "a-eth0" in e.why and "eth0" in e.why, e
        return
    # Whatever rules are written must decide as the evaluator on eth0.
    fake = FakeFirewall(rules)
    assert fake.allows(INGRESS, 4, 6, int(ipaddress.ip_address("198.18.0.10")),
                       int(ipaddress.ip_address("198.18.0.99")), 80, 40000, None,
                       interface="eth0")
