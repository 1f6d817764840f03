#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: global_network_set
short_description: Manage a Calico GlobalNetworkSet in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Create, update or delete one C(GlobalNetworkSet) (C(projectcalico.org/v3)), the labeled
    networks (and egress domains) that policy rules select like endpoints.
options:
  name:
    description: Name of the network set.
    type: str
    required: true
  nets:
    description: CIDRs in the set, IPv4 or IPv6.
    type: list
    elements: str
  allowed_egress_domains:
    description: Domain names (C(*.example.com) allowed) whose resolved addresses join the set.
    type: list
    elements: str
seealso:
  - module: bulkhead.microseg.global_network_policy
  - module: bulkhead.microseg.resource
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.resource
  - bulkhead.microseg.connection.wait
"""

EXAMPLES = r"""
- name: The monitoring networks, selected by policies as role == 'monitoring'
  bulkhead.microseg.global_network_set:
    name: monitoring
    nets: [198.18.10.0/24, "2001:2:0:10::/64"]
    labels:
      role: monitoring
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
  sample: unchanged
resource:
  description: The GlobalNetworkSet as the server stores it; empty when absent.
  returned: always
  type: dict
  sample:
    apiVersion: projectcalico.org/v3
    kind: GlobalNetworkSet
    metadata: {name: monitoring, labels: {role: monitoring}}
    spec: {nets: [198.18.10.0/24]}
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
        nets=dict(type="list", elements="str"),
        allowed_egress_domains=dict(type="list", elements="str"),
    )
    module = BulkheadModule(spec)
    p = module.params
    desired = module.make_resource("GlobalNetworkSet", p["name"], {
        "nets": p["nets"], "allowedEgressDomains": p["allowed_egress_domains"]}, p["labels"])
    module.run(lambda: ensure(module.service, desired, p["state"], module.check_mode,
                              p["labels"] is not None, p["purge_labels"]))


if __name__ == "__main__":
    main()
