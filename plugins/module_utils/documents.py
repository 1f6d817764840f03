# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)
"""Manifests as modules take them: YAML or JSON text, a file, a folder of files, a dict or
a list; `kind: List` documents unpacked."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re

from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.six import string_types

from ansible_collections.bulkhead.microseg.plugins.module_utils.labels import (
    normalize_document_labels,
)

try:
    import yaml
    HAS_YAML = True
except ImportError:  # pragma: no cover - PyYAML comes with ansible-core
    HAS_YAML = False

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

if HAS_YAML:
    class ManifestLoader(yaml.SafeLoader):  # pylint: disable=too-many-ancestors
        """YAML as the server and the CLI read manifests (bulkhead.model.load), as
        calicoctl's go-yaml reads them: no base-60 numbers (`ports: [20:30]` is the range
        20-30, not the port 1230) and timestamps left as strings. What the server's loader
        refuses is refused here too: duplicate keys (YAML keeps the last one silently),
        aliases (a few hundred bytes of `*name` expanding to gigabytes) and merge keys."""

        def construct_object(self, node, deep=False):
            # Each node is built once; a node met again is an alias (*name) of it.
            if node in self.constructed_objects:
                raise yaml.constructor.ConstructorError(
                    None, None, "YAML aliases (*name) are not accepted in manifests",
                    node.start_mark)
            return super(ManifestLoader, self).construct_object(node, deep=True)

    def _construct_mapping(loader, node):
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, "expected a mapping, found %s" % node.id, node.start_mark)
        out = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "YAML merge keys (<<) are not accepted in manifests",
                    key_node.start_mark)
            key = loader.construct_object(key_node)
            try:
                seen = key in out
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a string or a number, not %s"
                    % type(key).__name__, key_node.start_mark)
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "duplicate key %r" % (key,), key_node.start_mark)
            out[key] = loader.construct_object(value_node)
        return out

    ManifestLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)

    ManifestLoader.yaml_implicit_resolvers = dict(
        (first, [(tag, re.compile("(?!.*:)" + rx.pattern, rx.flags) if tag in _NUMBERS else rx)
                 for tag, rx in pairs if tag != _TIMESTAMP])
        for first, pairs in yaml.SafeLoader.yaml_implicit_resolvers.items())


def parse_documents(text, where):
    """Documents from YAML or JSON text; empty documents are skipped."""
    text = to_text(text)
    if not HAS_YAML:
        return json.loads(text)
    try:
        return [d for d in yaml.load_all(text, Loader=ManifestLoader) if d is not None]
    except yaml.YAMLError as e:
        raise ValueError("%s: not valid YAML: %s" % (where, e))


def flatten(docs):
    """A list of documents; a `kind: List` document contributes its items."""
    out = []
    for doc in docs if isinstance(docs, list) else [docs]:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            out.extend(flatten(doc.get("items") or []))
        elif isinstance(doc, list):
            out.extend(flatten(doc))
        else:
            out.append(doc)
    return out


def read_src(path):
    """The documents of a file, or of every *.yaml, *.yml and *.json file of a folder (not
    its subfolders), in name order."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if name.endswith(MANIFEST_SUFFIXES) and
                       os.path.isfile(os.path.join(path, name)))
    else:
        files = [path]
    docs = []
    for name in files:
        with open(name, "rb") as f:
            docs.extend(parse_documents(f.read(), name))
    return docs


def load(definition, src):
    """The documents of `definition` (dict, list or text) or of `src` (file or folder),
    flattened; ValueError or OSError naming what cannot be read."""
    if src:
        docs = read_src(src)
    elif isinstance(definition, string_types):
        docs = parse_documents(definition, "definition")
    else:
        docs = definition if definition is not None else []
    return flatten(docs)


def check_named(docs):
    """ValueError unless every document has kind and metadata.name, both strings."""
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not doc.get("kind") or \
                not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
            raise ValueError("document %d: needs kind and metadata.name" % (i + 1))
        for field, value in (("kind", doc["kind"]), ("metadata.name", doc["metadata"]["name"])):
            if not isinstance(value, string_types):
                raise ValueError("document %d: %s: %r is not a string" % (i + 1, field, value))


def load_manifests(definition, src):
    """The documents of `definition` or `src` (as `load`), each with kind and
    metadata.name, their label values following the collection's rule; ValueError or
    OSError naming the document, file or label otherwise."""
    docs = load(definition, src)
    check_named(docs)
    return [normalize_document_labels(doc, "document %d: %s %s" % (
        i + 1, doc["kind"], doc["metadata"]["name"])) for i, doc in enumerate(docs)]


def dump_documents(docs):
    """Multi-document YAML, as calicoctl and `bulkhead export` write it."""
    return yaml.safe_dump_all(docs, default_flow_style=False, sort_keys=False,
                              explicit_start=True)
