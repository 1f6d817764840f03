"""The selector lookup on a generated inventory of 10,000 hosts, run by ansible-playbook.

The expected members are computed here with plain Python predicates (not the selector
engine), so the test checks the lookup against an independent answer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from conftest import ansible_env, run

ZONES = ("trusted", "dmz", "corp", "lab")
APPS = ("web", "kafka", "db", "cache", "api")


def labels_of(i: int) -> dict[str, str]:
    labels = {"zone": ZONES[i % 4], "app": APPS[(i // 4) % 5], "env": "prod" if i % 3 else "dev"}
    if i % 7 == 0:
        labels["owner"] = "team-%d" % (i % 3)
    return labels


def address(i: int) -> str:
    return "198.18.%d.%d" % (i // 250, i % 250 + 1)


def fleet(n: int) -> dict:
    """An inventory in the JSON form ansible-inventory reads, two datacenter groups."""
    groups: dict = {"dc1": {"hosts": {}}, "dc2": {"hosts": {}}}
    for i in range(n):
        labels = labels_of(i)
        host = {"ansible_host": address(i), "bulkhead_labels": labels,
                "bulkhead_expected_ips": [address(i)],
                "bulkhead_host_endpoint": {
                    "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                    "metadata": {"name": "h%05d" % i, "labels": labels},
                    "spec": {"node": "h%05d" % i, "expectedIPs": [address(i)]}}}
        groups["dc1" if i % 2 else "dc2"]["hosts"]["h%05d" % i] = host
    # One host's labels are a template, as a YAML inventory may write them.
    groups["dc2"]["hosts"]["h00000"]["bulkhead_labels"] = {
        "zone": "{{ 'templated' }}", "app": "web"}
    return {"all": {"children": groups}}


PLAY = """\
- name: Move one host by set_fact
  hosts: h00004
  gather_facts: false
  tasks:
    - name: New labels for this play only
      ansible.builtin.set_fact:
        bulkhead_labels: {zone: moved, app: kafka}

- name: The lookup over every host
  hosts: localhost
  gather_facts: false
  tasks:
    - name: One question alone
      ansible.builtin.set_fact:
        timed: "{{ query('bulkhead.microseg.selector', \\"zone == 'dmz' && app == 'db'\\") }}"
    - name: Ask
      ansible.builtin.set_fact:
        answers:
          kafka_trusted: "{{ query('bulkhead.microseg.selector', \\"zone == 'trusted' && app == 'kafka'\\") }}"
          dc1_dev_db_or_cache: "{{ query('bulkhead.microseg.selector', \\"app in {'db', 'cache'} && env != 'prod'\\", hosts='dc1') }}"
          dmz_web_ips: "{{ query('bulkhead.microseg.selector', \\"zone == 'dmz' && app == 'web'\\", return='ips') }}"
          owned_team_1: "{{ query('bulkhead.microseg.selector', \\"owner == 'team-1'\\", return='endpoint', query='[].metadata.name') }}"
          templated: "{{ query('bulkhead.microseg.selector', \\"zone == 'templated'\\") }}"
          moved: "{{ query('bulkhead.microseg.selector', \\"zone == 'moved'\\") }}"
          timed: "{{ timed }}"
    - name: Write the answers
      ansible.builtin.copy:
        content: "{{ answers | to_json }}"
        dest: "{{ answers_file }}"
        mode: "0644"
"""


def test_lookup_on_10000_hosts(tmp_path: Path):
    n = 10_000
    inventory = tmp_path / "fleet.json"
    inventory.write_text(json.dumps(fleet(n)))
    play = tmp_path / "play.yml"
    play.write_text(PLAY)
    answers_file = tmp_path / "answers.json"
    env = dict(os.environ)
    env.update(ansible_env())
    env["PATH"] = "%s:%s" % (Path(sys.executable).parent, env.get("PATH", ""))
    run(["ansible-playbook", "-i", str(inventory), "-i", "localhost,", "-c", "local", str(play),
         "-e", "answers_file=%s" % answers_file], env)
    got = json.loads(answers_file.read_text())

    hosts = ["h%05d" % i for i in range(n)]
    # ansible-inventory lists dc1 (odd) hosts first, then dc2: the inventory's order.
    order = [h for h in hosts if int(h[1:]) % 2] + [h for h in hosts if not int(h[1:]) % 2]
    labels = {h: labels_of(int(h[1:])) for h in hosts}
    labels["h00000"] = {"zone": "templated", "app": "web"}
    labels["h00004"] = {"zone": "moved", "app": "kafka"}

    def members(predicate, among=order):
        return [h for h in among if predicate(labels[h])]

    kafka_trusted = members(lambda lab: lab["zone"] == "trusted" and lab["app"] == "kafka")
    assert got["kafka_trusted"] == kafka_trusted and len(kafka_trusted) == 499
    assert got["dc1_dev_db_or_cache"] == members(
        lambda lab: lab["app"] in ("db", "cache") and lab.get("env") != "prod",
        [h for h in order if int(h[1:]) % 2])
    assert got["dmz_web_ips"] == [address(int(h[1:])) for h in members(
        lambda lab: lab["zone"] == "dmz" and lab["app"] == "web")]
    assert got["owned_team_1"] == members(lambda lab: lab.get("owner") == "team-1")
    assert got["templated"] == ["h00000"]
    assert got["moved"] == ["h00004"]
    assert got["timed"] == members(lambda lab: lab["zone"] == "dmz" and lab["app"] == "db")
    # How fast it is against hostvars filtering is a benchmark's figure, not a test's:
    # agent/benchmarks/collection.py (docs/benchmarks.md).
