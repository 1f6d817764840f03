"""module_utils: normalisation, labels, and the runner's decisions (a fake server)."""

from __future__ import annotations

import copy

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils import runner, service
from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    ApiError,
    strip_server_fields,
)


def hep(name="web-1", labels=None, rv=None, ips=("198.18.0.11",)):
    doc = {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
           "metadata": {"name": name}, "spec": {"node": name, "expectedIPs": list(ips)}}
    if labels:
        doc["metadata"]["labels"] = dict(labels)
    if rv:
        doc["metadata"]["resourceVersion"] = rv
    return doc


class FakeService:
    """Enough of ResourceService: a dict store that compares like the server does."""

    def __init__(self, *docs):
        self.store = {(d["kind"], d["metadata"]["name"]): copy.deepcopy(d) for d in docs}
        self.writes = []
        self.rv = 10

    def get(self, kind, name):
        return copy.deepcopy(self.store.get((kind, name)))

    def _verdict(self, doc):
        key = service.doc_key(doc)
        old = self.store.get(key)
        after = service.comparable(doc)
        if old is None:
            return {"kind": key[0], "name": key[1], "action": "created", "after": after}
        if service.comparable(old) == after:
            return {"kind": key[0], "name": key[1], "action": "unchanged"}
        return {"kind": key[0], "name": key[1], "action": "configured",
                "before": service.comparable(old), "after": after}

    def preview_one(self, doc, current):
        return self._verdict(doc)

    def preview(self, docs):
        return [self._verdict(d) for d in docs]

    def _put(self, doc):
        self.rv += 1
        doc = copy.deepcopy(doc)
        doc["metadata"]["resourceVersion"] = str(self.rv)
        self.store[service.doc_key(doc)] = doc
        self.writes.append(("put", doc["metadata"]["name"]))
        return doc

    def create(self, doc):
        return self._put(doc)

    def update(self, doc, current):
        return self._put(doc)

    def apply(self, docs):
        for d in docs:
            self._put(d)
        return {"revision": self.rv}

    def remove(self, docs, dry_run=False):
        """As /v1/delete: all or nothing, a Tier only with every policy it holds."""
        keys = [service.doc_key(d) for d in docs]
        for kind, name in keys:
            if kind != "Tier":
                continue
            held = [k[1] for k, d in self.store.items() if k[0].endswith("NetworkPolicy")
                    and d["spec"].get("tier") == name and k not in keys]
            if held:
                raise ApiError(409, "Conflict", "Tier %s still holds policies: %s"
                               % (name, ", ".join(held)))
        results = [{"kind": k[0], "name": k[1],
                    "action": "deleted" if k in self.store else "absent"} for k in keys]
        if dry_run or not any(r["action"] == "deleted" for r in results):
            return {"dryRun": dry_run, "revision": None, "results": results}
        self.rv += 1
        for key in sorted(keys, key=lambda k: k[0] == "Tier"):
            if key in self.store:
                del self.store[key]
                self.writes.append(("delete", key[1]))
        return {"dryRun": False, "revision": self.rv, "results": results}


def test_prune_drops_what_was_not_set():
    assert service.prune({"a": None, "b": [], "c": {}, "d": {"e": None}, "f": 0,
                          "g": False, "h": [{"x": None, "y": 1}]}) == \
        {"f": 0, "g": False, "h": [{"y": 1}]}


def test_make_resource_stringifies_labels():
    doc = service.make_resource("Tier", "t", {"order": None}, {"tier": 1})
    assert doc == {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                   "metadata": {"name": "t", "labels": {"tier": "1"}}, "spec": {}}


def test_make_resource_label_values_follow_one_rule():
    doc = service.make_resource("HostEndpoint", "h", {}, {"pci": True, "old": False,
                                                          "prio": 1, "w": 2.5, "s": "x"})
    assert doc["metadata"]["labels"] == {"pci": "true", "old": "false", "prio": "1",
                                         "w": "2.5", "s": "x"}
    with pytest.raises(ValueError, match="labels: label owner: a label value cannot be null"):
        service.make_resource("HostEndpoint", "h", {}, {"owner": None})
    with pytest.raises(ValueError, match="label l: .* not list"):
        service.make_resource("HostEndpoint", "h", {}, {"l": [1]})


def test_purge_keeps_the_collections_own_labels():
    current = hep(labels={"a": "1", "microseg.bulkhead.io/managed-by": "east"})
    out = service.merge_labels(hep(labels={"b": "2"}), current, True, True)
    assert out["metadata"]["labels"] == {"b": "2", "microseg.bulkhead.io/managed-by": "east"}


@pytest.mark.parametrize("given,purge,expected", [
    (True, True, {"b": "2"}),
    (True, False, {"a": "1", "b": "2"}),
    (False, True, {"a": "1"}),
    (False, False, {"a": "1"}),
])
def test_merge_labels(given, purge, expected):
    current = hep(labels={"a": "1"})
    desired = hep(labels={"b": "2"} if given else None)
    assert service.merge_labels(desired, current, given, purge)["metadata"]["labels"] == expected


