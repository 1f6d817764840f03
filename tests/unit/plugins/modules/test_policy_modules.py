"""policy_preview and policy_promote in-process: options -> the requests they make -> the
result, with the HTTP request replaced (the real server: tests/integration)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    ApiError,
    BulkheadClient,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.modules import policy_preview, policy_promote

URL = "https://bulkhead.example.com:7443"
TOTALS = {"newlyDenied": {"records": 2, "connections": 6},
          "newlyAllowed": {"records": 0, "connections": 0},
          "undecided": {"records": 0, "connections": 0},
          "unchanged": {"records": 1, "connections": 1}}


class Server:
    """Requests made (method, path, body); answers by path, or an error to raise."""

    def __init__(self):
        self.requests = []
        self.answers = {"/v1/preview": {"totals": TOTALS, "truncated": False},
                        "/v1/resources/StagedGlobalNetworkPolicy": {"items": []},
                        "/v1/promote": {"dryRun": False, "revision": 3, "results": []}}
        self.errors = {}

    def reply(self, method, path, body):
        self.requests.append((method, path, body))
        if path in self.errors:
            raise self.errors[path]
        return self.answers[path]


@pytest.fixture
def server(monkeypatch):
    fake = Server()

    def request(self, method, path, body=None, query=None, raw=None):
        return fake.reply(method, path, body)

    monkeypatch.setattr(BulkheadClient, "request", request)
    return fake


def run(capsys, module, **args):
    args.setdefault("server_url", URL)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            module.main()
    return done.value.code, json.loads(capsys.readouterr().out)


def test_preview_within_the_gates(server, capsys):
    code, result = run(capsys, policy_preview, promote=["db-ingress"], max_denied=6,
                       protected="pci == 'true'")
    assert code == 0 and result["changed"] is False
    assert server.requests == [("POST", "/v1/preview", {
        "hours": 24.0, "limit": 100, "promote": ["db-ingress"], "protected": "pci == 'true'"})]
    assert result["gates"] == {"passed": True, "failed": []}
    assert result["preview"]["totals"] == TOTALS


def test_a_failed_gate_fails_with_the_preview(server, capsys):
    code, result = run(capsys, policy_preview, max_denied=5)
    assert code == 1
    assert result["msg"] == ("policy preview gate failed: max_denied: 6 connections would be "
                             "newly denied (at most 5)")
    assert result["preview"]["totals"] == TOTALS and result["gates"]["passed"] is False


def test_check_mode_previews_as_well(server, capsys):
    code, result = run(capsys, policy_preview, _ansible_check_mode=True, max_denied=6)
    assert code == 0 and result["changed"] is False and len(server.requests) == 1


def test_inline_definitions_are_sent_as_manifests(server, capsys):
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
           "metadata": {"name": "x", "labels": {"pci": True}}, "spec": {"selector": "all()"}}
    code, result = run(capsys, policy_preview, definition=[doc])
    assert code == 0 and result["gates"]["passed"] is True
    sent = json.loads(server.requests[0][2]["manifests"])
    assert sent[0]["metadata"]["labels"] == {"pci": "true"}


def test_a_truncated_preview_warns(server, capsys, monkeypatch):
    warned = []
    monkeypatch.setattr(BulkheadModule, "warn", lambda self, text: warned.append(text))
    server.answers["/v1/preview"] = {"totals": TOTALS, "truncated": True}
    code, result = run(capsys, policy_preview)
    assert code == 0 and result["preview"]["truncated"] is True
    assert len(warned) == 1 and "lower bounds" in warned[0]


def test_objects_the_server_left_out_are_warned_of(server, capsys, monkeypatch):
    warned = []
    monkeypatch.setattr(BulkheadModule, "warn", lambda self, text: warned.append(text))
    server.answers["/v1/preview"] = {"totals": TOTALS, "truncated": False,
                                     "leftOut": ["GlobalNetworkPolicy default.dd: bad"]}
    code, result = run(capsys, policy_preview)
    assert code == 0 and result["preview"]["leftOut"] == ["GlobalNetworkPolicy default.dd: bad"]
    assert warned == ["left out of the preview, as the agents leave it out: "
                      "GlobalNetworkPolicy default.dd: bad"]


@pytest.mark.parametrize("args,msg", [
    ({"max_denied": -1}, "max_denied: -1: give 0 or more connections"),
    ({"promote": "db-ingress"}, "promote: 'db-ingress': give a list of "
                                "StagedGlobalNetworkPolicy names, or all or none"),
    ({"definition": "a: [", "src": "x.yaml"}, "parameters are mutually exclusive: definition|src"),
    ({"definition": [{"kind": "Tier"}]}, "document 1: needs kind and metadata.name"),
])
def test_bad_options_fail_before_any_request(server, capsys, args, msg):
    code, result = run(capsys, policy_preview, **args)
    assert code == 1 and result["msg"] == msg and server.requests == []


def test_the_servers_refusal_is_passed_on(server, capsys):
    server.errors["/v1/preview"] = ApiError(404, "NotFound", "StagedGlobalNetworkPolicy x "
                                            "not found (in the store or the manifests)")
    code, result = run(capsys, policy_preview, promote=["x"])
    assert code == 1 and result["status"] == 404 and result["msg"].startswith(
        "StagedGlobalNetworkPolicy x not found")


def test_promote_asks_for_the_staged_names_in_check_mode_as_a_dry_run(server, capsys):
    server.answers["/v1/resources/StagedGlobalNetworkPolicy"] = {
        "items": [{"kind": "StagedGlobalNetworkPolicy", "metadata": {"name": "a"}}]}
    server.answers["/v1/promote"] = {"dryRun": True, "revision": 3, "results": []}
    code, result = run(capsys, policy_promote, _ansible_check_mode=True, names=["a"])
    assert code == 0
    assert server.requests[-1] == ("POST", "/v1/promote", {"names": ["a"], "dryRun": True})
    assert result["promoted"] == ["a"] and result["revision"] is None


def test_promote_sends_the_versions_pinned(server, capsys):
    server.answers["/v1/resources/StagedGlobalNetworkPolicy"] = {
        "items": [{"kind": "StagedGlobalNetworkPolicy", "metadata": {"name": "a"}}]}
    server.answers["/v1/promote"] = {"dryRun": False, "revision": 3, "results": []}
    code, result = run(capsys, policy_promote, names=["a"], resource_versions={"a": "2"})
    assert code == 0
    assert server.requests[-1] == ("POST", "/v1/promote", {
        "names": ["a"], "dryRun": False, "resourceVersions": {"a": "2"}})


@pytest.mark.parametrize("versions", [{"a": 2}, {"a": ""}, {"a": None}])
def test_promote_refuses_a_version_that_is_not_text_before_asking(server, capsys, versions):
    code, result = run(capsys, policy_promote, names=["a"], resource_versions=versions)
    assert code == 1 and result["msg"].startswith("resource_versions.a: expected a "
                                                  "resourceVersion (text)")
    assert server.requests == []


def test_promote_without_names_fails(server, capsys):
    code, result = run(capsys, policy_promote, names=[])
    assert code == 1 and result["msg"].startswith("names: give at least one")
    assert server.requests == []


def test_promote_missing_names_fail_unless_ignored(server, capsys):
    code, result = run(capsys, policy_promote, names=["gone"])
    assert code == 1 and result["msg"].startswith("StagedGlobalNetworkPolicy gone not found")
    code, result = run(capsys, policy_promote, names=["gone"], missing="ignore")
    assert code == 0 and result["changed"] is False and result["missing"] == ["gone"]
    assert [r[1] for r in server.requests] == ["/v1/resources/StagedGlobalNetworkPolicy"] * 2
