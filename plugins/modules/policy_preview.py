#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: policy_preview
short_description: Which stored flows staged policies or new manifests would deny or allow, with gates
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Like C(bulkhead preview). Judges the flow log records the agents sent
    (C(POST /v1/preview)) against a proposed state, and returns the flows it would decide
    differently from the enforced policies - newly denied, newly allowed, and undecided
    (the stored fields cannot tell; never guessed) - grouped by policy and endpoint pair.
  - The proposed state is the store's resources, with the documents of O(definition) or
    O(src) put over them (same kind and name - the document's), then the staged policies
    of O(promote) promoted as M(bulkhead.microseg.policy_promote) would promote them.
  - Gates make the task fail, with the preview in the result, so a play stops before
    a promotion or an apply that would cut traffic - O(max_denied), O(protected) and
    O(fail_on_undecided). The first two are the gates of C(bulkhead preview --max-denied
    --protected), with the same semantics.
  - It only reads - nothing is written to the server, and it never reports a change.
  - Needs the admin or the viewer role.
options:
  definition:
    description:
      - Resources not yet applied, put over the store's for the preview - a dict, a list
        of dicts, or YAML text, as M(bulkhead.microseg.resource) takes them.
      - Mutually exclusive with O(src).
    type: raw
  src:
    description:
      - A file, or a folder (its C(*.yaml), C(*.yml) and C(*.json) files, in name order),
        of resources not yet applied, put over the store's for the preview.
      - A relative path is looked up on the controller in the role's C(files/), the play's
        C(files/), then relative to the playbook, as M(bulkhead.microseg.resource) does.
      - Mutually exclusive with O(definition).
    type: path
  promote:
    description:
      - The StagedGlobalNetworkPolicies promoted for the preview - a list of names, V(all)
        (every staged policy, the store's and the documents') or V(none) (the documents'
        enforced policies alone).
      - Left out, the staged policies of O(definition) or O(src) when documents are
        given, else every staged policy in the store.
      - A name that is neither staged in the store nor in the documents fails (HTTP 404).
    type: raw
  hours:
    description: Judge the records that ended in the O(hours) before O(until) (1/60 to 2160).
    type: float
    default: 24
  until:
    description:
      - The end of the time range, as unix seconds, a duration before now (V(2h)) or an
        ISO 8601 time, as M(bulkhead.microseg.flow_logs_info) takes O(bulkhead.microseg.flow_logs_info#module:until).
      - Left out, now (the server's clock).
    type: raw
  protected:
    description:
      - A selector (V(pci == 'true')). Gate - the task fails when any record to or from an
        endpoint whose logged labels match it would be newly denied, as
        C(bulkhead preview --protected) fails.
      - RV(preview.protected) lists what it hits.
    type: str
  enforce:
    description:
      - A selector (V(zone == 'dmz')). The host endpoints it selects are previewed in
        enforce mode (label C(microseg.bulkhead.io/enforcement=enforce)) - a host in
        observe mode blocks nothing, so this previews moving it to enforce, as
        C(bulkhead preview --enforce) does.
    type: str
  max_denied:
    description:
      - Gate - the task fails when more than this many connections would be newly denied
        (C(newlyDenied.connections) of RV(preview.totals)), as C(bulkhead preview --max-denied)
        fails. V(0) allows none.
      - Connections, not records - a record counts the connections of one flush interval.
    type: int
  fail_on_undecided:
    description:
      - Gate - with V(true), the task fails when any record is undecided (its outcome
        depends on what flow logs do not keep, such as a source port).
    type: bool
    default: false
  limit:
    description: At most this many groups listed per kind of change (1 to 1000); totals count them all.
    type: int
    default: 100
notes:
  - When RV(preview.truncated) is true the server judged only part of the records
    (100,000 groups of alike records, 64 MiB of their text, or 20 seconds of judging), so
    the totals the gates compare are lower bounds - any gate given then fails, as
    C(bulkhead preview) fails; shorten O(hours).
  - A value the server refuses fails with its message, which starts with the field's name
    (C(protected), C(hours), C(manifests)), with the HTTP C(status) and C(reason).
seealso:
  - module: bulkhead.microseg.policy_promote
  - module: bulkhead.microseg.flow_logs_info
  - name: Policy impact preview and promotion
    description: The gates, and a play that previews, then promotes.
    link: https://github.com/bulkhead-microseg/bulkhead/blob/main/docs/collection.md#policy-impact-and-promotion-policy_preview-policy_promote
extends_documentation_fragment:
  - bulkhead.microseg.connection
  - bulkhead.microseg.connection.read_only
"""

EXAMPLES = r"""
- name: Promote the staged policies only if at most 10 connections of the last day would be denied, and none to PCI hosts
  bulkhead.microseg.policy_preview:
    promote: [security.db-ingress, security.web-ingress]
    max_denied: 10
    protected: pci == 'true'
  delegate_to: localhost
  run_once: true
  register: preview

- name: Promote them
  bulkhead.microseg.policy_promote:
    names: "{{ preview.preview.promoted }}"
    wait: true
  delegate_to: localhost
  run_once: true

- name: What a folder of policies not yet applied would change over the last week, whatever it is
  bulkhead.microseg.policy_preview:
    src: policies/platform/
    hours: 168
  delegate_to: localhost
  run_once: true
  register: impact

- name: Show it
  ansible.builtin.debug:
    msg: "{{ impact.preview.totals }}"

- name: Fail on any flow that cannot be decided, too
  bulkhead.microseg.policy_preview:
    promote: all
    max_denied: 0
    fail_on_undecided: true
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
preview:
  description: The server's answer (C(POST /v1/preview)), as C(bulkhead preview -o json) prints it.
  returned: always, and when a gate fails
  type: dict
  contains:
    since:
      description: Unix seconds, the start of the time range.
      type: float
      returned: always
      sample: 1764864000.0
    until:
      description: Unix seconds, the end of the time range.
      type: float
      returned: always
      sample: 1764950400.0
    promoted:
      description: The staged policies promoted for the preview.
      type: list
      elements: str
      returned: always
      sample: [security.db-ingress]
    promotedVersions:
      description:
        - The C(resourceVersion) of each promoted staged policy judged as stored; empty when
          the preview judged documents not applied (O(src), O(definition)), whose state is not
          the store's until they are applied.
        - Give it to M(bulkhead.microseg.policy_promote) as O(bulkhead.microseg.policy_promote#module:resource_versions)
          to promote exactly what was previewed.
      type: dict
      returned: always
      sample: {security.db-ingress: "118"}
    examined:
      description: What was judged - C(records), C(connections) and C(groups) (alike records judged once).
      type: dict
      returned: always
      sample: {records: 120, connections: 300, groups: 14}
    truncated:
      description: Whether the server stopped judging at its bound of groups; the totals are then lower bounds.
      type: bool
      returned: always
      sample: false
    leftOut:
      description:
        - Stored objects left out of the state judged, as the agents leave them out, a message each
          (objects an older server took that today's checks refuse, and the policies of a tier left out).
        - Each is also a warning of the module.
      type: list
      elements: str
      returned: when there are any
      sample: ["GlobalNetworkPolicy default.dd: spec.egress[0].destination.domains: only valid for Allow rules (the action is Deny)"]
    totals:
      description:
        - C(records) and C(connections) for each of C(newlyDenied), C(newlyAllowed),
          C(undecided) and C(unchanged).
      type: dict
      returned: always
      sample:
        newlyDenied: {records: 2, connections: 6}
        newlyAllowed: {records: 0, connections: 0}
        undecided: {records: 1, connections: 1}
        unchanged: {records: 4, connections: 8}
    newlyDenied:
      description:
        - The groups the proposed state would deny and the enforced policies allowed, most
          connections first, at most O(limit).
        - Each has C(direction) (V(Ingress) or V(Egress)), the deciding C(tier) and
          C(policy) (empty when several decide), C(src) and C(dst) (C(type), C(name),
          C(labels), and C(scope) for an address), C(ports), the reporting C(nodes),
          C(records), C(connections) and the deciding C(steps); C(domains), the names the
          destination was resolved from, when the records give any.
      type: list
      elements: dict
      returned: always
    newlyAllowed:
      description: As RV(preview.newlyDenied), for what the proposed state would allow and the enforced policies denied.
      type: list
      elements: dict
      returned: always
    undecided:
      description: As RV(preview.newlyDenied), for what cannot be decided from the stored fields, each with C(why).
      type: list
      elements: dict
      returned: always
    newlyDeniedGroups:
      description: How many groups are newly denied (RV(preview.newlyDenied) lists at most O(limit)).
      type: int
      returned: always
      sample: 2
    newlyAllowedGroups:
      description: How many groups are newly allowed.
      type: int
      returned: always
      sample: 0
    undecidedGroups:
      description: How many groups are undecided.
      type: int
      returned: always
      sample: 1
    protected:
      description: What O(protected) hits - C(selector), C(records), C(connections), and the C(groups) newly denied to or from it.
      type: dict
      returned: when O(protected) is given
      sample: {selector: pci == "true", records: 1, connections: 2, groups: []}
gates:
  description: The gates' verdict.
  returned: always, and when a gate fails
  type: dict
  contains:
    passed:
      description: Whether every gate given passed (true when none is given).
      type: bool
      returned: always
      sample: false
    failed:
      description: One reason per failed gate, starting with the option's name.
      type: list
      elements: str
      returned: always
      sample: ["max_denied: 6 connections would be newly denied (at most 5)"]
"""

import time

from ansible.module_utils.common.text.converters import to_text

from ansible_collections.bulkhead.microseg.plugins.module_utils.documents import load_manifests
from ansible_collections.bulkhead.microseg.plugins.module_utils.module import BulkheadModule
from ansible_collections.bulkhead.microseg.plugins.module_utils.preview import judged


def main():
    module = BulkheadModule(
        dict(
            definition=dict(type="raw"),
            src=dict(type="path"),
            promote=dict(type="raw"),
            hours=dict(type="float", default=24),
            until=dict(type="raw"),
            protected=dict(type="str"),
            enforce=dict(type="str"),
            max_denied=dict(type="int"),
            fail_on_undecided=dict(type="bool", default=False),
            limit=dict(type="int", default=100),
        ),
        mutually_exclusive=[("definition", "src")],
    )
    p = module.params
    manifests = []
    if p["definition"] is not None or p["src"]:
        try:
            manifests = load_manifests(p["definition"], p["src"])
        except (OSError, IOError, ValueError) as e:
            module.fail_json(msg=to_text(e))

    def run():
        result = judged(module.client, p, manifests, time.time())
        if result["preview"].get("truncated"):
            module.warn("the server judged only part of the records (truncated): the totals "
                        "are lower bounds; shorten hours")
        for message in (result["preview"].get("leftOut") or [])[:10]:
            module.warn("left out of the preview, as the agents leave it out: %s" % message)
        if not result["gates"]["passed"]:
            module.fail_json(msg="policy preview gate failed: " +
                             "; ".join(result["gates"]["failed"]), **result)
        return result

    module.run(run)


if __name__ == "__main__":
    main()
