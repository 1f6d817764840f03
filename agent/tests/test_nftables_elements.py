"""Element-only updates under traffic: a change of set and map elements (a label change)
must not let through a packet that both the old and the new elements deny, nor lose one
that both allow, while a packet that straddles the update looks some sets up before it
and some after it (docs/dataplane.md, "Element changes in order"). The worlds are the
renderer's own tables; the updates are never full applies."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import pytest

from bulkhead.dataplane.nftables import Ruleset, render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import gnp, hep, snap
from tests.test_nftables_load import under_traffic
from tests.test_notrack import pair

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
__all__ = ["pair"]   # the fixture, used by name

PADDING = 3000
# Rules that make a packet's walk between two lookups long (Log rules for TCP from
# addresses no test traffic has).
PADDING_RULES = [{"action": "Log", "protocol": "TCP",
                  "source": {"nets": [f"198.19.{i // 256}.{i % 256}/32"]},
                  "destination": {"ports": [1 + i]}} for i in range(PADDING)]
PER_POLICY = 1000   # Calico takes at most 1,024 rules a direction in one policy


def padded(name: str, order: int, head: list[dict[str, Any]],
           tail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Policies of db's first tier, in order: `head`, the padding, then `tail`. The
    padding is cut into policies of PER_POLICY rules (the walk is as long), `head` opens
    the first and `tail` closes the last."""
    chunks = [PADDING_RULES[i:i + PER_POLICY] for i in range(0, PADDING, PER_POLICY)]
    chunks[0] = head + chunks[0]
    chunks[-1] = chunks[-1] + tail
    return [gnp(name if i == 0 else f"{name}-{i}",
                {"selector": "app == 'db'", "order": order + i / 10, "ingress": rules})
            for i, rules in enumerate(chunks)]
TIER = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
        "metadata": {"name": "second"}, "spec": {"order": 200}}


def _rendered(docs: list[dict[str, Any]]) -> Ruleset:
    return render(calculate(snap(*docs), "n1", {}, Failsafes.off()))


def both_sets(moved: bool) -> Ruleset:
    """db (198.18.7.2 on v1) denies UDP to 5002 from `bad == 'yes'` (a plain set, `ip saddr
    @s4_... drop`), then, after many rules that make the walk long, allows UDP from `good
    == 'yes'` (elements of the tier's verdict map) and UDP to 5001 from anyone. The
    client (198.18.7.1) has neither label, or both: UDP to 5002 is denied either way
    (the tier's default Deny, or the Deny), but a packet that looks the Deny's set up
    before the client joins it and the map after would be accepted."""
    client = {"bad": "yes", "good": "yes"} if moved else {"role": "client"}
    return _rendered([
        hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
        hep("client", "n2", "198.18.7.1", client),
        hep("other", "n3", "198.18.9.9", {"bad": "yes", "good": "yes"}),
        *padded("deny", 1, [
            {"action": "Deny", "protocol": "UDP", "source": {"selector": "bad == 'yes'"},
             "destination": {"ports": [5002]}}], []),
        gnp("allow", {"selector": "app == 'db'", "order": 2, "ingress": [
            {"action": "Allow", "protocol": "UDP", "source": {"selector": "good == 'yes'"}},
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}}]})])


def verdict_moved(moved: bool) -> Ruleset:
    """db's first tier denies UDP to 5002 from `x == 'yes'` and passes it from `p ==
    'yes'` (one verdict-map element for the client: drop, or return), then allows all
    but TCP by a rule without sets; the second tier allows UDP to 5001 only. The client
    moves from x to p: its element changes verdict, and UDP to 5002 is denied before
    (Deny) and after (the second tier's default Deny); a packet that found the element
    in neither state would meet the Allow."""
    client = {"p": "yes"} if moved else {"x": "yes"}
    return _rendered([
        TIER,
        hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
        hep("client", "n2", "198.18.7.1", client),
        hep("other", "n3", "198.18.9.9", {"x": "yes", "p": "yes"}),
        gnp("first", {"selector": "app == 'db'", "order": 1, "ingress": [
            {"action": "Deny", "protocol": "UDP", "source": {"selector": "x == 'yes'"},
             "destination": {"ports": [5002]}},
            {"action": "Pass", "protocol": "UDP", "source": {"selector": "p == 'yes'"},
             "destination": {"ports": [5002]}},
            {"action": "Allow", "notProtocol": "TCP"}]}),
        gnp("second.last", {"tier": "second", "selector": "app == 'db'", "ingress": [
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}}]})])


