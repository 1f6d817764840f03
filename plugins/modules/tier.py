#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: tier
short_description: Manage a Calico Tier in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Create, update or delete one C(Tier) (C(projectcalico.org/v3)). Tiers are evaluated
    in order; a policy in a tier is named C(TIER.NAME).
  - The server refuses to delete a tier that still holds policies, and says which.
options:
  name:
    description: Tier name.
    type: str
    required: true
  order:
    description: Order among tiers; lower first, none last (ties by name).
    type: float
  default_action:
    description:
      - What happens to traffic that no rule of an applicable tier matched. The server
        defaults it to V(Deny).
    type: str
    choices: [Deny, Pass]
seealso:
  - module: bulkhead.microseg.global_network_policy
  - module: bulkhead.microseg.resource
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.resource
  - bulkhead.microseg.connection.wait
"""

EXAMPLES = r"""
- name: A tier for the platform team, evaluated before the default tier
  bulkhead.microseg.tier:
    name: platform
    order: 100
  delegate_to: localhost

- name: A tier that passes unmatched traffic on
  bulkhead.microseg.tier:
    name: security
    order: 10
    default_action: Pass
  delegate_to: localhost
"""

RETURN = r"""
revision:
  description:
    - The store revision of the write; the agents enforce the change once they report it
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
action:
  description: What was done (or in check mode would be done).
  returned: always
  type: str
  choices: [created, updated, deleted, unchanged]
  sample: created
resource:
  description: The Tier as the server stores it; empty when absent.
  returned: always
  type: dict
  sample:
    apiVersion: projectcalico.org/v3
    kind: Tier
    metadata: {name: platform, resourceVersion: "3"}
    spec: {order: 100, defaultAction: Deny}
"""

from ansible_collections.bulkhead.microseg.plugins.module_utils.module import (
    BulkheadModule,
    resource_spec,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import ensure


def main():
    spec = resource_spec()
    spec.update(
        name=dict(type="str", required=True),
        order=dict(type="float"),
        default_action=dict(type="str", choices=["Deny", "Pass"]),
    )
    module = BulkheadModule(spec)
    p = module.params
    order = module.order()
    desired = module.make_resource("Tier", p["name"], {"order": order,
                                                       "defaultAction": p["default_action"]},
                                   p["labels"])
    module.run(lambda: ensure(module.service, desired, p["state"], module.check_mode,
                              p["labels"] is not None, p["purge_labels"]))


if __name__ == "__main__":
    main()
