"""The store inventory plugin, run by the real ansible-inventory against the real
bulkhead-server. The main output is compared with golden/store.json."""

from __future__ import annotations

import json

import pytest

from conftest import compare_golden, inventory, plain, write


def hep(name, node, ips, labels):
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": labels},
            "spec": {"node": node, "expectedIPs": ips}}


STORE_ENDPOINTS = [
    hep("web-1-eth0", "web-1", ["198.18.1.11"], {"zone": "trusted", "app": "nginx"}),
    hep("kafka-1-eth0", "kafka-1", ["198.18.1.21", "2001:2::21"],
        {"zone": "trusted", "app": "kafka", "microseg.bulkhead.io/managed-by": "site"}),
    hep("kafka-1-eth1", "kafka-1", ["198.18.3.21"], {"zone": "backup", "app": "kafka"}),
    hep("db-1-eth0", "db-1", ["2001:2::31"], {"zone": "restricted", "app": "postgres"}),
]


@pytest.fixture
def store(clean_server):
    for doc in STORE_ENDPOINTS:
        clean_server.request("POST", "/v1/resources/HostEndpoint", doc)
    return clean_server


def test_store_golden(store, tmp_path):
    path = write(tmp_path, "fleet.bulkhead_store.yml", """\
plugin: bulkhead.microseg.store
keyed_groups:
  - key: bulkhead_labels.app
    prefix: app
compose:
  owner: bulkhead_labels['microseg.bulkhead.io/managed-by'] | default('nobody')
""")
    done = inventory(store.env("viewer"), path)
    compare_golden("store.json", done.stdout)


def test_store_selector_names_and_file_connection(store, tmp_path):
    """label_selector filtered by the server, hosts named by metadata.name, the
    connection from the file (no BULKHEAD_* environment), another vars prefix."""
    crt, key = store.cert("viewer")
    path = write(tmp_path, "sel.bulkhead_store.yml", """\
plugin: bulkhead.microseg.store
server_url: %s
ca_path: %s
client_cert: %s
client_key: %s
label_selector: "zone == 'trusted' && app in {'kafka', 'nginx'}"
hostname: name
vars_prefix: bh_
set_ansible_host: false
""" % (store.url, store.pki / "ca.crt", crt, key))
    env = store.env("viewer")
    for name in ("BULKHEAD_SERVER", "BULKHEAD_CA", "BULKHEAD_CERT", "BULKHEAD_KEY"):
        env.pop(name)
    data = plain(json.loads(inventory(env, path).stdout))
    hostvars = data["_meta"]["hostvars"]
    assert sorted(hostvars) == ["kafka-1-eth0", "web-1-eth0"]
    assert hostvars["web-1-eth0"] == {
        "bh_labels": {"zone": "trusted", "app": "nginx"},
        "bh_expected_ips": ["198.18.1.11"],
        "bh_host_endpoint": STORE_ENDPOINTS[0],
        "bh_host_endpoints": [STORE_ENDPOINTS[0]]}
    assert data["label_app_kafka"]["hosts"] == ["kafka-1-eth0"]


