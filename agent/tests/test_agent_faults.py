"""Faults, with real processes: bulkhead-server and a bulkhead-agent per lab host (a
Testbed), nftables in the hosts' network namespaces, probes on the wire.

- the server killed while agents run: enforcement unchanged; status resumes after restart
- a ruleset the kernel refuses: the old one stays in force, the error is in the status,
  and drift (`nft flush ruleset`) is repaired to it while the apply keeps failing
- the agent killed (with its nft) mid-apply: the kernel holds the old or the new ruleset
- the table deleted by hand: the agent's drift check puts it back
- an endpoint's address gone: reported in the status (not converged) until it is back
- a policy denying everything: failsafe ports keep SSH and the agent's server reachable

Each test has a testbed of its own (removed pass or fail); every wait polls for a state
(the agents' status on the server, their metrics, the kernel's table) with a generous
deadline.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.conformance.kernel import WireFlow
from bulkhead.model import API_VERSION, DEFAULT_ALLOW_PROFILE
from bulkhead.testbed import Testbed
from tests.labfixture import need_root, unique_lab_name, wire

HOSTS = ("h1", "h2", "h3")       # h3 has no host endpoint: the "controller"
AGENTS = ("h1", "h2")
WAIT = 60.0                      # generous: the machine is shared


def ip(host: str) -> str:
    return f"198.18.0.{10 + HOSTS.index(host)}"


def hep(host: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "HostEndpoint",
            "metadata": {"name": host, "labels": labels},
            "spec": {"node": host, "interfaceName": "*", "expectedIPs": [ip(host)],
                     "profiles": [DEFAULT_ALLOW_PROFILE]}}


def gnp(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


def web_policy(*ports: int) -> dict[str, Any]:
    """h2 (app=web) takes TCP on these ports only."""
    return gnp("web", {"selector": "app == 'web'", "ingress": [
        {"action": "Allow", "protocol": "TCP", "destination": {"ports": list(ports)}}]})


BASE = [hep("h1", {"app": "client"}), hep("h2", {"app": "web"}), web_policy(80)]


def flow(src: str, dst: str, proto: str = "TCP", port: int | None = 80) -> WireFlow:
    return WireFlow(src, ip(src), dst, ip(dst), proto, port)


FLOWS = [flow("h1", "h2", port=80), flow("h1", "h2", port=81), flow("h2", "h1", port=81),
         flow("h3", "h2", port=81)]
BASE_VERDICTS = [True, False, True, False]
ALL_OPEN = [True, True, True, True]   # nothing enforced


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    need_root()
    with Testbed(unique_lab_name(), list(HOSTS), failsafe_defaults=False,
                 agent_hosts=AGENTS) as testbed:
        yield testbed


# ------------------------------------------------------------------------ the server
def test_server_killed_enforcement_unchanged_and_status_resumes(bed: Testbed) -> None:
    bed.enforce(BASE, "base")
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS
    tables = {h: bed.table(h) for h in AGENTS}
    bed.stop_server()  # SIGKILL
    # The agents notice (their watch breaks) and fail to report, and enforce on.
    wait_until(lambda: all(bed.agent_metrics(h)["bulkhead_agent_connected"] == 0
                           and bed.agent_metrics(h)["bulkhead_agent_status_failures_total"] > 0
                           for h in AGENTS), "the agents to lose the server")
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS
    assert {h: bed.table(h) for h in AGENTS} == tables
    bed.start_server()
    revision = bed.enforce([*BASE[:2], web_policy(80, 81)], "after-restart", timeout=WAIT)
    for host in AGENTS:
        status = bed.node_status(host)
        assert status["appliedRevision"] >= revision and status["errors"] == []
    assert wire(bed, FLOWS, ALL_OPEN) == ALL_OPEN


# ------------------------------------------------------------- a ruleset nft refuses
def too_long_rule() -> dict[str, Any]:
    """A rule the server accepts and the kernel refuses: each named notPort is a set
    lookup of its own (address . protocol . port), and 40 of them make the rule longer
    than the kernel's limit of 128 expressions per rule (NFT_RULE_MAXEXPRS). Should the
    renderer ever fold named notPorts into one lookup, this stops failing in the kernel
    and the test says so: find another limit then."""
    return gnp("too-long", {"selector": "app == 'web'", "order": 1, "ingress": [
        {"action": "Deny", "destination": {"notPorts": [f"p{i}" for i in range(40)]}}]})


def test_a_ruleset_the_kernel_refuses_keeps_the_old_one_and_is_reported(bed: Testbed
                                                                         ) -> None:
    before_revision = bed.enforce(BASE, "base")
    table = bed.table("h2")
    revision = bed.replace_all([*BASE, too_long_rule()], "too-long")  # the server takes it

    def refused() -> bool:  # the revision the agent tried: this one or a later one
        status = bed.node_status("h2")
        assert status.get("appliedRevision", 0) < revision, \
            "the kernel took the too-long rule: this test needs another kernel limit"
        tried = [int(m.group(1)) for e in status.get("errors", [])
                 if (m := re.match(r"apply of revision (\d+) failed", e))]
        return bool(tried) and max(tried) >= revision

    wait_until(refused, f"h2 to report that revision {revision} or later was refused")
    status = bed.node_status("h2")
    assert before_revision <= status["appliedRevision"] < revision
    [error] = [e for e in status["errors"] if "apply of revision" in e]
    assert "nft refused the ruleset" in error and "Invalid argument" in error, error
    assert f"the kernel keeps revision {status['appliedRevision']}" in error, error
    assert status["counters"]["failures"] >= 1
    assert not bed.nodes(revision)["converged"]
    bed.wait_converged(revision, hosts=["h1"])  # h1 has no endpoint the policy selects
    assert bed.table("h2") == table
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS
    # While the apply keeps failing, drift is still repaired, to the last good ruleset:
    # another tool's `nft flush ruleset` does not leave h2 without policy.
    repairs = bed.agent_metrics("h2")["bulkhead_agent_drift_repairs_total"]
    bed.lab.run("h2", ["nft", "flush", "ruleset"], check=True)
    wait_until(lambda: bed.agent_metrics("h2")["bulkhead_agent_drift_repairs_total"]
               > repairs, "the agent of h2 to repair its table while the apply fails",
               timeout=30)
    assert bed.table("h2") == table
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS
    # The status report that counts the repair is sent a moment after the metric moves.
    wait_until(lambda: bed.node_status("h2").get("counters", {}).get("driftRepairs", 0) > 0,
               "h2's status report to count the repair")
    status = bed.node_status("h2")
    assert [e for e in status["errors"] if "apply of revision" in e], status
    # Taking the policy back lets h2 converge again, with its errors cleared.
    bed.enforce(BASE, "fixed", timeout=WAIT)
    assert bed.node_status("h2")["errors"] == []
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS


# ------------------------------------------------------------ the agent killed mid-apply
BIG = 12_000   # network set members: `nft -f` takes a few tenths of a second over them


def big_policy(step: int) -> list[dict[str, Any]]:
    """A network set large enough to make the apply last, and a policy for h2 whose
    selector is new each step: a new set name, so the whole table is replaced (with
    `nft -f`). Written in one request, so there is no revision in between."""
    first = int(ipaddress.IPv4Address("198.18.128.0")) + step
    nets = [str(ipaddress.IPv4Address(first + 2 * i)) for i in range(BIG)]
    netset = {"apiVersion": API_VERSION, "kind": "GlobalNetworkSet",
              "metadata": {"name": "big", "labels": {"role": f"blocked-{step}"}},
              "spec": {"nets": nets}}
    # notProtocol makes it a rule of its own (not a cell of a verdict map with the next
    # policy's rule): the set's members go to the kernel as they are.
    deny = gnp("deny-big", {"selector": "app == 'web'", "order": 1, "ingress": [
        {"action": "Deny", "notProtocol": "UDP",
         "source": {"selector": f"role == 'blocked-{step}'"}}]})
    return [netset, deny]


def nft_loads(pid: int) -> list[int]:
    """The `nft -f` processes (loading a ruleset, not listing one for a drift check)
    that `pid` started, from any of its threads."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if Path(argv[0].decode()).name == "nft" and b"-f" in argv:
                found.append(int(child))
    return found


