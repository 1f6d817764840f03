# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Policy impact preview and promotion from module options: the `POST /v1/preview` body,
the gates a preview is judged by (those of `bulkhead preview --max-denied --protected`,
plus undecided flows), and a promotion that leaves out names no longer staged when asked
to. The server checks every value again and names the field when it refuses one."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json

from ansible.module_utils.six import string_types

from ansible_collections.bulkhead.microseg.plugins.module_utils.flows import unix_seconds
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import converged

PROMOTE_WORDS = ("all", "none")
STAGED = "StagedGlobalNetworkPolicy"


def promote_value(value):
    """The `promote` option as the server takes it: None (the server's default), `all`,
    `none`, or a list of names; ValueError naming the option otherwise."""
    if value is None or value in PROMOTE_WORDS:
        return value
    if isinstance(value, (list, tuple)) and value and \
            all(isinstance(n, string_types) and n for n in value):
        return list(value)
    shown = value[:64] if isinstance(value, string_types) else value
    raise ValueError("promote: %r: give a list of %s names, or all or none"
                     % (shown, STAGED))


def preview_body(params, manifests, now):
    """The `POST /v1/preview` body from the module's options and the manifests (documents
    not yet applied; none: the store as it is)."""
    body = {"hours": params["hours"], "limit": params["limit"]}
    if manifests:
        body["manifests"] = json.dumps(manifests)
    promote = promote_value(params.get("promote"))
    if promote is not None:
        body["promote"] = promote
    if params.get("until") is not None:
        body["until"] = unix_seconds(params["until"], "until", now)
    if params.get("protected") is not None:
        body["protected"] = params["protected"]
    if params.get("enforce") is not None:
        body["enforce"] = params["enforce"]
    return body


def gates(answer, max_denied=None, fail_on_undecided=False):
    """`passed`, and `failed`: one reason per gate the preview fails. max_denied counts
    newly denied connections and protected fails on any newly denied record to or from
    the selector, as `bulkhead preview` does; fail_on_undecided on any undecided record.
    A preview that is not whole (truncated: its totals are lower bounds) fails when any
    gate is given, as `bulkhead preview` fails."""
    failed = []
    if answer.get("truncated") and (max_denied is not None or fail_on_undecided or
                                    "protected" in answer):
        failed.append("truncated: the preview is incomplete (%s); its totals are lower "
                      "bounds" % answer.get("stopped", "more records than the server "
                                            "judges at once"))
    totals = answer["totals"]
    denied = totals["newlyDenied"]["connections"]
    if max_denied is not None and denied > max_denied:
        failed.append("max_denied: %d connections would be newly denied (at most %d)"
                      % (denied, max_denied))
    protected = answer.get("protected")
    if protected and protected["records"]:
        failed.append("protected: %d connections to or from %s would be newly denied"
                      % (protected["connections"], protected["selector"]))
    undecided = totals["undecided"]
    if fail_on_undecided and undecided["records"]:
        failed.append("fail_on_undecided: %d connections in %d records cannot be decided "
                      "from the stored fields"
                      % (undecided["connections"], undecided["records"]))
    return {"passed": not failed, "failed": failed}


def judged(client, params, manifests, now):
    """The module's result: the preview and its gates."""
    if params.get("max_denied") is not None and params["max_denied"] < 0:
        raise ValueError("max_denied: %d: give 0 or more connections" % params["max_denied"])
    answer = client.preview(preview_body(params, manifests, now))
    return {"changed": False, "preview": answer,
            "gates": gates(answer, params.get("max_denied"), params.get("fail_on_undecided"))}


def promote(client, names, missing="fail", check_mode=False, versions=None):
    """Promote the staged policies `names` (a dry run in check mode), as the module reports
    it: results, created/updated/deleted, diff, revision, and `promoted` and `missing`.

    A name that is not staged (never was, or already promoted) fails with every such name
    listed and nothing promoted; with `missing="ignore"` it is left out, and when none is
    left nothing is asked of the server and nothing changes. `versions` (name:
    resourceVersion, as a preview's `promotedVersions`) pins names to the versions a
    preview judged: the server refuses the whole promotion when one changed since. Given
    (even empty), every name needs one: one without was not judged as stored (a preview of
    files) and would be promoted as it is now, unseen."""
    strays = sorted(set(versions or {}) - set(names))
    if strays:
        raise ValueError("resource_versions: %s is not among names" % strays[0])
    unpinned = [n for n in names if versions is not None and n not in versions]
    if unpinned:
        raise ValueError("resource_versions: %s has no version: the preview did not judge "
                         "it as stored (a preview of files not applied has none for them); "
                         "apply it, preview again and promote what that preview judged; "
                         "nothing was promoted" % unpinned[0])
    versions = versions or {}
    names = list(dict.fromkeys(names))
    staged = set(d["metadata"]["name"] for d in client.list(STAGED))
    absent = [n for n in names if n not in staged]
    if absent and missing == "fail":
        raise ValueError("%s %s not found: not staged (never, or already promoted); nothing "
                         "was promoted. With missing=ignore the names that are staged are "
                         "promoted and the others left out"
                         % (STAGED, ", ".join(absent)))
    present = [n for n in names if n not in absent]
    pinned = dict((n, versions[n]) for n in present if n in versions)
    answer = client.promote(present, dry_run=check_mode, versions=pinned) if present else \
        {"dryRun": check_mode, "revision": None, "results": []}
    result = converged(answer)
    result.update(promoted=present, missing=absent)
    return result
