"""The endpoints inventory plugin, run by the real ansible-inventory over YAML inventories
with a real fact cache. The main output is compared with golden/endpoints.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import HERE, compare_golden, inventory, inventory_env, plain, run, write

FILES = HERE / "files" / "inventory"
VENV_PYTHON = Path(sys.executable)


@pytest.fixture(scope="module")
def fact_cache(tmp_path_factory):
    """A jsonfile fact cache filled by a real playbook run (set_fact cacheable)."""
    tmp = tmp_path_factory.mktemp("facts")
    env = inventory_env(tmp)
    run(["ansible-playbook", "-i", str(FILES / "hosts.yml"),
         str(HERE / "files" / "inventory-facts.yml")], env)
    assert sorted(p.name for p in (tmp / "facts").iterdir()) == [
        "s1_kafka-1", "s1_kafka-2", "s1_win-1"]
    return env


def test_endpoints_golden(fact_cache):
    done = inventory(fact_cache, FILES / "hosts.yml", FILES / "site.bulkhead.yml")
    compare_golden("endpoints.json", done.stdout)
    # The one host without any address gets labels but no HostEndpoint, with a warning.
    assert "1 host(s) have no address" in done.stderr and "appliance-1" in done.stderr


def test_endpoints_facts_from_real_setup(tmp_path):
    """Facts gathered by the setup module on this machine become labels."""
    env = inventory_env(tmp_path, ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    hosts = tmp_path / "hosts.yml"
    hosts.write_text("all:\n  hosts:\n    this-host:\n      ansible_connection: local\n")
    run(["ansible", "-i", str(hosts), "all", "-m", "ansible.builtin.setup",
         "-a", "gather_subset=!all,network"], env)
    config = tmp_path / "local.bulkhead.yml"
    config.write_text("plugin: bulkhead.microseg.endpoints\nstrict: true\n"
                      "labels:\n  os: ansible_facts.system | lower\n"
                      "  machine: ansible_machine\ninterface_name: \"'*'\"\n")
    done = inventory(env, hosts, config, args=("--host", "this-host"))
    host = plain(json.loads(done.stdout))
    assert host["bulkhead_labels"] == {"os": os.uname().sysname.lower(),
                                       "machine": os.uname().machine}
    assert host["bulkhead_host_endpoint"]["spec"]["interfaceName"] == "*"
    assert host["bulkhead_host_endpoint"]["metadata"]["labels"] == host["bulkhead_labels"]


@pytest.mark.parametrize("config, expected", [
    # A value the model rejects: host, label and the model's reason.
    ("labels:\n  os: \"'Red Hat'\"\n",
     ['host web-1', 'label os="Red Hat": value is not valid']),
    ("labels:\n  zone: zone\n  Bad Key: \"'x'\"\n",
     ['host web-1', 'label key "Bad Key" is not valid']),
    ("labels:\n  groups: \"['a', 'b']\"\n",
     ["host web-1", "label groups", "must be a string, number or boolean, not list"]),
    ("expected_ips: \"['198.18.1.300']\"\n",
     ["host web-1", 'spec.expectedIPs[0]: "198.18.1.300" is not an IP address']),
    ("endpoint_name: inventory_hostname | upper\n",
     ["host web-1", '"WEB-1" is not a valid name']),
    ("labels:\n  ready: true\n",
     ["label ready must be a Jinja expression (a string), not boolean"]),
    # strict: an undefined label names host, label and the expression.
    ("strict: true\nlabels:\n  os: ansible_facts.system | lower\n",
     ["host web-1", "label os (ansible_facts.system | lower)", "undefined"]),
    ("strict: true\nlabels:\n  zone: zone\n  app: app\n",
     ["host win-1", "label zone (zone)", "undefined"]),
])
def test_endpoints_bad_data_fails_naming_host_and_label(tmp_path, fact_cache, config, expected):
    path = write(tmp_path, "bad.bulkhead.yml", "plugin: bulkhead.microseg.endpoints\n" + config)
    env = dict(fact_cache, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    done = inventory(env, FILES / "hosts.yml", path, check=False)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    for part in expected:
        assert part in message, done.stderr


def test_endpoints_compose_sees_the_labels(tmp_path, fact_cache):
    """Labels first, then compose, groups and keyed_groups: with strict, compose reads
    bulkhead_labels, and groups read what compose made."""
    path = write(tmp_path, "c.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
strict: true
labels:
  zone: zone
  datacenter: datacenter
expected_ips: "['198.18.9.1']"
compose:
  site_zone: bulkhead_labels.datacenter ~ '-' ~ bulkhead_labels.zone
groups:
  dc1_trusted: site_zone == 'dc1-trusted'
""")
    hosts = write(tmp_path, "hosts.yml", "all:\n  vars: {datacenter: dc1}\n  hosts:\n"
                  "    a: {zone: trusted}\n    b: {zone: dmz}\n")
    data = plain(json.loads(inventory(fact_cache, hosts, path).stdout))
    assert data["_meta"]["hostvars"]["a"]["site_zone"] == "dc1-trusted"
    assert data["_meta"]["hostvars"]["b"]["site_zone"] == "dc1-dmz"
    assert data["dc1_trusted"]["hosts"] == ["a"]


