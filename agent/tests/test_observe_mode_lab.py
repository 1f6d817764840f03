"""Observe mode end to end, with real processes and real traffic: bulkhead-server and an
agent per lab host with flow logs on. h2's HostEndpoint goes from enforce to observe and
back by a label written to the store, as a user would write it:

- in observe, a port its policy denies connects (nothing is blocked), and h2's records say
  `allow`, with the Deny the kernel logged and the observe marker as their trace, and the
  Deny as their staged verdict (what `bulkhead flows --staged differs` lists);
- in enforce, before and after, the same probe is dropped;
- the failsafe port answers in both modes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from bulkhead.conformance.kernel import WireFlow
from bulkhead.model import ENFORCE, ENFORCEMENT_LABEL, OBSERVE
from bulkhead.model.flowlog import OBSERVE_STEP
from bulkhead.testbed import Testbed
from tests.labfixture import need_root, unique_lab_name, wire
from tests.test_agent_faults import AGENTS, HOSTS, gnp, hep, ip, wait_until
from tests.test_flowlogs_lab import flows

WEB = gnp("web", {"selector": "app == 'web'", "ingress": [
    {"action": "Deny", "protocol": "TCP", "destination": {"ports": [81]}},
    {"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]})
PROBES = [WireFlow("h1", ip("h1"), "h2", ip("h2"), "TCP", port) for port in (80, 81, 22)]
DENIED_81 = ["default|web|0|deny"]


def h2(mode: str) -> dict[str, Any]:
    return hep("h2", {"app": "web", ENFORCEMENT_LABEL: mode})


def set_mode(bed: Testbed, mode: str) -> None:
    """Write h2's label (one store write) and wait until both agents enforce it."""
    revision = bed.apply([h2(mode)])
    assert revision is not None
    bed.wait_converged(revision)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    need_root()
    settings = {"flowLogs": {"enabled": True, "flushInterval": 1},
                "failsafeInbound": ["tcp:22"]}
    with Testbed(unique_lab_name(), list(HOSTS), failsafe_defaults=False,
                 agent_hosts=AGENTS, agent_settings=settings) as testbed:
        yield testbed


def test_observe_blocks_nothing_and_logs_what_enforce_would_block(bed: Testbed) -> None:
    bed.enforce([hep("h1", {"app": "client"}), h2(ENFORCE), WEB], "observe-mode")
    assert wire(bed, PROBES, [True, False, True]) == [True, False, True]

    set_mode(bed, OBSERVE)
    switched = time.time()   # every first packet of the probes below comes after it
    assert wire(bed, PROBES, [True, True, True]) == [True, True, True]

    def observed(port: int) -> list[dict[str, Any]]:
        return [r for r in flows(bed, node="h2", reporter="dst")
                if r["dst_port"] == port and r["src_name"] == "h1" and r["action"] == "allow"]

    def counted(port: int) -> int:
        return sum(r["packets_in"] for r in observed(port))

    def observed_80() -> list[dict[str, Any]]:
        # The probe of 80 in enforce mode, above, left records of the same ends and
        # action: the observed connection's is the one whose first packet came after
        # the switch (its conntrack counts, in a record of their own, can come later).
        return [r for r in observed(80) if r["started"] >= 1 and r["start"] >= switched]

    # A connection's first packet and conntrack's counts of it (it went through) can
    # land in two flush intervals, two records of one key: the counts are their sum.
    wait_until(lambda: counted(81) >= 2 and bool(observed_80()),
               "h2's records of the observed flows, with conntrack's counts")
    for would in observed(81):
        assert would["enforced_trace"] == [*DENIED_81, OBSERVE_STEP]
        assert (would["staged_action"], would["staged_trace"]) == ("deny", DENIED_81)
    assert sum(r["started"] for r in observed(81)) >= 1   # and it went through
    for allowed in observed_80():
        assert allowed["enforced_trace"] == ["default|web|1|allow", OBSERVE_STEP]
        assert allowed["staged_action"] == "allow"
    differs = {(r["src_name"], r["dst_port"]) for r in flows(bed, node="h2",
                                                            staged="differs")}
    assert differs == {("h1", 81)}

    set_mode(bed, ENFORCE)
    assert wire(bed, PROBES, [True, False, True]) == [True, False, True]
