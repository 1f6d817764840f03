#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: host_endpoint
short_description: Manage a Calico HostEndpoint in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Create, update or delete one C(HostEndpoint) (C(projectcalico.org/v3)), a host's
    interface(s) with the labels that policies select.
  - The module manages the whole C(spec); options left out are removed from the resource.
    Labels follow O(labels) and O(purge_labels).
  - "Run it on the controller (C(delegate_to: localhost)); it needs nothing but Ansible there."
options:
  name:
    description: Name of the host endpoint (C(metadata.name)), for example the inventory hostname.
    type: str
    required: true
  node:
    description:
      - The node (host) the endpoint lives on; its agent enforces the policies.
      - Required with O(state=present).
    type: str
  interface_name:
    description:
      - The interface the endpoint stands for. V(*) means all of the host's interfaces.
      - Left out, the agent finds the interface by O(expected_ips).
    type: str
  expected_ips:
    description: The host's addresses on this endpoint; used by policies that select it.
    type: list
    elements: str
  profiles:
    description: Profiles applied after the last tier, for example V(projectcalico-default-allow).
    type: list
    elements: str
  ports:
    description: Named ports, which rules can refer to by name.
    type: list
    elements: dict
    suboptions:
      name:
        description: Port name.
        type: str
        required: true
      port:
        description: Port number.
        type: int
        required: true
      protocol:
        description: V(TCP), V(UDP) or V(SCTP).
        type: str
        required: true
seealso:
  - module: bulkhead.microseg.host_endpoints
  - module: bulkhead.microseg.resource_info
  - plugin: bulkhead.microseg.endpoints
    plugin_type: inventory
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.resource
  - bulkhead.microseg.connection.wait
"""

EXAMPLES = r"""
- name: Every host as a labeled host endpoint (labels from the inventory plugin)
  bulkhead.microseg.host_endpoint:
    name: "{{ inventory_hostname }}"
    node: "{{ inventory_hostname }}"
    expected_ips: "{{ bulkhead_expected_ips }}"
    labels: "{{ bulkhead_labels }}"
  delegate_to: localhost

- name: Add one label and keep the others
  bulkhead.microseg.host_endpoint:
    name: web-1
    node: web-1
    interface_name: eth0
    expected_ips: [198.18.0.11]
    labels:
      maintenance: "true"
    purge_labels: false
    server_url: https://bulkhead.example.com:7443
    ca_path: /etc/bulkhead/pki/ca.crt
    client_cert: /etc/bulkhead/pki/alice.crt
    client_key: /etc/bulkhead/pki/alice.key
  delegate_to: localhost

- name: Remove it
  bulkhead.microseg.host_endpoint:
    name: web-1
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
  sample: created
resource:
  description:
    - The HostEndpoint as the server stores it (in check mode, as it would store it);
      empty when absent.
  returned: always
  type: dict
  sample:
    apiVersion: projectcalico.org/v3
    kind: HostEndpoint
    metadata:
      name: web-1
      labels: {zone: trusted, app: web}
      resourceVersion: "17"
    spec:
      node: web-1
      interfaceName: eth0
      expectedIPs: [198.18.0.11]
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
        node=dict(type="str"),
        interface_name=dict(type="str"),
        expected_ips=dict(type="list", elements="str"),
        profiles=dict(type="list", elements="str"),
        ports=dict(type="list", elements="dict", options=dict(
            name=dict(type="str", required=True),
            port=dict(type="int", required=True),
            protocol=dict(type="str", required=True),
        )),
    )
    module = BulkheadModule(spec, required_if=[("state", "present", ["node"])])
    p = module.params
    desired = module.make_resource("HostEndpoint", p["name"], {
        "node": p["node"], "interfaceName": p["interface_name"],
        "expectedIPs": p["expected_ips"], "profiles": p["profiles"], "ports": p["ports"],
    }, p["labels"])
    module.run(lambda: ensure(module.service, desired, p["state"], module.check_mode,
                              p["labels"] is not None, p["purge_labels"]))


if __name__ == "__main__":
    main()