@pytest.mark.parametrize("strict", ["true", "false"])
def test_endpoints_null_label_is_an_error_naming_it(tmp_path, fact_cache, strict):
    """One rule for label values: booleans true/false, numbers as written, null an error."""
    hosts = write(tmp_path, "hosts.yml", "all:\n  hosts:\n    a:\n      ansible_host: "
                  "198.18.9.1\n      pci: true\n      prio: 1\n      owner: null\n")
    path = write(tmp_path, "n.bulkhead.yml", "plugin: bulkhead.microseg.endpoints\n"
                 "strict: %s\nlabels:\n  pci: pci\n  prio: prio\n  owner: owner\n" % strict)
    env = dict(fact_cache, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    done = inventory(env, hosts, path, check=False)
    assert done.returncode != 0
    assert "host a: label owner (owner): a label value cannot be null" in " ".join(
        done.stderr.split())
    path.write_text(path.read_text().replace("owner: owner", "owner: owner | default(omit, true)"))
    data = plain(json.loads(inventory(env, hosts, path).stdout))
    assert data["_meta"]["hostvars"]["a"]["bulkhead_labels"] == {"pci": "true", "prio": "1"}


def test_endpoints_strict_host_without_address(tmp_path, fact_cache):
    hosts = write(tmp_path, "hosts.yml", "all:\n  hosts:\n    lonely:\n      zone: dmz\n")
    path = write(tmp_path, "s.bulkhead.yml",
                 "plugin: bulkhead.microseg.endpoints\nstrict: true\nlabels:\n  zone: zone\n")
    env = dict(fact_cache, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    done = inventory(env, hosts, path, check=False)
    assert done.returncode != 0
    assert "host lonely: no expected IPs and no interface_name" in " ".join(done.stderr.split())


def test_endpoints_options(tmp_path, fact_cache):
    """expected_ips as a comma-separated string, node/endpoint_name expressions, label
    groups without a prefix or switched off, non-strict skipping of undefined labels."""
    path = write(tmp_path, "o.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
labels:
  zone: zone
  ready: "true"
  port: "9000 + 92"
  missing: no_such_variable
expected_ips: "'198.18.9.1, 198.18.9.2'"
node: "'node-' ~ inventory_hostname"
endpoint_name: "inventory_hostname ~ '-eth0'"
label_group_prefix: ""
""")
    done = inventory(fact_cache, FILES / "hosts.yml", path)
    data = plain(json.loads(done.stdout))
    web1 = data["_meta"]["hostvars"]["web-1"]
    assert web1["bulkhead_labels"] == {"zone": "trusted", "ready": "true", "port": "9092"}
    assert web1["bulkhead_host_endpoint"] == {
        "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
        "metadata": {"name": "web-1-eth0", "labels": web1["bulkhead_labels"]},
        "spec": {"node": "node-web-1", "expectedIPs": ["198.18.9.1", "198.18.9.2"]}}
    assert "web-1" in data["zone_trusted"]["hosts"] and "port_9092" in data
    assert not any(name.startswith("label_") for name in data)

    off = write(tmp_path, "off.bulkhead.yml",
                "plugin: bulkhead.microseg.endpoints\nlabels:\n  zone: zone\nlabel_groups: false\n")
    data = json.loads(inventory(fact_cache, FILES / "hosts.yml", off).stdout)
    assert not any("zone" in name for name in data)


def test_endpoints_omit_leaves_a_label_out_even_when_strict(tmp_path, fact_cache):
    path = write(tmp_path, "omit.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
strict: true
labels:
  app: app | default(omit)
  zone: zone | default('none')
expected_ips: "[ansible_host] if ansible_host is match('^[0-9.:]+$') else omit"
interface_name: "'*'"
""")
    data = plain(json.loads(inventory(fact_cache, FILES / "hosts.yml", path).stdout))
    hostvars = data["_meta"]["hostvars"]
    assert hostvars["appliance-1"]["bulkhead_labels"] == {"zone": "none"}
    assert hostvars["appliance-1"]["bulkhead_expected_ips"] == []
    assert hostvars["appliance-1"]["bulkhead_host_endpoint"]["spec"] == {
        "node": "appliance-1", "interfaceName": "*"}
    assert hostvars["web-1"]["bulkhead_labels"] == {"zone": "trusted", "app": "nginx"}
    assert hostvars["web-1"]["bulkhead_expected_ips"] == ["198.18.1.11"]


def test_endpoints_use_vars_plugins(tmp_path, fact_cache):
    """host_vars/ and group_vars/ next to the inventory, with the precedence constructed
    gives them: host_vars/ over host variables over group_vars/ over group variables."""
    hosts = write(tmp_path, "hosts.yml", "all:\n  children:\n    dmz:\n      vars: {zone: dmz}\n"
                  "      hosts:\n        a: {ansible_host: 198.18.7.1, app: web}\n"
                  "        b: {ansible_host: 198.18.7.2}\n")
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "host_vars").mkdir()
    write(tmp_path / "group_vars", "dmz.yml", "app: from-group-vars\nzone: edge\n")
    write(tmp_path / "host_vars", "b.yml", "zone: from-host-vars\n")
    config = "plugin: bulkhead.microseg.endpoints\nlabels:\n  zone: zone\n  app: app\n"
    path = write(tmp_path, "v.bulkhead.yml", config + "use_vars_plugins: true\n")
    hostvars = plain(json.loads(inventory(fact_cache, hosts, path).stdout))["_meta"]["hostvars"]
    assert hostvars["a"]["bulkhead_labels"] == {"zone": "edge", "app": "web"}
    assert hostvars["b"]["bulkhead_labels"] == {"zone": "from-host-vars", "app": "from-group-vars"}
    # Without the option, only what the inventory sources themselves hold.
    path = write(tmp_path, "n.bulkhead.yml", config)
    hostvars = plain(json.loads(inventory(fact_cache, hosts, path).stdout))["_meta"]["hostvars"]
    assert hostvars["b"]["bulkhead_labels"] == {"zone": "dmz"}


SETUP_FACTS = {
    # What ansible.builtin.setup returns (the keys the cache holds), trimmed.
    "web-01": {"ansible_distribution": "Debian", "ansible_distribution_major_version": "12",
               "ansible_default_ipv4": {"address": "198.18.0.10", "interface": "eth0"},
               "ansible_default_ipv6": {"address": "2001:2::10", "interface": "eth0"}},
    "db-01": {"ansible_distribution": "RedHat", "ansible_distribution_major_version": "9",
              "ansible_default_ipv4": {"address": "198.18.0.12", "interface": "ens3"},
              "ansible_default_ipv6": {"address": "2001:2::12", "interface": "ens3"}},
}


def test_endpoints_with_the_demo_options_and_a_seeded_fact_cache(tmp_path):
    """The option shape `make demo` uses (inventory-examples/inventory/zz-endpoints.bulkhead.yml),
    facts written into the cache by Ansible's own jsonfile cache plugin."""
    from ansible.plugins.loader import cache_loader

    cache = cache_loader.get("jsonfile", _uri=str(tmp_path / "facts"), _timeout=0, _prefix="")
    for host, facts in SETUP_FACTS.items():
        cache.set(host, facts)
    hosts = write(tmp_path, "hosts.yml", """\
all:
  children:
    dmz: {vars: {zone: dmz}, hosts: {web-01: {app: web, department: ecommerce}}}
    restricted: {vars: {zone: restricted}, hosts: {db-01: {app: postgres, department: finance}}}
    fra1: {vars: {datacenter: fra1}, hosts: {web-01: null, db-01: null}}
""")
    config = write(tmp_path, "zz-endpoints.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
strict: true
labels:
  zone: zone
  datacenter: datacenter
  app: app
  department: department
  os: ansible_facts.distribution | lower
  os-version: ansible_facts.distribution_major_version
expected_ips: "[ansible_facts.default_ipv4.address, ansible_facts.default_ipv6.address]"
interface_name: ansible_facts.default_ipv4.interface
""")
    env = inventory_env(tmp_path, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    data = plain(json.loads(inventory(env, hosts, config).stdout))
    assert data["_meta"]["hostvars"]["db-01"]["bulkhead_host_endpoint"] == {
        "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
        "metadata": {"name": "db-01", "labels": {
            "zone": "restricted", "datacenter": "fra1", "app": "postgres",
            "department": "finance", "os": "redhat", "os-version": "9"}},
        "spec": {"node": "db-01", "interfaceName": "ens3",
                 "expectedIPs": ["198.18.0.12", "2001:2::12"]}}
    graph = inventory(env, hosts, config, args=("--graph", "label_zone_dmz")).stdout
    assert graph.split() == ["@label_zone_dmz:", "|--web-01"]
    # A host the cache has no facts for fails, naming it and the label.
    cache.delete("web-01")
    done = inventory(env, hosts, config, check=False)
    assert done.returncode != 0
    assert "host web-01: label os (ansible_facts.distribution | lower)" in " ".join(
        done.stderr.split())


def test_endpoints_without_bulkhead_package(tmp_path, fact_cache):
    """Ansible from the venv, but without the bulkhead package: a clear install message."""
    site = [p for p in sys.path if p.endswith("site-packages")][0]
    env = dict(fact_cache, PYTHONPATH="%s:%s" % (site, fact_cache["ANSIBLE_COLLECTIONS_PATH"]),
               ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    cmd = [sys.executable, "-S", str(VENV_PYTHON.parent / "ansible-inventory"),
           "-i", str(FILES / "hosts.yml"), "-i", str(FILES / "site.bulkhead.yml"), "--list"]
    done = run(cmd, env, check=False)
    assert done.returncode != 0
    message = " ".join(done.stderr.split())
    assert "bulkhead.microseg.endpoints needs the Python package bulkhead" in message
    assert "pip install bulkhead-microseg" in message


def test_a_hosts_facts_never_replace_the_inventorys_variables(tmp_path):
    """Facts are what a host says of itself: a compromised host's cached facts naming
    ansible_host, app or zone change neither its labels nor its address; they are seen
    only under ansible_facts (its real facts still label it)."""
    from ansible.plugins.loader import cache_loader

    cache = cache_loader.get("jsonfile", _uri=str(tmp_path / "facts"), _timeout=0, _prefix="")
    cache.set("web-01", {"ansible_host": "198.18.0.99", "ansible_port": 2222,
                         "app": "orders", "zone": "trusted", "ansible_system": "Linux",
                         "ansible_default_ipv4": {"address": "198.18.0.98"}})
    hosts = write(tmp_path, "hosts.yml", """\
all:
  children:
    dmz: {vars: {zone: dmz}, hosts: {web-01: {app: web, ansible_host: 198.18.0.10}}}
""")
    config = write(tmp_path, "zz.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
strict: true
labels:
  app: app
  zone: zone
  os: ansible_facts.system | lower
  said: ansible_facts.app
""")
    env = inventory_env(tmp_path, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    host = plain(json.loads(inventory(env, hosts, config).stdout))["_meta"]["hostvars"]["web-01"]
    assert host["bulkhead_host_endpoint"]["metadata"]["labels"] == {
        "app": "web", "zone": "dmz", "os": "linux", "said": "orders"}
    assert host["bulkhead_host_endpoint"]["spec"]["expectedIPs"] == ["198.18.0.10"]
    assert host["ansible_host"] == "198.18.0.10"


def test_a_fact_never_fills_in_for_an_inventory_variable_a_host_lacks(tmp_path):
    """A cached fact named `owner` (what set_fact cacheable or any module's ansible_facts
    can set, a compromised host's setup included) became the top-level variable `owner` on
    a host whose inventory had none, so `owner | default(omit)` labeled it as the host
    said. Only ansible_<name> facts are top-level; the others are ansible_facts.<name>."""
    from ansible.plugins.loader import cache_loader

    cache = cache_loader.get("jsonfile", _uri=str(tmp_path / "facts"), _timeout=0, _prefix="")
    cache.set("web-01", {"owner": "payments", "ansible_system": "Linux"})
    cache.set("web-02", {"owner": "payments"})
    hosts = write(tmp_path, "hosts.yml", """\
all:
  hosts:
    web-01: {ansible_host: 198.18.0.10}
    web-02: {ansible_host: 198.18.0.11, owner: web}
""")
    config = write(tmp_path, "zz.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
labels:
  owner: owner | default(omit)
  os: ansible_system | lower
  said: ansible_facts.owner
""")
    env = inventory_env(tmp_path, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true")
    hostvars = plain(json.loads(inventory(env, hosts, config).stdout))["_meta"]["hostvars"]
    assert hostvars["web-01"]["bulkhead_labels"] == {"os": "linux", "said": "payments"}
    assert hostvars["web-02"]["bulkhead_labels"] == {"owner": "web", "said": "payments"}


def test_one_host_that_cannot_be_labeled_does_not_stop_the_others(tmp_path):
    """A bad label value of one host (its facts, say) fails the source naming it and
    marks it with bulkhead_endpoint_error; the hosts after it still get their
    HostEndpoints (onboard.yml refuses to sync while one host has the error)."""
    hosts = write(tmp_path, "hosts.yml", """\
all:
  hosts:
    a-1: {os: debian, ansible_host: 198.18.0.11}
    b-1: {os: "openSUSE Leap", ansible_host: 198.18.0.12}
    c-1: {os: debian, ansible_host: 198.18.0.13}
""")
    config = write(tmp_path, "zz.bulkhead.yml", "plugin: bulkhead.microseg.endpoints\n"
                   "labels:\n  os: os\n")
    env = inventory_env(tmp_path)
    done = inventory(env, hosts, config)
    hostvars = plain(json.loads(done.stdout))["_meta"]["hostvars"]
    assert "bulkhead_host_endpoint" in hostvars["a-1"]
    assert "bulkhead_host_endpoint" in hostvars["c-1"]
    assert "bulkhead_host_endpoint" not in hostvars["b-1"]
    assert "host b-1" in hostvars["b-1"]["bulkhead_endpoint_error"]
    assert "1 host(s) could not be labeled" in " ".join(done.stderr.split())
    failing = inventory(dict(env, ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="true"), hosts,
                        config, check=False)
    assert failing.returncode != 0 and "host b-1" in " ".join(failing.stderr.split())


def test_label_groups_that_stand_for_two_labels_are_named_in_a_warning(tmp_path, fact_cache):
    """`zone=a_b` and `zone_a=b` both make the group label_zone_a_b (a group name keeps
    letters, digits and _ only): their hosts share it, and a warning names both labels."""
    hosts = write(tmp_path, "hosts.yml", """\
all:
  hosts:
    one: {ansible_host: 198.18.7.1, zone: a_b}
    two: {ansible_host: 198.18.7.2, zone_a: b}
    three: {ansible_host: 198.18.7.3, zone: c}
""")
    config = write(tmp_path, "zz.bulkhead.yml", """\
plugin: bulkhead.microseg.endpoints
labels:
  zone: zone | default(omit)
  zone_a: zone_a | default(omit)
""")
    done = inventory(fact_cache, hosts, config)
    data = plain(json.loads(done.stdout))
    assert sorted(data["label_zone_a_b"]["hosts"]) == ["one", "two"]
    message = " ".join(done.stderr.split())
    assert "label group label_zone_a_b stands for zone=a_b and for zone_a=b: their hosts " \
        "are in one group" in message, message
    assert "label_zone_c" not in message
