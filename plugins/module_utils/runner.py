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


def revision_of(doc):
    """The store revision that wrote `doc` (its resourceVersion), or None."""
    version = ((doc or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(version)
    except (TypeError, ValueError):
        return None


def _diff(before, after, name):
    return {"before": comparable(before) if before else {},
            "after": comparable(after) if after else {},
            "before_header": name, "after_header": name}


def ensure(service, desired, state="present", check_mode=False, labels_given=True,
           purge_labels=True):
    """Make one resource present (as `desired`) or absent.

    Returns a dict with `changed`, `action` (created, updated, deleted, unchanged),
    `resource` (the stored document, or in check mode what would be stored; {} when
    absent), `diff` (before/after without server-owned metadata) and `revision` (the
    store revision of the write; None when nothing was written).

    A delete goes through the server in check mode too (a dry run), so check mode fails
    where the real run would (a Tier that still holds policies).
    """
    kind, name = doc_key(desired)
    header = "%s %s" % (kind, name)
    current = service.get(kind, name)

    if state == "absent":
        if current is None:
            return {"changed": False, "action": "unchanged", "resource": {},
                    "diff": _diff(None, None, header), "revision": None}
        answer = service.remove([current], dry_run=check_mode)
        gone = any(r.get("action") == "deleted" for r in answer.get("results") or [])
        return {"changed": gone, "action": "deleted" if gone else "unchanged", "resource": {},
                "diff": _diff(current if gone else None, None, header),
                "revision": answer.get("revision")}

    desired = merge_labels(desired, current, labels_given, purge_labels)
    verdict = service.preview_one(desired, current)
    if verdict["action"] == "unchanged":
        return {"changed": False, "action": "unchanged", "resource": current,
                "diff": _diff(current, current, header), "revision": None}
    after = verdict.get("after") or desired
    if check_mode:
        stored = after
    elif current is None:
        stored = service.create(desired)
    else:
        stored = service.update(desired, current)
    return {"changed": True, "action": "created" if current is None else "updated",
            "resource": stored, "diff": _diff(current, stored, header),
            "revision": None if check_mode else revision_of(stored)}


def ensure_many(service, docs, state="present", check_mode=False):
    """Several resources, applied all or nothing (the server's /v1/apply).

    Returns `changed`, `results` (one per document: kind, name, action) and `diff`
    (a list of before/after pairs, one per changed resource)."""
    results, diffs = [], []
    if state == "absent":
        # One server transaction, all or nothing (a dry run in check mode): the results
        # are the server's, so they never claim what did not happen.
        keys = []
        for doc in docs:
            if doc_key(doc) not in keys:
                keys.append(doc_key(doc))
        currents = dict((key, service.get(*key)) for key in keys)
        answer = service.remove(docs, dry_run=check_mode)
        done = dict(((r["kind"], r["name"]), r["action"]) for r in answer.get("results") or [])
        for kind, name in keys:
            deleted = done.get((kind, name)) == "deleted"
            results.append({"kind": kind, "name": name,
                            "action": "deleted" if deleted else "unchanged"})
            if deleted:
                diffs.append(_diff(currents[(kind, name)], None, "%s %s" % (kind, name)))
        return {"changed": bool(diffs), "results": results, "diff": diffs,
                "revision": answer.get("revision")}

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


def converged(answer, header_prefix=""):
    """The module result from a sync or rollback answer (the server's results, with
    `before`/`after` per changed resource): changed, results, diff, revision."""
    results, diffs = [], []
    for r in answer.get("results") or []:
        action = {"configured": "updated"}.get(r["action"], r["action"])
        results.append({"kind": r["kind"], "name": r["name"], "action": action})
        if action != "unchanged":
            diffs.append({"before": r.get("before") or {}, "after": r.get("after") or {},
                          "before_header": "%s%s %s" % (header_prefix, r["kind"], r["name"]),
                          "after_header": "%s%s %s" % (header_prefix, r["kind"], r["name"])})
    out = {"changed": bool(diffs), "results": results, "diff": diffs,
           "revision": None if answer.get("dryRun") else answer.get("revision")}
    for action in ("created", "updated", "deleted"):
        out[action] = [r["name"] for r in results if r["action"] == action]
    return out
