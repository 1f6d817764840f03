"""Applying rendered tables to a real kernel, in a network namespace of the test's own."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from bulkhead.dataplane.nftables import Chain, render
from bulkhead.dataplane.nftables.apply import NftApplier, NftError
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import base, snap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def nft(ns: str, *args: str, script: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=script, text=True,
                          capture_output=True, check=True).stdout


def test_full_then_elements_then_nothing(netns: str) -> None:
    nft(netns, "-f", "-", script="table inet other {\n chain c {\n type filter hook input "
                                 "priority 10; policy accept;\n }\n}\n")
    applier = NftApplier(netns=netns)
    first = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    result = applier.apply(first)
    assert result.full and result.changed
    assert "198.18.0.11" in nft(netns, "list", "table", "inet", "bulkhead")
    second = render(calculate(snap(*base({"app": "cache"})), "n1", {}, Failsafes.off()))
    result = applier.apply(second)
    assert result.changed and not result.full
    listing = nft(netns, "list", "table", "inet", "bulkhead")
    assert "198.18.0.11" not in listing
    assert not applier.apply(second).changed
    assert applier.diff(second) == ""
    assert "table inet other" in nft(netns, "list", "tables")
    applier.remove()
    assert nft(netns, "list", "tables").strip() == "table inet other"


def test_a_rejected_ruleset_leaves_the_old_one(netns: str) -> None:
    applier = NftApplier(netns=netns)
    good = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    applier.apply(good)
    before = nft(netns, "list", "table", "inet", "bulkhead")
    bad = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    tier = next(c for c in bad.chains.values() if c.name.startswith("t_"))
    bad.chains[tier.name] = dataclasses.replace(
        tier, rules=(*tier.rules, "ip saddr @no_such_set accept"))
    with pytest.raises(NftError, match="no_such_set"):
        applier.apply(bad)
    assert nft(netns, "list", "table", "inet", "bulkhead") == before
    assert applier.drifted() is None


def test_drift_is_seen_and_repaired(netns: str) -> None:
    applier = NftApplier(netns=netns)
    ruleset = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    applier.apply(ruleset)
    expected = nft(netns, "list", "table", "inet", "bulkhead")
    nft(netns, "delete", "table", "inet", "bulkhead")
    assert applier.drifted() == "table inet bulkhead is missing"
    applier.repair()
    assert nft(netns, "list", "table", "inet", "bulkhead") == expected
    nft(netns, "insert", "rule", "inet", "bulkhead", "input", "accept")
    assert applier.drifted() == "table inet bulkhead was changed outside the agent"
    # A plain apply of the same ruleset notices the drift and replaces the table.
    assert applier.apply(ruleset).full
    assert applier.drifted() is None


def test_normalized_refuses_what_the_kernel_would(netns: str) -> None:
    applier = NftApplier(netns=netns)
    ruleset = render(calculate(snap(*base()), "n1", {}, Failsafes.off()))
    assert "chain input" in applier.normalized(ruleset)
    ruleset.chains["zz"] = Chain("zz", ("jump nowhere",))
    with pytest.raises(NftError):
        applier.normalized(ruleset)
    assert "bulkhead" not in nft(netns, "list", "tables")


def test_release_deletes_the_agents_table_and_nothing_else(netns: str) -> None:
    """`bulkhead-agent --release` on nftables: the agent's table goes (a stopped agent
    keeps it: fail static), another table stays; a second release finds nothing."""
    from bulkhead.agent.nft_enforcer import NftablesEnforcer

    nft(netns, "-f", "-", script="table inet other {\n chain c {\n type filter hook input "
                                 "priority 10; policy accept;\n }\n}\n")
    enforcer = NftablesEnforcer("n1", Failsafes.off(), interfaces=dict,
                                applier=NftApplier(netns=netns))
    enforcer.enforce(snap(*base()), 1)
    assert "table inet bulkhead" in nft(netns, "list", "tables")
    again = NftablesEnforcer("n1", Failsafes.off(), interfaces=dict,
                             applier=NftApplier(netns=netns))     # after a restart
    assert again.release() == (["table inet bulkhead"], [])
    assert nft(netns, "list", "tables").strip() == "table inet other"
    assert again.release() == ([], [])


def test_release_without_nft_is_an_error_not_a_traceback() -> None:
    from bulkhead.agent.enforcer import EnforceError
    from bulkhead.agent.nft_enforcer import NftablesEnforcer

    enforcer = NftablesEnforcer("n1", Failsafes.off(), interfaces=dict,
                                applier=NftApplier(nft="/nonexistent/nft", netlink=False))
    with pytest.raises(EnforceError, match="deleting table inet bulkhead: nft could not run"):
        enforcer.release()


def test_the_agent_warns_of_addresses_its_endpoint_covers_but_does_not_list(
        netns: str) -> None:
    """The table enforces a `*` endpoint on every interface; an address there that its
    expectedIPs do not list (a dual-stack host's IPv6 one) is in the report's warnings,
    which the agent logs at each apply; it is not an unenforced endpoint."""
    from bulkhead.agent.nft_enforcer import NftablesEnforcer

    held = {"lo": ["127.0.0.1"], "eth0": ["198.18.0.12", "2001:2::12", "fe80::2"]}
    docs = [d for d in base() if d["kind"] != "HostEndpoint" or d["spec"]["node"] != "n1"]
    docs.append({"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                 "metadata": {"name": "n1-all", "labels": {"app": "db"}},
                 "spec": {"node": "n1", "interfaceName": "*",
                          "expectedIPs": ["198.18.0.12"]}})
    enforcer = NftablesEnforcer("n1", Failsafes.off(), interfaces=lambda: held,
                                applier=NftApplier(netns=netns))
    report = enforcer.enforce(snap(*docs), 1)
    assert [w for w in report.warnings if "2001:2::12" in w] == [
        "HostEndpoint n1-all: its interfaces hold 2001:2::12, not in its expectedIPs: the "
        "table enforces their traffic as this endpoint's, but other hosts' selectors, "
        "explain, the preview and staged verdicts take them for no endpoint; list the host's "
        "own in expectedIPs (not one many hosts share, as a container bridge's)"]
    # Found once for these endpoints and interfaces, not again at a watch event's apply
    # (a policy changed: the plan is updated, the interfaces are not read again).
    found = enforcer.uncovered
    relabeled = [d for d in docs if d["metadata"]["name"] != "web"]
    relabeled += [d for d in base({"app": "cache"}) if d["metadata"]["name"] == "web"]
    enforcer.enforce(snap(*relabeled), 2, changed=[("HostEndpoint", "web")])
    assert not enforcer.scratch
    assert enforcer.uncovered is found
    assert report.unenforced == []
    docs[-1]["spec"]["expectedIPs"] = ["198.18.0.12", "2001:2::12"]
    assert not any("expectedIPs:" in w for w in enforcer.enforce(snap(*docs), 3).warnings)
