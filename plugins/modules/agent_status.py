#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: agent_status
short_description: Report the node agents and the revision each enforces; wait for one
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Reads what every bulkhead-agent last reported (applied revision, errors, counters).
  - With O(wait_for_revision), waits until every agent (and each of O(nodes)) has applied
    that store revision without errors, so a play can continue only once a change is
    enforced everywhere. Fails after O(timeout) seconds, naming the nodes that lag.
options:
  wait_for_revision:
    description:
      - The store revision to wait for, for example RV(bulkhead.microseg.resource#module:revision)
        of an earlier task, or the C(metadata.resourceVersion) of a resource written.
      - V(0) or left out, do not wait (unless O(started_after) is given); report only.
    type: int
  nodes:
    description:
      - Nodes that must have reported, for example C(groups['bulkhead_agents']). A node
        that has never reported counts as not converged.
      - Left out, the nodes that have reported so far.
    type: list
    elements: str
  started_after:
    description:
      - With O(wait_for_revision) (V(0) too, a store nothing was written to yet) and
        O(nodes), each of O(nodes) converges only on a report from an agent started after
        this time (Unix seconds on that node's clock, compared with the C(startedAt)
        counter its agent reports). After restarting an agent, give the time taken on
        the node just before the restart. A report the old process sent then does not
        count, so an agent that crashes after the restart fails the wait.
      - A node whose agent does not report C(startedAt) (one older than this option) never
        converges with this option.
    type: float
  timeout:
    description:
      - Seconds to wait for O(wait_for_revision); a value that is not a finite number
        (V(nan), V(inf)) fails naming this option.
    type: float
    default: 300
  poll_interval:
    description:
      - Seconds between two reads of the agents' status while waiting, at least 0.1 (a
        smaller or non-finite value fails naming this option).
    type: float
    default: 1
seealso:
  - module: bulkhead.microseg.resource
  - module: bulkhead.microseg.host_endpoints
extends_documentation_fragment:
  - bulkhead.microseg.connection
attributes:
  check_mode:
    support: full
    description: The module only reads (and waits).
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
"""

EXAMPLES = r"""
- name: Apply the policies
  bulkhead.microseg.resource:
    src: policies.yaml
  delegate_to: localhost
  register: applied

- name: Wait until every agent enforces them
  bulkhead.microseg.agent_status:
    wait_for_revision: "{{ applied.revision }}"
    nodes: "{{ groups['linux'] }}"
    timeout: 120
  delegate_to: localhost
  when: applied.revision is not none

- name: Which agents report errors?
  bulkhead.microseg.agent_status:
  delegate_to: localhost
  register: status

- name: Show them
  ansible.builtin.debug:
    msg: "{{ status.nodes | selectattr('errors') | map(attribute='node') }}"
"""

RETURN = r"""
nodes:
  description: One entry per node, as its agent reported it.
  returned: always
  type: list
  elements: dict
  contains:
    node:
      description: Node name (the CN of its agent certificate).
      type: str
      returned: always
    appliedRevision:
      description: The store revision the agent enforces.
      type: int
      returned: always
    errors:
      description: Errors the agent reported; empty when all is well.
      type: list
      elements: raw
      returned: always
    counters:
      description: The agent's counters.
      type: dict
      returned: always
    lastReport:
      description: When the agent last reported (UTC).
      type: str
      returned: always
    agentVersion:
      description: The version of the node's agent, from its reports (C(User-Agent)); absent for an agent that says none.
      type: str
      returned: when the agent says it
    converged:
      description: Whether the node enforces O(wait_for_revision) without errors.
      type: bool
      returned: with O(wait_for_revision)
    restarted:
      description: V(false) for a node of O(nodes) whose last report comes from an agent
        started before O(started_after).
      type: bool
      returned: with O(started_after), for such a node
revision:
  description: The store's current revision.
  returned: always
  type: int
  sample: 120
converged:
  description: Whether every node (and each of O(nodes)) converged to O(wait_for_revision).
  returned: with O(wait_for_revision)
  type: bool
  sample: true
missing:
  description: Nodes of O(nodes) that have never reported.
  returned: always
  type: list
  elements: str
  sample: []
elapsed:
  description: Seconds spent waiting.
  returned: always
  type: float
  sample: 2.5
"""

import math

from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import wait

# Seconds: a shorter interval would only poll the server harder, not answer sooner.
MIN_POLL_INTERVAL = 0.1


def main():
    module = BulkheadModule(dict(
        wait_for_revision=dict(type="int"),
        nodes=dict(type="list", elements="str"),
        timeout=dict(type="float", default=300),
        poll_interval=dict(type="float", default=1),
        started_after=dict(type="float"),
    ))
    p = module.params
    module.seconds("timeout")
    after = p["started_after"]
    if after is not None:
        if not math.isfinite(after):
            module.fail_json(msg="started_after: %s: give a time in Unix seconds" % after)
        if p["wait_for_revision"] is None or not p["nodes"]:
            module.fail_json(msg="started_after: give wait_for_revision and nodes too (the "
                                 "nodes whose agents were restarted)")
    interval = p["poll_interval"]
    if not interval >= MIN_POLL_INTERVAL or interval == float("inf"):   # nan is neither
        module.fail_json(msg="poll_interval: %s: give a number of seconds of at least %s (each "
                             "poll is a request to the server)" % (interval, MIN_POLL_INTERVAL))
    module.run(lambda: wait(module.client, p["wait_for_revision"], p["nodes"], p["timeout"],
                            p["poll_interval"], started_after=after))


if __name__ == "__main__":
    main()
