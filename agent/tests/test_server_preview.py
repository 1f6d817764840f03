"""Policy impact preview (issue 20) through a real bulkhead-server process:
`POST /v1/preview` and `bulkhead preview` list exactly the stored flows the reference
evaluator says the staged policies (or files not applied) would decide differently,
newly denied and newly allowed apart, the undecided with their reasons; protected
selectors and --max-denied gate; bad input is refused naming the field; agents may not
ask."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bulkhead.cli.main import main
from bulkhead.client import ApiError
from bulkhead.client.flows import preview, send_flows
from bulkhead.model import API_VERSION, ENFORCEMENT_LABEL, Snapshot, parse_resource
from bulkhead.model.flowlog import OBSERVE_STEP, FlowRecord, parse_record
from bulkhead.observe.flows import Ends
from bulkhead.policy import Evaluator, Failsafes, Flow
from bulkhead.policy.trace import verdict_steps
from tests.test_server_limits import apply, start
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401


def doc(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
        ) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, **({"labels": labels} if labels else {})},
            "spec": spec}


HOSTS = {"web-1": ("198.18.0.10", {"app": "web"}), "web-2": ("198.18.0.11", {"app": "web"}),
         "db-1": ("198.18.0.20", {"app": "db"}), "ops-1": ("198.18.0.30", {"app": "ops"})}
ENDPOINTS = [doc("HostEndpoint", name, {"node": name, "expectedIPs": [ip],
                                        "profiles": ["projectcalico-default-allow"]}, labels)
             for name, (ip, labels) in HOSTS.items()]
ENFORCED = [doc("GlobalNetworkPolicy", "ops-lockdown", {
    "selector": "app == 'ops'", "types": ["Ingress"],
    "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [9100]}}]})]
STAGED = [
    doc("StagedGlobalNetworkPolicy", "db-ingress", {
        "selector": "app == 'db'", "types": ["Ingress"],
        "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"selector": "app == 'web'"},
                     "destination": {"ports": [5432]}}]}),
    doc("StagedGlobalNetworkPolicy", "ops-lockdown", {"stagedAction": "Delete"}),
    doc("StagedGlobalNetworkPolicy", "web-ingress", {
        "selector": "app == 'web'", "types": ["Ingress"],
        "ingress": [{"action": "Deny", "protocol": "TCP", "source": {"ports": ["1:1023"]}},
                    {"action": "Allow"}]}),
]
# (source, destination, protocol, port, times)
TRAFFIC = [("web-1", "db-1", "TCP", 5432, 3), ("web-2", "db-1", "TCP", 5432, 1),
           ("web-1", "db-1", "TCP", 22, 2), ("198.19.7.7", "db-1", "TCP", 5432, 4),
           ("ops-1", "db-1", "UDP", 53, 1), ("web-1", "ops-1", "TCP", 9100, 5),
           ("web-1", "ops-1", "TCP", 22, 1), ("db-1", "web-2", "TCP", 80, 2),
           ("db-1", "web-1", "UDP", 514, 1)]


def test_a_deny_undone_since_and_proposed_again_is_newly_denied(
        server: ServerProcess) -> None:
    """Records of an older state (a policy denied web to db on 5432, deleted since: the
    store allows it now) and a proposal that brings that policy back: the records say
    deny, as the proposal does, but from now it is a change, and the gates count it."""
    import time
    old_deny = doc("GlobalNetworkPolicy", "old-deny", {
        "selector": "app == 'db'", "types": ["Ingress"], "order": 1,
        "ingress": [{"action": "Deny", "protocol": "TCP", "source": {"selector": "app == 'web'"},
                     "destination": {"ports": [5432]}}]})
    then = Snapshot.build(parse_resource(d) for d in ENDPOINTS + ENFORCED + [old_deny])
    docs, _ = records(then, time.time())
    assert {d["action"] for d in docs if d["dst_port"] == 5432 and
            d["src_name"].startswith("web-")} == {"deny"}
    for dst in {d["node"] for d in docs}:
        send_flows(server.client(dst, "agent"), [d for d in docs if d["node"] == dst])
    viewer = server.client("carol", "viewer")
    again = preview(viewer, hours=1, promote="none", manifests=json.dumps(old_deny))
    assert {("web-1", "db-1", "TCP", 5432), ("web-2", "db-1", "TCP", 5432)} <= \
        listed(again, "newlyDenied"), again["newlyDenied"]
    # and a preview of no change lists nothing, though the records say deny
    same = preview(viewer, hours=1, promote="none")
    assert not same["newlyDenied"] and not same["newlyAllowed"]


def test_protected_reads_the_labels_the_store_gives_not_the_records(
        server: ServerProcess) -> None:
    """The records name their ends' labels as the agent saw them; the protected gate
    takes a host endpoint's labels from the store: an agent claiming web-1 is `cache`
    neither hides web-1's denied flow from `app == 'web'` nor flags `app == 'cache'`."""
    import time
    snapshot = Snapshot.build(parse_resource(d) for d in ENDPOINTS + ENFORCED + STAGED)
    docs, _ = records(snapshot, time.time())
    for d in docs:
        for end in ("src", "dst"):
            if d[f"{end}_type"] == "hep" and d[f"{end}_name"] == "web-1":
                d[f"{end}_labels"] = {"app": "cache"}
    for dst in {d["node"] for d in docs}:
        send_flows(server.client(dst, "agent"), [d for d in docs if d["node"] == dst])
    viewer = server.client("carol", "viewer")
    web = preview(viewer, hours=1, protected="app == 'web'")["protected"]
    assert (web["records"], web["connections"]) == (1, 2)
    cache = preview(viewer, hours=1, protected="app == 'cache'")["protected"]
    assert (cache["records"], cache["connections"]) == (0, 0)


