#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: resource
short_description: Apply or delete any projectcalico.org/v3 manifest in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Like C(kubernetes.core.k8s) for Bulkhead, and C(bulkhead apply) or C(bulkhead delete), for
    one or more C(projectcalico.org/v3) documents (HostEndpoint, GlobalNetworkPolicy,
    StagedGlobalNetworkPolicy, Tier, GlobalNetworkSet, Profile), given inline or read from files.
  - With O(state=present) all documents are applied all or nothing; the server validates
    every one first and nothing is written if any is invalid.
  - Each document replaces the resource of the same kind and name as a whole.
options:
  definition:
    description:
      - The manifest(s), as a dict, a list of dicts, or YAML text (several documents
        separated by C(---)). Calico's own YAML is accepted as it is.
      - Mutually exclusive with O(src).
    type: raw
    aliases: [resource_definition]
  src:
    description:
      - Path to a YAML or JSON file with one or more documents. Mutually exclusive with
        O(definition).
      - A relative path is looked up on the controller as C(kubernetes.core.k8s) and
        M(ansible.builtin.copy) look up theirs, in the role's C(files/), the play's
        C(files/), then relative to the playbook; the module reads it where it runs
        (the controller, with C(delegate_to=localhost)).
    type: path
  state:
    description:
      - V(present) creates or updates every document; V(absent) deletes every one that
        exists, all or nothing in one server transaction (policies before their tiers). A
        Tier that would still hold policies not in the list fails the whole delete, and
        nothing is deleted.
    type: str
    choices: [present, absent]
    default: present
seealso:
  - module: bulkhead.microseg.resource_info
  - module: bulkhead.microseg.global_network_policy
  - module: bulkhead.microseg.agent_status
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.wait
attributes:
  check_mode:
    support: full
    description:
      - Validated by the server (dry run) and compared; nothing is written.
      - With O(state=absent) the delete is a dry run on the server, so check mode fails
        where the real run would.
  diff_mode:
    support: full
    description: One before/after pair per changed resource.
"""

EXAMPLES = r"""
- name: Apply a Calico manifest from a file
  bulkhead.microseg.resource:
    src: policies/platform.yaml
  delegate_to: localhost

- name: Apply inline documents
  bulkhead.microseg.resource:
    definition:
      - apiVersion: projectcalico.org/v3
        kind: Tier
        metadata: {name: platform}
        spec: {order: 100}
      - apiVersion: projectcalico.org/v3
        kind: GlobalNetworkPolicy
        metadata: {name: platform.ssh-from-bastion}
        spec:
          tier: platform
          selector: all()
          ingress:
            - action: Allow
              protocol: TCP
              source: {selector: role == 'bastion'}
              destination: {ports: [22]}
  delegate_to: localhost

- name: Apply a templated manifest
  bulkhead.microseg.resource:
    definition: "{{ lookup('ansible.builtin.template', 'policies.yaml.j2') }}"
  delegate_to: localhost

- name: Delete what a manifest describes
  bulkhead.microseg.resource:
    src: policies/platform.yaml
    state: absent
  delegate_to: localhost
"""

RETURN = r"""
results:
  description: One entry per document, in order.
  returned: always
  type: list
  elements: dict
  contains:
    kind:
      description: Resource kind.
      type: str
      returned: always
      sample: GlobalNetworkPolicy
    name:
      description: Resource name.
      type: str
      returned: always
      sample: platform.ssh-from-bastion
    action:
      description: What was done to it (or in check mode would be done).
      type: str
      returned: always
      choices: [created, updated, deleted, unchanged]
      sample: created
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
"""

from ansible.module_utils.common.text.converters import to_text

from ansible_collections.bulkhead.microseg.plugins.module_utils.documents import load_manifests
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.runner import ensure_many
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait_spec


def main():
    module = BulkheadModule(
        dict(definition=dict(type="raw", aliases=["resource_definition"]),
             src=dict(type="path"),
             state=dict(type="str", default="present", choices=["present", "absent"]),
             **wait_spec()),
        mutually_exclusive=[("definition", "src")],
        required_one_of=[("definition", "src")],
    )
    p = module.params
    try:
        docs = load_manifests(p["definition"], p["src"])
    except (OSError, IOError, ValueError) as e:
        module.fail_json(msg=to_text(e))
    if not docs:
        module.fail_json(msg="no documents given")
    module.run(lambda: ensure_many(module.service, docs, p["state"], module.check_mode))


if __name__ == "__main__":
    main()
