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
