#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: flow_logs_info
short_description: Query the flow logs bulkhead-server holds, or their top talkers
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Reads the flow log records the agents sent to bulkhead-server (C(GET /v1/flows)), as
    C(bulkhead flows) shows them - each record one flush interval of the connections
    between two ends on one protocol and port, with the enforced verdict and trace and
    the verdict the staged policies would give.
  - With O(top), the top talkers instead - records grouped by both ends, protocol and
    port, with bytes, packets and connections summed, most bytes first.
  - Every filter is applied by the server; filters given together must all match.
  - Needs the admin or the viewer role.
options:
  since:
    description:
      - Only records whose end is at or after this time.
      - Unix seconds (V(1764950400)), a duration before now (V(30m), V(2h), V(1d), V(1h30m);
        units V(s), V(m), V(h), V(d), V(w)) or an ISO 8601 time (V(2026-12-04T08:00:00Z),
        UTC unless it has an offset).
      - Left out, the server's default - an hour before O(until), or the last hour.
    type: raw
  until:
    description:
      - Only records whose end is at or before this time, given as O(since) is.
      - Left out, no upper bound (a record from a host whose clock is ahead still shows).
    type: raw
  node:
    description: Only records reported by this node (the name in its agent certificate).
    type: str
  reporter:
    description:
      - Only records reported by the source host of the flow (V(src), its egress policy)
        or by the destination host (V(dst), its ingress policy).
      - A connection between two hosts that both run agents is reported twice, once by
        each; give one of them to count it once.
    type: str
    choices: [src, dst]
  action:
    description: Only records with this enforced action.
    type: str
    choices: [allow, deny]
  policy:
    description: Only records whose enforced or staged trace has a step of this policy (for example V(security.db-in)).
    type: str
  tier:
    description: Only records whose enforced or staged trace has a step in this tier.
    type: str
  staged_differs:
    description:
      - With V(true), only records for which the staged policies give another action
        than the enforced one - what promoting them would change.
      - With V(false), records are not filtered on their staged action.
    type: bool
    default: false
  selector:
    description:
      - Only records where the labels of the source or the destination end match this
        selector, in Calico's selector language (V(app == 'db')).
      - The server matches it over at most 100,000 records the other filters let through,
        newest first; RV(truncated) says when it stopped there.
    type: str
  endpoint:
    description: Only records with this name at either end (a host endpoint, a GlobalNetworkSet or an address).
    type: str
  limit:
    description:
      - At most this many records (1 to 10000), newest first; RV(truncated) says when more match.
      - Not with O(top).
    type: int
    default: 1000
  top:
    description:
      - Return this many top talkers (1 to 1000) in RV(top) instead of records.
    type: int
notes:
  - The server refuses a value it cannot take with a message that starts with the
    parameter's name (C(selector), C(limit), ...); the module fails with that message in
    C(msg), and the HTTP C(status) and C(reason).
seealso:
  - name: Flow logs
    description: How flow logs are captured, stored and queried.
    link: https://github.com/bulkhead-microseg/bulkhead/blob/main/docs/observability.md
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.read_only
"""

EXAMPLES = r"""
- name: Flows denied in the last hour where either end has app == 'db'
  bulkhead.microseg.flow_logs_info:
    since: 1h
    action: deny
    selector: app == 'db'
  delegate_to: localhost
  register: denied

- name: Who was denied on the way to the db hosts
  ansible.builtin.debug:
    msg: "{{ denied.flows | selectattr('dst_labels.app', 'defined') | selectattr('dst_labels.app', '==', 'db')
             | map(attribute='src_name') | unique }}"

- name: Would the staged policies change anything? The last 24 hours
  bulkhead.microseg.flow_logs_info:
    since: 1d
    staged_differs: true
    limit: 20
  delegate_to: localhost
  register: differs

- name: Promote them only if they decide every flow as the enforced ones do
  ansible.builtin.assert:
    that: differs.flows | length == 0
    fail_msg: >-
      flow records the staged policies would decide otherwise: {{ differs.flows | length }}{{ '+' if differs.truncated else '' }},
      for example {{ differs.flows | map(attribute='src_name') | zip(differs.flows | map(attribute='dst_name'))
      | map('join', ' -> ') | unique | list }}
    success_msg: the staged policies decide every flow of the last 24 hours as the enforced ones

- name: The ten top talkers of the last day
  bulkhead.microseg.flow_logs_info:
    since: 1d
    top: 10
  delegate_to: localhost
  register: talkers

- name: What web-1 reported between two times, decided by or passing a policy
  bulkhead.microseg.flow_logs_info:
    since: "2026-12-04T08:00:00Z"
    until: "2026-12-04T09:00:00Z"
    node: web-1
    policy: security.db-in
  delegate_to: localhost
  register: window
