"""bulkhead.model.load: reading manifests (YAML, JSON, List, folders), dumping them, and
load errors that name the file and document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bulkhead.model import (
    GlobalNetworkPolicy,
    LoadError,
    NamedPort,
    PortRange,
    Snapshot,
    ValidationError,
    dump_yaml,
    load_paths,
    load_text,
)
from bulkhead.model.load import json_value
from tests.modelfixture import EVERY_KIND, V3, gnp


def test_every_kind_loads_and_round_trips() -> None:
    resources = load_text(EVERY_KIND)
    assert [r.kind for r in resources] == ["Tier", "GlobalNetworkPolicy",
                                           "StagedGlobalNetworkPolicy", "HostEndpoint",
                                           "GlobalNetworkSet", "Profile"]
    policy = resources[1]
    assert isinstance(policy, GlobalNetworkPolicy)
    assert policy.spec.types == ("Ingress", "Egress")
    assert policy.spec.ingress[0].destination.ports == (
        NamedPort("postgres"), PortRange(80, 80), PortRange(8000, 8080))
    assert policy.bare_name == "db-ingress"
    again = load_text(dump_yaml(resources))
    assert again == resources
    assert load_text(json.dumps([r.dump() for r in resources])) == resources
    Snapshot.build(resources)


def test_list_kind_and_multi_document() -> None:
    items = [gnp({"selector": "a == 'b'"}, "one"), gnp({}, "two")]
    text = yaml.safe_dump({"apiVersion": V3, "kind": "List", "items": items})
    assert [r.name for r in load_text(text)] == ["one", "two"]
    assert len(load_text(yaml.safe_dump_all(items))) == 2


def test_load_text_names_file_and_document() -> None:
    text = yaml.safe_dump_all([gnp({}, "ok"), gnp({"order": "x"}, "bad")])
    with pytest.raises(ValidationError, match=r"^f.yaml: document 2: GlobalNetworkPolicy bad"):
        load_text(text, "f.yaml")


def test_yaml_errors_and_duplicate_keys() -> None:
    with pytest.raises(LoadError, match="not valid YAML"):
        load_text("a: [", "x.yaml")
    with pytest.raises(LoadError, match="duplicate key 'kind'"):
        load_text("kind: Tier\nkind: Tier\n", "x.yaml")
    with pytest.raises(LoadError, match="a List needs `items:`"):
        load_text("kind: List\n")


def test_load_paths_reads_folders(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(gnp({}, "a")))
    (tmp_path / "sub" / "b.json").write_text(json.dumps(gnp({}, "b")))
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [r.name for r in load_paths([tmp_path])] == ["a", "b"]
    with pytest.raises(LoadError, match="no such file"):
        load_paths([tmp_path / "missing.yaml"])


@pytest.mark.parametrize("text, problem", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": {"b": [{"c": 1, "d": 2, "c": 3}]}}', "duplicate key 'c'"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('[-Infinity]', "-Infinity is not a JSON number"),
    ('{"a": 1} x', "Extra data"),
])
def test_strict_json_refuses_what_json_loads_takes_or_refuses(text: str, problem: str) -> None:
    """One decoder serves every call: it refuses duplicate keys at any depth, NaN and
    Infinity, with the same words for str and for bytes."""
    for given in (text, text.encode()):
        with pytest.raises(LoadError, match=f"^body: not valid JSON: {problem}"):
            json_value(given, "body")


def test_strict_json_reads_what_json_loads_reads() -> None:
    """A byte order mark is refused in a text and read in bytes, as json.loads does."""
    with pytest.raises(LoadError, match=r"^body: not valid JSON: Unexpected UTF-8 BOM"):
        json_value('\ufeff{"a": 1}', "body")
    assert json_value('\ufeff{"a": 1}'.encode(), "body") == {"a": 1}
    assert json_value('{"a": {"b": [1, {"a": 2}]}, "b": "\\u00e9"}', "body") == {
        "a": {"b": [1, {"a": 2}]}, "b": "é"}
    assert json_value('{"a": 1}'.encode("utf-16"), "body") == {"a": 1}


def test_values_yaml_cannot_read_are_load_errors_naming_where() -> None:
    """An integer of thousands of digits (beyond Python's limit on reading one, or in hex,
    which has none, beyond what any message can print) is a LoadError naming where it is,
    not a ValueError escaping to the caller (a 500 in the server); so is an impossible
    value a constructor refuses."""
    for value in ("9" * 5000, "0x" + "f" * 4000, "0" * 4400 + "6"):
        text = yaml.safe_dump(gnp({}, "ok")) + "---\n" + f"spec: {{order: {value}}}\n"
        with pytest.raises(LoadError, match=r"^f.yaml: not valid YAML or JSON: an integer "
                           r"written in [0-9,]+ characters \(at most 70\)\n.*line 7"):
            load_text(text, "f.yaml")
    assert load_text(yaml.safe_dump(gnp({}, "ok")) + "---\n" + yaml.safe_dump(
        gnp({"order": 10**60}, "big")), "f.yaml")[1].spec.order == float(10**60)


def test_plain_scalars_mean_what_they_mean_to_calicoctl() -> None:
    """go-yaml (Calico's YAML library) reads no base-60 numbers and gives timestamps to a
    generic value as strings: `20:30` is a port range, not the integer 1230, and a date,
    valid or not, is text."""
    text = f"""apiVersion: {V3}
kind: GlobalNetworkPolicy
metadata: {{name: ranges, labels: {{released: 2024-01-31}}}}
spec:
  ingress:
  - action: Allow
    protocol: TCP
    destination: {{ports: [20:30, 1:05, 80, 0x1f]}}
"""
    policy = load_text(text)[0]
    assert isinstance(policy, GlobalNetworkPolicy)
    assert policy.spec.ingress[0].destination.ports == (
        PortRange(20, 30), PortRange(1, 5), PortRange(80, 80), PortRange(31, 31))
    assert policy.labels == {"released": "2024-01-31"}
    bad_date = text.replace("2024-01-31", "2001-13-45")
    assert load_text(bad_date)[0].labels["released"] == "2001-13-45"
