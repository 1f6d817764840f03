#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: policy_promote
short_description: Make staged policies enforced in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Like C(bulkhead promote NAME...) (C(POST /v1/promote)). Each StagedGlobalNetworkPolicy
    named takes effect, in one server transaction, all or nothing - with C(stagedAction)
    V(Set) (the default) the GlobalNetworkPolicy of its name is written from it, with
    V(Delete) the enforced policy it stands for is deleted; either way the staged copy is
    deleted.
  - A promoted policy is no longer staged, so a second run finds nothing to promote. With
    O(missing=fail) (the default) a name that is not staged fails, naming every such name,
    and nothing is promoted - a misspelt name never passes unseen. With O(missing=ignore)
    those names are left out (RV(missing) lists them); when none is left the task is ok
    and unchanged, so a play that promotes and is run again stays green.
  - Run M(bulkhead.microseg.policy_preview) first to see what the promotion would deny.
  - Needs the admin role; a tier-limited admin only promotes policies of its tiers.
options:
  names:
    description: The StagedGlobalNetworkPolicies to promote, by name (as C(metadata.name), for example V(security.db-ingress)).
    type: list
    elements: str
    required: true
  missing:
    description:
      - What a name that is not staged does - V(fail) the task, nothing promoted, or
        V(ignore) it and promote the others.
    type: str
    choices: [fail, ignore]
    default: fail
  resource_versions:
    description:
      - Pins names to the versions a preview judged - a name and its C(resourceVersion),
        as M(bulkhead.microseg.policy_preview) returns them in RV(bulkhead.microseg.policy_preview#module:preview.promotedVersions).
      - When a pinned policy is staged at another version (changed, or deleted and staged
        anew, after the preview) the server refuses the whole promotion and the task
        fails naming it; nothing is promoted. Preview again and promote what was previewed.
      - Each key must be among O(names), and given (even empty) every name must have one.
        A preview of files not applied gives none, and a name without one would be promoted
        as it is now, unseen, so the task fails and nothing is promoted. A pinned name that
        is not staged follows O(missing).
    type: dict
seealso:
  - module: bulkhead.microseg.policy_preview
  - module: bulkhead.microseg.global_network_policy
  - module: bulkhead.microseg.rollback
  - name: Promoting staged policies
    description: What a promotion writes and deletes, on the server.
    link: https://github.com/bulkhead-microseg/bulkhead/blob/main/docs/server.md#promoting-staged-policies
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.wait
attributes:
  check_mode:
    support: full
    description: The server's dry run of the same promotion; it fails where the real run would, and nothing is written.
  diff_mode:
    support: full
    description: One before/after pair per policy written or deleted.
"""

EXAMPLES = r"""
- name: Promote two staged policies, and wait until every agent enforces them
  bulkhead.microseg.policy_promote:
    names: [security.db-ingress, security.web-ingress]
    wait: true
    wait_timeout: 300
  delegate_to: localhost
  run_once: true

- name: The same, in a play that is run again and again
  bulkhead.microseg.policy_promote:
    names: [security.db-ingress, security.web-ingress]
    missing: ignore
  delegate_to: localhost
  run_once: true
  register: promoted

- name: What was promoted
  ansible.builtin.debug:
    msg: "{{ promoted.promoted }} promoted; {{ promoted.missing }} were not staged"

- name: Promote exactly what a preview judged, refused whole if a staged policy changed since
  bulkhead.microseg.policy_promote:
    names: "{{ preview.preview.promoted }}"
    resource_versions: "{{ preview.preview.promotedVersions }}"
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
results:
  description: One entry per resource the promotion writes or deletes.
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: C(GlobalNetworkPolicy) or C(StagedGlobalNetworkPolicy).
      type: str
      returned: always
      sample: GlobalNetworkPolicy
    name:
      description: Resource name.
      type: str
      returned: always
      sample: security.db-ingress
    action:
      description: What was done to it (or in check mode would be done).
      type: str
      returned: always
      choices: [created, updated, deleted, unchanged]
created:
  description: Names of the enforced policies created.
  returned: always
  type: list
  elements: str
updated:
  description: Names of the enforced policies replaced by their staged version.
  returned: always
  type: list
  elements: str
deleted:
  description: Names of the staged copies, and of the enforced policies a V(Delete) stands for, deleted.
  returned: always
  type: list
  elements: str
promoted:
  description: The names promoted (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [security.db-ingress]
missing:
  description: The names that were not staged, left out (O(missing=ignore)).
  returned: always
  type: list
  elements: str
  sample: []
revision:
  description: The store revision of the promotion; null when nothing was promoted, and in check mode.
  returned: always
  type: int
  sample: 142
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

from ansible.module_utils.six import string_types
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.preview import promote
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait_spec


def main():
    module = BulkheadModule(dict(
        names=dict(type="list", elements="str", required=True),
        missing=dict(type="str", default="fail", choices=["fail", "ignore"]),
        resource_versions=dict(type="dict"),
        **wait_spec()))
    p = module.params
    if not p["names"]:
        module.fail_json(msg="names: give at least one StagedGlobalNetworkPolicy name")
    versions = p["resource_versions"]   # None: not given, no pins
    for name, version in (versions or {}).items():
        if not isinstance(version, string_types) or not version:
            module.fail_json(msg="resource_versions.%s: expected a resourceVersion (text), "
                             "not %r" % (name, version))
    module.run(lambda: promote(module.client, p["names"], p["missing"], module.check_mode,
                               versions))


if __name__ == "__main__":
    main()
