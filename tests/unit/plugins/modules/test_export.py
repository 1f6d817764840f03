"""export's dest against a fake HTTPS server: written through a temporary file no one can
plant beforehand, and a dest that cannot be written fails naming it."""

from __future__ import annotations

import json
import os

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.modules import export

ANSWER = json.dumps({"revision": 7, "items": [
    {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t"},
     "spec": {"order": 10}}]}).encode()


def run(capsys, fake, **args):
    with patch_module_args(dict(server_url=fake.url, ca_path=fake.ca, **args)):
        with pytest.raises(SystemExit) as done:
            export.main()
    return done.value.code, json.loads(capsys.readouterr().out)


def test_a_planted_tmp_symlink_is_not_followed(fake_server, capsys, tmp_path):
    """dest + ".tmp" was opened for writing: a symlink planted there overwrote its target."""
    fake_server.set("/v1/export", ANSWER)
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    victim.chmod(0o600)
    dest = tmp_path / "out.yaml"
    os.symlink(str(victim), str(dest) + ".tmp")
    code, result = run(capsys, fake_server, dest=str(dest))
    assert code == 0 and result["changed"] is True, result
    assert victim.read_text() == "keep me\n" and oct(victim.stat().st_mode & 0o777) == "0o600"
    assert dest.read_text().startswith("# bulkhead export: revision 7\n---\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.yaml", "out.yaml.tmp", "victim"]


def test_a_dest_that_cannot_be_a_file_fails_naming_it(fake_server, capsys, tmp_path):
    fake_server.set("/v1/export", ANSWER)
    code, result = run(capsys, fake_server, dest=str(tmp_path))
    assert code == 1 and result["msg"] == (
        "dest: %s is a directory: give the path of the file to write" % tmp_path)
    missing = tmp_path / "no" / "out.yaml"
    code, result = run(capsys, fake_server, dest=str(missing))
    assert code == 1 and result["msg"] == (
        "dest: %s: its directory %s does not exist" % (missing, missing.parent))
