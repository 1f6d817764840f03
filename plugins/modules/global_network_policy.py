#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: global_network_policy
short_description: Manage a Calico GlobalNetworkPolicy or StagedGlobalNetworkPolicy
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Create, update or delete one C(GlobalNetworkPolicy) or, with O(staged=true), one
    C(StagedGlobalNetworkPolicy) (C(projectcalico.org/v3)).
  - Staged policies never change a packet's fate; agents log what they would have done.
  - Rules are Calico's own (O(ingress), O(egress)), as in Calico's YAML, so manifests and
    docs from Calico can be reused as they are.
  - The module manages the whole C(spec); options left out are removed from the policy.
  - The server validates the policy; its message (naming the resource and field) is
    returned as it is when the policy is invalid.
options:
  name:
    description:
      - Policy name. A policy in a tier other than V(default) is named C(TIER.NAME), as in Calico.
    type: str
    required: true
  staged:
    description: Manage a C(StagedGlobalNetworkPolicy) instead of a C(GlobalNetworkPolicy).
    type: bool
    default: false
  staged_action:
    description:
      - Staged policies only. V(Set) stages the policy; V(Delete) stages the deletion of the
        enforced policy of the same name.
    type: str
    choices: [Set, Delete]
  tier:
    description: The tier the policy belongs to; the server defaults it to V(default).
    type: str
  order:
    description: Order within the tier; lower first, none last.
    type: float
  selector:
    description: Which endpoints the policy applies to, in Calico's selector language.
    type: str
  types:
    description:
      - V(Ingress), V(Egress) or both. Left out, the server infers them from the rules.
    type: list
    elements: str
    choices: [Ingress, Egress]
  ingress:
    description: Ingress rules, each a Calico rule (C(action), C(protocol), C(source), C(destination), ...).
    type: list
    elements: dict
  egress:
    description: Egress rules, each a Calico rule.
    type: list
    elements: dict
  do_not_track:
    description: Apply the rules before connection tracking, without return traffic.
    type: bool
  pre_dnat:
    description: Apply the rules before DNAT (ingress only).
    type: bool
  apply_on_forward:
    description: Apply the rules to forwarded traffic too.
    type: bool
seealso:
  - module: bulkhead.microseg.tier
  - module: bulkhead.microseg.resource
  - module: bulkhead.microseg.agent_status
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.resource
  - bulkhead.microseg.connection.wait
"""

EXAMPLES = r"""
- name: Stage a policy first
  bulkhead.microseg.global_network_policy:
    name: platform.kafka-from-trusted
    staged: true
    tier: platform
    order: 100
    selector: app == 'kafka'
    ingress:
      - action: Allow
        protocol: TCP
        source:
          selector: zone == 'trusted'
        destination:
          ports: [9092]
  delegate_to: localhost

- name: Enforce it
  bulkhead.microseg.global_network_policy:
    name: platform.kafka-from-trusted
    tier: platform
    order: 100
    selector: app == 'kafka'
    ingress:
      - action: Allow
        protocol: TCP
        source:
          selector: zone == 'trusted'
        destination:
          ports: [9092]
  delegate_to: localhost

- name: Remove the staged copy
  bulkhead.microseg.global_network_policy:
    name: platform.kafka-from-trusted
    staged: true
    state: absent
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
  sample: updated
resource:
  description:
    - The policy as the server stores it, normalised (tier, types and canonical selectors
      filled in); in check mode, as it would be stored; empty when absent.
  returned: always
  type: dict
  sample:
    apiVersion: projectcalico.org/v3
    kind: GlobalNetworkPolicy
    metadata: {name: platform.kafka-from-trusted, resourceVersion: "42"}
    spec:
      tier: platform
      order: 100
      selector: app == "kafka"
      types: [Ingress]
      ingress:
        - action: Allow
          protocol: TCP
          source: {selector: zone == "trusted"}
          destination: {ports: [9092]}
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
        staged=dict(type="bool", default=False),
        staged_action=dict(type="str", choices=["Set", "Delete"]),
        tier=dict(type="str"),
        order=dict(type="float"),
        selector=dict(type="str"),
        types=dict(type="list", elements="str", choices=["Ingress", "Egress"]),
        ingress=dict(type="list", elements="dict"),
        egress=dict(type="list", elements="dict"),
        do_not_track=dict(type="bool"),
        pre_dnat=dict(type="bool"),
        apply_on_forward=dict(type="bool"),
    )
    module = BulkheadModule(spec)
    p = module.params
    if p["staged_action"] and not p["staged"]:
        module.fail_json(msg="staged_action needs staged=true")
    order = module.order()  # 100, not 100.0, as users write it
    kind = "StagedGlobalNetworkPolicy" if p["staged"] else "GlobalNetworkPolicy"
    desired = module.make_resource(kind, p["name"], {
        "stagedAction": p["staged_action"], "tier": p["tier"], "order": order,
        "selector": p["selector"], "types": p["types"], "ingress": p["ingress"],
        "egress": p["egress"], "doNotTrack": p["do_not_track"], "preDNAT": p["pre_dnat"],
        "applyOnForward": p["apply_on_forward"],
    }, p["labels"])
    module.run(lambda: ensure(module.service, desired, p["state"], module.check_mode,
                              p["labels"] is not None, p["purge_labels"]))


if __name__ == "__main__":
    main()
