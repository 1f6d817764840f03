# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The controller side's bridge to the `bulkhead` package: selectors, labels, host endpoints.

Inventory plugins, the selector lookup and the filters run on the controller and share
the agent's own engine (`bulkhead.selector`, `bulkhead.model`), so a selector means the
same in a playbook as on a host. Everything here raises AnsibleError (or a subclass)
with a message that names what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Mapping

from ansible.errors import AnsibleError, AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.module_utils import labels as _labels

# Only the selector language here: the lookup and the filters run in a fresh worker per
# task, and bulkhead.model costs ~0.3 s to import; host_endpoint() imports it when needed.
try:
    from bulkhead.selector import SelectorError
    from bulkhead.selector import parse as _parse_selector
except ImportError as exc:  # pragma: no cover - exercised by the missing-package test
    BULKHEAD_IMPORT_ERROR: ImportError | None = exc
else:
    BULKHEAD_IMPORT_ERROR = None

API_VERSION = "projectcalico.org/v3"
DEFAULT_LABELS_VAR = "bulkhead_labels"
# The distribution that holds the `bulkhead` package (the name `bulkhead` on the package
# index is someone else's project).
DISTRIBUTION = "bulkhead-microseg"


def require_core_219(plugin: str) -> None:
    """Fail on ansible-core older than 2.19 (meta/runtime.yml requires it, which Ansible
    only warns about): before 2.19 every string in inventory variables is a template, so
    what a server or a host sends (an annotation, a fact) would run on the controller."""
    from ansible.release import __version__ as core_version

    numbers = re.findall(r"\d+", core_version)[:2]
    if tuple(int(n) for n in numbers) < (2, 19):
        raise AnsibleError(
            "%s needs ansible-core 2.19 or newer (this is %s): older versions treat the "
            "strings it reads from bulkhead-server or from hosts' facts as templates"
            % (plugin, core_version))


def require_bulkhead(plugin: str) -> None:
    """Fail with an "install bulkhead" message when the package cannot be imported."""
    if BULKHEAD_IMPORT_ERROR is not None:
        raise AnsibleError(
            "%s needs the Python package bulkhead on the controller: install the distribution "
            "%s into the Python that runs Ansible (%s), for example `%s -m pip install %s` "
            "(an execution environment: the collection's meta/ee-requirements.txt), or "
            "`pip install -e agent/` from a checkout (import failed: %s)"
            % (plugin, DISTRIBUTION, sys.executable, sys.executable, DISTRIBUTION,
               BULKHEAD_IMPORT_ERROR))


def compile_selector(text: object, plugin: str, error=AnsibleError):
    """The compiled selector (bulkhead.selector.Selector) for `text`.

    A selector that does not parse fails with the parser's message: position and what
    was expected there.
    """
    require_bulkhead(plugin)
    if not isinstance(text, str):
        raise error("%s: the selector must be a string, not %s" % (plugin, type_name(text)))
    try:
        return _parse_selector(text)
    except SelectorError as e:
        raise error("%s: %s" % (plugin, e)) from None


def filter_selector(text: object, plugin: str):
    return compile_selector(text, plugin, AnsibleFilterError)


def type_name(value: object) -> str:
    """A value's type as a user knows it (Ansible's tagged types are plain lists etc.)."""
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "integer"), (float, "float"),
                       (Mapping, "mapping"), (list, "list"), (tuple, "list")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def label_value(value: object) -> str | None:
    """A label value as text, by the rule every writer follows (module_utils.labels):
    booleans `true`/`false`, numbers as written; None for "" (no label); TypeError for
    null, lists and mappings."""
    if value == "" and isinstance(value, str):
        return None
    return str(_labels.label_value(value))


def labels_of(value: object, where: str) -> Mapping:
    """A host's label mapping, checked to be a mapping (empty when absent)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AnsibleError("%s: labels must be a mapping of label keys to values, not %s"
                           % (where, type_name(value)))
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            break
    else:
        return value
    # Numbers and booleans compare as the strings they would be as labels, and a key
    # that is not a string (`1:` in YAML) as the text the modules store it as.
    out = {}
    for key, item in value.items():
        key = str(key)
        if item is None:
            continue  # read leniently: a null value is no label
        try:
            text = item if isinstance(item, str) else label_value(item)
        except TypeError as e:
            raise AnsibleError("%s: label %s: %s" % (where, key, e)) from None
        if text is not None:
            out[key] = text
    return out


def ip_list(value: object) -> list[str]:
    """Expected IPs as a list of strings: a string is one address (or a comma-separated list)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if item is None or item == "":
                continue
            if not isinstance(item, str):
                raise TypeError("expected IPs must be strings, not %s (%r)"
                                % (type_name(item), item))
            out.append(str(item))
        return out
    raise TypeError("expected IPs must be a list of addresses or a string, not %s"
                    % type_name(value))


def is_ip(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def host_endpoint(name: str, node: str, labels: Mapping, expected_ips: list[str],
                  interface_name: str | None = None) -> dict:
    """A HostEndpoint document, validated by bulkhead's model.

    Raises ValueError with the model's message (kind, name, field path, what is wrong),
    for example `HostEndpoint web-1: metadata.labels: label zone="a b": value is not valid`.
    """
    require_bulkhead("bulkhead.microseg")
    from bulkhead.model import ValidationError, parse_resource  # pylint: disable=import-outside-toplevel

    spec: dict = {"node": node}
    if interface_name:
        spec["interfaceName"] = interface_name
    if expected_ips:
        spec["expectedIPs"] = list(expected_ips)
    doc = {"apiVersion": API_VERSION, "kind": "HostEndpoint",
           "metadata": {"name": name}, "spec": spec}
    if labels:
        doc["metadata"]["labels"] = dict(labels)
    try:
        parse_resource(doc)
    except ValidationError as e:
        raise ValueError(str(e)) from None
    return doc


def label_group_names(labels: Mapping, prefix: str, sanitize) -> list[str]:
    """Group names `<prefix>_<key>_<value>` for a label mapping, sanitised like keyed_groups."""
    return [sanitize("%s_%s_%s" % (prefix, key, labels[key]) if prefix
                     else "%s_%s" % (key, labels[key]))
            for key in sorted(labels)]