def test_store_cache(store, tmp_path):
    """The raw API answer is cached: a deleted endpoint stays until --flush-cache."""
    path = write(tmp_path, "c.bulkhead_store.yml", """\
plugin: bulkhead.microseg.store
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: %s
""" % (tmp_path / "cache"))
    env = store.env("viewer")

    def hosts(done):
        return sorted(json.loads(done.stdout)["_meta"]["hostvars"])

    assert hosts(inventory(env, path)) == ["db-1", "kafka-1", "web-1"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    store.request("DELETE", "/v1/resources/HostEndpoint/db-1-eth0")
    assert hosts(inventory(env, path)) == ["db-1", "kafka-1", "web-1"]
    assert hosts(inventory(env, path, args=("--list", "--flush-cache"))) == ["kafka-1", "web-1"]
    assert hosts(inventory(env, path)) == ["kafka-1", "web-1"]


@pytest.mark.parametrize("config, who, expected", [
    ("label_selector: \"zone == \"\n", "viewer",
     ["listing HostEndpoints", "label_selector", "zone =="]),
    ("server_url: https://127.0.0.1:9\n", "viewer",
     ["listing HostEndpoints from https://127.0.0.1:9", "failed"]),
    ("server_url: \"\"\n", "viewer",
     ["e.bulkhead_store.yml: server_url is not set", "BULKHEAD_SERVER"]),
    # an agent's certificate may not list host endpoints: the server's refusal, verbatim
    ("", "node-1", ["failed: agent node-1 may not GET /v1/resources/HostEndpoint"]),
])
def test_store_errors(store, tmp_path, config, who, expected):
    path = write(tmp_path, "e.bulkhead_store.yml", "plugin: bulkhead.microseg.store\n" + config)
    env = dict(store.env(who), ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    done = inventory(env, path, check=False)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    for part in expected:
        assert part in message, done.stderr


def test_store_leaves_out_endpoints_named_as_ansible_reserves(clean_server, tmp_path):
    """`node: localhost` would take the implicit localhost's place (delegate_to: localhost
    over SSH to the endpoint's address); `node: all` made the groups loop. Both are left
    out with a warning naming the HostEndpoint; the others are read."""
    for doc in (hep("evil-local", "localhost", ["127.0.0.2"], {"app": "x"}),
                hep("evil-all", "all", ["198.18.9.1"], {"app": "x"}),
                hep("evil-loop", "127.0.0.1", ["198.18.9.2"], {"app": "x"}),
                STORE_ENDPOINTS[0]):
        clean_server.request("POST", "/v1/resources/HostEndpoint", doc)
    path = write(tmp_path, "r.bulkhead_store.yml", "plugin: bulkhead.microseg.store\n")
    done = inventory(clean_server.env("viewer"), path)
    data = plain(json.loads(done.stdout))
    assert sorted(data["_meta"]["hostvars"]) == ["web-1"]
    assert data["_meta"]["hostvars"]["web-1"]["ansible_host"] == "198.18.1.11"
    warnings = " ".join(done.stderr.split())
    for name, why in (("evil-local", "'localhost' is a name Ansible reserves"),
                      ("evil-all", "'all' is a name Ansible reserves"),
                      ("evil-loop", "'127.0.0.1' is a loopback address")):
        assert "HostEndpoint %s is left out: spec.node (%s" % (name, why) in warnings, warnings


def test_store_cache_is_per_server_and_selector(store, tmp_path):
    """The cache key was the file's path alone: the same file with another label_selector,
    or pointed at another server by BULKHEAD_SERVER, gave the hosts cached for the first
    until the cache expired."""
    cache = tmp_path / "cache"
    head = ("plugin: bulkhead.microseg.store\ncache: true\ncache_plugin: "
            "ansible.builtin.jsonfile\ncache_connection: %s\n" % cache)
    path = write(tmp_path, "k.bulkhead_store.yml", head)
    env = store.env("viewer")

    def hosts(done):
        return sorted(json.loads(done.stdout)["_meta"]["hostvars"])

    assert hosts(inventory(env, path)) == ["db-1", "kafka-1", "web-1"]
    write(tmp_path, "k.bulkhead_store.yml", head + "label_selector: app == 'nginx'\n")
    assert hosts(inventory(env, path)) == ["web-1"]
    write(tmp_path, "k.bulkhead_store.yml", head)
    assert hosts(inventory(env, path)) == ["db-1", "kafka-1", "web-1"]  # its own entry
    elsewhere = dict(env, BULKHEAD_SERVER="https://127.0.0.1:9",
                     ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    done = inventory(elsewhere, path, check=False)
    assert done.returncode != 0
    assert "listing HostEndpoints from https://127.0.0.1:9" in " ".join(done.stderr.split())
