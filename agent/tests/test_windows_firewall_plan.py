"""Windows Firewall over whole plans: for random snapshots (tiers, order, Pass, Log,
negations, nets, ports, named ports, profiles, observe mode) and random packets, the
fake Windows Firewall over `firewall.compile(flatten(...))` decides as the reference
evaluator, on every host endpoint and in both directions (issue 24's property test for
this backend; tests/test_windows_hns.py is HNS's)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.windows import firewall
from bulkhead.dataplane.windows.fake_firewall import FakeFirewall
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.flatten import flatten
from bulkhead.dataplane.windows.rules import FirewallRule
from bulkhead.model import INGRESS
from tests.test_differential import HOSTS as HOST_NAMES
from tests.windowsfixture import DIRECTIONS, endpoint, packets, worlds

EXAMPLES = 20
PACKETS = 16


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
            fake = FakeFirewall(rules)
            seen["rules"] += len(rules)
            for direction in DIRECTIONS:
                for packet in data.draw(st.lists(packets(host), min_size=PACKETS,
                                                 max_size=PACKETS)):
                    verdict = world.evaluator.evaluate(packet.flow(direction), trace=False)
                    dv = verdict.ingress if direction == INGRESS else verdict.egress
                    got = fake.allows(direction, packet.family, *packet.args())
                    assert got == dv.allowed, (packet, direction, dv, rules)
                    seen["allowed" if got else "denied"] += 1

    check()
    print(dict(seen))
    assert seen["allowed"] > 200 and seen["denied"] > 200, seen