def passed(moved: bool) -> Ruleset:
    """db's first tier denies UDP to 5002 from `bad == 'yes'` (a plain set), then after
    many rules passes everything from `p == 'yes'` to the second tier, denies UDP to
    5002 and allows all but TCP; the second tier allows UDP to 5001 only. The Pass and
    the Deny are one verdict map, its drop for 5002 a range of sources that the client
    cuts when it joins p (its other keys become `return` elements, which cannot be
    ranked). The client joins bad and p at once: UDP to 5002 is denied before (the
    map's Deny) and after (the plain set's), to 5001 allowed both ways. Three commits:
    the set and the cut range, the returns, the range merged again."""
    client = {"bad": "yes", "p": "yes"} if moved else {"role": "client"}
    return _rendered([
        TIER,
        hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
        hep("client", "n2", "198.18.7.1", client),
        hep("other", "n3", "198.18.9.9", {"p": "yes", "bad": "yes"}),
        *padded("first", 1, [
            {"action": "Deny", "protocol": "UDP", "source": {"selector": "bad == 'yes'"},
             "destination": {"ports": [5002]}}], [
            {"action": "Pass", "source": {"selector": "p == 'yes'"}},
            {"action": "Deny", "protocol": "UDP", "destination": {"ports": [5002]}},
            {"action": "Allow", "notProtocol": "TCP"}]),
        gnp("second.last", {"tier": "second", "selector": "app == 'db'", "ingress": [
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}}]})])


def interface_moved(moved: bool) -> Ruleset:
    """db on v1 is in zone a or zone b (endpoints on va and vb keep both zones' chains):
    its `ep_in` element jumps to one endpoint chain or the other. Both zones deny UDP to
    5002 and allow it to 5001, by chains of their own; a packet that found no `ep_in`
    element would end the input chain, policy accept."""
    zone = "b" if moved else "a"
    return _rendered([
        hep("db", "n1", "198.18.7.2", {"app": "db", "zone": zone}, iface="v1"),
        hep("db-a", "n1", "198.18.7.10", {"app": "db", "zone": "a"}, iface="va"),
        hep("db-b", "n1", "198.18.7.11", {"app": "db", "zone": "b"}, iface="vb"),
        gnp("za", {"selector": "zone == 'a'", "ingress": [
            {"action": "Deny", "protocol": "UDP", "destination": {"ports": [5002]}},
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}}]}),
        gnp("zb", {"selector": "zone == 'b'", "ingress": [
            {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}},
            {"action": "Deny", "protocol": "UDP"}]})])


WORLDS = {"both_sets": both_sets, "verdict_moved": verdict_moved,
          "interface_moved": interface_moved, "passed": passed}


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_the_worlds_differ_in_elements_only(world: str) -> None:
    before, after = WORLDS[world](False), WORLDS[world](True)
    assert before.same_structure(after)
    assert not before.same(after)


def updated_under_traffic(server: str, client: str, applier: NftApplier,
                          variants: list[Ruleset], via: str
                          ) -> tuple[list[float], int, int, int]:
    """(each update's seconds, datagrams sent to each port, arrived at 5001, arrived at
    5002) while the elements go back and forth between the variants (at most 400
    updates) under UDP to both ports; never a full apply."""
    assert applier.apply(variants[0]).full
    updates: list[float] = []

    def update(i: int) -> None:
        start = time.perf_counter()
        result = applier.apply(variants[(i + 1) % 2])
        updates.append(time.perf_counter() - start)
        assert not result.full and result.changed and result.via == via, result

    _, sent, accepted, denied = under_traffic(server, client, update, 400, timeout=60)
    return updates, sent, accepted, denied


@root
@pytest.mark.parametrize("netlink", [True, False])
@pytest.mark.parametrize("world", sorted(WORLDS))
def test_no_denied_datagram_passes_an_element_update(pair: tuple[str, str], world: str,
                                                      netlink: bool) -> None:
    client, server = pair
    build = WORLDS[world]
    updates, sent, accepted, denied = updated_under_traffic(
        server, client, NftApplier(netns=server, netlink=netlink), [build(False), build(True)],
        "netlink" if netlink else "nft")
    print(f"{world} netlink={netlink}: {len(updates)} updates (median "
          f"{1000 * statistics.median(updates):.2f} ms), {sent} sent to each port, "
          f"{accepted} arrived at 5001, {denied} at 5002")
    assert len(updates) >= 5
    assert denied == 0
    assert accepted == sent


@root
@pytest.mark.parametrize("netlink", [True, False])
def test_a_change_that_cannot_be_ordered_replaces_the_table(netns: str, netlink: bool
                                                              ) -> None:
    """A set behind a Pass that one packet can look up twice (the Pass's and a later
    Allow's `!= @set`): `order` gives None, and the applier replaces the table whole;
    the kernel then holds the new table."""
    def table(member: bool) -> Ruleset:
        return _rendered([
            hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
            hep("c", "n2", "198.18.7.1", {"p": "yes"} if member else {}),
            hep("o", "n3", "198.18.9.9", {"p": "yes"}),
            gnp("x", {"selector": "app == 'db'", "ingress": [
                {"action": "Pass", "source": {"selector": "p == 'yes'"}},
                {"action": "Allow", "notProtocol": "TCP",
                 "source": {"notSelector": "p == 'yes'"}}]})])
    applier = NftApplier(netns=netns, netlink=netlink)
    before, after = table(False), table(True)
    assert before.same_structure(after)
    assert applier.apply(before).full
    result = applier.apply(after)
    assert result.full and result.changed
    assert applier.diff(after) == ""
    assert applier.drifted() is None
