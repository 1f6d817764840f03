"""The preview's request body, its gates, and promotion with names no longer staged,
without a server (the real one: tests/integration/targets/policy_preview)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils.preview import (
    gates,
    preview_body,
    promote,
    promote_value,
)

PARAMS = {"hours": 24.0, "limit": 100, "promote": None, "until": None, "protected": None}


def answer(denied=0, undecided=0, protected=None):
    out = {"totals": {"newlyDenied": {"records": min(denied, 1), "connections": denied},
                      "newlyAllowed": {"records": 0, "connections": 0},
                      "undecided": {"records": undecided, "connections": undecided * 2},
                      "unchanged": {"records": 3, "connections": 9}}}
    if protected is not None:
        out["protected"] = {"selector": 'pci == "true"', "records": min(protected, 1),
                            "connections": protected, "groups": []}
    return out


@pytest.mark.parametrize("denied,limit,passed", [(6, 6, True), (6, 5, False), (0, 0, True),
                                                 (1, 0, False), (6, None, True)])
def test_max_denied_counts_connections_and_allows_up_to_it(denied, limit, passed):
    verdict = gates(answer(denied=denied), max_denied=limit)
    assert verdict["passed"] is passed
    if not passed:
        assert verdict["failed"] == ["max_denied: %d connections would be newly denied "
                                     "(at most %d)" % (denied, limit)]


def test_protected_fails_on_any_record_and_passes_on_none():
    assert gates(answer(denied=5, protected=0)) == {"passed": True, "failed": []}
    assert gates(answer(denied=5, protected=2))["failed"] == [
        'protected: 2 connections to or from pci == "true" would be newly denied']


def test_undecided_fails_only_when_asked():
    assert gates(answer(undecided=2))["passed"] is True
    assert gates(answer(undecided=2), fail_on_undecided=True)["failed"] == [
        "fail_on_undecided: 4 connections in 2 records cannot be decided from the stored "
        "fields"]
    assert gates(answer(), fail_on_undecided=True)["passed"] is True


def test_every_failed_gate_is_named():
    verdict = gates(answer(denied=3, undecided=1, protected=1), max_denied=2,
                    fail_on_undecided=True)
    assert [reason.split(":")[0] for reason in verdict["failed"]] == \
        ["max_denied", "protected", "fail_on_undecided"]


def test_an_incomplete_preview_fails_any_gate_given():
    cut = dict(answer(), truncated=True, stopped="judging stopped after 20 s")
    assert gates(cut)["passed"] is True
    for verdict in (gates(cut, max_denied=5), gates(cut, fail_on_undecided=True),
                    gates(dict(cut, **answer(protected=0)), None)):
        assert verdict["failed"] == ["truncated: the preview is incomplete (judging stopped "
                                     "after 20 s); its totals are lower bounds"]


@pytest.mark.parametrize("value,wire", [(None, None), ("all", "all"), ("none", "none"),
                                        (["a", "b"], ["a", "b"]), (("a",), ["a"])])
def test_promote_values(value, wire):
    assert promote_value(value) == wire


@pytest.mark.parametrize("value", ["db-ingress", [], [""], [1], {"a": 1}, 3])
def test_other_promote_values_fail_naming_the_option(value):
    with pytest.raises(ValueError, match=r"^promote: .*give a list of "
                       "StagedGlobalNetworkPolicy names, or all or none"):
        promote_value(value)


def test_the_body_holds_only_what_is_given():
    assert preview_body(PARAMS, [], 1000.0) == {"hours": 24.0, "limit": 100}
    docs = [{"kind": "StagedGlobalNetworkPolicy", "metadata": {"name": "x"}}]
    body = preview_body(dict(PARAMS, promote="all", until="10m", protected="app == 'db'",
                             enforce="zone == 'dmz'"), docs, 1000.0)
    assert body == {"hours": 24.0, "limit": 100, "promote": "all", "until": 400.0,
                    "protected": "app == 'db'", "enforce": "zone == 'dmz'",
                    "manifests": json.dumps(docs)}


def test_a_bad_until_fails_naming_it():
    with pytest.raises(ValueError, match=r"^until: 'soon' is not a time"):
        preview_body(dict(PARAMS, until="soon"), [], 1000.0)


class Client:
    """Staged policies held, and the promotions asked for."""

    def __init__(self, staged):
        self.staged = staged
        self.asked = []
        self.pinned = []

    def list(self, kind):
        assert kind == "StagedGlobalNetworkPolicy"
        return [{"metadata": {"name": n}} for n in self.staged]

    def promote(self, names, dry_run=False, versions=None):
        self.asked.append((names, dry_run))
        self.pinned.append(versions)
        results = []
        for n in names:
            results += [{"kind": "GlobalNetworkPolicy", "name": n, "action": "created",
                         "after": {"metadata": {"name": n}}},
                        {"kind": "StagedGlobalNetworkPolicy", "name": n, "action": "deleted",
                         "before": {"metadata": {"name": n}}}]
        return {"dryRun": dry_run, "revision": 7, "results": results}


def test_promote_reports_what_the_server_did():
    client = Client(["a", "b"])
    result = promote(client, ["a", "a"])
    assert client.asked == [(["a"], False)]
    assert result["changed"] is True and result["revision"] == 7
    assert (result["created"], result["deleted"]) == (["a"], ["a"])
    assert (result["promoted"], result["missing"]) == (["a"], [])
    assert [d["before_header"] for d in result["diff"]] == [
        "GlobalNetworkPolicy a", "StagedGlobalNetworkPolicy a"]


def test_check_mode_is_the_servers_dry_run_and_writes_no_revision():
    client = Client(["a"])
    result = promote(client, ["a"], check_mode=True)
    assert client.asked == [(["a"], True)]
    assert result["changed"] is True and result["revision"] is None


def test_names_not_staged_fail_all_named_and_nothing_is_asked():
    client = Client(["a"])
    with pytest.raises(ValueError, match=r"^StagedGlobalNetworkPolicy b, c not found: not "
                       r"staged \(never, or already promoted\); nothing was promoted"):
        promote(client, ["a", "b", "c"])
    assert client.asked == []


def test_with_missing_ignore_the_others_are_promoted():
    client = Client(["a"])
    result = promote(client, ["b", "a"], missing="ignore")
    assert client.asked == [(["a"], False)]
    assert (result["promoted"], result["missing"]) == (["a"], ["b"])


def test_with_missing_ignore_and_none_left_nothing_changes():
    client = Client([])
    result = promote(client, ["a", "b"], missing="ignore")
    assert client.asked == []
    assert result["changed"] is False and result["revision"] is None
    assert result["results"] == [] and result["diff"] == []
    assert (result["promoted"], result["missing"]) == ([], ["a", "b"])


def test_versions_pin_the_names_asked_for_and_only_those():
    client = Client(["a", "b"])
    promote(client, ["a", "b", "c"], missing="ignore",
            versions={"a": "4", "b": "5", "c": "9"})
    assert client.asked == [(["a", "b"], False)] and client.pinned == [{"a": "4", "b": "5"}]
    promote(client, ["a"])
    assert client.pinned[-1] == {}


def test_a_version_for_a_name_not_asked_for_fails_and_nothing_is_asked():
    client = Client(["a", "b"])
    with pytest.raises(ValueError, match=r"^resource_versions: b is not among names$"):
        promote(client, ["a"], versions={"a": "4", "b": "5"})
    assert client.asked == []


def test_with_versions_every_name_needs_one_and_nothing_is_asked_without():
    """A name without a version beside resource_versions was not judged as stored (a
    preview of files, its promotedVersions empty for them): promoted unpinned it would be
    enforced as it is now, unseen; refused, as bulkhead promote --preview refuses it."""
    client = Client(["a", "b"])
    for versions, unpinned in (({"a": "4"}, "b"), ({}, "a")):
        with pytest.raises(ValueError, match=r"^resource_versions: %s has no version" %
                           unpinned):
            promote(client, ["a", "b"], missing="ignore", versions=versions)
    assert client.asked == []
