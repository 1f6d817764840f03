"""The store's past through the API (issue 17), on SQLite and etcd, against a real server
process: who changed what (history), every resource at a revision (export), back to a
revision in one transaction (rollback), and a tier's or an owner's policies made exactly
a given set (sync)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bulkhead.cli.main import main
from bulkhead.client import ApiError, Connection
from tests.test_server_limits import apply, datastore, start  # noqa: F401
from tests.test_server_process import ServerProcess, netset, pki_dir, servers  # noqa: F401

OWNER = "microseg.bulkhead.io/managed-by"


def tier(name: str, order: int = 100) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": name},
            "spec": {"order": order}}


def policy(name: str, tier_name: str = "default", port: int = 22,
           labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": meta,
            "spec": {"tier": tier_name, "selector": "all()", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "destination": {"ports": [port]}}]}}


def body(docs: list[dict[str, Any]]) -> bytes:
    return json.dumps(docs).encode()


def strip(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda d: (d["kind"], d["metadata"]["name"]))


def test_history_says_who_changed_what(pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
                                       datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore)
    alice = server.conn
    ops = server.client("ops", "admin", ("t1",))
    first = apply(server, [tier("t1"), netset("n1")])["revision"]
    second = ops.request("POST", "/v1/resources/GlobalNetworkPolicy",
                         policy("t1.ssh", "t1"))["metadata"]["resourceVersion"]
    third = alice.request("DELETE", "/v1/resources/GlobalNetworkSet/n1")["metadata"]
    entries = alice.request("GET", "/v1/history")["entries"]
    assert [e["revision"] for e in entries][:3] == sorted(
        [first, int(second), entries[0]["revision"]], reverse=True)
    assert entries[0]["who"] == "alice" and entries[0]["role"] == "admin"
    # The request that wrote each: what rollback.yml finds a promotion by.
    assert [e["operation"] for e in entries[:3]] == ["delete", "create", "apply"]
    assert entries[0]["changes"] == [{"kind": "GlobalNetworkSet", "name": "n1",
                                      "action": "deleted"}]
    assert entries[1]["who"] == "ops" and entries[1]["role"] == "admin (tiers t1)"
    assert entries[1]["changes"] == [{"kind": "GlobalNetworkPolicy", "name": "t1.ssh",
                                      "action": "created"}]
    assert sorted((c["kind"], c["action"]) for c in entries[2]["changes"]) == \
        [("GlobalNetworkSet", "created"), ("Tier", "created")]
    only = alice.request("GET", "/v1/history", query={"kind": "globalnetworksets", "name": "n1"})
    assert [e["revision"] for e in only["entries"]] == [entries[0]["revision"], first]
    viewer = server.client("val", "viewer")
    assert viewer.request("GET", "/v1/history", query={"limit": "1"})["entries"] == \
        entries[:1]
    agent = server.client("web-1", "agent")
    with pytest.raises(ApiError) as err:
        agent.request("GET", "/v1/history")
    assert err.value.status == 403
    assert third["name"] == "n1"


def test_export_and_rollback_restore_a_revision(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    good = apply(server, [tier("t1"), policy("t1.ssh", "t1"), policy("t1.web", "t1", 443),
                          netset("n1")])["revision"]
    then = conn.request("GET", "/v1/export", query={"revision": str(good)})
    assert then["revision"] == good and len(then["items"]) == 4
    assert all("resourceVersion" not in d["metadata"] for d in then["items"])
    # Later: a policy changed, one deleted, a set and a tier added.
    apply(server, [policy("t1.ssh", "t1", 2222), tier("t2", 200), netset("n2")])
    conn.request("DELETE", "/v1/resources/GlobalNetworkPolicy/t1.web")
    now_before = conn.request("GET", "/v1/export")
    assert strip(now_before["items"]) != strip(then["items"])
    # Export of a tier: the tier and its policies, at that revision.
    only = conn.request("GET", "/v1/export", query={"revision": str(good), "tier": "t1"})
    assert [d["metadata"]["name"] for d in only["items"]] == ["t1", "t1.ssh", "t1.web"]
    # A dry run changes nothing and says what would.
    dry = conn.request("POST", "/v1/rollback", query={"revision": str(good), "dryRun": "true"})
    actions = {(r["kind"], r["name"]): r["action"] for r in dry["results"]}
    assert actions == {("Tier", "t1"): "unchanged", ("GlobalNetworkPolicy", "t1.ssh"):
                       "configured", ("GlobalNetworkPolicy", "t1.web"): "created",
                       ("GlobalNetworkSet", "n1"): "unchanged",
                       ("Tier", "t2"): "deleted", ("GlobalNetworkSet", "n2"): "deleted"}
    assert dry["revision"] is None
    assert strip(conn.request("GET", "/v1/export")["items"]) == strip(now_before["items"])
    done = conn.request("POST", "/v1/rollback", query={"revision": str(good)})
    assert strip(conn.request("GET", "/v1/export")["items"]) == strip(then["items"])
    # One transaction: one revision, audited.
    entry = conn.request("GET", "/v1/history", query={"limit": "1"})["entries"][0]
    assert entry["revision"] == done["revision"] and len(entry["changes"]) == 4
    assert entry["operation"] == "rollback"
    # A tier admin may not roll the whole store back; revisions out of range are refused.
    ops = server.client("ops", "admin", ("t1",))
    with pytest.raises(ApiError) as err:
        ops.request("POST", "/v1/rollback", query={"revision": str(good)})
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/rollback", query={"revision": str(done["revision"] + 50)})
    assert err.value.status == 400 and "future" in err.value.message


def test_rollback_past_the_kept_history_is_gone(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore, compactionInterval=0.2, compactionRetain=3)
    conn = server.conn
    first = apply(server, [netset("n0")])["revision"]
    for i in range(1, 8):
        apply(server, [netset(f"n{i}")])
    for _ in range(100):   # compaction runs every 0.2 s
        try:
            conn.request("GET", "/v1/export", query={"revision": str(first)})
        except ApiError as e:
            assert e.status == 410 and "older than the kept history" in e.message
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"revision {first} was never compacted")
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/rollback", query={"revision": str(first)})
    assert err.value.status == 410


def hep(name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": labels},
            "spec": {"node": name, "expectedIPs": [ip]}}


def test_sync_makes_an_owners_host_endpoints_exactly_the_given_ones(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    """`?kind=HostEndpoint&owner=O`: an inventory's host endpoints become the body's in
    one transaction (created, updated and deleted at one revision, never half of it);
    another owner's, and endpoints of no owner, are left alone, and taken over only with
    adopt=true; `label` names another owner label."""
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    inv, other = {OWNER: "inv"}, {OWNER: "other"}
    apply(server, [hep("h1", "198.18.0.1", inv), hep("h2", "198.18.0.2", inv),
                   hep("h3", "198.18.0.3", other), hep("h4", "198.18.0.4", {"app": "x"})])
    desired = [hep("h1", "198.18.0.11", inv), hep("h5", "198.18.0.5", inv)]
    query = {"kind": "HostEndpoint", "owner": "inv"}
    before = conn.request("GET", "/v1/export")
    dry = conn.request("POST", "/v1/sync", raw=body(desired), query={**query, "dryRun": "true"})
    assert dry["revision"] is None and conn.request("GET", "/v1/export") == before
    done = conn.request("POST", "/v1/sync", raw=body(desired), query=query)
    assert [(r["name"], r["action"]) for r in done["results"]] == \
        [("h1", "configured"), ("h5", "created"), ("h2", "deleted")]
    assert [(r["name"], r["action"]) for r in dry["results"]] == \
        [(r["name"], r["action"]) for r in done["results"]]
    endpoints = {d["metadata"]["name"]: d for d in
                 conn.request("GET", "/v1/resources/HostEndpoint")["items"]}
    assert sorted(endpoints) == ["h1", "h3", "h4", "h5"]
    assert endpoints["h1"]["spec"]["expectedIPs"] == ["198.18.0.11"]
    entry = conn.request("GET", "/v1/history", query={"limit": "1"})["entries"][0]
    assert entry["revision"] == done["revision"] and entry["operation"] == "sync"
    assert sorted(c["name"] for c in entry["changes"]) == ["h1", "h2", "h5"]
    # Another owner's endpoint: 409 naming it, nothing written; adopt=true takes it over.
    taken = [*desired, hep("h3", "198.18.0.3", inv)]
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/sync", raw=body(taken), query=query)
    assert err.value.status == 409 and "HostEndpoint h3 exists and is owned by 'other' " \
        f"({OWNER}); adopt=true takes it over; nothing was changed" in err.value.message
    conn.request("POST", "/v1/sync", raw=body(taken), query={**query, "adopt": "true"})
    owned = {d["metadata"]["name"]: d["metadata"]["labels"].get(OWNER) for d in
             conn.request("GET", "/v1/resources/HostEndpoint")["items"]}
    assert owned == {"h1": "inv", "h3": "inv", "h4": None, "h5": "inv"}
    # Another owner label: the scope is that label's.
    team = {"team/owner": "net"}
    conn.request("POST", "/v1/sync", raw=body([hep("h6", "198.18.0.6", team)]),
                 query={**query, "owner": "net", "label": "team/owner"})
    assert [*sorted(owned), "h6"] == sorted(
        d["metadata"]["name"] for d in conn.request("GET", "/v1/resources/HostEndpoint")["items"])
    # What a HostEndpoint sync refuses, naming the parameter or the resource.
    for q, docs, status, said in (
            ({"kind": "Tier", "owner": "inv"}, [], 400, "kind: 'Tier'"),
            ({"kind": "HostEndpoint", "tier": "t1"}, [], 400, "by owner=VALUE, not tier"),
            ({"tier": "t1", "label": "a"}, [], 400, "label: only with owner=VALUE"),
            ({**query, "label": "a b"}, [], 400, "label: label key"),
            ({**query, "adopt": "maybe"}, [], 400, "adopt: 'maybe'"),
            (query, [policy("p")], 422, "GlobalNetworkPolicy p: a sync of HostEndpoint holds "
                                        "only HostEndpoint resources"),
            (query, [hep("h7", "198.18.0.7", other)], 422,
             f'HostEndpoint h7: metadata.labels: {OWNER} must be "inv"')):
        with pytest.raises(ApiError) as err:
            conn.request("POST", "/v1/sync", raw=body(docs), query=q)
        assert err.value.status == status and said in err.value.message, (q, err.value.message)


def test_sync_makes_a_tier_exactly_the_given_policies(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    apply(server, [tier("t1"), policy("t1.a", "t1"), policy("t1.b", "t1"),
                   policy("other", "default")])
    desired = [policy("t1.a", "t1"), policy("t1.b", "t1", 2222), policy("t1.c", "t1")]
    dry = conn.request("POST", "/v1/sync", raw=body(desired),
                       query={"tier": "t1", "dryRun": "true"})
    assert [(r["name"], r["action"]) for r in dry["results"]] == \
        [("t1.a", "unchanged"), ("t1.b", "configured"), ("t1.c", "created")]
    done = conn.request("POST", "/v1/sync", raw=body(desired[1:]), query={"tier": "t1"})
    assert [(r["name"], r["action"]) for r in done["results"]] == \
        [("t1.b", "configured"), ("t1.c", "created"), ("t1.a", "deleted")]
    names = [d["metadata"]["name"] for d in
             conn.request("GET", "/v1/resources/GlobalNetworkPolicy")["items"]]
    assert names == ["other", "t1.b", "t1.c"]   # the default tier's policy is untouched
    # One transaction.
    entry = conn.request("GET", "/v1/history", query={"limit": "1"})["entries"][0]
    assert entry["revision"] == done["revision"] and len(entry["changes"]) == 3
    assert entry["operation"] == "sync"
    # Every policy must be in the tier synced.
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/sync", raw=body([policy("x", "default")]),
                     query={"tier": "t1"})
    assert err.value.status == 422 and 'not the tier synced ("t1")' in err.value.message


def test_sync_by_owner_prunes_only_what_the_owner_has(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    mine, theirs = {OWNER: "team-a"}, {OWNER: "team-b"}
    apply(server, [policy("a1", labels=mine), policy("a2", labels=mine),
                   policy("b1", labels=theirs), policy("loose")])
    done = conn.request("POST", "/v1/sync", raw=body([policy("a3", labels=mine)]),
                        query={"owner": "team-a"})
    assert sorted((r["name"], r["action"]) for r in done["results"]) == \
        [("a1", "deleted"), ("a2", "deleted"), ("a3", "created")]
    names = [d["metadata"]["name"] for d in
             conn.request("GET", "/v1/resources/GlobalNetworkPolicy")["items"]]
    assert names == ["a3", "b1", "loose"]
    # Another owner's policy (or an unowned one) is not taken over.
    for name in ("b1", "loose"):
        with pytest.raises(ApiError) as err:
            conn.request("POST", "/v1/sync", raw=body([policy(name, labels=mine)]),
                         query={"owner": "team-a"})
        assert err.value.status == 409 and "nothing was changed" in err.value.message
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/sync", raw=body([policy("a4")]), query={"owner": "team-a"})
    assert err.value.status == 422 and OWNER in err.value.message
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/sync", raw=body([]), query={"owner": "x", "tier": "y"})
    assert err.value.status == 400


def cli_as(conn: Connection, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """`bulkhead` commands from here on talk to `conn`'s server with its certificate (and
    no ~/.config/bulkhead/config.yaml)."""
    for env, value in (("BULKHEAD_SERVER", conn.server), ("BULKHEAD_CA", conn.ca),
                       ("BULKHEAD_CERT", conn.cert), ("BULKHEAD_KEY", conn.key)):
        monkeypatch.setenv(env, str(value))
    monkeypatch.setenv("HOME", str(home))


def test_cli_export_history_rollback(pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    cli_as(server.conn, monkeypatch, tmp_path)
    good = apply(server, [tier("t1"), policy("t1.ssh", "t1")])["revision"]
    apply(server, [netset("late")])
    out = tmp_path / "then.yaml"
    assert main(["export", "--revision", str(good), "-o", str(out)]) == 0
    assert "2 resources at revision" in capsys.readouterr().out
    assert main(["validate", "-f", str(out)]) == 0
    capsys.readouterr()
    assert main(["history", "--limit", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["REVISION", "TIME", "WHO", "ROLE", "OPERATION", "CHANGES"]
    assert rows[1].split()[2:] == ["alice", "admin", "apply", "created", "GlobalNetworkSet",
                                   "late"]
    assert main(["rollback", "--to-revision", str(good), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "--- now/GlobalNetworkSet/late" in text
    assert "GlobalNetworkSet late deleted (dry run)" in text
    assert main(["rollback", "--to-revision", str(good)]) == 0
    assert "1 resources changed; revision" in capsys.readouterr().out
    assert main(["get", "globalnetworksets"]) == 0
    assert capsys.readouterr().out.split() == ["NAME"]
