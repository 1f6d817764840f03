#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: global_network_policies
short_description: Make a folder of policies exactly the policies of a tier or an owner
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Declarative policy sync, as M(bulkhead.microseg.host_endpoints) is for endpoints. The
    C(GlobalNetworkPolicy) and C(StagedGlobalNetworkPolicy) documents given (a folder, a
    file or a list) become exactly the policies of a tier (O(tier)) or of an owner
    (O(owner)). New ones are created, changed ones updated, and the other policies of that
    tier or owner deleted (pruned), all in one server transaction, all or nothing.
  - With O(tier), a document without C(spec.tier) is put in that tier, and one in another
    tier is refused. With O(owner), every document gets the label
    C(microseg.bulkhead.io/managed-by) with the owner as value; policies of another owner,
    or without the label, are never deleted, and one of the same name is refused.
options:
  tier:
    description: Sync the policies of this tier. Mutually exclusive with O(owner).
    type: str
  owner:
    description:
      - Sync the policies labeled C(microseg.bulkhead.io/managed-by=OWNER), in any tier.
        Mutually exclusive with O(tier).
    type: str
  src:
    description:
      - A folder (its C(*.yaml), C(*.yml) and C(*.json) files, in name order, not its
        subfolders) or a file of policies. Mutually exclusive with O(definition).
      - A folder or file without a document fails, naming it, and nothing is deleted (as
        C(bulkhead apply -f) refuses one); to delete every policy give O(definition=[]).
      - A relative path is looked up on the controller in the role's C(files/), the play's
        C(files/), then relative to the playbook, as M(bulkhead.microseg.resource) does.
    type: path
  definition:
    description:
      - The policies, as a list of dicts, a dict, or YAML text. An empty list deletes every
        policy of the tier or owner.
      - YAML text without a document fails, as O(src) without one does, so a template or
        a file that rendered or read nothing never empties the tier or owner; give V([])
        to delete every policy.
    type: raw
seealso:
  - module: bulkhead.microseg.host_endpoints
  - module: bulkhead.microseg.global_network_policy
  - module: bulkhead.microseg.rollback
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.wait
attributes:
  check_mode:
    support: full
    description: The server's dry run of the same sync; it fails where the real run would.
  diff_mode:
    support: full
    description: One before/after pair per policy created, updated or deleted.
"""

EXAMPLES = r"""
- name: The platform tier holds exactly the policies of policies/platform/
  bulkhead.microseg.global_network_policies:
    tier: platform
    src: policies/platform/
  delegate_to: localhost
  run_once: true

- name: The policies this team owns, in whichever tier, and wait until they are enforced
  bulkhead.microseg.global_network_policies:
    owner: team-payments
    definition: "{{ lookup('ansible.builtin.template', 'payments-policies.yaml.j2') }}"
    wait: true
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
results:
  description: One entry per policy written, left unchanged or deleted.
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: C(GlobalNetworkPolicy) or C(StagedGlobalNetworkPolicy).
      type: str
      returned: always
    name:
      description: Policy name.
      type: str
      returned: always
      sample: platform.ssh
    action:
      description: What was done to it (or in check mode would be done).
      type: str
      returned: always
      choices: [created, updated, deleted, unchanged]
created:
  description: Names of the policies created.
  returned: always
  type: list
  elements: str
updated:
  description: Names of the policies updated.
  returned: always
  type: list
  elements: str
deleted:
  description: Names of the policies of the tier or owner deleted because they are not given.
  returned: always
  type: list
  elements: str
  sample: [platform.old-rule]
revision:
  description: The store revision of the sync; null when nothing changed, and in check mode.
  returned: always
  type: int
  sample: 88
converged:
  description: Every agent that reports its status enforces RV(revision) (O(wait=true) only).
  returned: when O(wait=true) and something was written
  type: bool
wait_elapsed:
  description: Seconds the module waited for every agent to enforce RV(revision) (O(wait=true) only).
  returned: when O(wait=true) and something was written
  type: float
  sample: 0.412
"""

import copy

from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.six import string_types

from ansible_collections.bulkhead.microseg.plugins.module_utils.api import OWNER_LABEL
from ansible_collections.bulkhead.microseg.plugins.module_utils.documents import check_named, load
from ansible_collections.bulkhead.microseg.plugins.module_utils.labels import normalize_labels
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import converged
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait_spec


def scoped(docs, tier, owner):
    """The documents with the tier filled in, or the owner label set."""
    out = []
    for i, doc in enumerate(docs):
        doc = copy.deepcopy(doc)
        doc.setdefault("apiVersion", "projectcalico.org/v3")
        meta = doc["metadata"]
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            meta.pop(key, None)
        where = "document %d: %s %s: metadata.labels" % (i + 1, doc["kind"], meta["name"])
        labels = normalize_labels(meta.get("labels") or {}, where)
        if tier is not None:
            spec = doc.setdefault("spec", {})
            if isinstance(spec, dict):
                spec.setdefault("tier", tier)
        else:
            labels[OWNER_LABEL] = owner
        if labels:
            meta["labels"] = labels
        out.append(doc)
    return out


def main():
    module = BulkheadModule(
        dict(tier=dict(type="str"), owner=dict(type="str"),
             src=dict(type="path"), definition=dict(type="raw"), **wait_spec()),
        mutually_exclusive=[("tier", "owner"), ("src", "definition")],
        required_one_of=[("tier", "owner"), ("src", "definition")],
    )
    p = module.params
    try:
        docs = load(p["definition"], p["src"])
        if not docs and (p["src"] or isinstance(p["definition"], string_types)):
            # An empty list is the one way to ask for every policy to go: a folder, file
            # or text that holds nothing is far more often a mistake (a wrong folder, a
            # template that rendered nothing) than a wish to empty the tier or owner.
            what = "src: %s holds no document (in a *.yaml, *.yml or *.json file)" % p["src"] \
                if p["src"] else "definition: the text holds no document"
            scope = "tier %s" % p["tier"] if p["tier"] is not None else "owner %s" % p["owner"]
            raise ValueError("%s: nothing was synced, since with none every policy of the %s "
                             "would be deleted; to delete them all, give definition: []"
                             % (what, scope))
        check_named(docs)
        docs = scoped(docs, p["tier"], p["owner"])
    except (OSError, IOError, ValueError) as e:
        module.fail_json(msg=to_text(e))
    module.run(lambda: converged(module.client.sync(docs, tier=p["tier"], owner=p["owner"],
                                                    dry_run=module.check_mode)))


if __name__ == "__main__":
    main()
