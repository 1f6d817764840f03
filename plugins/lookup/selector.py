# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: selector
short_description: The inventory hosts whose labels match a Calico selector
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Returns the inventory hosts whose labels (the host variable O(labels_var), a mapping)
    match a selector in Calico's selector language, evaluated by the same engine as the
    Bulkhead agent (C(bulkhead.selector)), so a playbook and an agent agree on membership.
  - Each selector is parsed and compiled once per call; a selector that does not parse
    fails with the parser's message, its position and what was expected there.
  - With several selectors, the hosts matching any of them, each once, in inventory order.
  - Hosts without O(labels_var) have no labels; they match only selectors such as
    V(!has(app\)) or V(all(\)).
requirements:
  - The Python package C(bulkhead) on the controller, from the distribution C(bulkhead-microseg).
  - The Python package C(jmespath) on the controller, for O(query).
options:
  _terms:
    description: One or more selectors, for example V(zone == 'trusted' && app == 'kafka').
    required: true
    type: list
    elements: str
  labels_var:
    description: The host variable holding each host's labels.
    type: str
    default: bulkhead_labels
  return:
    description:
      - V(name) returns inventory host names.
      - V(endpoint) returns each host's HostEndpoint, the host variable O(endpoint_var)
        (which the inventory plugins M(bulkhead.microseg.endpoints) and M(bulkhead.microseg.store) set);
        a matching host without it is an error.
      - V(ips) returns the matching hosts' addresses, each once, from O(ips_var), else from the
        endpoint's C(spec.expectedIPs), else from C(ansible_host) when it is an IP address.
    type: str
    choices: [name, endpoint, ips]
    default: name
  endpoint_var:
    description: The host variable holding each host's HostEndpoint, for O(return=endpoint).
    type: str
    default: bulkhead_host_endpoint
  ips_var:
    description: The host variable holding each host's expected IPs, for O(return=ips).
    type: str
    default: bulkhead_expected_ips
  hosts:
    description:
      - Only hosts matching this host pattern, as in a play's C(hosts:) (a group, V(linux:&dc1),
        V(web*)). Limits given with C(--limit) do not apply.
    type: str
    default: all
  query:
    description:
      - A JMESPath expression applied to the whole result list, for example
        V([].metadata.name) with O(return=endpoint), or V([?starts_with(@, 'web'\)]) with names.
        A result that is not a list is returned as a list of one element.
    type: str
  precedence:
    description:
      - V(inventory) reads each host's variables from the inventory (what the inventory
        plugins and inventory files set), which is fast on large inventories; a host whose
        inventory lacks the variable, or whose value is a template, or which has it from
        extra vars, C(set_fact), C(register) or C(include_vars), is read through C(hostvars)
        instead. A value in C(host_vars/) or C(group_vars/) files is seen only when the host's
        inventory has none; use V(full) when such files override what the inventory sets.
      - V(full) reads every host through C(hostvars), with all of Ansible's variable
        precedence (C(host_vars/) files over inventory values, for example); slower, about
        a millisecond or more per host.
    type: str
    choices: [inventory, full]
    default: inventory
notes:
  - Call it with the C(query) function (or C(lookup) with C(wantlist=true)) to always get a list.
seealso:
  - plugin: bulkhead.microseg.selector_select
    plugin_type: filter
  - plugin: bulkhead.microseg.endpoints
    plugin_type: inventory
"""

EXAMPLES = r"""
- name: Kafka brokers of the trusted zone
  ansible.builtin.debug:
    msg: "{{ query('bulkhead.microseg.selector', \"zone == 'trusted' && app == 'kafka'\") }}"

- name: Their addresses, for a GlobalNetworkSet or a firewall rule elsewhere
  ansible.builtin.set_fact:
    kafka_ips: "{{ query('bulkhead.microseg.selector', \"app == 'kafka'\", return='ips') }}"

- name: Names of the endpoints of Linux hosts without an owner label, through JMESPath
  ansible.builtin.debug:
    msg: "{{ query('bulkhead.microseg.selector', '!has(owner)', hosts='linux', return='endpoint',
                   query='[].metadata.name') }}"

- name: Run a task on each matching host's endpoint
  ansible.builtin.debug:
    msg: "{{ item.spec.node }}"
  loop: "{{ query('bulkhead.microseg.selector', \"zone in {'dmz', 'corp'}\", return='endpoint') }}"
"""

RETURN = r"""
_list:
  description:
    - Host names, HostEndpoint documents or IP addresses (O(return)), or what O(query) made of them.
  type: list
  elements: raw
