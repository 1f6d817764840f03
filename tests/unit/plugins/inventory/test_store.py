"""The store plugin takes only *.bulkhead_store.yml files."""

from __future__ import annotations

import pytest

from ansible_collections.bulkhead.microseg.plugins.inventory import store


@pytest.mark.parametrize("name, taken", [
    ("fleet.bulkhead_store.yml", True), ("fleet.bulkhead_store.yaml", True),
    ("fleet.bulkhead.yml", False), ("fleet.yml", False),
])
def test_verify_file_by_suffix(tmp_path, name, taken):
    path = tmp_path / name
    path.write_text("plugin: bulkhead.microseg.store\n")
    assert store.InventoryModule().verify_file(str(path)) is taken


@pytest.mark.parametrize("name, problem", [
    ("web-1", None), ("web-1.example.com", None), ("kafka_1", None), ("198.18.0.10", None),
    ("2001:db8::1", None),
    ("localhost", "reserves"), ("LocalHost", "reserves"), ("localhost.localdomain", "reserves"),
    ("all", "reserves"), ("ungrouped", "reserves"),
    ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("web[1:3]", "not a valid host name"), ("a b", "not a valid host name"),
    ("-web", "not a valid host name"), ("web:22", "not a valid host name"),
    ("", "no host name"), (None, "no host name"), (["a"], "no host name"),
])
def test_host_names_ansible_reserves_or_cannot_take_are_refused(name, problem):
    found = store.host_name_problem(name)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize("value, address", [
    ("198.18.0.10", "198.18.0.10"), ("2001:db8::1", "2001:db8::1"),
    ("198.18.0.0/24", None), ("web-1", None), (2130706433, None), ({"a": 1}, None),
    ("198.18.0.10 -o ProxyCommand=x", None),
])
def test_only_an_ip_address_becomes_ansible_host(value, address):
    docs = [{"metadata": {"name": "e"}, "spec": {"expectedIPs": [value]}}]
    assert store.InventoryModule._ansible_host("h", docs) == address


@pytest.mark.parametrize("ips, address", [
    (["127.0.0.1"], None), (["::1", "198.18.0.12"], "198.18.0.12"),
    (["127.1.2.3", "2001:2::1"], "2001:2::1"), (["0.0.0.0"], None), (["::"], None),
    (["::ffff:127.0.0.1", "198.18.0.13"], "198.18.0.13"),
])
def test_a_loopback_expected_ip_never_becomes_ansible_host(ips, address):
    """`expectedIPs: [127.0.0.1]` made ansible_host 127.0.0.1: the host's tasks went over
    SSH to the controller, which the plugin refuses as a host name for that reason."""
    docs = [{"metadata": {"name": "e"}, "spec": {"expectedIPs": ips}}]
    assert store.InventoryModule._ansible_host("h", docs) == address


@pytest.mark.parametrize("name", ["::ffff:127.0.0.1", "0.0.0.0", "::"])
def test_host_names_that_reach_the_controller_are_refused(name):
    assert "loopback" in store.host_name_problem(name)
