"""`wait: true` on every write module: the write's revision is returned, and the module
returns once every agent that reports its status enforces it, or fails naming the
agents that lag. The agents here are threads reporting with the nodes' own certificates,
to a server of the test's own: the session's server would go on hearing of them (their
reports stay), and other tests' waits there would wait for them too."""

from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import run

NODES = ("node-1", "node-2")

PLAY = """\
- name: Every write module with wait
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/bulkhead.microseg.bulkhead:
      wait: true
      wait_timeout: 30
  tasks:
    - name: Tier
      bulkhead.microseg.tier: {name: apps, order: 10}
      register: tier
    - name: Policy
      bulkhead.microseg.global_network_policy:
        name: apps.web
        tier: apps
        selector: app == 'web'
        ingress: [{action: Allow}]
      register: policy
    - name: Network set
      bulkhead.microseg.global_network_set: {name: lab, nets: [198.18.0.0/24]}
      register: netset
    - name: Host endpoint
      bulkhead.microseg.host_endpoint: {name: web-1, node: node-1, expected_ips: [198.18.0.1]}
      register: hep
    - name: Host endpoints
      bulkhead.microseg.host_endpoints:
        owner: lab
        endpoints: [{metadata: {name: web-2}, spec: {node: node-2, expectedIPs: [198.18.0.2]}}]
      register: heps
    - name: Resource
      bulkhead.microseg.resource:
        definition: {apiVersion: projectcalico.org/v3, kind: GlobalNetworkSet,
                     metadata: {name: lab}, spec: {nets: [198.18.1.0/24]}}
      register: resource
    - name: Staged policy
      bulkhead.microseg.global_network_policy:
        name: apps.canary
        tier: apps
        staged: true
        selector: app == 'canary'
        ingress: [{action: Allow}]
      register: staged
    - name: Promote it
      bulkhead.microseg.policy_promote:
        names: [apps.canary]
      register: promoted
    - name: Delete the policy
      bulkhead.microseg.global_network_policy: {name: apps.web, state: absent}
      register: deleted
    - name: Unchanged, nothing to wait for
      bulkhead.microseg.tier: {name: apps, order: 10}
      register: unchanged
    - name: Results
      ansible.builtin.copy:
        content: "{{ [tier, policy, netset, hep, heps, resource, staged, promoted, deleted, unchanged] | to_json }}"
        dest: "{{ out }}"
        mode: "0600"
"""


class Agents:
    """Agents that report the store's current revision until `stall` names some of them."""

    def __init__(self, server):
        self.server, self.stalled, self.stop = server, set(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            revision = self.server.request("GET", "/v1/nodes", who="viewer")["revision"]
            for node in NODES:
                if node not in self.stalled:
                    self.server.request("POST", "/v1/status/%s" % node,
                                        {"appliedRevision": revision}, who=node)
            time.sleep(0.1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture
def agents(own_server):
    """The agents, once both have reported: one that never did is not waited for."""
    with Agents(own_server) as running:
        deadline = time.monotonic() + 10
        while {n["node"] for n in own_server.request("GET", "/v1/nodes")["nodes"]} != set(NODES):
            assert time.monotonic() < deadline, "the agents did not report"
            time.sleep(0.1)
        yield running


def test_every_write_module_waits_for_its_revision(own_server, agents, tmp_path):
    play, out = tmp_path / "play.yml", tmp_path / "out.json"
    play.write_text(PLAY)
    run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(play), "-e",
         "out=%s" % out], own_server.env())
    results = json.loads(out.read_text())
    written, unchanged = results[:-1], results[-1]
    revisions = [r["revision"] for r in written]
    assert all(isinstance(r, int) for r in revisions), revisions
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert all(r["converged"] is True for r in written)
    # wait_elapsed, as the RETURN blocks say: the seconds each write's wait took.
    assert all(isinstance(r["wait_elapsed"], float) and r["wait_elapsed"] >= 0
               for r in written), written
    assert unchanged["revision"] is None and "converged" not in unchanged
    assert "wait_elapsed" not in unchanged
    # What the agents report now covers the last write.
    status = own_server.request("GET", "/v1/nodes?revision=%d" % revisions[-1])
    assert status["converged"]


def test_wait_fails_naming_the_agent_that_lags(own_server, agents, tmp_path):
    agents.stalled.add("node-2")
    time.sleep(0.3)
    done = run(["ansible", "localhost", "-i", "localhost,", "-c", "local", "-m",
                "bulkhead.microseg.global_network_set", "-a",
                "name=late nets=198.18.2.0/24 wait=true wait_timeout=5.0"],
               own_server.env(), check=False)
    assert done.returncode != 0
    text = " ".join(done.stdout.split())
    assert "timed out after 5.0s waiting for every agent to apply revision" in text
    assert "not converged: node-2 (at " in text and "node-1" not in text.split("not converged")[1]
    # The write happened; the failure says at which revision.
    assert '"revision": ' in text
