"""host_endpoints against a fake server answering as bulkhead-server does: what the
module reports of a purge done with one POST /v1/sync."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.modules import host_endpoints

OWNER = "microseg.bulkhead.io/managed-by"


def stored(name, ip, version):
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": {OWNER: "east"},
                         "resourceVersion": str(version)},
            "spec": {"node": name, "expectedIPs": [ip]}}


def plain(doc):
    doc = json.loads(json.dumps(doc))
    doc["metadata"].pop("resourceVersion")
    return doc


def run(capsys, **args):
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            host_endpoints.main()
    return done.value.code, json.loads(capsys.readouterr().out)


def test_an_endpoint_both_listed_and_kept_is_reported_as_written(fake_server, capsys):
    """keep names an endpoint that endpoints lists too: it is written as listed, and the
    result says so (updated, with its diff), as for any other endpoint written."""
    web1, web2, db1 = (stored("web-1", "198.18.0.1", 3), stored("web-2", "198.18.0.2", 4),
                       stored("db-1", "198.18.0.3", 5))
    fake_server.set("/v1/resources/HostEndpoint",
                    json.dumps({"items": [web1, web2, db1], "revision": 5}))
    web1_new = plain(web1)
    web1_new["spec"]["expectedIPs"] = ["198.18.0.11"]
    # The answer bulkhead-server gives that sync: web-1 written, db-1 (kept) as it is,
    # web-2 (owned, neither listed nor kept) deleted, in one transaction.
    fake_server.set("/v1/sync", json.dumps({"dryRun": False, "revision": 6, "results": [
        {"kind": "HostEndpoint", "name": "web-1", "action": "configured",
         "before": plain(web1), "after": web1_new},
        {"kind": "HostEndpoint", "name": "db-1", "action": "unchanged"},
        {"kind": "HostEndpoint", "name": "web-2", "action": "deleted",
         "before": plain(web2)}]}))
    code, result = run(capsys, server_url=fake_server.url, ca_path=fake_server.ca,
                       owner="east", keep=["web-1", "db-1"],
                       endpoints=[{"metadata": {"name": "web-1"},
                                   "spec": {"node": "web-1", "expectedIPs": ["198.18.0.11"]}}])
    assert code == 0, result
    assert [request[0] for request in fake_server.requests] == ["GET", "POST"]
    assert result["changed"] and result["revision"] == 6
    assert result["updated"] == ["web-1"]
    assert result["deleted"] == ["web-2"] and result["kept"] == ["db-1"]
    assert [(r["name"], r["action"]) for r in result["results"]] == \
        [("web-1", "updated"), ("web-2", "deleted")]


def test_a_purge_with_nothing_to_write_never_sends_an_empty_sync(fake_server, capsys):
    """No endpoints listed, every owned one gone: only deletes, one transaction of
    POST /v1/delete. Never an empty POST /v1/sync?kind=HostEndpoint&owner=O, which a
    server from before kind=HostEndpoint reads as the sync of owner O's policies, empty:
    every policy labeled managed-by=O deleted."""
    web1 = stored("web-1", "198.18.0.1", 3)
    fake_server.set("/v1/resources/HostEndpoint",
                    json.dumps({"items": [web1], "revision": 3}))
    fake_server.set("/v1/resources/HostEndpoint/web-1", json.dumps(web1))
    fake_server.set("/v1/delete", json.dumps({"dryRun": False, "revision": 4, "results": [
        {"kind": "HostEndpoint", "name": "web-1", "action": "deleted"}]}))
    code, result = run(capsys, server_url=fake_server.url, ca_path=fake_server.ca,
                       owner="east", endpoints=[], _ansible_diff=True)
    assert code == 0, result
    paths = [request[1].split("?")[0] for request in fake_server.requests]
    assert "/v1/sync" not in paths and paths[-1] == "/v1/delete", paths
    assert result["changed"] and result["deleted"] == ["web-1"] and result["revision"] == 4
    assert [d["before_header"] for d in result["diff"]] == ["HostEndpoint web-1"]


def test_a_change_larger_than_one_transaction_is_written_in_two_with_a_warning(
        fake_server, capsys):
    """The server refuses the sync as larger than one datastore transaction (etcd's
    --max-txn-ops), before writing anything: the module writes the endpoints, then the
    deletes, as two transactions, and warns that it did."""
    web1, web2 = stored("web-1", "198.18.0.1", 3), stored("web-2", "198.18.0.2", 4)
    fake_server.set("/v1/resources/HostEndpoint",
                    json.dumps({"items": [web1, web2], "revision": 5}))
    fake_server.set("/v1/resources/HostEndpoint/web-1", json.dumps(web1))
    fake_server.set("/v1/resources/HostEndpoint/web-2", json.dumps(web2))
    fake_server.set("/v1/sync", json.dumps({"error": {
        "reason": "RequestEntityTooLarge",
        "message": "130 operations in one etcd transaction; etcd takes at most 128"}}),
        status=413)
    web1_new = plain(web1)
    web1_new["spec"]["expectedIPs"] = ["198.18.0.11"]
    fake_server.set("/v1/apply", json.dumps({"dryRun": False, "revision": 6, "results": [
        {"kind": "HostEndpoint", "name": "web-1", "action": "configured", "after": web1_new}]}))
    fake_server.set("/v1/delete", json.dumps({"dryRun": False, "revision": 7, "results": [
        {"kind": "HostEndpoint", "name": "web-2", "action": "deleted"}]}))
    args = dict(server_url=fake_server.url, ca_path=fake_server.ca, owner="east",
                endpoints=[{"metadata": {"name": "web-1"},
                            "spec": {"node": "web-1", "expectedIPs": ["198.18.0.11"]}}])
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            host_endpoints.main()
    captured = capsys.readouterr()
    code, result = done.value.code, json.loads(captured.out)
    assert code == 0, result
    posts = [path.split("?")[0] for method, path in fake_server.requests if method == "POST"]
    assert posts == ["/v1/sync", "/v1/apply", "/v1/apply", "/v1/delete"]
    assert result["changed"] and result["revision"] == 7
    assert (result["updated"], result["deleted"]) == (["web-1"], ["web-2"])
    # ansible-core 2.19 gives each warning as a summary of its event, in the result; in a
    # process that has loaded controller code (the inventory plugins' tests) the warning
    # is displayed instead, on stderr.
    warnings = [w["event"]["msg"] if isinstance(w, dict) else w
                for w in result.get("warnings", [])] + [" ".join(captured.err.split())]
    assert any("larger than one datastore transaction (130 operations in one etcd "
               "transaction; etcd takes at most 128); written in two" in w
               for w in warnings), warnings


def test_other_refusals_of_the_sync_fail_the_module_and_nothing_else_is_asked(
        fake_server, capsys):
    web1, web2 = stored("web-1", "198.18.0.1", 3), stored("web-2", "198.18.0.2", 4)
    fake_server.set("/v1/resources/HostEndpoint",
                    json.dumps({"items": [web1, web2], "revision": 5}))
    fake_server.set("/v1/sync", json.dumps({"error": {
        "reason": "Invalid", "message": "HostEndpoint web-1: spec.expectedIPs: bad"}}),
        status=422)
    code, result = run(capsys, server_url=fake_server.url, ca_path=fake_server.ca,
                       owner="east",
                       endpoints=[{"metadata": {"name": "web-1"},
                                   "spec": {"node": "web-1", "expectedIPs": ["198.18.0.11"]}}])
    assert code == 1 and "spec.expectedIPs: bad" in result["msg"]
    assert [request[0] for request in fake_server.requests] == ["GET", "POST"]


def test_a_conflict_reads_and_syncs_again_then_fails_naming_it(fake_server, capsys):
    """409 from the sync (the owner's endpoints changed after the module read them;
    nothing written): read and sync again, three times in all, then fail with the
    server's words and why. Each sync asks for preconditions."""
    web1, web2, db1 = (stored("web-1", "198.18.0.1", 3), stored("web-2", "198.18.0.2", 4),
                       stored("db-1", "198.18.0.3", 5))
    fake_server.set("/v1/resources/HostEndpoint",
                    json.dumps({"items": [web1, web2, db1], "revision": 5}))
    fake_server.set("/v1/sync", json.dumps({"error": {
        "reason": "Conflict", "message": "HostEndpoint web-2: resourceVersion is 6, not 4: "
        "it changed after it was read; read it again; nothing was changed"}}), status=409)
    code, result = run(capsys, server_url=fake_server.url, ca_path=fake_server.ca,
                       owner="east", keep=["web-2"],
                       endpoints=[{"metadata": {"name": "web-1"},
                                   "spec": {"node": "web-1", "expectedIPs": ["198.18.0.11"]}}])
    assert code == 1
    assert result["msg"] == (
        "HostEndpoint web-2: resourceVersion is 6, not 4: it changed after it was read; "
        "read it again; nothing was changed (the owner's host endpoints changed while the "
        "module read and wrote them, 3 times in a row)")
    assert [request[0] for request in fake_server.requests] == ["GET", "POST"] * 3
    syncs = [path for method, path in fake_server.requests if method == "POST"]
    assert all(path.startswith("/v1/sync?") and "preconditions=true" in path
               for path in syncs), syncs
