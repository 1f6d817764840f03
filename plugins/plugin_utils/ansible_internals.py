# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one place the collection reads Ansible's private attributes.

The `selector` lookup answers "which hosts does this selector match" from the inventory's
own host objects, without templating every host's variables through `hostvars` (which is
what makes it 44x faster than `selectattr` on 10,000 hosts). Ansible has no public way to
reach the inventory or the play's set_fact/include_vars layers from a lookup, so these
few reads go through here, each tolerant of the attribute missing (the lookup then falls
back to reading every variable through `hostvars`). `tests/unit/plugins/plugin_utils/
test_ansible_internals.py` checks them against real objects of the ansible-core the
collection claims (meta/runtime.yml `requires_ansible`).
"""

from __future__ import annotations


def inventory_of(hostvars):
    """The InventoryManager behind a play's `hostvars`, or None."""
    return getattr(hostvars, "_inventory", None)


def variable_manager_of(hostvars):
    """The VariableManager behind a play's `hostvars`, or None."""
    return getattr(hostvars, "_variable_manager", None)


def override_layers(manager):
    """The per-host variables that outrank the inventory and can change during a play:
    facts set with set_fact/register (non-persistent) and include_vars."""
    return [layer for layer in (getattr(manager, "_nonpersistent_fact_cache", None),
                                getattr(manager, "_vars_cache", None))
            if layer is not None]
