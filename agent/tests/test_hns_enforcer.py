"""The HNS enforcer against a fake HCN (tests/hcnfake.py): the compile stage is the real
one (flatten, hns.compile, hns_json), the endpoints' ACLs are held in memory and decided
by the fake HNS (fake_hns.FakeHns); the verdicts are checked against the reference
evaluator."""

from __future__ import annotations

import ipaddress
import json
import sys
from itertools import product
from pathlib import Path
from typing import Any

import pytest

from bulkhead.agent.enforcer import EnforceError
from bulkhead.agent.hcn import ComputeNetwork, HcnError, HnsEndpoint, parse_endpoint
from bulkhead.agent.hns_enforcer import STATE_FILE, HnsEnforcer, assign, load_set_endpoints
from bulkhead.model import EGRESS, INGRESS, Snapshot, parse_resource
from bulkhead.policy import Evaluator, Failsafes
from bulkhead.policy.plan import calculate
from tests.hcnfake import FakeEndpoint, FakeHcn
from tests.windowsfixture import Packet

WEB_ID = "0b5c1d9e-0000-4000-8000-000000000001"
DB_ID = "0b5c1d9e-0000-4000-8000-000000000002"
OTHER_ID = "0b5c1d9e-0000-4000-8000-000000000003"
FOREIGN = {"Type": "OutBoundNAT", "Settings": {"Exceptions": ["198.18.0.0/15"]}}


def doc(kind: str, name: str, spec: dict[str, Any],
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind,
            "metadata": {"name": name, **({"labels": labels} if labels else {})},
            "spec": spec}


