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


def test_a_duplicate_key_is_refused_naming_the_key_and_where():
    """As the server's loader: YAML would keep the second value silently."""
    text = "kind: Tier\nmetadata:\n  name: a\n  name: b\n"
    with pytest.raises(ValueError, match=r"definition: not valid YAML: duplicate key 'name'"
                                         r"[\s\S]*line 4, column 3"):
        documents.load(text, None)


def test_aliases_and_merge_keys_are_refused(tmp_path):
    """A kilobyte of aliases would expand to gigabytes: refused at the first one, fast."""
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        bomb.append("%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]"
                    % ((chr(97 + i), chr(97 + i)) + (chr(96 + i),) * 9))
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    assert len(path.read_text()) < 1024
    with pytest.raises(ValueError, match=r"bomb.yaml: not valid YAML: YAML aliases \(\*name\) "
                                         r"are not accepted in manifests"):
        documents.load(None, str(path))
    with pytest.raises(ValueError, match=r"merge keys \(<<\) are not accepted"):
        documents.load("base: {a: 1}\nother:\n  <<: {a: 2}\n", None)


def test_an_anchor_without_alias_is_read():
    assert documents.load("kind: Tier\nmetadata: &m {name: a}\n", None) == [
        {"kind": "Tier", "metadata": {"name": "a"}}]