"""

from collections.abc import Mapping

from ansible.errors import AnsibleError, AnsibleLookupError
from ansible.plugins.lookup import LookupBase

from ansible_collections.bulkhead.microseg.plugins.plugin_utils import ansible_internals as internals
from ansible_collections.bulkhead.microseg.plugins.plugin_utils import engine

try:
    import jmespath
except ImportError:
    jmespath = None

NAME = "bulkhead.microseg.selector"
_MISSING = object()


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        engine.require_bulkhead(NAME)
        if not terms:
            raise AnsibleLookupError("%s: give at least one selector" % NAME)
        selectors = [engine.compile_selector(term, NAME, AnsibleLookupError) for term in terms]
        projection = self.get_option("query")
        if projection and jmespath is None:
            raise AnsibleLookupError("%s: the option query needs the Python package jmespath "
                                     "on the controller (pip install jmespath)" % NAME)

        reader = _HostVars(variables or {}, self.get_option("precedence") == "full")
        labels_var = self.get_option("labels_var")
        matched = []
        for host in reader.hosts(self.get_option("hosts")):
            labels = engine.labels_of(reader.get(host, labels_var),
                                      "%s: host %s: %s" % (NAME, host, labels_var))
            for selector in selectors:
                if selector.matches(labels):
                    matched.append(host)
                    break

        results = self._project(reader, matched)
        if projection:
            try:
                found = jmespath.search(projection, results)
            except jmespath.exceptions.JMESPathError as e:
                raise AnsibleLookupError("%s: query %r: %s" % (NAME, projection, e)) from None
            results = found if isinstance(found, list) else [found]
        return results

    def _project(self, reader, hosts):
        what = self.get_option("return")
        if what == "name":
            return hosts
        endpoint_var = self.get_option("endpoint_var")
        if what == "endpoint":
            out = []
            for host in hosts:
                doc = reader.get(host, endpoint_var)
                if not isinstance(doc, Mapping):
                    raise AnsibleLookupError(
                        "%s: host %s matches but has no HostEndpoint in %s (set by the "
                        "bulkhead.microseg.endpoints or store inventory plugin)"
                        % (NAME, host, endpoint_var))
                out.append(doc)
            return out
        ips = []
        seen = set()
        for host in hosts:
            for ip in self._ips(reader, host, endpoint_var):
                if ip not in seen:
                    seen.add(ip)
                    ips.append(ip)
        return ips

    def _ips(self, reader, host, endpoint_var):
        ips_var = self.get_option("ips_var")
        value = reader.get(host, ips_var)
        if value is None:
            doc = reader.get(host, endpoint_var)
            if isinstance(doc, Mapping):
                value = (doc.get("spec") or {}).get("expectedIPs")
        if value is None:
            address = reader.get(host, "ansible_host")
            value = [address] if engine.is_ip(address) else []
        try:
            return engine.ip_list(value)
        except TypeError as e:
            raise AnsibleLookupError("%s: host %s: %s: %s" % (NAME, host, ips_var, e)) from None


class _HostVars:
    """Reads host variables, from the inventory where that gives what hostvars would."""

    def __init__(self, variables, full):
        self.hostvars = variables.get("hostvars")
        self.groups = variables.get("groups") or {}
        self.inventory = internals.inventory_of(self.hostvars)
        manager = internals.variable_manager_of(self.hostvars)
        self.extra_vars = getattr(manager, "extra_vars", None) or {}
        # set_fact/register and include_vars outrank the inventory: the live mappings.
        self.overrides = internals.override_layers(manager)
        self.full = full or self.inventory is None
        self._hosts = {}

    def hosts(self, pattern):
        if self.inventory is not None:
            found = self.inventory.get_hosts(pattern, ignore_limits=True, ignore_restrictions=True)
            self._hosts = dict((h.name, h) for h in found)
            return list(self._hosts)
        if pattern in self.groups:
            return list(self.groups[pattern])
        raise AnsibleLookupError("%s: hosts %r: not a group of this inventory (patterns need "
                                 "the play's hostvars)" % (NAME, pattern))

    def get(self, host, name):
        """The variable's value for the host, None when it does not have it."""
        if not self.full and name not in self.extra_vars:
            obj = self._hosts.get(host)
            value = obj.vars.get(name, _MISSING) if obj is not None else _MISSING
            if value is not _MISSING and not _is_template(value) and \
                    not any(name in cache.get(host, ()) for cache in self.overrides):
                return value
        if self.hostvars is None:
            raise AnsibleError("%s: no hostvars to read %s of host %s from" % (NAME, name, host))
        try:
            return self.hostvars[host].get(name)
        except Exception as e:
            raise AnsibleLookupError("%s: host %s: %s: %s" % (NAME, host, name, e)) from None


def _is_template(value):
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_template(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_is_template(v) for v in value)
    return False
