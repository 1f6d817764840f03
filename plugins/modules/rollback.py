#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: rollback
short_description: Restore every resource of bulkhead-server to what it was at a revision
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Like C(bulkhead rollback --to-revision N). Every resource goes back to what it was at
    store revision O(revision), and resources created after it are deleted, in one server
    transaction, all or nothing. The rollback is a new revision; the history keeps both.
  - Needs an admin certificate without tier limits.
options:
  revision:
    description:
      - The store revision to go back to, for example RV(bulkhead.microseg.resource#module:revision)
        of an earlier task or one listed by M(bulkhead.microseg.history_info). A revision older
        than the history the server keeps fails (HTTP 410).
    type: int
    required: true
seealso:
  - module: bulkhead.microseg.history_info
  - module: bulkhead.microseg.export
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.wait
attributes:
  check_mode:
    support: full
    description: The server's dry run of the same rollback; nothing is written.
  diff_mode:
    support: full
    description: One before/after pair per resource the rollback creates, updates or deletes.
"""

EXAMPLES = r"""
- name: Note the revision before a change
  bulkhead.microseg.export:
  register: before_change
  delegate_to: localhost
  run_once: true

- name: Go back to it, and wait until the agents enforce it again
  bulkhead.microseg.rollback:
    revision: "{{ before_change.revision }}"
    wait: true
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
results:
  description: One entry per resource the rollback touches or keeps.
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: Resource kind.
      type: str
      returned: always
    name:
      description: Resource name.
      type: str
      returned: always
    action:
      description: What was done to it (or in check mode would be done).
      type: str
      returned: always
      choices: [created, updated, deleted, unchanged]
created:
  description: Names of the resources created again.
  returned: always
  type: list
  elements: str
updated:
  description: Names of the resources put back as they were.
  returned: always
  type: list
  elements: str
deleted:
  description: Names of the resources created after O(revision), deleted.
  returned: always
  type: list
  elements: str
revision:
  description: The new store revision the rollback wrote; null when nothing changed, and in check mode.
  returned: always
  type: int
  sample: 131
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

from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import converged
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait_spec


def main():
    module = BulkheadModule(dict(revision=dict(type="int", required=True), **wait_spec()))
    module.run(lambda: converged(module.client.rollback(module.params["revision"],
                                                        dry_run=module.check_mode)))


if __name__ == "__main__":
    main()
