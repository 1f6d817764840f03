# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""The one rule for label values that every writer follows (modules, inventory plugins).

Booleans become `true`/`false` (what YAML and JSON write, so a selector `pci == 'true'`
finds them), numbers stay as written, null is an error naming the label.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.module_utils.six import string_types

from ansible_collections.bulkhead.microseg.plugins.module_utils import api
from ansible_collections.bulkhead.microseg.plugins.module_utils.api import RESERVED_LABEL_PREFIX

# Labels the collection itself writes (ownership); purges keep them, as amazon.aws keeps
# `aws:` tags.
RESERVED_PREFIX = RESERVED_LABEL_PREFIX


def type_name(value):
    for kind, name in ((bool, "boolean"), (string_types, "string"), (int, "integer"),
                       (float, "float"), (dict, "mapping"), ((list, tuple), "list")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def label_value(value):
    """A label value as the text the server stores (module_utils/api.py's rule);
    TypeError for null and containers."""
    return api.label_value(value)


def normalize_labels(labels, where):
    """`labels` with every value as text; ValueError naming `where` and the label."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise ValueError("%s: must be a mapping of label keys to values, not %s"
                         % (where, type_name(labels)))
    out = {}
    for key, value in labels.items():
        try:
            out[str(key)] = label_value(value)
        except TypeError as e:
            raise ValueError("%s: label %s: %s" % (where, key, e))
    return out


def normalize_document_labels(doc, where):
    """A copy of a v3 document whose metadata.labels follow the rule."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("labels") is None:
        return doc
    out = dict(doc)
    out["metadata"] = dict(meta)
    out["metadata"]["labels"] = normalize_labels(meta["labels"], where + ": metadata.labels")
    return out


def reserved(key):
    return str(key).startswith(RESERVED_PREFIX)
