# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: endpoints
short_description: Labels, expected IPs and HostEndpoints for the hosts of an existing inventory
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Works like M(ansible.builtin.constructed) over the inventory that the sources before
    it loaded (list it after them, for example C(-i hosts.yml -i site.bulkhead.yml), or
    name it last in an inventory directory), with facts from the fact cache when one is
    configured.
  - For each host it evaluates O(labels), O(expected_ips), O(interface_name), O(node) and
    O(endpoint_name) as Jinja expressions over the host's variables and facts, and sets
    the host variables C(bulkhead_labels) (a dict), C(bulkhead_expected_ips) (a list) and
    C(bulkhead_host_endpoint) (the whole C(projectcalico.org/v3) HostEndpoint, ready for
    M(bulkhead.microseg.host_endpoints)).
  - Every HostEndpoint is validated with the C(bulkhead) package's model, the one
    bulkhead-server uses, so a bad label key or value, address or name fails here with
    the host, the label and what is wrong.
  - Facts are available both as C(ansible_facts.<name>) and, as M(ansible.builtin.constructed)
    has them, as top-level C(ansible_<name>) variables; but a fact never replaces an inventory
    variable of the same name, and connection and magic variables among the facts (C(ansible_host)
    and the like) are dropped, as Ansible drops them from gathered facts. A fact whose name does
    not start with C(ansible_) (C(owner), from C(set_fact) with C(cacheable) or a module's
    C(ansible_facts)) is only C(ansible_facts.owner), also on a host whose inventory has no
    C(owner), so it never fills in for an inventory variable (V(owner | default(omit\))).
  - Facts are what a host says of itself, and a compromised host says what it likes. Labels that
    policies trust (who may reach a database) and the addresses of O(expected_ips) should come from
    the inventory (variables, groups, an IP C(ansible_host)); a label or address taken from a fact
    is only as trustworthy as the host.
  - The configuration file's name must end in C(.bulkhead.yml) or C(.bulkhead.yaml).
requirements:
  - The Python package C(bulkhead) on the controller, from the distribution C(bulkhead-microseg).
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    required: true
    type: str
    choices: [bulkhead.microseg.endpoints]
  labels:
    description:
      - Label key to a Jinja expression over host variables and facts, for example
        V(ansible_facts.system | lower).
      - A label whose expression is undefined or empty is left out of the host's labels;
        with O(strict=true) it fails instead, naming the host and the label.
      - A label whose expression gives V(omit) (for example V(app | default(omit\))) is left out
        of the host's labels, also with O(strict=true).
      - Booleans become V(true) or V(false), numbers stay as written (V(1), V(2.5)), as the
        modules write them; a null value, a list or a mapping is an error naming the host
        and the label (use V(default(omit\)) to leave a label out).
    type: dict
    default: {}
  expected_ips:
    description:
      - Jinja expression giving the host's addresses, C(spec.expectedIPs) - a list, or a
        string with one address or several separated by commas.
      - Left out, C(ansible_host) when it is an IP address, otherwise the facts
        C(default_ipv4.address) and C(default_ipv6.address).
    type: str
  interface_name:
    description:
      - Jinja expression giving C(spec.interfaceName); V("*") (quote it, V("'*'")) means all of the
        host's interfaces. Left out, the agent finds the interface by the expected IPs.
    type: str
  node:
    description: Jinja expression giving C(spec.node), the name the host's agent runs as.
    type: str
    default: inventory_hostname
  endpoint_name:
    description: Jinja expression giving the HostEndpoint's C(metadata.name).
    type: str
    default: inventory_hostname
  label_groups:
    description:
      - Add each host to a group per label, C(<label_group_prefix>_<key>_<value>), for
        example C(label_zone_trusted), with the name sanitised as O(keyed_groups) does.
      - Two labels can make one name (C(zone=a_b) and C(zone_a=b) both make
        C(label_zone_a_b)); their hosts then share the group, and a warning names both
        labels.
    type: bool
    default: true
  label_group_prefix:
    description: Prefix of the label groups. Empty, the groups are C(<key>_<value>).
    type: str
    default: label
  use_vars_plugins:
    description:
      - Also read the variables that vars plugins give the hosts and their groups, for
        example C(host_vars/) and C(group_vars/) next to the inventory, as
        M(ansible.builtin.constructed) does with the same option.
    type: bool
    default: false
