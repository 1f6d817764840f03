"""The endpoints plugin's pure parts: which files it takes, default expected IPs."""

from __future__ import annotations

import pytest

from ansible_collections.bulkhead.microseg.plugins.inventory import endpoints


@pytest.mark.parametrize("name, taken", [
    ("site.bulkhead.yml", True), ("site.bulkhead.yaml", True),
    ("site.bulkhead_store.yml", False), ("site.yml", False), ("bulkhead.yml.bak", False),
])
def test_verify_file_by_suffix(tmp_path, name, taken):
    path = tmp_path / name
    path.write_text("plugin: bulkhead.microseg.endpoints\n")
    assert endpoints.InventoryModule().verify_file(str(path)) is taken


@pytest.mark.parametrize("variables, expected", [
    # an IP ansible_host wins over facts
    ({"ansible_host": "198.18.0.1", "ansible_facts": {
        "default_ipv4": {"address": "198.18.0.2"}}}, ["198.18.0.1"]),
    ({"ansible_host": "2001:2::1"}, ["2001:2::1"]),
    # a name: both default addresses from the facts, in the ansible_facts namespace ...
    ({"ansible_host": "web-1.example.com", "ansible_facts": {
        "default_ipv4": {"address": "198.18.0.2"}, "default_ipv6": {"address": "2001:2::2"}}},
     ["198.18.0.2", "2001:2::2"]),
    # ... or top-level, as the fact cache holds them
    ({"ansible_default_ipv4": {"address": "198.18.0.3"}, "ansible_default_ipv6": {}},
     ["198.18.0.3"]),
    # nothing usable
    ({"ansible_host": "web-1", "ansible_facts": {"default_ipv4": {"address": "n/a"}}}, []),
    ({}, []),
])
def test_default_expected_ips(variables, expected):
    assert endpoints._default_ips(variables) == expected  # pylint: disable=protected-access
