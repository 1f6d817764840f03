#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: dns_logs_info
short_description: Query the DNS logs bulkhead-server holds
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Reads the DNS log records the agents sent to bulkhead-server (C(GET /v1/dns)), as
    C(bulkhead dns) shows them - each record one flush interval of the lookups a host
    made to one of its trusted resolvers with the same question, response code and
    answers, with their count and latency.
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
    type: raw
  node:
    description: Only records reported by this node (the name in its agent certificate).
    type: str
  client:
    description: Only records of this client - a host endpoint's name, or an address.
    type: str
  qname:
    description:
      - Only records of this name (lowercase, without the final dot), or with V(*.SUFFIX)
        of the names under SUFFIX (V(*.example.com) takes V(api.example.com), not V(example.com)).
    type: str
  rcode:
    description: Only records with this response code (V(NOERROR), V(NXDOMAIN), V(SERVFAIL), ...).
    type: str
  limit:
    description: At most this many records (1 to 10000), newest first; RV(truncated) says when more match.
    type: int
    default: 1000
notes:
  - The server refuses a value it cannot take with a message that starts with the
    parameter's name (C(qname), C(limit), ...); the module fails with that message in
    C(msg), and the HTTP C(status) and C(reason).
seealso:
  - name: Domain policy and DNS logs
    description: How DNS answers are snooped, enforced and logged.
    link: https://github.com/bulkhead-microseg/bulkhead/blob/main/docs/dns.md
  - module: bulkhead.microseg.flow_logs_info
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.read_only
"""

EXAMPLES = r"""
- name: Names web-1 could not resolve in the last day
  bulkhead.microseg.dns_logs_info:
    since: 1d
    client: web-1
    rcode: NXDOMAIN
  delegate_to: localhost
  register: failed

- name: Which hosts looked up the payment provider's names, and what they got
  bulkhead.microseg.dns_logs_info:
    since: 2h
    qname: "*.payments.example.com"
  delegate_to: localhost
  register: lookups

- name: The addresses the names resolved to, for a network set
  ansible.builtin.debug:
    msg: "{{ lookups.dns | map(attribute='answers') | flatten | select('search', ' A ') | map('split', ' ') | map('last') | unique }}"
"""

RETURN = r"""
dns:
  description: The matching records, newest end first, as the server answers them.
  returned: always
  type: list
  elements: dict
  contains:
    start:
      description: Unix seconds, the first lookup of the interval.
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
    client_type:
      description: V(hep) (a host endpoint), V(ns) (a GlobalNetworkSet holding the address) or V(net) (the address itself).
      type: str
      returned: always
      sample: hep
    client_name:
      description: The endpoint's or network set's name, or the address, that asked.
      type: str
      returned: always
      sample: web-1
    client_labels:
      description: The labels of the endpoint or network set (empty for an address).
      type: dict
      returned: always
      sample: {app: web}
    client_scope:
      description: For an address, V(private) or V(public); empty otherwise.
      type: str
      returned: always
      sample: ""
    server_type:
      description: As RV(dns[].client_type), for the resolver.
      type: str
      returned: always
      sample: net
    server_name:
      description: As RV(dns[].client_name), for the resolver.
      type: str
      returned: always
      sample: 198.18.0.53
    server_labels:
      description: As RV(dns[].client_labels), for the resolver.
      type: dict
      returned: always
      sample: {}
    server_scope:
      description: As RV(dns[].client_scope), for the resolver.
      type: str
      returned: always
      sample: private
    qname:
      description: The name asked, lowercase, without the final dot.
      type: str
      returned: always
      sample: api.example.com
    qtype:
      description: The record type asked.
      type: str
      returned: always
      sample: A
    rcode:
      description: The response code.
      type: str
      returned: always
      sample: NOERROR
    answers:
      description: The A, AAAA and CNAME records on the chain from the name asked, each C(NAME TYPE VALUE), sorted.
      type: list
      elements: str
      returned: always
      sample: ["api.example.com A 198.18.3.4"]
    count:
      description: Lookups in the interval with this question, code and answers.
      type: int
      returned: always
      sample: 3
    latency_count:
      description: Of them, those whose query the agent saw leave (their latency is known).
      type: int
      returned: always
      sample: 3
    latency_mean_ms:
      description: Their mean latency, query leaving to answer arriving, in milliseconds.
      type: float
      returned: always
      sample: 1.25
    latency_max_ms:
      description: The longest of them, in milliseconds.
      type: float
      returned: always
      sample: 2.5
truncated:
  description: Whether more records match than are returned (O(limit) was reached).
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

from ansible_collections.bulkhead.microseg.plugins.module_utils.flows import read_dns
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule


def main():
    module = BulkheadModule(
        dict(
            since=dict(type="raw"),
            until=dict(type="raw"),
            node=dict(type="str"),
            client=dict(type="str"),
            qname=dict(type="str"),
            rcode=dict(type="str"),
            limit=dict(type="int", default=1000),
        ),
    )
    module.run(lambda: read_dns(module.client, module.params, time.time()))


if __name__ == "__main__":
    main()