def address(end: str) -> str:
    return HOSTS[end][0] if end in HOSTS else end


def records(snapshot: Snapshot, now: float) -> tuple[list[dict[str, Any]],
                                                     dict[tuple[str, str, str, int], str]]:
    """The records the destinations' agents would send about TRAFFIC (ingress: what the
    wire saw, the decisions logged, the observe step from an observing endpoint), and
    what the evaluator says the policies change for each flow once the staged policies
    are in force (the policy decision, whatever the endpoint's mode)."""
    evaluator = Evaluator(snapshot, Failsafes.off())
    ends = Ends(snapshot)
    out, changes = [], {}
    for src, dst, proto, port, times in TRAFFIC:
        flow = Flow.make(address(src), address(dst), proto, port)
        v = evaluator.evaluate(flow)
        side, staged = v.ingress, v.staged_ingress
        record = FlowRecord(
            start=now - 100, end=now - 90, node=dst, reporter="dst",
            src=ends.at(ipaddress.ip_address(address(src))),
            dst=ends.at(ipaddress.ip_address(address(dst))), proto=flow.protocol,
            dst_port=port, action=side.wire_action.lower(),
            enforced_trace=verdict_steps(side) + ((OBSERVE_STEP,) if side.observed else ()),
            staged_action=staged.action.lower(), staged_trace=verdict_steps(staged),
            connections=times, started=times)
        out.append(record.json())
        if side.action != staged.action:
            changes[(src, dst, proto, port)] = \
                "newlyDenied" if staged.action == "Deny" else "newlyAllowed"
    return out, changes


@pytest.fixture
def server(pki_dir: Path, servers: list[ServerProcess]) -> ServerProcess:  # noqa: F811
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    apply(server, ENDPOINTS + ENFORCED + STAGED)
    return server


def listed(answer: dict[str, Any], change: str) -> set[tuple[str, str, str, int]]:
    out = set()
    for g in answer[change]:
        for port in g["ports"]:
            proto, _, number = port.partition("/")
            out.add((g["src"]["name"], g["dst"]["name"], proto, int(number or 0)))
    return out


