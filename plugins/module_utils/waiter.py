# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Wait until the agents enforce a store revision (GET /v1/nodes?revision=R).

Which agents a change touches is approximated by every agent that has reported its
status: the server answers `converged` for all of them, so a write module with
`wait: true` waits for the whole fleet, not only for the nodes whose endpoints the change
selects (exact for a fleet where every agent holds every policy; never too early).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import BulkheadError

WAIT_SPEC = dict(
    wait=dict(type="bool", default=False),
    wait_timeout=dict(type="float", default=120),
)


def wait_spec():
    return dict((k, dict(v)) for k, v in WAIT_SPEC.items())


class NotConverged(BulkheadError):
    """The agents did not enforce the revision in time; `result` is the last status."""

    def __init__(self, message, result):
        self.result = result
        super(NotConverged, self).__init__(message)


def started_at(node):
    """When the agent that sent a node's report started (its counters' `startedAt`, Unix
    seconds on the node's clock), or None if the report does not say."""
    value = (node.get("counters") or {}).get("startedAt")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(body, wanted, revision, started_after=None):
    """The status of every node from one /v1/nodes answer. With `started_after`, a node
    of `wanted` converges only on a report from an agent started later: after a restart,
    the report its predecessor sent does not count."""
    nodes = body.get("nodes") or []
    seen = set(n["node"] for n in nodes)
    missing = [n for n in wanted or [] if n not in seen]
    result = {"changed": False, "nodes": nodes, "revision": body.get("revision"),
              "missing": missing}
    if revision or started_after is not None:
        converged = bool(body.get("converged")) and not missing
        if started_after is not None:
            for node in nodes:
                when = started_at(node)
                if node["node"] in (wanted or []) and (when is None or when <= started_after):
                    node["converged"] = False
                    node["restarted"] = False
                    converged = False
        result["converged"] = converged
    return result


def lagging(result):
    names = ["%s (at %s%s%s)" % (n["node"], n.get("appliedRevision"),
                                 ", errors" if n.get("errors") else "",
                                 ", no report yet from an agent started after the restart"
                                 if n.get("restarted") is False else "")
             for n in result["nodes"] if not n.get("converged")]
    names += ["%s (never reported)" % n for n in result["missing"]]
    return ", ".join(names)


def wait(client, revision, wanted, timeout, interval=1.0, clock=time.monotonic,
         sleep=time.sleep, started_after=None):
    """The nodes' status once every node (and each of `wanted`) enforces `revision`
    without errors, each of `wanted` reported by an agent started after `started_after`
    if given, even at revision 0 (a fresh store); NotConverged after `timeout` seconds.
    No revision and no `started_after`: one read."""
    started = clock()
    waiting = bool(revision) or started_after is not None
    while True:
        result = summarize(client.nodes((revision or 0) if waiting else None), wanted,
                           revision, started_after)
        result["elapsed"] = round(clock() - started, 3)
        if not waiting or result["converged"]:
            return result
        if clock() - started >= timeout:
            raise NotConverged("timed out after %ss waiting for every agent to apply "
                               "revision %s; not converged: %s"
                               % (timeout, revision, lagging(result) or "(no node)"), result)
        sleep(interval)


def wait_for_write(module, result):
    """With the module's `wait: true`, wait until the agents enforce the revision the
    write made (nothing to wait for in check mode or when nothing was written)."""
    revision = result.get("revision")
    if not module.params.get("wait") or module.check_mode or not revision:
        return result
    status = wait(module.client, revision, None, module.params["wait_timeout"])
    result["converged"] = True
    result["wait_elapsed"] = status["elapsed"]
    return result