def _declarations(listing: str) -> set[str]:
    """A table listing's declarations (each set, map, counter and chain, whole), map
    names without their generation suffix (`replace.py`)."""
    out, block = set(), ""
    for line in re.sub(r"_g[0-9]+\b", "", listing).splitlines(keepends=True):
        if block:
            block += line
            if line.rstrip("\n") == "\t}":
                out.add(block)
                block = ""
        elif line.startswith("\t") and not line.startswith("\t\t") and \
                line.rstrip().endswith("{"):
            block = line
    return out


@pytest.mark.parametrize("when", ["during-nft", "after-nft"])
def test_agent_killed_mid_apply_leaves_a_whole_ruleset(bed: Testbed, when: str) -> None:
    """Killed while its `nft -f` runs, or right after it ends (the kernel has the new
    ruleset, the cache and the status still say the old revision)."""
    bed.enforce([*BASE, *big_policy(0)], "big-0", timeout=WAIT)
    old = bed.table("h2")
    assert old is not None
    agent = bed.agents["h2"]
    revision = bed.apply(big_policy(1))
    assert revision is not None
    deadline = time.monotonic() + WAIT
    while not (seen := nft_loads(agent.pid)):
        assert time.monotonic() < deadline, "the agent of h2 never started nft"
        time.sleep(0.005)
    if when == "during-nft":
        time.sleep(0.05)
    else:
        while any(Path(f"/proc/{p}").exists() for p in seen):
            assert time.monotonic() < deadline, f"nft {seen} did not end"
            time.sleep(0.005)
    os.killpg(agent.pid, signal.SIGKILL)   # the agent and its nft, as a crash would
    agent.wait(timeout=10)
    bed.agents.pop("h2")
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in seen), "nft to exit")
    after_kill = bed.table("h2")
    bed.start_agent("h2")
    bed.wait_converged(revision, timeout=WAIT)
    new = bed.table("h2")
    assert new is not None and new != old
    # A full apply is three transactions (new sets, switch, cleanup: replace.py).
    # Killed between two of them, the kernel holds the old or the new table whole, and
    # sets and chains no rule reaches (the restarted agent's full apply removes them):
    # every declaration of the old or of the new table is there.
    held = _declarations(after_kill or "")
    held_new = _declarations(new) <= held
    assert _declarations(old) <= held or held_new, (
        "the kernel holds neither the old nor the new ruleset after the kill:\n"
        f"{(after_kill or '(no table)')[:3000]}")
    print(f"killed {when}: the kernel held the "
          f"{'new' if held_new else 'old'} ruleset")
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS


