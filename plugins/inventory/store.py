# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: store
short_description: The host endpoints held by bulkhead-server as inventory hosts
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Lists the HostEndpoints stored in bulkhead-server (optionally only those matching
    O(label_selector)) and makes each one an inventory host, named after its C(spec.node)
    or its C(metadata.name) (O(hostname)).
  - Sets the host variables C(<vars_prefix>labels) (the endpoint's labels; when several
    endpoints share a node, the labels of the first by name, and the groups of all of them),
    C(<vars_prefix>expected_ips), C(<vars_prefix>host_endpoint) (the HostEndpoint without
    server-owned metadata) and C(<vars_prefix>host_endpoints) (all of the host's endpoints,
    when several share a node), and C(ansible_host) from the first expected IP (the first
    value of C(expectedIPs) that is an IP address and not a loopback or unspecified one, which
    would reach the controller; others are warned about and skipped).
  - A HostEndpoint whose host name would be a name Ansible reserves (C(localhost), C(all),
    C(ungrouped), a loopback address such as C(127.0.0.1) or C(::1)) or is not a valid host
    name is left out, with a warning naming it and why, so an endpoint cannot stand in for
    the controller (a task delegated to C(localhost)) or for a built-in group.
  - Adds every host to a group per label, C(label_<key>_<value>), and supports
    O(compose), O(groups) and O(keyed_groups) like M(ansible.builtin.constructed).
  - The API's answer can be cached (O(cache)), as C(amazon.aws.aws_ec2) caches its own, one
    entry per configuration file, O(server_url) and O(label_selector).
  - The connection options are the modules' own; each falls back to its E(BULKHEAD_*)
    environment variable.
  - The configuration file's name must end in C(.bulkhead_store.yml) or C(.bulkhead_store.yaml).
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    required: true
    type: str
    choices: [bulkhead.microseg.store]
  label_selector:
    description:
      - Only host endpoints whose labels match this selector, in Calico's selector language,
        for example V(zone == 'trusted' && has(app\)). The server filters.
    type: str
  hostname:
    description:
      - What names a host. V(node) is C(spec.node), the name the agent runs as (endpoints on
        the same node become one host); V(name) is the HostEndpoint's C(metadata.name).
    type: str
    choices: [node, name]
    default: node
  vars_prefix:
    description: Prefix of the host variables this plugin sets.
    type: str
    default: bulkhead_
  set_ansible_host:
    description:
      - Set C(ansible_host) to the host's first expected IP that is an IP address and not a
        loopback or unspecified one.
    type: bool
    default: true
  label_groups:
    description:
      - Add each host to a group per label, C(<label_group_prefix>_<key>_<value>), sanitised as
        O(keyed_groups) names are.
    type: bool
    default: true
  label_group_prefix:
    description: Prefix of the label groups. Empty, the groups are C(<key>_<value>).
    type: str
    default: label
extends_documentation_fragment:
  - bulkhead.microseg.connection.plugins
  - bulkhead.microseg.connection
  - constructed
  - inventory_cache
notes:
  - The caller needs a certificate with at least the viewer role.
seealso:
  - plugin: bulkhead.microseg.endpoints
    plugin_type: inventory
  - module: bulkhead.microseg.resource_info
"""

EXAMPLES = r"""
# fleet.bulkhead_store.yml, used as: ansible-inventory -i fleet.bulkhead_store.yml --graph
# The smallest file is the plugin line alone; the connection then comes from
# BULKHEAD_SERVER, BULKHEAD_CA, BULKHEAD_CERT and BULKHEAD_KEY.
plugin: bulkhead.microseg.store
server_url: https://bulkhead.example.com:7443
ca_path: /etc/bulkhead/pki/ca.crt
client_cert: /etc/bulkhead/pki/viewer.crt
client_key: /etc/bulkhead/pki/viewer.key
label_selector: zone in {'trusted', 'dmz'}
hostname: name
keyed_groups:
  - key: bulkhead_labels.app | default('none')
    prefix: app
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/bulkhead-inventory
cache_timeout: 300
"""

import hashlib
import ipaddress
import json
import re

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.display import Display

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    BulkheadError,
    strip_server_fields,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.connection import (
    CONNECTION_SPEC,
    client_from_params,
)
from ansible_collections.bulkhead.microseg.plugins.plugin_utils import engine

NAME = "bulkhead.microseg.store"
SUFFIXES = (".bulkhead_store.yml", ".bulkhead_store.yaml")

display = Display()

# Names Ansible gives a meaning of its own: a host called so would take the place of the
# implicit localhost (every delegate_to: localhost task would go where the endpoint says)
# or of a built-in group (`all` made the groups loop).
RESERVED_NAMES = frozenset(("localhost", "localhost.localdomain", "localhost6",
                            "localhost6.localdomain6", "all", "ungrouped"))
# A DNS name or a single label (letters, digits, `-`, `_`, dots between labels), as a
# Calico node name is; an IPv6 address is checked on its own.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*$")


def ip_address(value):
    """The IP address `value` is written as, or None (a network, a name, a number, ...)."""
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def reaches_controller(address):
    """True for an address that leads back to this machine wherever it is used: loopback
    (127.0.0.0/8, ::1, also as ::ffff:127.0.0.1) or unspecified (0.0.0.0, ::)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return any(a.is_loopback or a.is_unspecified for a in (address, mapped) if a is not None)


