"""Read resources from YAML or JSON text, files and folders; write them back as YAML."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from bulkhead.model.errors import LoadError, ValidationError
from bulkhead.model.resources import Resource, parse_resource

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


MAX_DOCUMENTS = 10_000   # per text: a bound on work, far above any real manifest


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _StrictLoader(_BaseLoader):  # type: ignore[misc]
    """A safe loader that refuses what a manifest never needs and an attacker uses:
    duplicate keys (silently keeping the last one), aliases (a few KB expanding to GB),
    and unhashable keys. libyaml also caps nesting at 1,000 levels."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # Every node is constructed once; meeting one again means an alias (*name).
        if node in self.constructed_objects:
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not accepted in manifests",
                node.start_mark)
        return super().construct_object(node, deep=True)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a mapping, found {node.id}", node.start_mark)
    out: dict[Any, Any] = {}
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
                None, None, f"a mapping key must be a string or a number, not "
                f"{type(key).__name__}", key_node.start_mark) from None
        if seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

MAX_INT_TEXT = 70   # characters of a YAML integer: 64 bits written in binary, and some


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    """An integer, written in at most MAX_INT_TEXT characters: `0x` and thousands of
    digits would make an integer no message can print (str() refuses past 4,300 digits);
    go-yaml reads no integer beyond 64 bits either."""
    text = loader.construct_scalar(node)
    if len(text) > MAX_INT_TEXT:
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer written in {len(text):,} characters (at most "
            f"{MAX_INT_TEXT})", node.start_mark)
    value: int = yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)
    return value


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NUMBERS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})


def _read_as_calico_does(resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]]
                         ) -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    """PyYAML's implicit types less two YAML 1.1 readings Calico's YAML library (go-yaml,
    through sigs.k8s.io/yaml) does not make, so a plain scalar means what it means to
    calicoctl: base-60 numbers (`20:30`, a port range, is not the integer 1230) and
    timestamps (`2024-01-31` is a string, as go-yaml gives one to a generic value; an
    impossible date such as `2001-13-45` is a string too, not an error)."""
    out: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}
    for first, pairs in resolvers.items():
        kept: list[tuple[str, re.Pattern[str]]] = []
        for tag, pattern in pairs:
            if tag == _TIMESTAMP:
                continue
            if tag in _NUMBERS:   # no colon anywhere: no base-60 reading
                pattern = re.compile("(?!.*:)" + pattern.pattern, pattern.flags)
            kept.append((tag, pattern))
        out[first] = kept
    return out


_StrictLoader.yaml_implicit_resolvers = _read_as_calico_does(_BaseLoader.yaml_implicit_resolvers)


def strict_yaml(text: str) -> Any:
    """One YAML document, with what `documents` refuses refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=_StrictLoader)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):   # a key came twice: name the first that did
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for every call (`json.loads` with hooks builds a new one each time).
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys,
                                parse_constant=_no_constant)


def json_value(text: str | bytes, source: str = "<input>") -> Any:
    """Decode strict JSON: no duplicate keys, no NaN or Infinity; LoadError otherwise."""
    try:
        if isinstance(text, bytes):   # as json.loads takes bytes: UTF-8, -16 or -32
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        elif text.startswith("\ufeff"):   # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        return _STRICT_JSON.decode(text)
    except RecursionError:
        raise LoadError(f"{source}: not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise LoadError(f"{source}: not valid JSON: {e}") from None


def documents(text: str, source: str = "<input>") -> list[Any]:
    """Decode every YAML (or JSON) document in `text`, expanding `kind: List`.

    Refuses aliases, duplicate keys and more than MAX_DOCUMENTS documents (LoadError)."""
    docs: list[Any] = []
    try:
        for doc in yaml.load_all(text, Loader=_StrictLoader):
            docs.append(doc)
            if len(docs) > MAX_DOCUMENTS:
                break
    except yaml.YAMLError as e:
        raise LoadError(f"{source}: not valid YAML or JSON: {e}") from None
    except RecursionError:
        raise LoadError(f"{source}: not valid YAML or JSON: nested too deeply") from None
    except (ValueError, OverflowError) as e:   # a value a constructor refuses (an
        # explicit `!!timestamp` of an impossible date); integers are bounded above
        raise LoadError(f"{source}: document {len(docs) + 1}: not valid YAML or JSON: "
                        f"{str(e).split(';')[0]}") from None
    return flatten(docs, source)


def flatten(docs: list[Any], source: str = "<input>") -> list[Any]:
    """Documents with `kind: List` and top-level lists expanded; at most MAX_DOCUMENTS."""
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
        if len(out) > MAX_DOCUMENTS:
            raise LoadError(f"{source}: more than {MAX_DOCUMENTS:,} documents; split it into "
                            "several applies")
    return out


def load_text(text: str, source: str = "<input>") -> list[Resource]:
    """Every resource in `text`; the first invalid one raises (nothing is half-loaded)."""
    return parse_documents(documents(text, source), source)


def parse_documents(docs: list[Any], source: str = "<input>") -> list[Resource]:
    """Resources from decoded documents; the first invalid one raises."""
    resources = []
    for i, doc in enumerate(docs):
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


def load_paths(paths: Iterable[str | Path],
               prepare: Callable[[Any, str], Any] | None = None) -> list[Resource]:
    """Resources from files, folders and `-` (standard input). `prepare(doc, where)`, if
    given, may rewrite each decoded document before it is validated."""
    resources: list[Resource] = []
    for raw in paths:
        if str(raw) == "-":
            sources = [("<stdin>", sys.stdin.read())]
        else:
            sources = []
            for file in manifest_files(Path(raw)):
                try:
                    sources.append((str(file), file.read_text(encoding="utf-8")))
                except (OSError, UnicodeDecodeError) as e:
                    raise LoadError(f"{file}: cannot read: {e}") from None
        for source, text in sources:
            docs = documents(text, source)
            if prepare is not None:
                docs = [prepare(doc, f"{source}: document {i + 1}")
                        for i, doc in enumerate(docs)]
            resources.extend(parse_documents(docs, source))
    return resources


def dump_yaml(resources: Iterable[Resource]) -> str:
    """Resources as a multi-document YAML stream, in Calico's shape."""
    return yaml.safe_dump_all([r.dump() for r in resources], sort_keys=False,
                              default_flow_style=False)


def dump_json(resources: Iterable[Resource]) -> str:
    items = [r.dump() for r in resources]
    return json.dumps(items[0] if len(items) == 1 else {"kind": "List", "items": items},
                      indent=2)
