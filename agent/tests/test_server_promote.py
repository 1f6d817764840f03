"""Staged policies promoted in one step (issue 20), against a real server process:
`POST /v1/promote` and `bulkhead promote`. stagedAction Set writes the enforced policy and
deletes the staged copy; Delete deletes the enforced policy and the staged copy; all names
in one transaction, or nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bulkhead.cli.main import main
from bulkhead.client import ApiError, Connection
from tests.test_server_limits import apply, datastore, start, wait_revision  # noqa: F401
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401
from tests.test_server_revisions import cli_as, policy, tier


def staged(name: str, tier_name: str = "default", port: int = 22,
           action: str | None = None) -> dict[str, Any]:
    doc = policy(name, tier_name, port, labels={"team": "net"})
    doc["kind"] = "StagedGlobalNetworkPolicy"
    doc["metadata"]["annotations"] = {"why": "ticket 7"}
    if action == "Delete":
        doc["spec"] = {"stagedAction": "Delete", "tier": tier_name}
    elif action is not None:
        doc["spec"]["stagedAction"] = action
    return doc


def names(conn: Connection, kind: str) -> list[str]:
    items = conn.request("GET", f"/v1/resources/{kind}")["items"]
    return sorted(d["metadata"]["name"] for d in items)


def everything(conn: Connection) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = conn.request("GET", "/v1/export")["items"]
    return items


def test_promote_set_and_delete_in_one_transaction(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    apply(server, [tier("t1"), policy("t1.ssh", "t1", 22), policy("t1.old", "t1", 23),
                   staged("t1.ssh", "t1", 2222, "Set"), staged("t1.web", "t1", 443),
                   staged("t1.old", "t1", action="Delete")])
    before = everything(conn)
    # A dry run changes nothing and shows the diff.
    dry = conn.request("POST", "/v1/promote",
                       {"names": ["t1.ssh", "t1.web", "t1.old"], "dryRun": True})
    assert dry["dryRun"] is True and dry["revision"] is None
    actions = [(r["kind"], r["name"], r["action"]) for r in dry["results"]]
    assert actions == [
        ("GlobalNetworkPolicy", "t1.ssh", "configured"),
        ("StagedGlobalNetworkPolicy", "t1.ssh", "deleted"),
        ("GlobalNetworkPolicy", "t1.web", "created"),
        ("StagedGlobalNetworkPolicy", "t1.web", "deleted"),
        ("GlobalNetworkPolicy", "t1.old", "deleted"),
        ("StagedGlobalNetworkPolicy", "t1.old", "deleted")]
    ssh = dry["results"][0]
    assert ssh["before"]["spec"]["ingress"][0]["destination"]["ports"] == [22]
    assert ssh["after"]["spec"]["ingress"][0]["destination"]["ports"] == [2222]
    assert "stagedAction" not in ssh["after"]["spec"]
    assert everything(conn) == before
    # The real thing: one revision, audited.
    done = conn.request("POST", "/v1/promote", {"names": ["t1.ssh", "t1.web", "t1.old"]})
    assert done["dryRun"] is False and done["revision"] > 0
    assert [(r["kind"], r["name"], r["action"]) for r in done["results"]] == actions
    assert names(conn, "StagedGlobalNetworkPolicy") == []
    assert names(conn, "GlobalNetworkPolicy") == ["t1.ssh", "t1.web"]
    web = conn.request("GET", "/v1/resources/GlobalNetworkPolicy/t1.web")
    assert web["metadata"]["labels"] == {"team": "net"}
    assert web["metadata"]["annotations"] == {"why": "ticket 7"}
    assert web["spec"]["tier"] == "t1" and "stagedAction" not in web["spec"]
    assert web["metadata"]["resourceVersion"] == str(done["revision"])
    entry = conn.request("GET", "/v1/history", query={"limit": "1"})["entries"][0]
    assert entry["revision"] == done["revision"] and entry["who"] == "alice"
    assert entry["operation"] == "promote"
    assert [(c["kind"], c["name"], c["action"]) for c in entry["changes"]] == actions


def test_promote_unknown_name_changes_nothing(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    conn = server.conn
    apply(server, [staged("web", port=443), staged("gone", action="Delete"),
                   policy("gone")])
    before = everything(conn)
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/promote", {"names": ["web", "nosuch", "gone"]})
    assert err.value.status == 404
    assert "StagedGlobalNetworkPolicy nosuch not found" in err.value.message
    assert everything(conn) == before
    # A body that is not {"names": [...], "dryRun": bool} is refused whole.
    with pytest.raises(ApiError) as err:
        conn.request("POST", "/v1/promote", {"names": ["web"], "dryRun": "yes"})
    assert err.value.status == 400
    for bad in ({"names": []}, {"names": ["a/b"]}, {"names": "web"}, {"name": ["web"]}, []):
        with pytest.raises(ApiError) as err:
            conn.request("POST", "/v1/promote", bad)
        assert err.value.status == 400, bad
    assert everything(conn) == before
    # A staged policy without stagedAction is a Set; a name given twice counts once.
    done = conn.request("POST", "/v1/promote", {"names": ["web", "web", "gone"]})
    assert len(done["results"]) == 4
    assert names(conn, "GlobalNetworkPolicy") == ["web"]


def test_promote_is_an_admins_and_tier_limited(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    conn = server.conn
    apply(server, [tier("t1"), tier("t2", 200), staged("t1.a", "t1"), staged("t2.b", "t2"),
                   policy("t2.c", "t2"), staged("t1.c", "t1")])
    before = everything(conn)
    # Viewers and agents are refused before the body is read: a body that is not even
    # JSON gets 403, not 400.
    for client in (server.client("val", "viewer"), server.client("web-1", "agent")):
        for raw in (b'{"names": ["t1.a"]}', b"not json"):
            with pytest.raises(ApiError) as err:
                client.request("POST", "/v1/promote", raw=raw)
            assert err.value.status == 403, raw
    ops = server.client("ops", "admin", ("t1",))
    with pytest.raises(ApiError) as err:
        ops.request("POST", "/v1/promote", {"names": ["t1.a", "t2.b"]})
    assert err.value.status == 403 and "t2" in err.value.message
    assert everything(conn) == before
    # In its own tier, yes.
    done = ops.request("POST", "/v1/promote", {"names": ["t1.a"]})
    assert done["revision"] > 0 and names(conn, "GlobalNetworkPolicy") == ["t1.a", "t2.c"]
    entry = conn.request("GET", "/v1/history", query={"limit": "1"})["entries"][0]
    assert entry["who"] == "ops" and entry["role"] == "admin (tiers t1)"


def test_promote_replaces_the_enforced_policy_the_staged_view_pairs(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    """`ssh` and `t1.ssh` in tier t1 are one policy to the staged view: promoting the one
    leaves no other behind."""
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    conn = server.conn
    apply(server, [tier("t1"), policy("ssh", "t1"), staged("t1.ssh", "t1", 2222),
                   policy("t1.db", "t1"), staged("db", "t1", action="Delete")])
    done = conn.request("POST", "/v1/promote", {"names": ["t1.ssh", "db"]})
    assert sorted((r["kind"], r["name"], r["action"]) for r in done["results"]) == [
        ("GlobalNetworkPolicy", "ssh", "deleted"), ("GlobalNetworkPolicy", "t1.db", "deleted"),
        ("GlobalNetworkPolicy", "t1.ssh", "created"),
        ("StagedGlobalNetworkPolicy", "db", "deleted"),
        ("StagedGlobalNetworkPolicy", "t1.ssh", "deleted")]
    assert names(conn, "GlobalNetworkPolicy") == ["t1.ssh"]


def test_promote_refuses_what_the_staged_view_cannot_be(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    """A promoted name held by a policy of another tier would move that policy; two
    staged policies standing for one: 422, nothing changed (the preview refuses the same)."""
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    apply(server, [tier("t1"), policy("p0", "default", 22), staged("p0", "t1", 2222),
                   staged("default.p1", "default", 80), staged("p1", "default", 81)])
    before = everything(conn)
    for names, words in ((["p0"], "GlobalNetworkPolicy p0 is in tier default"),
                         (["default.p1", "p1"], "both stand for the policy p1 of tier "
                                                "default")):
        with pytest.raises(ApiError) as e:
            conn.request("POST", "/v1/promote", {"names": names})
        assert e.value.status == 422 and words in e.value.message, e.value.message
        assert "nothing was promoted" in e.value.message
    assert everything(conn) == before


def test_promote_refuses_one_of_two_staged_policies_for_one_policy(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    """`db` and `t1.db` staged in tier t1 stand for one policy, and the staged view (the
    agents' staged verdicts, explain) shows only one of them (`t1.db`, the later name).
    Promoting the other alone would enforce what no staged verdict showed: 422 naming
    the other, nothing changed, as when both are named; the preview refuses alike."""
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    conn = server.conn
    deny = staged("t1.db", "t1", 5432)
    deny["spec"]["ingress"][0]["action"] = "Deny"
    apply(server, [tier("t1"), staged("db", "t1", 5432), deny])
    before = everything(conn)
    for name, other in (("db", "t1.db"), ("t1.db", "db")):
        with pytest.raises(ApiError) as e:
            conn.request("POST", "/v1/promote", {"names": [name]})
        assert e.value.status == 422, e.value.message
        assert f"StagedGlobalNetworkPolicy {other} stands for the policy db of tier t1 " \
            "too" in e.value.message and "nothing was promoted" in e.value.message
        with pytest.raises(ApiError) as e:
            conn.request("POST", "/v1/preview", {"promote": [name]})
        assert e.value.status == 422 and f"{other} stands for" in e.value.message
    assert everything(conn) == before
    # Once one is gone, the other is promoted.
    conn.request("DELETE", "/v1/resources/StagedGlobalNetworkPolicy/t1.db")
    conn.request("POST", "/v1/promote", {"names": ["db"]})
    assert names(conn, "GlobalNetworkPolicy") == ["db"]


def test_a_promote_pinned_to_what_a_preview_judged(
        pki_dir: Path, servers: list[ServerProcess], datastore: str) -> None:  # noqa: F811
    """A preview names the version of each staged policy it judged (`promotedVersions`);
    a promote pinned to them refuses the whole request, 409, when one changed since, so
    what is enforced is what the preview showed."""
    server = start(pki_dir, servers, datastore)
    conn = server.conn
    wait_revision(server, apply(server, [policy("old"), staged("old", action="Delete"),
                                         staged("ssh", port=2222),
                                         staged("web", port=443)])["revision"])
    judged = conn.request("POST", "/v1/preview", {"promote": "all", "hours": 1})
    assert judged["promoted"] == ["old", "ssh", "web"]
    versions = judged["promotedVersions"]
    stored = {d["metadata"]["name"]: d["metadata"]["resourceVersion"] for d in
              conn.request("GET", "/v1/resources/StagedGlobalNetworkPolicy")["items"]}
    assert versions == stored and len(stored) == 3
    # A preview of files not applied judged another state than the store's: whatever the
    # files hold (a staged policy, or anything else), it gives no versions to promote.
    for manifest in (staged("ssh", port=1), policy("other")):
        over = conn.request("POST", "/v1/preview", {
            "promote": "all", "hours": 1, "manifests": json.dumps([manifest])})
        assert over["promoted"] == ["old", "ssh", "web"]
        assert over["promotedVersions"] == {}
    # web staged again after the preview: the pinned promotion is refused whole.
    changed = apply(server, [staged("web", port=8443)])["revision"]
    before = everything(conn)
    for dry_run in (True, False):
        with pytest.raises(ApiError) as err:
            conn.request("POST", "/v1/promote", {"names": judged["promoted"],
                                                 "resourceVersions": versions,
                                                 "dryRun": dry_run})
        assert err.value.status == 409
        assert f"StagedGlobalNetworkPolicy web: resourceVersion is {changed}, not " \
            f"{versions['web']}" in err.value.message
        assert "nothing was promoted" in err.value.message
    assert everything(conn) == before
    for bad, field in (({"names": ["ssh"], "resourceVersions": {"web": "1"}}, "'web'"),
                       ({"names": ["ssh"], "resourceVersions": ["1"]}, "resourceVersions"),
                       ({"names": ["ssh"], "resourceVersions": {"ssh": 7}}, ".ssh"),
                       ({"names": ["ssh"], "resourceVersions": {"ssh": ""}}, ".ssh")):
        with pytest.raises(ApiError) as err:
            conn.request("POST", "/v1/promote", bad)
        assert err.value.status == 400 and field in err.value.message, bad
    assert everything(conn) == before
    # The pins that still hold promote; web, not named, stays staged.
    conn.request("POST", "/v1/promote", {
        "names": ["old", "ssh"],
        "resourceVersions": {"old": versions["old"], "ssh": versions["ssh"]}})
    assert names(conn, "GlobalNetworkPolicy") == ["ssh"]
    assert names(conn, "StagedGlobalNetworkPolicy") == ["web"]


def test_a_thousand_of_the_longest_names_fit_a_promote_pinned_to_their_versions(
        pki_dir: Path, servers: list[ServerProcess]) -> None:  # noqa: F811
    """The most names a promote takes, each of the longest a policy may have and pinned to
    a version (as a preview of that many answers): the body is read and judged (404: not
    staged), not refused for its size."""
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    many = [f"{i:04d}" + "a" * 249 for i in range(1000)]
    body = {"names": many, "resourceVersions": {n: "1" * 64 for n in many},
            "dryRun": True}
    assert len(json.dumps(body)) > 512 * 1024
    with pytest.raises(ApiError) as err:
        server.conn.request("POST", "/v1/promote", body)
    assert err.value.status == 404, err.value.message
    assert f"StagedGlobalNetworkPolicy {many[0]} not found" in err.value.message


def test_cli_promote(pki_dir: Path, servers: list[ServerProcess],  # noqa: F811
                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    cli_as(server.conn, monkeypatch, tmp_path)
    apply(server, [policy("ssh"), staged("ssh", port=2222), staged("web", port=443)])
    assert main(["promote", "ssh", "web", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "--- now/GlobalNetworkPolicy/ssh" in text
    assert any(line.startswith("+") and line.endswith("- 2222") for line in text.splitlines())
    assert "GlobalNetworkPolicy web created (dry run)" in text
    assert "4 resources changed (dry run)" in text
    assert names(server.conn, "StagedGlobalNetworkPolicy") == ["ssh", "web"]
    assert main(["promote", "ssh", "web"]) == 0
    out = capsys.readouterr().out
    assert "StagedGlobalNetworkPolicy ssh deleted" in out
    assert "4 resources changed; revision" in out
    assert names(server.conn, "StagedGlobalNetworkPolicy") == []
    assert main(["promote", "ssh"]) == 1
    assert "StagedGlobalNetworkPolicy ssh not found" in capsys.readouterr().err


def test_cli_promotes_what_a_kept_preview_judged(
        pki_dir: Path, servers: list[ServerProcess], tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    server = start(pki_dir, servers, f"sqlite://{pki_dir}/store.db")
    cli_as(server.conn, monkeypatch, tmp_path)
    wait_revision(server, apply(server, [staged("ssh", port=2222),
                                         staged("web", port=443)])["revision"])
    assert main(["preview", "-o", "json", "--hours", "1"]) == 0
    report = tmp_path / "preview.json"
    report.write_text(capsys.readouterr().out)
    for bad, said in (("[]", "not a preview of this version"),
                      ('{"promoted": ["ssh"], "promotedVersions": {}}',
                       "ssh has no version: the preview judged files not applied"),
                      ("{", "cannot read a preview's JSON")):
        (tmp_path / "bad.json").write_text(bad)
        assert main(["promote", "--preview", str(tmp_path / "bad.json")]) == 2
        assert said in capsys.readouterr().err
    assert main(["promote", "ssh", "--preview", str(report)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["promote"]) == 2
    assert "give the StagedGlobalNetworkPolicy NAMEs" in capsys.readouterr().err
    # Staged again after the preview: refused, nothing promoted.
    apply(server, [staged("web", port=8443)])
    assert main(["promote", "--preview", str(report)]) == 1
    assert "StagedGlobalNetworkPolicy web: resourceVersion is" in capsys.readouterr().err
    assert names(server.conn, "StagedGlobalNetworkPolicy") == ["ssh", "web"]
    # Previewed again, the new report promotes both.
    assert main(["preview", "-o", "json", "--hours", "1"]) == 0
    report.write_text(capsys.readouterr().out)
    assert main(["promote", "--preview", str(report)]) == 0
    assert "4 resources changed; revision" in capsys.readouterr().out
    assert names(server.conn, "GlobalNetworkPolicy") == ["ssh", "web"]
    empty = tmp_path / "empty.json"
    empty.write_text('{"promoted": [], "promotedVersions": {}}')
    assert main(["promote", "--preview", str(empty)]) == 0
    assert "nothing to promote" in capsys.readouterr().out
