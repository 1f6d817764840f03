# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Selector filters: match labels, canonical form, select/reject items, labels -> selector.

Documented in the sidecar files selector_*.yml next to this one.
"""

from __future__ import annotations

from collections.abc import Mapping

from ansible.errors import AnsibleFilterError

from ansible_collections.bulkhead.microseg.plugins.plugin_utils import engine


def _labels(value, what):
    try:
        labels = engine.labels_of(value, what)
    except Exception as e:
        raise AnsibleFilterError(str(e)) from None
    return labels


def selector_match(labels, selector):
    """True when a resource with these labels is selected by `selector`."""
    compiled = engine.filter_selector(selector, "selector_match")
    return compiled.matches(_labels(labels, "selector_match: the input"))


def selector_canonical(selector):
    """The selector's canonical text, the form bulkhead-server stores and compares."""
    return engine.filter_selector(selector, "selector_canonical").canonical


def _item_labels(item, attribute, index, plugin):
    where = "%s: item %d" % (plugin, index)
    if attribute:
        value = item
        for part in attribute.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return _labels(value, "%s: %s" % (where, attribute))
    if not isinstance(item, Mapping):
        raise AnsibleFilterError("%s: expected a mapping (labels, host variables or a "
                                 "resource), not %s" % (where, engine.type_name(item)))
    metadata = item.get("metadata") if "kind" in item else None
    if isinstance(metadata, Mapping):
        return _labels(metadata.get("labels"), "%s: metadata.labels" % where)
    if engine.DEFAULT_LABELS_VAR in item:
        return _labels(item.get(engine.DEFAULT_LABELS_VAR),
                       "%s: %s" % (where, engine.DEFAULT_LABELS_VAR))
    # Scalars only (a mapping of host variables holds lists and mappings too); numbers and
    # booleans as the label rule writes them, as selector_match reads the same mapping,
    # so {pci: true} is selected by pci == 'true' here too.
    return dict((k, v if isinstance(v, str) else engine.label_value(v))
                for k, v in item.items()
                if isinstance(v, (str, bool, int, float)))


def _partition(items, selector, attribute, plugin, keep):
    compiled = engine.filter_selector(selector, plugin)
    if isinstance(items, (str, Mapping)) or not hasattr(items, "__iter__"):
        raise AnsibleFilterError("%s: expected a list, not %s" % (plugin, engine.type_name(items)))
    return [item for index, item in enumerate(items)
            if compiled.matches(_item_labels(item, attribute, index, plugin)) is keep]


def selector_select(items, selector, attribute=None):
    """The items whose labels match `selector`."""
    return _partition(items, selector, attribute, "selector_select", True)


def selector_reject(items, selector, attribute=None):
    """The items whose labels do not match `selector`."""
    return _partition(items, selector, attribute, "selector_reject", False)


def _check_labels(labels, plugin):
    """AnsibleFilterError naming the first key or value that is not a Calico label's (the
    model's own check): a key is pasted into the selector's text, so `a == 'x' || all()`
    as a key would select everything."""
    engine.require_bulkhead(plugin)
    # pylint: disable-next=import-outside-toplevel
    from bulkhead.model.checks import ValidationError, check_labels
    from bulkhead.model.reader import Reader  # pylint: disable=import-outside-toplevel
    for key in sorted(labels):
        try:
            check_labels(Reader("labels", "", "", labels), {key: labels[key]})
        except ValidationError as e:
            raise AnsibleFilterError("%s: %s" % (plugin, e.problem)) from None


def selector_from_labels(labels):
    """The selector matching exactly these labels (`k == 'v'` joined by `&&`), canonical."""
    if isinstance(labels, Mapping):
        for key, value in labels.items():
            if value is None:
                # selector_match reads a null as no label; here leaving it out would
                # widen the selector ({app: null} gave all(), every endpoint).
                raise AnsibleFilterError(
                    "selector_from_labels: label %s: a label value cannot be null (leaving "
                    "it out would select more than these labels); drop the key instead"
                    % key)
    labels = _labels(labels, "selector_from_labels: the input")
    if not labels:
        return "all()"
    _check_labels(labels, "selector_from_labels")
    # Keys and values are Calico's (checked above): no quote, space or operator in them.
    parts = ["%s == '%s'" % (key, labels[key]) for key in sorted(labels)]
    return selector_canonical(" && ".join(parts))


class FilterModule:
    def filters(self):
        return {
            "selector_match": selector_match,
            "selector_canonical": selector_canonical,
            "selector_select": selector_select,
            "selector_reject": selector_reject,
            "selector_from_labels": selector_from_labels,
        }
