"""Read resources from YAML or JSON text, files and folders; write them back as YAML."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from bulkhead.model.errors import LoadError, ValidationError
from bulkhead.model.resources import Resource, parse_resource

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def strict_yaml(text: str) -> Any:
    """One YAML document, duplicate keys refused (yaml.YAMLError), as `documents` does."""
    return yaml.load(text, Loader=_StrictLoader)


class DuplicateKeyError(json.JSONDecodeError):
    """A JSON object names a key twice. RFC 8259 leaves what that means to the reader;
    json.loads keeps the last silently, so a reviewer and the server could read two
    different documents. Refused, as the YAML loader refuses it."""

    def __init__(self, key: str, doc: str) -> None:
        super().__init__(f"duplicate key {key!r}", doc, 0)
        self.key = key
        self.args = (f"duplicate key {key!r}",)  # no position: the hook does not know it


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def strict_json(text: str) -> Any:
    """json.loads that raises DuplicateKeyError (a JSONDecodeError) on a repeated key."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _Duplicate as e:
        raise DuplicateKeyError(e.key, text) from None


def documents(text: str, source: str = "<input>") -> list[Any]:
    """Decode every YAML (or JSON) document in `text`, expanding `kind: List`."""
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as e:
        raise LoadError(f"{source}: not valid YAML or JSON: {e}") from None
    out: list[Any] = []
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, list):
            out.extend(doc)
        elif isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            if not isinstance(items, list):
                raise LoadError(f"{source}: a List needs `items:` with a list of resources")
            out.extend(items)
        else:
            out.append(doc)
    return out


def load_text(text: str, source: str = "<input>") -> list[Resource]:
    """Every resource in `text`; the first invalid one raises (nothing is half-loaded)."""
    resources = []
    for i, doc in enumerate(documents(text, source)):
        try:
            resources.append(parse_resource(doc))
        except ValidationError as e:
            e.args = (f"{source}: document {i + 1}: {e}",)
            raise
    return resources


def manifest_files(path: Path) -> list[Path]:
    """A file, or the manifests in a folder (recursively, sorted)."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    return [path]


def load_paths(paths: Iterable[str | Path]) -> list[Resource]:
    """Resources from files, folders and `-` (standard input)."""
    resources: list[Resource] = []
    for raw in paths:
        if str(raw) == "-":
            resources.extend(load_text(sys.stdin.read(), "<stdin>"))
            continue
        for file in manifest_files(Path(raw)):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise LoadError(f"{file}: cannot read: {e}") from None
            resources.extend(load_text(text, str(file)))
    return resources


def dump_yaml(resources: Iterable[Resource]) -> str:
    """Resources as a multi-document YAML stream, in Calico's shape."""
    return yaml.safe_dump_all([r.dump() for r in resources], sort_keys=False,
                              default_flow_style=False)


def dump_json(resources: Iterable[Resource]) -> str:
    items = [r.dump() for r in resources]
    return json.dumps(items[0] if len(items) == 1 else {"kind": "List", "items": items},
                      indent=2)
