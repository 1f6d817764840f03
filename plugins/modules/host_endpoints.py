#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: host_endpoints
short_description: Sync the host endpoints an inventory owns with bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Calico's automatic host endpoints, driven by inventory instead of Kubernetes. Given
    every host endpoint a play computed (for example C(bulkhead_host_endpoint) from the
    P(bulkhead.microseg.endpoints#inventory) inventory plugin), creates and updates them,
    and deletes the host endpoints this inventory owns that are no longer in the list.
  - Ownership is a label, O(managed_by_label) with the value O(owner), added to every
    endpoint written. Host endpoints without it, or owned by another inventory, are never
    deleted, and are only taken over with O(adopt=true).
  - Creations, updates and deletions are one server transaction, all or nothing (with
    O(purge=true), C(POST /v1/sync) of the owner's host endpoints, or C(POST /v1/delete)
    when there is nothing to write), so agents never see half of a change; the server
    validates every endpoint first.
  - The endpoints O(keep) keeps go back to the server as the module read them, with their
    C(resourceVersion) as a precondition, so a change another writer made to one after
    that reading is refused (409, nothing written), not undone. The module then reads and
    syncs again, up to three times in all, and fails naming the endpoint if it still
    conflicts.
  - A change larger than one transaction of the datastore (etcd takes 128 operations by
    default, C(--max-txn-ops)) is refused by the server before anything is written; the
    module then writes the endpoints and the deletes as two transactions, and warns.
options:
  endpoints:
    description:
      - The host endpoints that should exist, each a C(HostEndpoint) document
        (C(apiVersion), C(kind) may be left out; C(metadata.name) and C(spec.node) are needed).
    type: list
    elements: dict
    required: true
  owner:
    description:
      - Who owns these endpoints, for example the name of the inventory or the team.
        Endpoints labeled with another owner are not touched.
    type: str
    required: true
  managed_by_label:
    description: The label key that records the owner.
    type: str
    default: microseg.bulkhead.io/managed-by
  purge:
    description: Delete the endpoints this owner has on the server that are not in O(endpoints).
    type: bool
    default: true
  keep:
    description:
      - Names of endpoints this owner has on the server that the purge leaves as they are,
        though they are not in O(endpoints); for example those of hosts still in the
        inventory whose endpoint could not be made this time (no address known).
      - An endpoint both here and in O(endpoints) is written as O(endpoints) says.
    type: list
    elements: str
    default: []
  adopt:
    description:
      - Take over endpoints of the same name that have no owner label or another owner.
        With V(false) the module fails naming them, and writes nothing.
    type: bool
    default: false
seealso:
  - module: bulkhead.microseg.host_endpoint
  - module: bulkhead.microseg.agent_status
  - plugin: bulkhead.microseg.endpoints
    plugin_type: inventory
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.wait
attributes:
  check_mode:
    support: full
    description: Validated by the server (dry run) and compared; nothing is written.
  diff_mode:
    support: full
    description: One before/after pair per endpoint created, updated or deleted.
"""

EXAMPLES = r"""
- name: Host endpoints for every host of this inventory, and only those
  bulkhead.microseg.host_endpoints:
    owner: datacenter-east
    endpoints: >-
      {{ groups['all'] | map('extract', hostvars, 'bulkhead_host_endpoint')
         | select('defined') | list }}
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
results:
  description: One entry per endpoint written or deleted (and unchanged ones).
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: Always C(HostEndpoint).
      type: str
      returned: always
    name:
      description: Endpoint name.
      type: str
      returned: always
      sample: web-1
    action:
      description: What was done to it (or in check mode would be done).
      type: str
      returned: always
      choices: [created, updated, deleted, unchanged]
      sample: deleted
created:
  description: Names of the endpoints created.
  returned: always
  type: list
  elements: str
  sample: [web-3]
updated:
  description: Names of the endpoints updated.
  returned: always
  type: list
  elements: str
  sample: []
deleted:
  description: Names of the owned endpoints deleted because they are gone from O(endpoints).
  returned: always
  type: list
  elements: str
  sample: [web-old]
kept:
  description: Names of the owned endpoints not in O(endpoints) that O(keep) kept from the purge.
  returned: always
  type: list
  elements: str
  sample: [web-2]
revision:
  description:
    - The store revision of the last write (creations and updates are one transaction,
      deletions a second one); the agents enforce the change once they report it
      (O(wait=true) waits for that). Null when nothing was written, and in check mode.
  returned: always
  type: int
  sample: 57
converged:
  description: Every agent that reports its status enforces RV(revision) (O(wait=true) only).
  returned: when O(wait=true) and something was written
  type: bool
  sample: true
wait_elapsed:
  description: Seconds the module waited for every agent to enforce RV(revision) (O(wait=true) only).
  returned: when O(wait=true) and something was written
  type: float
  sample: 0.412
"""

import copy

from ansible_collections.bulkhead.microseg.plugins.module_utils.api import API_VERSION, OWNER_LABEL, SERVER_FIELDS
from ansible_collections.bulkhead.microseg.plugins.module_utils.client import ApiError
from ansible_collections.bulkhead.microseg.plugins.module_utils.labels import normalize_labels
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import converged, ensure_many
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait_spec


def owned_docs(endpoints, owner, label):
    """Complete documents with apiVersion, kind and the owner label."""
    docs, seen = [], set()
    for i, ep in enumerate(endpoints):
        doc = copy.deepcopy(ep)
        doc.setdefault("apiVersion", API_VERSION)
        doc.setdefault("kind", "HostEndpoint")
        meta = doc.get("metadata")
        if doc["kind"] != "HostEndpoint" or not isinstance(meta, dict) or not meta.get("name"):
            raise ValueError("endpoints[%d]: needs kind HostEndpoint and metadata.name" % i)
        if not isinstance(meta["name"], str):
            raise ValueError("endpoints[%d]: metadata.name: %r is not a string" % (i, meta["name"]))
        if meta["name"] in seen:
            raise ValueError("endpoints[%d]: HostEndpoint %s is listed twice" % (i, meta["name"]))
        seen.add(meta["name"])
        for key in SERVER_FIELDS:
            meta.pop(key, None)
        meta["labels"] = normalize_labels(meta.get("labels") or {},
                                          "endpoints[%d]: metadata.labels" % i)
        meta["labels"][label] = owner
        docs.append(doc)
    return docs


def stripped(doc):
    """A stored endpoint as a document to write back: what the server owns left out."""
    doc = copy.deepcopy(doc)
    for key in SERVER_FIELDS:
        doc.get("metadata", {}).pop(key, None)
    return doc


def kept_doc(doc):
    """A kept endpoint sent back as it was read, with its resourceVersion: the sync's
    preconditions then refuse it (409) if another writer changed it since."""
    version = doc.get("metadata", {}).get("resourceVersion")
    out = stripped(doc)
    if version is not None:
        out["metadata"]["resourceVersion"] = version
    return out


# A purge's one transaction refused because the owner's endpoints changed between the
# module's reading and the server's commit (409: nothing written): read and plan again,
# up to this many times in all.
SYNC_ATTEMPTS = 3


class ChangedMeanwhile(Exception):
    """The server refused the purge's transaction with 409; nothing was written."""

    def __init__(self, error):
        self.error = error
        super(ChangedMeanwhile, self).__init__(error.message)


def sync(module, service):
    p = module.params
    label, owner = p["managed_by_label"], p["owner"]
    docs = owned_docs(p["endpoints"], owner, label)
    wanted = set(d["metadata"]["name"] for d in docs)
    existing = dict((d["metadata"]["name"], d) for d in service.find("HostEndpoint"))
    foreign = [n for n in sorted(wanted) if n in existing and
               (existing[n]["metadata"].get("labels") or {}).get(label) != owner]
    if foreign and not p["adopt"]:
        raise ValueError("HostEndpoint %s exist(s) and are not owned by %s (label %s); set "
                         "adopt=true to take them over" % (", ".join(foreign), owner, label))
    keep = set(p["keep"] or [])
    owned = [n for n in sorted(existing) if n not in wanted and
             (existing[n]["metadata"].get("labels") or {}).get(label) == owner]
    gone = [n for n in owned if n not in keep]
    result = {"changed": False, "results": [], "diff": []}
    if p["purge"] and gone and not docs:
        # Deletes alone: one transaction of POST /v1/delete. Never an empty sync, which a
        # server from before its kind=HostEndpoint takes for the sync of the owner's
        # policies (every policy of that owner label deleted).
        result = ensure_many(service, [existing[n] for n in gone], "absent",
                             module.check_mode)
    elif p["purge"] and gone:
        # Writes and deletes in one server transaction (POST /v1/sync of the owner's host
        # endpoints), all or nothing; the endpoints kept go in as they are.
        # The kept ones leave the results (the server's "unchanged"); one both kept and
        # listed in endpoints is written as listed, and reported.
        kept = [n for n in owned if n in keep]
        # The kept ones carry the version read: one changed since is refused, not undone.
        try:
            answer = module.client.sync(docs + [kept_doc(existing[n]) for n in kept],
                                        owner=owner, dry_run=module.check_mode,
                                        kind="HostEndpoint", label=label, adopt=p["adopt"],
                                        preconditions=True)
        except ApiError as e:
            if e.status == 409:
                raise ChangedMeanwhile(e)
            if e.status != 413:
                raise
            # Larger than one transaction of the datastore (etcd's --max-txn-ops), and
            # refused before anything was written: the writes, then the deletes.
            module.warn("the change is larger than one datastore transaction (%s); written "
                        "in two, the endpoints first, then the deletes" % e.message)
            result = ensure_many(service, docs, "present", module.check_mode)
            removed = ensure_many(service, [existing[n] for n in gone], "absent",
                                  module.check_mode)
            result["changed"] = result["changed"] or removed["changed"]
            result["results"] += removed["results"]
            result["diff"] += removed["diff"]
            result["revision"] = removed["revision"] or result.get("revision")
        else:
            result = converged(answer)
            result["results"] = [r for r in result["results"] if r["name"] not in kept]
    elif docs:
        result = ensure_many(service, docs, "present", module.check_mode)
    for action in ("created", "updated", "deleted"):
        result[action] = [r["name"] for r in result["results"] if r["action"] == action]
    result.setdefault("revision", None)
    result["kept"] = [n for n in owned if n in keep] if p["purge"] else []
    return result


def main():
    module = BulkheadModule(dict(
        endpoints=dict(type="list", elements="dict", required=True),
        owner=dict(type="str", required=True),
        managed_by_label=dict(type="str", default=OWNER_LABEL),
        purge=dict(type="bool", default=True),
        adopt=dict(type="bool", default=False),
        keep=dict(type="list", elements="str", default=[]),
        **wait_spec()
    ))
    service = module.service

    def run():
        for attempt in range(1, SYNC_ATTEMPTS + 1):
            try:
                return sync(module, service)
            except ValueError as e:
                module.fail_json(msg=str(e))
            except ChangedMeanwhile as e:
                if attempt == SYNC_ATTEMPTS:
                    module.fail_json(msg="%s (the owner's host endpoints changed while the "
                                         "module read and wrote them, %d times in a row)"
                                     % (e.error.message, SYNC_ATTEMPTS))

    module.run(run)


if __name__ == "__main__":
    main()