extends_documentation_fragment:
  - constructed
notes:
  - Runs after the other inventory sources; it adds variables and groups and no hosts.
  - A host whose HostEndpoint cannot be made (a bad label value, address or name) does not
    stop the others; it gets C(bulkhead_endpoint_error) (the message), and the source fails
    at the end naming every such host (a warning unless C(any_unparsed_is_failed)).
    C(onboard.yml) syncs nothing while any host has C(bulkhead_endpoint_error), since its
    purge would delete that host's HostEndpoint.
  - Needs ansible-core 2.19 or newer (older versions would treat the strings read from
    facts as templates on the controller).
  - Hosts without any address (no O(expected_ips), no IP C(ansible_host), no facts) and
    without O(interface_name) get labels but no C(bulkhead_host_endpoint), with a warning;
    with O(strict=true) they fail. They still get C(bulkhead_endpoint_name), and
    C(onboard.yml) leaves the endpoint of that name as it is in the store instead of
    deleting it.
seealso:
  - plugin: bulkhead.microseg.store
    plugin_type: inventory
  - plugin: bulkhead.microseg.selector
    plugin_type: lookup
  - module: bulkhead.microseg.host_endpoints
"""

EXAMPLES = r"""
# site.bulkhead.yml, used as: ansible-inventory -i hosts.yml -i site.bulkhead.yml --list
plugin: bulkhead.microseg.endpoints
labels:
  zone: zone
  app: app
  os: ansible_facts.system | lower
  datacenter: inventory_hostname.split('-')[0]
expected_ips: "[ansible_facts.default_ipv4.address]"
# groups label_zone_trusted, label_app_kafka, ... and anything constructed can do:
keyed_groups:
  - key: bulkhead_labels.zone
    prefix: zone
groups:
  kafka_trusted: bulkhead_labels.app | default('') == 'kafka' and bulkhead_labels.zone | default('') == 'trusted'
