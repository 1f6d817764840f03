"""The lookup's host-variable reader on real InventoryManager/VariableManager/HostVars
objects: the inventory fast path, and the hostvars path where precedence needs it."""

from __future__ import annotations

from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.vars.hostvars import HostVars
from ansible.vars.manager import VariableManager

from ansible_collections.bulkhead.microseg.plugins.lookup import selector

INVENTORY = """\
all:
  children:
    dc1:
      hosts:
        a: {bulkhead_labels: {zone: trusted}}
        b: {bulkhead_labels: {zone: "{{ 'templated' }}"}}
    dc2:
      vars: {bulkhead_labels: {zone: from-group}}
      hosts:
        c: {}
        d: {bulkhead_labels: {zone: dmz}}
"""


def reader(tmp_path, full=False, extra=None):
    path = tmp_path / "hosts.yml"
    path.write_text(INVENTORY)
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[str(path)])
    manager = VariableManager(loader=loader, inventory=inventory)
    if extra:
        manager._extra_vars = extra  # pylint: disable=protected-access
    hostvars = HostVars(inventory=inventory, variable_manager=manager, loader=loader)
    return selector._HostVars({"hostvars": hostvars, "groups": {}}, full), manager


def test_inventory_fast_path_and_fallbacks(tmp_path):
    hosts, manager = reader(tmp_path)
    assert hosts.hosts("all") == ["a", "b", "c", "d"]
    assert hosts.get("a", "bulkhead_labels") == {"zone": "trusted"}
    # a template is rendered through hostvars; a group variable is found there too
    assert hosts.get("b", "bulkhead_labels") == {"zone": "templated"}
    assert hosts.get("c", "bulkhead_labels") == {"zone": "from-group"}
    assert hosts.get("c", "no_such") is None
    # set_fact (non-persistent facts) outranks the inventory
    manager.set_nonpersistent_facts("d", {"bulkhead_labels": {"zone": "moved"}})
    assert hosts.get("d", "bulkhead_labels") == {"zone": "moved"}
    # and so does include_vars
    manager.set_host_variable("a", "bulkhead_labels", {"zone": "included"})
    assert hosts.get("a", "bulkhead_labels") == {"zone": "included"}


def test_patterns_ignore_limits(tmp_path):
    hosts = reader(tmp_path)[0]
    hosts.inventory.subset("a")
    assert hosts.hosts("dc2") == ["c", "d"]
    assert hosts.hosts("dc1:&all:!b") == ["a"]


def test_extra_vars_outrank_every_host(tmp_path):
    hosts = reader(tmp_path, extra={"bulkhead_labels": {"zone": "extra"}})[0]
    hosts.hosts("all")
    assert hosts.get("a", "bulkhead_labels") == {"zone": "extra"}


def test_full_precedence_reads_hostvars(tmp_path):
    hosts = reader(tmp_path, full=True)[0]
    hosts.hosts("all")
    assert hosts.full
    assert hosts.get("a", "bulkhead_labels") == {"zone": "trusted"}


def test_is_template():
    assert selector._is_template({"a": ["x", "{{ y }}"]})
    assert selector._is_template("{% if x %}")
    assert not selector._is_template({"a": "b", "c": [1, None]})
