# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The private attributes the selector lookup reads, against real objects of the
installed ansible-core (the version meta/runtime.yml claims): if a release renames one,
this fails here rather than the lookup silently falling back to its slow path."""

from __future__ import annotations

from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.vars.hostvars import HostVars
from ansible.vars.manager import VariableManager

from ansible_collections.bulkhead.microseg.plugins.plugin_utils import ansible_internals


def test_the_lookups_private_reads_hold(tmp_path):
    source = tmp_path / "hosts.ini"
    source.write_text("[web]\nweb-1 zone=dmz\n")
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(source)])
    manager = VariableManager(loader=loader, inventory=inventory)
    hostvars = HostVars(inventory, manager, loader)

    assert ansible_internals.inventory_of(hostvars) is inventory
    assert ansible_internals.variable_manager_of(hostvars) is manager
    manager.set_nonpersistent_facts("web-1", {"zone": "restricted"})
    manager.set_host_variable("web-1", "tier", "gold")
    layers = ansible_internals.override_layers(manager)
    assert len(layers) == 2
    assert layers[0]["web-1"]["zone"] == "restricted"     # set_fact / register
    assert layers[1]["web-1"]["tier"] == "gold"           # include_vars
    # The host objects the lookup reads before those layers.
    (host,) = inventory.get_hosts("web", ignore_limits=True, ignore_restrictions=True)
    assert host.vars["zone"] == "dmz"


def test_missing_attributes_mean_the_slow_path():
    assert ansible_internals.inventory_of(object()) is None
    assert ansible_internals.variable_manager_of(None) is None
    assert ansible_internals.override_layers(None) == []