def test_merge_labels_keeps_annotations_and_drops_empty_labels():
    current = hep()
    current["metadata"]["annotations"] = {"note": "x"}
    out = service.merge_labels(hep(), current, True, True)
    assert "labels" not in out["metadata"]
    assert out["metadata"]["annotations"] == {"note": "x"}


def test_canonical_kind():
    assert service.canonical_kind("gnp") == "GlobalNetworkPolicy"
    assert service.canonical_kind("HostEndpoints") == "HostEndpoint"
    assert service.canonical_kind("Weird") == "Weird"
    assert service.canonical_kind(None) is None


def test_comparable_hides_server_fields():
    doc = hep(rv="7")
    doc["metadata"].update(uid="u", creationTimestamp="t", labels={})
    assert service.comparable(doc)["metadata"] == {"name": "web-1"}
    assert strip_server_fields(None) is None


def test_ensure_create_then_unchanged():
    svc = FakeService()
    first = runner.ensure(svc, hep(labels={"a": "1"}))
    assert first["changed"] and first["action"] == "created"
    assert first["diff"]["before"] == {}
    assert first["resource"]["metadata"]["resourceVersion"] == "11"
    second = runner.ensure(svc, hep(labels={"a": "1"}))
    assert not second["changed"] and second["action"] == "unchanged"
    assert second["diff"]["before"] == second["diff"]["after"]
    assert svc.writes == [("put", "web-1")]


def test_ensure_check_mode_writes_nothing():
    svc = FakeService(hep(ips=("198.18.0.1",), rv="3"))
    result = runner.ensure(svc, hep(ips=("198.18.0.2",)), check_mode=True)
    assert result["changed"] and result["action"] == "updated"
    assert result["diff"]["before"]["spec"]["expectedIPs"] == ["198.18.0.1"]
    assert result["diff"]["after"]["spec"]["expectedIPs"] == ["198.18.0.2"]
    assert svc.writes == []


def test_ensure_absent():
    svc = FakeService(hep(rv="3"))
    check = runner.ensure(svc, hep(), "absent", check_mode=True)
    assert check["changed"] and check["revision"] is None
    assert svc.writes == []
    result = runner.ensure(svc, hep(), "absent")
    assert result["changed"] and result["diff"]["after"] == {}
    assert result["revision"] == 11
    assert not runner.ensure(svc, hep(), "absent")["changed"]


def test_ensure_absent_check_mode_fails_as_the_real_run():
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t"},
            "spec": {}}
    policy = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
              "metadata": {"name": "t.p"}, "spec": {"tier": "t"}}
    svc = FakeService(tier, policy)
    for check_mode in (True, False):
        with pytest.raises(ApiError, match="still holds policies: t.p"):
            runner.ensure(svc, tier, "absent", check_mode=check_mode)
    assert svc.writes == []


def test_ensure_many_absent_is_all_or_nothing():
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t"},
            "spec": {}}
    policy = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
              "metadata": {"name": "t.p"}, "spec": {"tier": "t"}}
    netset = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
              "metadata": {"name": "s"}, "spec": {}}
    svc = FakeService(tier, policy, netset)
    with pytest.raises(ApiError):
        runner.ensure_many(svc, [netset, tier], "absent")
    assert svc.writes == [] and len(svc.store) == 3


def test_ensure_many_and_delete_order():
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t"},
            "spec": {}}
    policy = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
              "metadata": {"name": "t.p"}, "spec": {"tier": "t"}}
    svc = FakeService()
    result = runner.ensure_many(svc, [tier, policy])
    assert result["changed"] and result["revision"] == 12
    assert [r["action"] for r in result["results"]] == ["created", "created"]
    assert not runner.ensure_many(svc, [tier, policy])["changed"]
    gone = runner.ensure_many(svc, [tier, policy], "absent")
    assert svc.writes[-2:] == [("delete", "t.p"), ("delete", "t")]
    assert len(gone["diff"]) == 2


def test_converged_reports_the_servers_answer():
    answer = {"dryRun": False, "revision": 40, "results": [
        {"kind": "GlobalNetworkPolicy", "name": "t.a", "action": "created", "after": {"a": 1}},
        {"kind": "GlobalNetworkPolicy", "name": "t.b", "action": "configured",
         "before": {"b": 1}, "after": {"b": 2}},
        {"kind": "GlobalNetworkPolicy", "name": "t.c", "action": "unchanged"},
        {"kind": "GlobalNetworkPolicy", "name": "t.d", "action": "deleted", "before": {"d": 1}},
    ]}
    out = runner.converged(answer)
    assert out["changed"] and out["revision"] == 40
    assert (out["created"], out["updated"], out["deleted"]) == (["t.a"], ["t.b"], ["t.d"])
    assert [d["after"] for d in out["diff"]] == [{"a": 1}, {"b": 2}, {}]
    dry = runner.converged(dict(answer, dryRun=True))
    assert dry["changed"] and dry["revision"] is None
    assert not runner.converged({"dryRun": False, "revision": None, "results": []})["changed"]