def test_preview_lists_what_the_evaluator_says_would_change(server: ServerProcess) -> None:
    import time
    now = time.time()
    snapshot = Snapshot.build(parse_resource(d) for d in ENDPOINTS + ENFORCED + STAGED)
    docs, changes = records(snapshot, now)
    for dst in {d["node"] for d in docs}:
        send_flows(server.client(dst, "agent"), [d for d in docs if d["node"] == dst])
    viewer = server.client("carol", "viewer")
    answer = preview(viewer, hours=1)
    assert answer["promoted"] == ["db-ingress", "ops-lockdown", "web-ingress"]
    assert answer["examined"]["records"] == len(TRAFFIC)
    # Every flow the evaluator says changes is listed, as it changes; web's ingress has a
    # source-port rule first, which the stored fields cannot decide: undecided, with why.
    web = {k for k in changes if k[1].startswith("web-")}
    assert listed(answer, "newlyDenied") == {k for k, c in changes.items()
                                             if c == "newlyDenied" and k not in web}
    assert listed(answer, "newlyAllowed") == {k for k, c in changes.items()
                                              if c == "newlyAllowed" and k not in web}
    # (UDP to web is decided: the source-port rule is TCP's.)
    assert listed(answer, "undecided") == {("db-1", "web-2", "TCP", 80)}
    assert all("source port" in w for g in answer["undecided"] for w in g["why"])
    denied = {(g["src"]["name"], g["dst"]["name"]): g for g in answer["newlyDenied"]}
    db_web = denied[("web-1", "db-1")]
    assert (db_web["tier"], db_web["policy"], db_web["direction"], db_web["connections"],
            db_web["nodes"]) == ("default", "end-of-tier", "Ingress", 2, ["db-1"])
    assert denied[("198.19.7.7", "db-1")]["src"] == {
        "type": "net", "name": "198.19.7.7", "labels": {}, "scope": "private"}
    allowed = answer["newlyAllowed"]
    assert [(g["src"]["name"], g["dst"]["name"], g["steps"]) for g in allowed] == [
        ("web-1", "ops-1", ["profile|projectcalico-default-allow|0|allow"])]
    assert answer["totals"]["newlyDenied"] == {"records": 3, "connections": 7}
    assert answer["totals"]["unchanged"]["records"] == 3

    # Only some promoted: the others stay staged, out of force.
    only = preview(viewer, hours=1, promote=["ops-lockdown"])
    assert only["promoted"] == ["ops-lockdown"] and not only["newlyDenied"]
    assert listed(only, "newlyAllowed") == {("web-1", "ops-1", "TCP", 9100),
                                            ("web-1", "ops-1", "TCP", 22)}

    # Files not applied: a policy that would deny web to db on 5432 too.
    files = [doc("GlobalNetworkPolicy", "db-closed", {
        "selector": "app == 'db'", "types": ["Ingress"],
        "ingress": [{"action": "Allow", "protocol": "UDP"}]})]
    text = "\n---\n".join(json.dumps(d) for d in files)
    from_files = preview(viewer, hours=1, manifests=text)
    assert from_files["promoted"] == []
    assert listed(from_files, "newlyDenied") == {
        ("web-1", "db-1", "TCP", 5432), ("web-2", "db-1", "TCP", 5432),
        ("web-1", "db-1", "TCP", 22), ("198.19.7.7", "db-1", "TCP", 5432)}

    # A protected selector: a newly denied flow from web is flagged.
    gated = preview(viewer, hours=1, protected="app == 'web'")
    assert gated["protected"]["records"] == 1 and gated["protected"]["connections"] == 2
    # Nothing examined outside the window.
    assert preview(viewer, hours=1, until=now - 3600)["examined"]["records"] == 0


def test_the_cli_prints_the_preview_and_gates(server: ServerProcess, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import time
    snapshot = Snapshot.build(parse_resource(d) for d in ENDPOINTS + ENFORCED + STAGED)
    docs, _ = records(snapshot, time.time())
    for dst in {d["node"] for d in docs}:
        send_flows(server.client(dst, "agent"), [d for d in docs if d["node"] == dst])
    conn = server.conn
    base = ["--server", conn.server, "--ca", conn.ca, "--cert", str(conn.cert),
            "--key", str(conn.key)]
    assert main(["preview", "--hours", "1", *base]) == 0
    out = capsys.readouterr().out
    assert "Newly denied: 7 connections in 3 records" in out, out
    assert "default|end-of-tier" in out and "198.19.7.7" in out
    assert "why: the source port" in out
    assert main(["preview", "--max-denied", "7", *base]) == 0
    capsys.readouterr()
    assert main(["preview", "--max-denied", "6", *base]) == 1
    assert "gate failed: 7 connections would be newly denied (at most 6)" in \
        capsys.readouterr().err
    assert main(["preview", "--protected", "app == 'cache'", *base]) == 0
    assert main(["preview", "--protected", "app == 'web'", *base]) == 1
    capsys.readouterr()
    assert main(["preview", "-o", "json", "--promote", "ops-lockdown", *base]) == 0
    assert json.loads(capsys.readouterr().out)["promoted"] == ["ops-lockdown"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc("GlobalNetworkPolicy", "x", {"order": "first"})))
    assert main(["preview", "-f", str(bad), *base]) == 2
    assert "spec.order" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["preview", "-f", str(tmp_path / "empty"), *base]) == 2
    assert "no resources to preview" in capsys.readouterr().err
    # Label values read as `bulkhead apply` writes them: `rack: 12` is the label "12".
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n"
                       "metadata: {name: racked, labels: {rack: 12, pci: true}}\n"
                       "spec: {nets: [198.19.250.0/24]}\n")
    assert main(["preview", "-f", str(numbers), *base]) == 0, capsys.readouterr().err