def host_name_problem(name):
    """Why `name` cannot be an inventory host's name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "no host name"
    if name.lower() in RESERVED_NAMES:
        return "%r is a name Ansible reserves" % name
    address = ip_address(name)
    if address is not None:
        if reaches_controller(address):
            return "%r is a loopback address, which Ansible takes for the controller" % name
        return None
    if name.lower().startswith("localhost."):
        return "%r is a name Ansible reserves" % name
    if not _HOST_NAME.match(name):
        return "%r is not a valid host name" % name
    return None


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    """HostEndpoints from bulkhead-server as hosts, labels as variables and groups."""

    NAME = NAME

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(SUFFIXES)

    _config_path = None

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache=cache)
        engine.require_core_219(NAME)
        self._read_config_data(path)
        self._config_path = path
        key = self._cache_key(path)
        # As amazon.aws.aws_ec2: read the cache only when both the caller (no
        # --flush-cache, no refresh_inventory) and the configuration allow it.
        use_cache = self.get_option("cache") and cache
        update_cache = self.get_option("cache") and not cache
        items = None
        if use_cache:
            try:
                items = self._cache[key]
            except KeyError:
                update_cache = True
        if items is None:
            items = self._fetch()
        if update_cache:
            self._cache[key] = items
        self._populate(items)

    def _cache_key(self, path):
        """Ansible's key for the file, and what the answer depends on besides: the server
        (often from BULKHEAD_SERVER, so one file serves several) and the label selector.
        By the file's path alone, a file pointed at another server, or given another
        selector, read the hosts of the first from the cache."""
        digest = hashlib.sha256(json.dumps(
            [self.get_option("server_url"), self.get_option("label_selector")]).encode())
        return "%s_%s" % (self.get_cache_key(path), digest.hexdigest()[:16])

    def _fetch(self):
        params = dict((option, self.get_option(option)) for option in CONNECTION_SPEC)
        if not params.get("server_url"):
            raise AnsibleParserError("%s: %s: server_url is not set: give it in the file or set "
                                     "BULKHEAD_SERVER" % (NAME, self._config_path))
        selector = self.get_option("label_selector")
        try:
            client = client_from_params(params)
            return client.list("HostEndpoint", selector=selector)
        except BulkheadError as e:
            where = " (label_selector %r)" % selector if selector else ""
            raise AnsibleParserError("%s: listing HostEndpoints from %s%s failed: %s"
                                     % (NAME, params.get("server_url"), where, e)) from None

    @staticmethod
    def _ansible_host(host, docs):
        """The first expected IP that is an IP address and not this machine's; the others
        are warned about. A loopback address as ansible_host would send the host's tasks
        over SSH to the controller, which a host name may not stand for either."""
        for doc in docs:
            for value in (doc.get("spec") or {}).get("expectedIPs") or ():
                address = ip_address(value)
                if address is not None and reaches_controller(address):
                    display.warning("%s: host %s: HostEndpoint %s: expectedIPs value %r is a "
                                    "loopback or unspecified address, which reaches the "
                                    "controller: not used as ansible_host"
                                    % (NAME, host, doc["metadata"]["name"], value))
                    continue
                if address is not None:
                    return str(address)
                display.warning("%s: host %s: HostEndpoint %s: expectedIPs value %r is not an "
                                "IP address: not used as ansible_host"
                                % (NAME, host, doc["metadata"]["name"], value))
        return None

    def _populate(self, items):
        by_host = {}
        use_node = self.get_option("hostname") == "node"
        for item in sorted(items, key=lambda d: d["metadata"]["name"]):
            doc = strip_server_fields(item)
            node = (doc.get("spec") or {}).get("node") if use_node else None
            host = node or doc["metadata"]["name"]
            problem = host_name_problem(host)
            if problem:
                display.warning("%s: HostEndpoint %s is left out: %s (%s)" % (
                    NAME, doc["metadata"]["name"], "spec.node" if node else "metadata.name",
                    problem))
                continue
            by_host.setdefault(host, []).append(doc)

        prefix = self.get_option("vars_prefix")
        strict = self.get_option("strict")
        for host, docs in by_host.items():
            first = docs[0]
            labels = dict(first["metadata"].get("labels") or {})
            ips = []
            for doc in docs:
                ips.extend(ip for ip in (doc.get("spec") or {}).get("expectedIPs") or ()
                           if ip not in ips)
            self.inventory.add_host(host)
            self.inventory.set_variable(host, prefix + "labels", labels)
            self.inventory.set_variable(host, prefix + "expected_ips", ips)
            self.inventory.set_variable(host, prefix + "host_endpoint", first)
            self.inventory.set_variable(host, prefix + "host_endpoints", docs)
            if self.get_option("set_ansible_host"):
                address = self._ansible_host(host, docs)
                if address is not None:
                    self.inventory.set_variable(host, "ansible_host", address)
            if self.get_option("label_groups"):
                groups = []
                for doc in docs:
                    for group in engine.label_group_names(
                            doc["metadata"].get("labels") or {},
                            self.get_option("label_group_prefix"), self._sanitize_group_name):
                        if group not in groups:
                            groups.append(group)
                for group in groups:
                    self.inventory.add_child(self.inventory.add_group(group), host)

            variables = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host,
                                              strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host,
                                           strict=strict)
