#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: history_info
short_description: Who changed what in bulkhead-server, at which revision
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - The audit trail, newest first, as C(bulkhead history) shows it - each entry a store
    revision, when, who (the certificate's subject) with which role, and what changed.
  - Needs the admin or the viewer role.
options:
  limit:
    description: At most this many entries (1 to 1000).
    type: int
    default: 100
  kind:
    description: Only changes to resources of this kind (C(GlobalNetworkPolicy), C(gnp), ...).
    type: str
  name:
    description: Only changes to resources of this name.
    type: str
seealso:
  - module: bulkhead.microseg.rollback
  - module: bulkhead.microseg.export
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.read_only
"""

EXAMPLES = r"""
- name: Who changed the ssh policy last?
  bulkhead.microseg.history_info:
    kind: GlobalNetworkPolicy
    name: platform.ssh
    limit: 1
  delegate_to: localhost
  register: last

- name: Show it
  ansible.builtin.debug:
    msg: "{{ last.entries[0].who }} ({{ last.entries[0].role }}) at revision {{ last.entries[0].revision }}"
"""

RETURN = r"""
entries:
  description: The audit entries, newest first.
  returned: always
  type: list
  elements: dict
  contains:
    revision:
      description: The store revision of the change.
      type: int
      returned: always
      sample: 57
    time:
      description: When (UTC).
      type: str
      returned: always
      sample: "2026-12-04T18:00:00Z"
    who:
      description: The subject (CN) of the certificate that made the change.
      type: str
      returned: always
      sample: alice
    role:
      description: Its role.
      type: str
      returned: always
      sample: admin
    operation:
      description:
        - The request that made the change - V(apply), V(create), V(replace), V(delete),
          V(sync), V(rollback) or V(promote).
        - Entries an older server wrote have none.
      type: str
      returned: when the server wrote it
      sample: promote
    changes:
      description: What changed, each with C(kind), C(name) and C(action) (V(created), V(configured), V(deleted)).
      type: list
      elements: dict
      returned: always
truncated:
  description:
    - Whether the server left older entries out, its bound on the changes one answer holds
      (100,000 in all, the first entry whole) reached before O(limit) entries; a warning
      says so too.
  returned: always
  type: bool
  sample: false
"""

from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule


def main():
    module = BulkheadModule(dict(limit=dict(type="int", default=100), kind=dict(type="str"),
                                 name=dict(type="str")))
    p = module.params

    def read():
        entries, truncated = module.client.history(p["limit"], p["kind"], p["name"])
        if truncated:
            module.warn("the server left older entries out: %d entries hold the most changes "
                        "one answer gives (100,000); ask for fewer (limit) or filter (kind, "
                        "name)" % len(entries))
        return {"changed": False, "entries": entries, "truncated": truncated}

    module.run(read)


if __name__ == "__main__":
    main()
