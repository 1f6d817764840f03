#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: resource_info
short_description: Get or list resources in bulkhead-server
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Read resources from bulkhead-server, like C(bulkhead get) and C(kubernetes.core.k8s_info).
  - One by kind and name, all of one kind, or every resource; optionally only those
    whose labels match a selector.
options:
  kind:
    description:
      - Resource kind, as Calico names it or abbreviated (V(HostEndpoint), V(hep),
        V(GlobalNetworkPolicy), V(gnp), V(StagedGlobalNetworkPolicy), V(Tier),
        V(GlobalNetworkSet), V(Profile)). Left out, every kind.
    type: str
  name:
    description: Only the resource with this name (needs O(kind)).
    type: str
  label_selector:
    description:
      - Only resources whose labels match this selector, in Calico's selector language,
        for example V(zone == 'trusted' && app in {'kafka', 'zookeeper'}).
    type: str
seealso:
  - module: bulkhead.microseg.resource
  - plugin: bulkhead.microseg.store
    plugin_type: inventory
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.read_only
"""

EXAMPLES = r"""
- name: The host endpoints of the trusted zone
  bulkhead.microseg.resource_info:
    kind: HostEndpoint
    label_selector: zone == 'trusted'
  delegate_to: localhost
  register: trusted

- name: One policy
  bulkhead.microseg.resource_info:
    kind: gnp
    name: platform.ssh-from-bastion
  delegate_to: localhost
  register: policy

- name: Does it exist?
  ansible.builtin.debug:
    msg: "{{ policy.resources | length == 1 }}"
"""

RETURN = r"""
resources:
  description: The matching resources as the server stores them (empty list if none).
  returned: always
  type: list
  elements: dict
  sample:
    - apiVersion: projectcalico.org/v3
      kind: HostEndpoint
      metadata: {name: web-1, labels: {zone: trusted}, resourceVersion: "9"}
      spec: {node: web-1, expectedIPs: [198.18.0.11]}
"""

from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule


def main():
    module = BulkheadModule(
        dict(kind=dict(type="str"), name=dict(type="str"), label_selector=dict(type="str")),
        required_by={"name": "kind"},
    )
    p = module.params
    module.run(lambda: {"changed": False, "resources": module.service.find(
        p["kind"], p["name"], p["label_selector"])})


if __name__ == "__main__":
    main()