# --------------------------------------------------------------- the table deleted
def test_a_deleted_table_is_repaired(bed: Testbed) -> None:
    bed.enforce(BASE, "base")
    table = bed.table("h2")
    repairs = bed.agent_metrics("h2")["bulkhead_agent_drift_repairs_total"]
    bed.lab.run("h2", ["nft", "delete", "table", "inet", "bulkhead"], check=True)
    # Within a few drift intervals (2 s in a testbed); generous for a loaded machine.
    wait_until(lambda: bed.agent_metrics("h2")["bulkhead_agent_drift_repairs_total"]
               > repairs, "the agent of h2 to repair its table", timeout=30)
    assert bed.table("h2") == table
    assert wire(bed, FLOWS, BASE_VERDICTS) == BASE_VERDICTS
    # The agent still follows the server (the table's conntrack entries outlived it).
    bed.enforce([*BASE[:2], web_policy(80, 81)], "after-repair", timeout=WAIT)
    assert wire(bed, FLOWS, ALL_OPEN) == ALL_OPEN


# ------------------------------------------------- an endpoint's address goes away
def test_an_endpoint_whose_address_goes_away_is_reported_until_it_is_back(bed: Testbed
                                                                           ) -> None:
    """h2's endpoint is found by its expectedIPs (no interfaceName). The address goes
    (a DHCP renew): the drift check plans again and leaves the endpoint out, as Calico
    does, and h2's status says so, so it is not counted converged; back, it is enforced
    and the error goes."""
    address = "198.18.0.111"
    bed.lab.run("h2", ["ip", "addr", "add", f"{address}/32", "dev", "eth0"], check=True)
    by_address = {**BASE[1], "spec": {"node": "h2", "expectedIPs": [address],
                                      "profiles": [DEFAULT_ALLOW_PROFILE]}}
    revision = bed.enforce([BASE[0], by_address, web_policy(80)], "by-address")
    bed.lab.run("h2", ["ip", "addr", "del", f"{address}/32", "dev", "eth0"], check=True)

    def reported() -> list[str]:
        return [e for e in bed.node_status("h2").get("errors", []) if "HostEndpoint h2: "
                f"no interface of this host has any of its expectedIPs ['{address}']" in e]

    wait_until(lambda: bool(reported()), "h2 to report its endpoint unenforced", timeout=30)
    assert not bed.nodes(revision)["converged"]
    assert "not enforced" in (bed.dir / "agent-h2.log").read_text()
    bed.lab.run("h2", ["ip", "addr", "add", f"{address}/32", "dev", "eth0"], check=True)
    wait_until(lambda: bed.node_status("h2").get("errors") == [], "the error to go",
               timeout=30)
    bed.wait_converged(revision, timeout=WAIT)