"""

RETURN = r"""
flows:
  description: The matching records, newest end first, as the server answers them.
  returned: when O(top) is not set
  type: list
  elements: dict
  contains:
    start:
      description: Unix seconds, the first connection of the interval.
      type: float
      returned: always
      sample: 1764950395.5
    end:
      description: Unix seconds, the end of the interval.
      type: float
      returned: always
      sample: 1764950405.5
    received:
      description: Unix seconds (server clock) when the server stored the record.
      type: float
      returned: always
      sample: 1764950406.1
    node:
      description: The node that reported the record.
      type: str
      returned: always
      sample: web-1
    reporter:
      description: V(src) (the flow left the reporting host) or V(dst) (it reached it).
      type: str
      returned: always
      sample: src
    src_type:
      description: V(hep) (a host endpoint), V(ns) (a GlobalNetworkSet holding the address) or V(net) (the address itself).
      type: str
      returned: always
      sample: hep
    src_name:
      description: The endpoint's or network set's name, or the address.
      type: str
      returned: always
      sample: web-1
    src_labels:
      description: The labels of the endpoint or network set (empty for an address).
      type: dict
      returned: always
      sample: {app: web, zone: dmz}
    src_scope:
      description: For an address, V(private) or V(public); empty otherwise.
      type: str
      returned: always
      sample: ""
    dst_type:
      description: As RV(flows[].src_type), for the destination.
      type: str
      returned: always
      sample: hep
    dst_name:
      description: As RV(flows[].src_name), for the destination.
      type: str
      returned: always
      sample: db-1
    dst_labels:
      description: As RV(flows[].src_labels), for the destination.
      type: dict
      returned: always
      sample: {app: db, zone: trusted}
    dst_scope:
      description: As RV(flows[].src_scope), for the destination.
      type: str
      returned: always
      sample: ""
    proto:
      description: The IP protocol number (6 TCP, 17 UDP, 1 ICMP).
      type: int
      returned: always
      sample: 6
    dst_port:
      description: The destination port; 0 where the protocol has no ports.
      type: int
      returned: always
      sample: 5432
    action:
      description: The enforced action, V(allow) or V(deny).
      type: str
      returned: always
      sample: allow
    enforced_trace:
      description: The steps that decided the flow, each C(tier|policy|rule|action) (rule V(-) where no rule decided).
      type: list
      elements: str
      returned: always
      sample: ["security|security.db-in|0|allow"]
    staged_action:
      description: The action with the staged policies in force.
      type: str
      returned: always
      sample: allow
    staged_trace:
      description: The steps with the staged policies in force.
      type: list
      elements: str
      returned: always
      sample: ["security|security.db-in|0|allow"]
    connections:
      description: Connections active in the interval.
      type: int
      returned: always
      sample: 2
    started:
      description: Of them, connections started in the interval.
      type: int
      returned: always
      sample: 1
    packets_in:
      description: Packets towards the reporting host.
      type: int
      returned: always
      sample: 10
    packets_out:
      description: Packets from the reporting host.
      type: int
      returned: always
      sample: 12
    bytes_in:
      description: Bytes towards the reporting host.
      type: int
      returned: always
      sample: 1000
    bytes_out:
      description: Bytes from the reporting host.
      type: int
      returned: always
      sample: 2000
    dst_domains:
      description:
        - The domain names the destination address was resolved from, as the reporting agent's DNS name cache had
          them when the connection began (sorted, at most 16).
        - V(null) when not known (an ingress record, an agent that does not snoop DNS, or one from before the field).
      type: list
      elements: str
      returned: always
      sample: [api.example.com]
top:
  description: The top talkers, most bytes first - records grouped by both ends, protocol and port.
  returned: when O(top) is set
  type: list
  elements: dict
  contains:
    src_type:
      description: As RV(flows[].src_type).
      type: str
      returned: always
      sample: hep
    src_name:
      description: As RV(flows[].src_name).
      type: str
      returned: always
      sample: web-1
    dst_type:
      description: As RV(flows[].dst_type).
      type: str
      returned: always
      sample: hep
    dst_name:
      description: As RV(flows[].dst_name).
      type: str
      returned: always
      sample: db-1
    proto:
      description: The IP protocol number.
      type: int
      returned: always
      sample: 6
    dst_port:
      description: The destination port.
      type: int
      returned: always
      sample: 5432
    bytes:
      description: Bytes in and out, summed over the group's records.
      type: int
      returned: always
      sample: 3000
    packets:
      description: Packets in and out, summed.
      type: int
      returned: always
      sample: 22
    connections:
      description: Connections, summed (each record counts those active in its interval).
      type: int
      returned: always
      sample: 2
    started:
      description: Connections started, summed.
      type: int
      returned: always
      sample: 1
    records:
      description: How many records the group holds.
      type: int
      returned: always
      sample: 1
truncated:
  description:
    - Whether more records match than are returned - O(limit) was reached, or the server
      stopped matching O(selector) after 100,000 records; narrow the time range or add a
      filter.
  returned: always
  type: bool
  sample: false
since:
  description: O(since) as unix seconds (a duration counted back from when the module ran); null when not given.
  returned: always
  type: float
  sample: 1764946800.0
until:
  description: O(until) as unix seconds; null when not given.
  returned: always
  type: float
  sample: null
"""

import time

from ansible_collections.bulkhead.microseg.plugins.module_utils.flows import read_flows
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule


def main():
    module = BulkheadModule(
        dict(
            since=dict(type="raw"),
            until=dict(type="raw"),
            node=dict(type="str"),
            reporter=dict(type="str", choices=["src", "dst"]),
            action=dict(type="str", choices=["allow", "deny"]),
            policy=dict(type="str"),
            tier=dict(type="str"),
            staged_differs=dict(type="bool", default=False),
            selector=dict(type="str"),
            endpoint=dict(type="str"),
            limit=dict(type="int", default=1000),
            top=dict(type="int"),
        ),
        # Checked before defaults are set: an explicit limit with top is refused, the
        # default limit is not sent with top.
        mutually_exclusive=[("limit", "top")],
    )
    module.run(lambda: read_flows(module.client, module.params, time.time()))


if __name__ == "__main__":
    main()