HOSTS = [
    doc("HostEndpoint", "win1-web", {"node": "win1", "expectedIPs": ["198.18.0.10"]},
        {"role": "web"}),
    doc("HostEndpoint", "win1-db", {"node": "win1", "expectedIPs": ["198.18.0.11"]},
        {"role": "db"}),
]
POLICIES = [
    doc("GlobalNetworkPolicy", "web", {
        "selector": "role == 'web'", "order": 10,
        "ingress": [{"action": "Deny", "source": {"nets": ["198.18.1.66/32"]}},
                    {"action": "Allow", "protocol": "TCP",
                     "destination": {"ports": [80, 443]}}],
        "egress": [{"action": "Allow", "protocol": "TCP",
                    "destination": {"selector": "role == 'db'", "ports": [5432]}},
                   {"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]}),
    doc("GlobalNetworkPolicy", "db", {
        "selector": "role == 'db'", "order": 20, "types": ["Ingress"],
        "ingress": [{"action": "Allow", "protocol": "TCP",
                     "source": {"selector": "role == 'web'"},
                     "destination": {"ports": [5432]}}]}),
]
ICMP = doc("GlobalNetworkPolicy", "ping", {
    "selector": "role == 'db'", "order": 5, "types": ["Ingress"],
    "ingress": [{"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}]})


def snapshot(*docs: dict[str, Any]) -> Snapshot:
    return Snapshot.build([parse_resource(d) for d in docs])


SNAPSHOT = snapshot(*HOSTS, *POLICIES)


def fake() -> FakeHcn:
    return FakeHcn([FakeEndpoint(WEB_ID, "web", ("198.18.0.10",), [FOREIGN]),
                    FakeEndpoint(DB_ID, "db", ("198.18.0.11",)),
                    FakeEndpoint(OTHER_ID, "other", ("198.18.0.12",))])


def setup() -> tuple[HnsEnforcer, FakeHcn]:
    hcn = fake()
    return HnsEnforcer("win1", Failsafes(), hcn=hcn), hcn


def test_applied_acls_decide_as_the_reference_evaluator() -> None:
    enforcer, hcn = setup()
    report = enforcer.enforce(SNAPSHOT, 1)
    assert report.changed and report.counts["endpoints"] == 2 and not report.warnings
    assert sorted(hcn.modified) == [WEB_ID, DB_ID]
    assert hcn.held[OTHER_ID].policies == [] and FOREIGN in hcn.held[WEB_ID].policies
    evaluator = Evaluator(SNAPSHOT, Failsafes())
    remotes = ["198.18.0.10", "198.18.0.11", "198.18.1.66", "198.18.1.7"]
    seen = {True: 0, False: 0}
    for (i, own), remote, protocol, port, direction in product(
            ((WEB_ID, "198.18.0.10"), (DB_ID, "198.18.0.11")), remotes, (6, 17, 1),
            (80, 5432, 53, 22), (INGRESS, EGRESS)):
        if own == remote:
            continue
        ports = (40000, port) if protocol in (6, 17) else (None, None)
        if direction == INGRESS:
            ports = ports[::-1]
        packet = Packet(4, protocol, int(ipaddress.ip_address(own)),
                        int(ipaddress.ip_address(remote)), *ports,
                        0x0800 if protocol == 1 else None)
        verdict = evaluator.evaluate(packet.flow(direction), trace=False)
        want = (verdict.ingress if direction == INGRESS else verdict.egress).allowed
        got = hcn.fake_hns(i).allows(direction, 4, *packet.args())
        assert got == want, (i, packet, direction)
        seen[got] += 1
    assert seen[True] > 5 and seen[False] > 20, seen
    assert enforcer.drift() is None
    again = enforcer.enforce(SNAPSHOT, 2)
    assert not again.changed and len(hcn.modified) == 2


def test_a_failed_modify_restores_the_endpoints_already_changed() -> None:
    enforcer, hcn = setup()
    enforcer.enforce(snapshot(*HOSTS), 1)           # no policy: default deny only
    before = {i: list(e.policies) for i, e in hcn.held.items()}
    hcn.failing = {4}            # endpoints go by id: WEB_ID changes, DB_ID fails
    with pytest.raises(EnforceError) as e:
        enforcer.enforce(SNAPSHOT, 2)
    assert f"endpoint {DB_ID} for revision 2 failed" in str(e.value)
    assert "1 endpoint(s) already changed got their previous ACLs back" in str(e.value)
    assert {i: x.policies for i, x in hcn.held.items()} == before
    assert hcn.modified == [WEB_ID, DB_ID, WEB_ID, WEB_ID]
    assert enforcer.revision == 1 and enforcer.drift() is None


def test_a_failed_restore_is_reported() -> None:
    enforcer, hcn = setup()
    hcn.failing = {2, 3}         # DB_ID's modify fails, and so does WEB_ID's restore
    with pytest.raises(EnforceError, match=f"restoring the endpoints already changed "
                       f"failed for {WEB_ID}"):
        enforcer.enforce(SNAPSHOT, 1)
    assert hcn.acls(WEB_ID) and not hcn.acls(DB_ID)


def test_drift_when_an_acl_is_removed_and_repair() -> None:
    enforcer, hcn = setup()
    enforcer.enforce(SNAPSHOT, 1)
    web = hcn.held[WEB_ID]
    acls = [p for p in web.policies if p["Type"] == "ACL"]
    web.policies.remove(acls[0])
    drift = enforcer.drift()
    assert drift is not None and f"HNS endpoint {WEB_ID}: missing: " in drift
    assert DB_ID not in drift
    report = enforcer.repair()
    assert report.changed and hcn.modified[-1] == WEB_ID
    assert enforcer.drift() is None and FOREIGN in web.policies


def test_new_and_gone_endpoints_are_drift() -> None:
    enforcer, hcn = setup()
    enforcer.enforce(SNAPSHOT, 1)
    del hcn.held[DB_ID]
    hcn.held["0b5c1d9e-0000-4000-8000-000000000004"] = FakeEndpoint(
        "0b5c1d9e-0000-4000-8000-000000000004", "web2", ("198.18.0.10",))
    drift = enforcer.drift()
    assert drift is not None and f"HNS endpoint {DB_ID} (HostEndpoint win1-db) is gone" \
        in drift and "000000000004 (HostEndpoint win1-web) is new" in drift
    enforcer.repair()
    assert enforcer.drift() is None
    assert hcn.acls("0b5c1d9e-0000-4000-8000-000000000004") == hcn.acls(WEB_ID)


def test_an_endpoint_no_host_endpoint_names_any_more_loses_its_acls() -> None:
    enforcer, hcn = setup()
    enforcer.enforce(SNAPSHOT, 1)
    enforcer.enforce(snapshot(HOSTS[0], *POLICIES), 2)
    assert hcn.held[DB_ID].policies == [] and hcn.acls(WEB_ID)


def test_unsupported_names_the_rule_and_applies_nothing() -> None:
    enforcer, hcn = setup()
    with pytest.raises(EnforceError) as e:
        enforcer.enforce(snapshot(*HOSTS, *POLICIES, ICMP), 1)
    assert "HostEndpoint win1-db: not enforceable by HNS ACLs" in str(e.value)
    assert "ping" in str(e.value) and "icmp" in str(e.value)
    assert hcn.modified == [] and enforcer.drift() is None


def test_dry_run_shows_the_json_and_a_diff_and_changes_nothing() -> None:
    enforcer, hcn = setup()
    text, diff = enforcer.dry_run(SNAPSHOT)
    assert hcn.modified == []
    first = text.split("\n", 1)
    assert first[0] == f"# HNS endpoint {WEB_ID} (HostEndpoint win1-web)"
    assert json.loads(first[1].split("# HNS")[0])["RequestType"] == "Update"
    assert f"+++ endpoint {DB_ID} (HostEndpoint win1-db)" in diff and "+AclRule(" in diff
    enforcer.enforce(SNAPSHOT, 1)
    assert enforcer.dry_run(SNAPSHOT)[1] == ""


def test_endpoints_are_assigned_by_ip_name_and_star() -> None:
    found = [HnsEndpoint(WEB_ID, "web", ("198.18.0.10",)),
             HnsEndpoint(DB_ID, "db", ("198.18.0.11",)),
             HnsEndpoint(OTHER_ID, "other", ("198.18.0.12",))]
    snap = snapshot(
        HOSTS[0],
        doc("HostEndpoint", "a-db", {"node": "win1", "interfaceName": "db"}),
        doc("HostEndpoint", "b-web", {"node": "win1", "interfaceName": "web"}),
        doc("HostEndpoint", "c-missing", {"node": "win1", "interfaceName": "nope"}),
        doc("HostEndpoint", "d-all", {"node": "win1", "interfaceName": "*"}))
    plan = calculate(snap, "win1", {e.id: list(e.addresses) for e in found})
    owners, warnings = assign(plan, found)
    assert owners == {DB_ID: "a-db", WEB_ID: "b-web", OTHER_ID: "d-all"}
    assert any("HostEndpoint win1-web: HNS endpoint " + WEB_ID + " already belongs to "
               "HostEndpoint b-web" in w for w in warnings)
    assert any("c-missing: no HNS endpoint of this host is named 'nope'"
               in w for w in warnings)


def test_endpoint_properties_are_parsed() -> None:
    e = parse_endpoint({"ID": WEB_ID.upper(), "Name": "web",
                        "IpConfigurations": [{"IpAddress": "198.18.0.10", "PrefixLength": 24},
                                             {"IpAddress": "2001:2::10"}]})
    assert e == HnsEndpoint(WEB_ID, "web", ("198.18.0.10", "2001:2::10"))
    with pytest.raises(HcnError, match="no string ID"):
        parse_endpoint("{}")


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
def test_the_real_hcn_refuses_cleanly_off_windows() -> None:
    with pytest.raises(HcnError, match="HCN is only on Windows"):
        ComputeNetwork()
    enforcer = HnsEnforcer("win1", Failsafes())
    with pytest.raises(EnforceError, match="dataplane hns: HCN is only on Windows"):
        enforcer.enforce(SNAPSHOT, 1)


def test_a_restarted_agent_releases_endpoints_set_before_it_stopped(tmp_path: Path) -> None:
    """The ids of the endpoints holding the agent's ACLs are kept in the state
    directory: an agent started again releases the endpoint whose HostEndpoint went
    while it was stopped (without the file it could not know the endpoint was its)."""
    hcn = fake()
    first = HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path)
    first.enforce(SNAPSHOT, 1)
    assert hcn.acls(DB_ID) and hcn.acls(WEB_ID)
    kept = json.loads((tmp_path / STATE_FILE).read_text())
    assert kept == {"format": 1, "endpoints": sorted([WEB_ID, DB_ID])}
    # Stopped; win1-db deleted meanwhile; started again on the same state directory.
    again = HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path)
    report = again.enforce(snapshot(HOSTS[0], *POLICIES), 2)
    assert report.changed and hcn.held[DB_ID].policies == [] and hcn.acls(WEB_ID)
    assert json.loads((tmp_path / STATE_FILE).read_text())["endpoints"] == [WEB_ID]
    # Without the file (an agent of before), the endpoint kept its ACLs.
    hcn = fake()
    HnsEnforcer("win1", Failsafes(), hcn=hcn).enforce(SNAPSHOT, 1)
    HnsEnforcer("win1", Failsafes(), hcn=hcn).enforce(snapshot(HOSTS[0], *POLICIES), 2)
    assert hcn.acls(DB_ID)


@pytest.mark.parametrize("content", [b"{not json", b'{"format": 2, "endpoints": []}',
                                     b'{"format": 1, "endpoints": [7]}', b"[1, 2]",
                                     b'{"format": 1, "endpoints": ["' + b"x" * 200 + b'"]}',
                                     b" " * (5 << 20)])
def test_an_unusable_state_file_is_a_warning_and_taken_as_empty(tmp_path: Path,
                                                                 content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    hcn = fake()
    enforcer = HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path)
    report = enforcer.enforce(SNAPSHOT, 1)
    assert any(STATE_FILE in w and "not used" in w for w in report.warnings), report.warnings
    assert hcn.acls(WEB_ID)                        # enforced all the same
    # the apply wrote a good file over it
    assert load_set_endpoints(tmp_path) == ({WEB_ID, DB_ID}, None)


def test_a_state_file_the_disk_refuses_is_a_warning(tmp_path: Path) -> None:
    state = tmp_path / "not-a-directory"
    state.write_text("a file where the state directory should be")
    report = HnsEnforcer("win1", Failsafes(), hcn=fake(), state_dir=state).enforce(
        SNAPSHOT, 1)
    assert any("not written" in w for w in report.warnings), report.warnings


def test_release_removes_the_agents_acls_and_nothing_else(tmp_path: Path) -> None:
    """`bulkhead-agent --release` (an uninstall): a stopped agent keeps its ACLs (fail
    static); release, by an agent started again on the same state directory, removes
    them from the endpoints it set and only there, keeps their other policies, and
    forgets them (a second release finds nothing)."""
    hcn = fake()
    theirs = json.loads(HnsEnforcer("other", Failsafes(), hcn=fake()).wanted(
        snapshot(doc("HostEndpoint", "x", {"node": "other", "expectedIPs": ["198.18.0.12"]}),
                 *POLICIES))[OTHER_ID].request())["Settings"]["Policies"]
    hcn.held[OTHER_ID].policies = list(theirs)          # ACLs someone else set
    HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).enforce(SNAPSHOT, 1)
    assert hcn.acls(WEB_ID) and hcn.acls(DB_ID)
    released, warnings = HnsEnforcer("win1", Failsafes(), hcn=hcn,
                                     state_dir=tmp_path).release()
    assert released == [f"ACLs of HNS endpoint {i}" for i in sorted([WEB_ID, DB_ID])]
    assert warnings == []
    assert hcn.held[WEB_ID].policies == [FOREIGN] and hcn.held[DB_ID].policies == []
    assert hcn.held[OTHER_ID].policies == theirs
    assert not (tmp_path / STATE_FILE).exists()
    assert HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).release() == ([], [])


def test_release_by_the_running_process_and_of_an_endpoint_gone(tmp_path: Path) -> None:
    hcn = fake()
    enforcer = HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path)
    enforcer.enforce(SNAPSHOT, 1)
    del hcn.held[DB_ID]                                   # the container went
    assert enforcer.release() == ([f"ACLs of HNS endpoint {WEB_ID}"], [])
    assert hcn.held[WEB_ID].policies == [FOREIGN] and enforcer.applied == {}
    assert enforcer.drift() is None
    assert not (tmp_path / STATE_FILE).exists()


def test_a_failed_release_names_the_endpoint_and_a_second_one_finishes(
        tmp_path: Path) -> None:
    hcn = fake()
    HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).enforce(SNAPSHOT, 1)
    hcn.failing = {hcn.calls + 2}                         # the second removal fails
    first_id, second_id = sorted([WEB_ID, DB_ID])
    with pytest.raises(EnforceError, match=f"removing the ACLs of HNS endpoint {second_id}"
                       ".*released 1 endpoint.*1 left"):
        HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).release()
    assert hcn.acls(second_id) and not hcn.acls(first_id)
    assert load_set_endpoints(tmp_path) == ({second_id}, None)
    assert HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).release() == (
        [f"ACLs of HNS endpoint {second_id}"], [])
    assert not hcn.acls(WEB_ID) and not hcn.acls(DB_ID)


def test_release_with_an_unusable_state_file_touches_nothing(tmp_path: Path) -> None:
    """The file alone says which endpoints hold the agent's ACLs: unusable, release
    fails (the role's uninstall with it), removes nothing and keeps the file."""
    hcn = fake()
    HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).enforce(SNAPSHOT, 1)
    (tmp_path / STATE_FILE).write_bytes(b"{not json")
    with pytest.raises(EnforceError, match=r"cannot tell which HNS endpoints hold the "
                       r"agent's ACLs: .*not used.*nothing was removed"):
        HnsEnforcer("win1", Failsafes(), hcn=hcn, state_dir=tmp_path).release()
    assert hcn.acls(WEB_ID) and hcn.acls(DB_ID)
    assert (tmp_path / STATE_FILE).read_bytes() == b"{not json"
