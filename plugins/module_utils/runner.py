# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Decide what to do and report it (kubernetes.core's "runner"): changed, diff, result."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.bulkhead.microseg.plugins.module_utils.service import (
    comparable,
    doc_key,
    merge_labels,
)


def _diff(before, after, name):
    return {"before": comparable(before) if before else {},
            "after": comparable(after) if after else {},
            "before_header": name, "after_header": name}


def ensure(service, desired, state="present", check_mode=False, labels_given=True,
           purge_labels=True):
    """Make one resource present (as `desired`) or absent.

    Returns a dict with `changed`, `action` (created, updated, deleted, unchanged),
    `resource` (the stored document, or in check mode what would be stored; {} when
    absent) and `diff` (before/after without server-owned metadata).
    """
    kind, name = doc_key(desired)
    header = "%s %s" % (kind, name)
    current = service.get(kind, name)

    if state == "absent":
        if current is None:
            return {"changed": False, "action": "unchanged", "resource": {},
                    "diff": _diff(None, None, header)}
        if not check_mode:
            service.delete(current)
        return {"changed": True, "action": "deleted", "resource": {},
                "diff": _diff(current, None, header)}

    desired = merge_labels(desired, current, labels_given, purge_labels)
    verdict = service.preview_one(desired, current)
    if verdict["action"] == "unchanged":
        return {"changed": False, "action": "unchanged", "resource": current,
                "diff": _diff(current, current, header)}
    after = verdict.get("after") or desired
    if check_mode:
        stored = after
    elif current is None:
        stored = service.create(desired)
    else:
        stored = service.update(desired, current)
    return {"changed": True, "action": "created" if current is None else "updated",
            "resource": stored, "diff": _diff(current, stored, header)}


def ensure_many(service, docs, state="present", check_mode=False):
    """Several resources, applied all or nothing (the server's /v1/apply).

    Returns `changed`, `results` (one per document: kind, name, action) and `diff`
    (a list of before/after pairs, one per changed resource)."""
    results, diffs = [], []
    if state == "absent":
        todo = []
        for doc in docs:
            kind, name = doc_key(doc)
            current = service.get(kind, name)
            results.append({"kind": kind, "name": name,
                            "action": "unchanged" if current is None else "deleted"})
            if current is not None:
                todo.append(current)
                diffs.append(_diff(current, None, "%s %s" % (kind, name)))
        if not check_mode:
            # Policies before their tiers: a tier still holding policies is refused.
            for current in sorted(todo, key=lambda d: d["kind"] == "Tier"):
                service.delete(current)
        return {"changed": bool(todo), "results": results, "diff": diffs, "revision": None}

    currents = dict((doc_key(d), service.get(*doc_key(d))) for d in docs)
    verdicts = service.preview(docs)
    changed = [v for v in verdicts if v["action"] != "unchanged"]
    revision = None
    if changed and not check_mode:
        revision = service.apply(docs).get("revision")
    for v in verdicts:
        action = {"created": "created", "configured": "updated"}.get(v["action"], "unchanged")
        results.append({"kind": v["kind"], "name": v["name"], "action": action})
        if action != "unchanged":
            before = currents.get((v["kind"], v["name"]))
            diffs.append(_diff(before, v.get("after"), "%s %s" % (v["kind"], v["name"])))
    return {"changed": bool(changed), "results": results, "diff": diffs,
            "revision": revision}
