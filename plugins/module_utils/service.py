# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Get, compare, create, update and delete resources (kubernetes.core's "service").

The comparison is made after normalising both sides: the server parses and re-dumps
what it is given (defaults filled in, selectors in canonical form), so the desired
document is normalised by a dry run on the server and compared without the metadata
the server owns. Only a real difference leads to a write.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import copy

from ansible_collections.bulkhead.microseg.plugins.module_utils import api
from ansible_collections.bulkhead.microseg.plugins.module_utils.api import API_VERSION
from ansible_collections.bulkhead.microseg.plugins.module_utils.client import (
    strip_server_fields,
)
from ansible_collections.bulkhead.microseg.plugins.module_utils.labels import (
    normalize_labels,
    reserved,
)


def canonical_kind(kind):
    """`gnp` -> GlobalNetworkPolicy (the aliases of module_utils/api.py, the server's
    own); unknown kinds are returned unchanged for the server to refuse."""
    if kind is None:
        return None
    return api.canonical_kind(str(kind)) or kind


def prune(value):
    """Drop None, empty dicts and empty lists, recursively: what the user did not set."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = prune(v)
            if v is None or v == {} or v == []:
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [prune(v) for v in value]
    return value


def make_resource(kind, name, spec, labels=None):
    """A v3 document from a module's options; ValueError for a label value that has no
    text form (null, a list)."""
    doc = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name},
           "spec": prune(spec or {})}
    if labels:
        doc["metadata"]["labels"] = normalize_labels(labels, "labels")
    return doc


def merge_labels(desired, current, labels_given, purge_labels):
    """Apply the labels/purge_labels rules to `desired` (a new document) and return it."""
    desired = copy.deepcopy(desired)
    meta = desired.setdefault("metadata", {})
    current_labels = dict(((current or {}).get("metadata") or {}).get("labels") or {})
    if not labels_given:
        labels = current_labels
    elif purge_labels:
        # The collection's own labels (ownership) survive a purge.
        labels = dict((k, v) for k, v in current_labels.items() if reserved(k))
        labels.update(meta.get("labels") or {})
    else:
        labels = current_labels
        labels.update(meta.get("labels") or {})
    if labels:
        meta["labels"] = labels
    else:
        meta.pop("labels", None)
    # Annotations are not managed by the typed modules: keep the server's.
    annotations = ((current or {}).get("metadata") or {}).get("annotations")
    if annotations and "annotations" not in meta:
        meta["annotations"] = annotations
    return desired


def doc_key(doc):
    return (canonical_kind(doc.get("kind")), (doc.get("metadata") or {}).get("name"))


class ResourceService:
    """Reads and writes resources through a BulkheadClient."""

    def __init__(self, client):
        self.client = client

    def get(self, kind, name):
        return self.client.get(canonical_kind(kind), name)

    def find(self, kind=None, name=None, selector=None):
        kind = canonical_kind(kind)
        if name:
            found = self.client.get(kind, name)
            if found is None:
                return []
            if selector:
                return [d for d in self.client.list(kind, selector)
                        if d["metadata"]["name"] == name]
            return [found]
        return self.client.list(kind, selector)

    def preview(self, docs):
        """The server's dry-run verdict per document: action and normalised after."""
        return self.client.apply(docs, dry_run=True)["results"]

    def preview_one(self, doc, current):
        """The server's dry-run verdict for one document (its own write endpoint, so an
        error names the resource and field with nothing in front)."""
        if current is None:
            return self.client.create(doc, dry_run=True)
        doc = copy.deepcopy(doc)
        doc["metadata"].pop("resourceVersion", None)
        return self.client.replace(doc, dry_run=True)

    def create(self, doc):
        return self.client.create(doc)

    def update(self, doc, current):
        doc = copy.deepcopy(doc)
        # Optimistic concurrency: refused (409) if someone changed it since we read it.
        doc["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
        return self.client.replace(doc)

    def remove(self, docs, dry_run=False):
        """Delete every document's resource in one transaction, all or nothing (the
        server's /v1/delete, dependents first); ones already gone are `absent`."""
        keys = []
        for doc in docs:
            key = doc_key(doc)
            if key not in keys:
                keys.append(key)
        body = [{"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}}
                for kind, name in keys]
        return self.client.delete_many(body, dry_run=dry_run, ignore_not_found=True)

    def apply(self, docs):
        return self.client.apply(docs)


def comparable(doc):
    """What is compared and shown in a diff: the document without server-owned fields."""
    out = strip_server_fields(doc)
    if out is None:
        return {}
    meta = out.get("metadata") or {}
    for key in ("labels", "annotations"):
        if key in meta and not meta[key]:
            meta.pop(key)
    return out