def test_egress_by_domain_is_previewed_from_the_names_records_give(
        server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """Egress records carry the names their destination was resolved from (agents that
    snoop DNS): a policy allowing by name is previewed from them; a record that does not
    give them is undecided, never guessed."""
    import time
    now = time.time()
    web = Ends(Snapshot.build(parse_resource(d) for d in ENDPOINTS)).at(
        ipaddress.ip_address(HOSTS["web-1"][0]))
    names = {"198.19.8.1": ["api.example.com"], "198.19.8.2": [], "198.19.8.3": None}
    docs = [FlowRecord(now - 100, now - 90, "web-1", "src", web,
                       Ends(Snapshot.build([])).at(ipaddress.ip_address(ip)), 6, 443,
                       "allow", ("profile|projectcalico-default-allow|0|allow",), "allow",
                       ("profile|projectcalico-default-allow|0|allow",), connections=1,
                       started=1, dst_domains=None if n is None else tuple(n)).json()
            for ip, n in names.items()]
    send_flows(server.client("web-1", "agent"), docs)
    files = [doc("GlobalNetworkPolicy", "web-out", {
        "selector": "app == 'web'", "types": ["Egress"],
        "egress": [{"action": "Allow", "destination": {"domains": ["*.example.com"]}}]})]
    answer = preview(server.client("carol", "viewer"), hours=1,
                     manifests="\n---\n".join(json.dumps(d) for d in files))
    assert answer["totals"]["unchanged"]["records"] == 1     # allowed by name, as today
    assert listed(answer, "newlyDenied") == {("web-1", "198.19.8.2", "TCP", 443)}
    assert listed(answer, "undecided") == {("web-1", "198.19.8.3", "TCP", 443)}
    assert any("domain names" in w for w in answer["undecided"][0]["why"])
    # The CLI shows the names with the destination.
    docs = [{**d, "dst_domains": ["api.example.com", "b.example.com", "c.example.com"],
             "dst_name": "198.19.8.4"} for d in docs[:1]]
    send_flows(server.client("web-1", "agent"), docs)
    conn = server.conn
    assert main(["flows", "--server", conn.server, "--ca", conn.ca, "--cert",
                 str(conn.cert), "--key", str(conn.key)]) == 0
    out = capsys.readouterr().out
    assert "web-1 -> 198.19.8.4 (api.example.com,b.example.com +1)" in out, out
    assert "web-1 -> 198.19.8.1 (api.example.com)" in out, out


def test_observing_hosts_block_nothing_until_previewed_in_enforce_mode(
        server: ServerProcess) -> None:
    import time
    # db-1 observes: its records say allow, with the decisions enforce would make.
    db = json.loads(json.dumps(ENDPOINTS[2]))
    db["metadata"]["labels"][ENFORCEMENT_LABEL] = "observe"
    apply(server, [db])
    docs_now = [db if d["metadata"]["name"] == "db-1" else d for d in ENDPOINTS]
    snapshot = Snapshot.build(parse_resource(d) for d in docs_now + ENFORCED + STAGED)
    docs, changes = records(snapshot, time.time())
    db_records = [d for d in docs if d["node"] == "db-1"]
    assert db_records and all(d["action"] == "allow" and d["enforced_trace"][-1] ==
                              OBSERVE_STEP for d in db_records)
    for dst in {d["node"] for d in docs}:
        send_flows(server.client(dst, "agent"), [d for d in docs if d["node"] == dst])
    viewer = server.client("carol", "viewer")
    # Promoting alone changes nothing on db-1: it still observes.
    still = preview(viewer, hours=1)
    assert not any(g["dst"]["name"] == "db-1" for g in still["newlyDenied"])
    # Moving db-1 to enforce with the staged policies promoted: what the evaluator's
    # policy decision denies there is newly denied.
    moved = preview(viewer, hours=1, enforce="app == 'db'")
    assert moved["enforce"] == 'app == "db"'
    on_db = {k for k, c in changes.items() if k[1] == "db-1" and c == "newlyDenied"}
    assert on_db and {k for k in listed(moved, "newlyDenied") if k[1] == "db-1"} == on_db
    # Not promoting, only enforcing: the enforced policies alone (none select db-1, and
    # it has the default-allow profile) deny nothing new.
    alone = preview(viewer, hours=1, enforce="app == 'db'", promote="none")
    assert not alone["newlyDenied"], alone["newlyDenied"]
    # Done as previewed: promoted, db-1 enforcing. The records from its observing days
    # (allowed then) are compared with what is in force now, which denies them too:
    # previewing no further change shows nothing newly denied (it showed them all,
    # compared with what the table did then).
    server.conn.request("POST", "/v1/promote", {"names": sorted(
        d["metadata"]["name"] for d in STAGED), "dryRun": False})
    db["metadata"]["labels"][ENFORCEMENT_LABEL] = "enforce"
    apply(server, [db])
    after = preview(viewer, hours=1, promote="none")
    assert after["promoted"] == []
    assert not after["newlyDenied"] and not after["newlyAllowed"], after
    assert after["totals"]["unchanged"]["records"] + \
        after["totals"]["undecided"]["records"] == len(docs)


def test_an_incomplete_preview_fails_every_gate_given() -> None:
    from bulkhead.cli.preview import gates
    answer: dict[str, Any] = {"truncated": True, "stopped": "judging stopped after 20 s",
                              "totals": {"newlyDenied": {"connections": 0, "records": 0}}}
    assert gates(answer, None) == []
    assert gates(answer, 10) == ["the preview is incomplete (judging stopped after 20 s); "
                                 "its totals are lower bounds"]
    answer["protected"] = {"records": 0, "connections": 0, "selector": "all()"}
    assert len(gates(answer, None)) == 1
    assert gates({**answer, "truncated": False}, 10) == []


@pytest.mark.parametrize(("body", "words"), [
    ({"enforce": "app =="}, "enforce:"),
    ([], "expected a JSON object"),
    ({"hours": 0}, "hours: expected a number from"),
    ({"hours": "24"}, "hours: expected a number"),
    ({"hours": 1e9}, "hours: expected a number"),
    ({"hours": 10**400}, "hours: expected a number"),
    ({"until": -10**400}, "until: expected a number"),
    ({"limit": 0}, "limit: expected a whole number"),
    ({"promote": "some"}, "promote: expected"),
    ({"promote": []}, "promote: expected 1 to"),
    ({"protected": "app =="}, "protected:"),
    ({"manifests": 7}, "manifests: expected YAML"),
    ({"colour": "red"}, "unknown field 'colour'"),
])
def test_bad_bodies_are_refused_naming_the_field(server: ServerProcess, body: Any,
                                                 words: str) -> None:
    with pytest.raises(ApiError) as e:
        server.conn.request("POST", "/v1/preview", body)
    assert e.value.status == 400 and words in e.value.message, e.value.message


def test_judging_stops_at_its_time_bound(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from bulkhead.policy.impact import proposed_state
    from bulkhead.server import preview as module
    from bulkhead.store.flowlog.sqlite import SQLiteFlowStore
    resources = [parse_resource(d) for d in ENDPOINTS + ENFORCED + STAGED]
    snapshot = Snapshot.build(resources)
    now = time.time()
    store = SQLiteFlowStore(tmp_path / "flows.sqlite")
    store.insert([parse_record(r, now) for r in records(snapshot, now)[0]])
    proposed, names = proposed_state(resources, [], "all")
    request = module.parse_preview({"hours": 1})
    whole = module.preview(store, proposed, request, now, names, snapshot)
    assert not whole["truncated"] and whole["examined"]["groups"] == len(TRAFFIC)
    monkeypatch.setattr(module, "JUDGE_SECONDS", -1.0)
    cut = module.preview(store, proposed, request, now, names, snapshot)
    assert cut["truncated"] and "judging stopped" in cut["stopped"]
    assert cut["examined"]["groups"] == 0
    store.close()


def test_bad_manifests_unknown_names_and_roles(server: ServerProcess) -> None:
    conn = server.conn
    with pytest.raises(ApiError) as e:
        preview(conn, manifests=json.dumps(doc("GlobalNetworkPolicy", "x",
                                               {"tier": "nope"})))
    assert e.value.status == 422 and 'tier "nope" does not exist' in e.value.message
    with pytest.raises(ApiError) as e:
        preview(conn, manifests="kind: GlobalNetworkPolicy\nmetadata: {name: x}\nspec: "
                "{selector: 'a ==', apiVersion: 1}")
    assert e.value.status in (400, 422) and "manifests" in e.value.message
    with pytest.raises(ApiError) as e:
        preview(conn, promote=["no-such"])
    assert e.value.status == 404 and "StagedGlobalNetworkPolicy no-such" in e.value.message
    # What promote would refuse, the preview refuses too: two staged policies standing
    # for one policy.
    twice = doc("StagedGlobalNetworkPolicy", "default.db-ingress", STAGED[0]["spec"])
    with pytest.raises(ApiError) as e:
        preview(conn, manifests=json.dumps(twice), promote="all")
    assert e.value.status == 422 and "both stand for the policy db-ingress" in \
        e.value.message, e.value.message
    # An agent may not ask, and is refused before its body is read.
    with pytest.raises(ApiError) as e:
        server.client("db-1", "agent").request("POST", "/v1/preview", raw=b"{" * 100)
    assert e.value.status == 403