"""

from ansible import constants as C
from ansible.errors import AnsibleError, AnsibleParserError
from ansible.inventory.helpers import get_group_vars
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable
from ansible.plugins.loader import cache_loader
from ansible.utils.display import Display
from ansible.utils.vars import combine_vars
from ansible.vars.clean import clean_facts, namespace_facts
from ansible.vars.plugins import get_vars_from_inventory_sources

from ansible_collections.bulkhead.microseg.plugins.plugin_utils import engine

try:
    from ansible.errors import AnsibleValueOmittedError
    from ansible.template import trust_as_template
except ImportError:  # ansible-core < 2.19: refused in parse (engine.require_core_219)
    class AnsibleValueOmittedError(Exception):
        """Never raised before 2.19, where an omitted value is the omit placeholder."""

    def trust_as_template(value):
        return value

display = Display()

NAME = "bulkhead.microseg.endpoints"
SUFFIXES = (".bulkhead.yml", ".bulkhead.yaml")
_MISSING = object()  # undefined or failed (an error with strict)
_OMITTED = object()  # the expression gave omit: left out on purpose, also with strict


class InventoryModule(BaseInventoryPlugin, Constructable):
    """Label hosts of the inventory loaded so far and build their HostEndpoints."""

    NAME = NAME
    _sources: list = []  # the inventory sources, for vars plugins

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(SUFFIXES)

    def parse(self, inventory, loader, path, cache=False):
        super().parse(inventory, loader, path, cache=cache)
        engine.require_core_219(NAME)
        engine.require_bulkhead(NAME)
        self._read_config_data(path)
        labels = self.get_option("labels") or {}
        if not isinstance(labels, dict):
            raise AnsibleParserError("%s: %s: labels must be a mapping of label key to "
                                     "expression" % (NAME, path))
        fact_cache = cache_loader.get(C.CACHE_PLUGIN)
        self._sources = getattr(inventory, "processed_sources", None) or []
        without_address = []
        errors = []
        self._label_groups = {}    # group name -> the first (key, value) that made it
        self._collisions = {}      # group name -> the labels that made it too
        for host in list(inventory.hosts):
            # A host that cannot be labeled does not stop the others: it gets
            # bulkhead_endpoint_error instead of a HostEndpoint, which onboard.yml refuses
            # to sync past (its purge would delete that host's HostEndpoint), and the
            # source fails at the end, naming every such host.
            try:
                if not self._host(host, labels, fact_cache):
                    without_address.append(host)
            except Exception as e:  # pylint: disable=broad-exception-caught
                message = to_text(e) if isinstance(e, AnsibleError) else \
                    "%s: host %s: %s" % (NAME, host, e)
                self.inventory.set_variable(host, "bulkhead_endpoint_error", message)
                errors.append(message)
        for group in sorted(self._collisions):
            key, value = self._label_groups[group]
            display.warning(
                "%s: label group %s stands for %s=%s and for %s: their hosts are in one "
                "group (group names keep letters, digits and _ only); use keyed_groups with "
                "another separator to tell them apart" % (
                    NAME, group, key, value, ", ".join(
                        "%s=%s" % kv for kv in sorted(self._collisions[group]))))
        if without_address:
            display.warning(
                "%s: %d host(s) have no address and no interface_name, so no "
                "bulkhead_host_endpoint: %s%s" % (
                    NAME, len(without_address), ", ".join(without_address[:10]),
                    ", ..." if len(without_address) > 10 else ""))
        if errors:
            raise AnsibleParserError(
                "%s: %d host(s) could not be labeled (each has bulkhead_endpoint_error, and "
                "onboard.yml syncs nothing while one has): %s%s" % (
                    NAME, len(errors), "; ".join(errors[:10]),
                    "; ..." if len(errors) > 10 else ""))

    # ------------------------------------------------------------------ per host
    def _variables(self, host, fact_cache):
        """Group and host variables, then cached facts (as ansible_facts, and top-level
        where the inventory has no variable of that name).

        Facts are what a host says of itself (a compromised host says what it likes), so
        they never replace the inventory's variables: connection and magic variables
        (``ansible_host``...) are dropped as Ansible drops them from gathered facts
        (``clean_facts``), and a fact named like an inventory variable (``app``) is seen
        only under ``ansible_facts``, as is a fact whose name does not start with
        ``ansible_`` (``owner``), also where the inventory has no variable of that name."""
        obj = self.inventory.hosts[host]
        group_vars, host_vars = get_group_vars(obj.get_groups()), obj.get_vars()
        if self.get_option("use_vars_plugins"):
            # As constructed: group_vars/ over inventory group vars, host_vars/ over host vars.
            group_vars = combine_vars(group_vars, get_vars_from_inventory_sources(
                self.loader, self._sources, obj.get_groups(), "all"))
            host_vars = combine_vars(host_vars, get_vars_from_inventory_sources(
                self.loader, self._sources, [obj], "all"))
        variables = combine_vars(group_vars, host_vars)
        if fact_cache.contains(host):
            cached = clean_facts(fact_cache.get(host))
            # Top-level only as ansible_<name>: a fact of another name (`owner`, which a
            # module or the host's setup can return) would stand in for an inventory
            # variable the host lacks (`owner | default(omit)` as a label).
            facts = dict((k, v) for k, v in cached.items() if str(k).startswith("ansible_"))
            if "ansible_facts" not in facts:
                facts = combine_vars(facts, namespace_facts(cached))
            variables = combine_vars(facts, variables)
        return variables

    def _evaluate(self, expression, variables, host, what, strict):
        """The expression's value; _OMITTED for omit; _MISSING when it is undefined or fails
        (not strict)."""
        if not isinstance(expression, str):
            raise AnsibleParserError("%s: %s must be a Jinja expression (a string), not %s"
                                     % (NAME, what, engine.type_name(expression)))
        try:
            value = self._compose(trust_as_template(expression), variables)
        except AnsibleValueOmittedError:
            return _OMITTED
        except Exception as e:
            if strict:
                raise AnsibleParserError("%s: host %s: %s (%s): %s"
                                         % (NAME, host, what, expression, e)) from e
            return _MISSING
        return value

    def _host(self, host, label_exprs, fact_cache):
        """Set the host's bulkhead_* variables and groups; False when it has no address."""
        strict = self.get_option("strict")
        variables = self._variables(host, fact_cache)

        labels = {}
        for key, expression in label_exprs.items():
            what = "label %s" % key
            value = self._evaluate(expression, variables, host, what, strict)
            if value is _OMITTED:
                continue
            try:
                value = None if value is _MISSING else engine.label_value(value)
            except TypeError as e:
                raise AnsibleParserError("%s: host %s: %s (%s): %s"
                                         % (NAME, host, what, expression, e)) from None
            if value is None:
                if strict:
                    raise AnsibleParserError("%s: host %s: %s (%s) is empty"
                                             % (NAME, host, what, expression))
                continue
            labels[str(key)] = value

        ips = self._expected_ips(variables, host, strict)
        interface = self._optional("interface_name", variables, host, strict)
        node = self._required("node", variables, host, strict)
        name = self._required("endpoint_name", variables, host, strict)

        self.inventory.set_variable(host, "bulkhead_labels", labels)
        self.inventory.set_variable(host, "bulkhead_expected_ips", ips)
        if name is not None:
            # Also for a host without an address: onboard.yml keeps the endpoint of that
            # name instead of deleting it (an expired fact cache is not a host gone).
            self.inventory.set_variable(host, "bulkhead_endpoint_name", name)
        has_address = bool(ips or interface)
        if has_address and node is not None and name is not None:
            try:
                doc = engine.host_endpoint(name, node, labels, ips, interface)
            except ValueError as e:
                raise AnsibleParserError("%s: host %s: %s" % (NAME, host, e)) from None
            self.inventory.set_variable(host, "bulkhead_host_endpoint", doc)
        elif not has_address and strict:
            raise AnsibleParserError(
                "%s: host %s: no expected IPs and no interface_name (ansible_host is not an "
                "IP address and there are no default_ipv4/default_ipv6 facts): set "
                "expected_ips or interface_name" % (NAME, host))

        # Labels first, then compose, groups and keyed_groups: they all see the variables
        # just set (bulkhead_labels included), and groups see what compose made.
        variables = self._variables(host, fact_cache)
        self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
        variables = self._variables(host, fact_cache)
        self._add_host_to_composed_groups(self.get_option("groups"), variables, host,
                                          strict=strict, fetch_hostvars=False)
        self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host,
                                       strict=strict, fetch_hostvars=False)
        if self.get_option("label_groups"):
            names = engine.label_group_names(labels, self.get_option("label_group_prefix"),
                                             self._sanitize_group_name)
            for group, key in zip(names, sorted(labels)):
                made = (key, labels[key])
                if self._label_groups.setdefault(group, made) != made:
                    self._collisions.setdefault(group, set()).add(made)
                self.inventory.add_child(self.inventory.add_group(group), host)
        return has_address

    def _optional(self, option, variables, host, strict):
        expression = self.get_option(option)
        if expression is None:
            return None
        value = self._evaluate(expression, variables, host, option, strict)
        if value in (_MISSING, _OMITTED, None, ""):
            return None
        if not isinstance(value, str):
            raise AnsibleParserError("%s: host %s: %s (%s) must be a string, not %s"
                                     % (NAME, host, option, expression, engine.type_name(value)))
        return str(value)

    def _required(self, option, variables, host, strict):
        value = self._optional(option, variables, host, strict)
        if value is None and strict:
            raise AnsibleParserError("%s: host %s: %s (%s) is empty"
                                     % (NAME, host, option, self.get_option(option)))
        return value

    def _expected_ips(self, variables, host, strict):
        expression = self.get_option("expected_ips")
        if expression is None:
            return _default_ips(variables)
        value = self._evaluate(expression, variables, host, "expected_ips", strict)
        if value in (_MISSING, _OMITTED):
            return []
        try:
            return engine.ip_list(value)
        except TypeError as e:
            raise AnsibleParserError("%s: host %s: expected_ips (%s): %s"
                                     % (NAME, host, expression, e)) from None


def _default_ips(variables):
    """ansible_host when it is an address, else the default IPv4/IPv6 facts."""
    address = variables.get("ansible_host")
    if engine.is_ip(address):
        return [str(address)]
    facts = variables.get("ansible_facts")
    facts = facts if isinstance(facts, dict) else {}
    out = []
    for family in ("default_ipv4", "default_ipv6"):
        entry = facts.get(family) or variables.get("ansible_" + family) or {}
        address = entry.get("address") if isinstance(entry, dict) else None
        if engine.is_ip(address):
            out.append(str(address))
    return out