# ------------------------------------------------------- the first ruleset of a host
def test_the_first_ruleset_does_not_stall_the_watch_made_before_it(bed: Testbed) -> None:
    """A host with no ruleset using conntrack has its connections untracked; the agent's
    first apply turns conntrack on, and the packets of the watch stream it opened before
    are then seen mid-stream as new ones, from the server's port: the ingress policy
    drops them. The agent must not be left deaf until its heartbeat timeout (here 181 s)."""
    bed.enforce(BASE, "base")
    bed.stop_agent("h2")
    bed.lab.run("h2", ["nft", "delete", "table", "inet", "bulkhead"], check=True)
    (bed.dir / "agent-h2" / "snapshot.json").unlink()   # no cache: first start
    bed.start_agent("h2", heartbeatInterval=60.0)
    wait_until(lambda: bed.table("h2") is not None, "the first apply of h2")
    bed.enforce([*BASE[:2], web_policy(80, 81)], "after-first-apply", timeout=45)
    assert wire(bed, FLOWS, ALL_OPEN) == ALL_OPEN


# ----------------------------------------------------------------------- deny all
DENY_ALL = gnp("deny-all", {"selector": "all()", "types": ["Ingress", "Egress"]})
SSH = 22


def test_deny_all_keeps_ssh_and_the_server_reachable(bed: Testbed) -> None:
    bed.start_agents(failsafe_defaults=True)   # Felix's failsafe ports, SSH among them
    bed.enforce([*BASE[:2], DENY_ALL], "deny-all", timeout=WAIT)
    ssh = [flow("h3", h, port=SSH) for h in AGENTS]
    denied = [flow("h3", "h2", port=80), flow("h3", "h1", "ICMP", None),
              flow("h1", "h2", port=SSH), flow("h2", "h1", "UDP", 80)]
    expected = [True] * len(ssh) + [False] * len(denied)
    assert wire(bed, [*ssh, *denied], expected) == expected
    # h1 listens on 22 (wire_verdicts listens on the ports it probes): a handshake.
    assert bed.lab.probe("h3", "h1", "tcp", SSH, timeout=5).outcome == "open"
    # A restarted agent boots into the deny-all from its cache, then reaches the server
    # on a new connection, syncs and reports.
    bed.stop_agent("h1", kill=True)
    bed.start_agent("h1")
    revision = bed.enforce([*BASE[:2], DENY_ALL, web_policy(80)], "deny-all-2",
                           timeout=WAIT)
    assert bed.node_status("h1")["appliedRevision"] >= revision
    assert bed.agent_metrics("h1")["bulkhead_agent_connected"] == 1
    assert "deny-all" in (bed.table("h1") or "")
