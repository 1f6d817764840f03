"""module_utils.documents: manifests from text, files and folders."""

from __future__ import annotations

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils import documents


def test_a_folder_is_its_manifest_files_in_name_order(tmp_path):
    (tmp_path / "20-b.yaml").write_text("kind: B\nmetadata: {name: b}\n---\nkind: C\n"
                                        "metadata: {name: c}\n")
    (tmp_path / "10-a.yml").write_text("kind: A\nmetadata: {name: a}\n")
    (tmp_path / "30-d.json").write_text('{"kind": "List", "items": [{"kind": "D", '
                                        '"metadata": {"name": "d"}}]}')
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("kind: X\nmetadata: {name: x}\n")
    docs = documents.load(None, str(tmp_path))
    assert [d["kind"] for d in docs] == ["A", "B", "C", "D"]


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kind: [\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        documents.load(None, str(path))


def test_documents_need_kind_and_name():
    with pytest.raises(ValueError, match="document 2: needs kind and metadata.name"):
        documents.check_named([{"kind": "A", "metadata": {"name": "a"}}, {"kind": "B"}])


def test_dump_round_trips():
    docs = [{"kind": "A", "metadata": {"name": "a"}}, {"kind": "B", "metadata": {"name": "b"}}]
    assert documents.load(documents.dump_documents(docs), None) == docs


def test_plain_scalars_are_read_as_the_server_reads_them():
    """As the server and the CLI (bulkhead.model.load), as calicoctl's go-yaml: no base-60
    numbers (`20:30` is a port range, not 1230) and timestamps as strings; the other
    numbers as YAML reads them."""
    text = "ports: [20:30, 1:05, 80, 0x1f]\nreleased: 2024-01-31\nbad: 2001-13-45\norder: 1.5\n"
    (doc,) = documents.load(text, None)
    assert doc == {"ports": ["20:30", "1:05", 80, 31], "released": "2024-01-31",
                   "bad": "2001-13-45", "order": 1.5}
