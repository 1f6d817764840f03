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
