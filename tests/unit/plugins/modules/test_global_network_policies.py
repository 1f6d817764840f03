"""global_network_policies in-process: what it asks of the server for what it is given,
with the HTTP request replaced (the real server: tests/integration)."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.module_utils.client import BulkheadClient
from ansible_collections.bulkhead.microseg.plugins.modules import global_network_policies

URL = "https://bulkhead.example.com:7443"


@pytest.fixture
def requests(monkeypatch):
    made = []

    def request(self, method, path, body=None, query=None, raw=None):
        made.append((method, path, query, raw))
        return {"dryRun": bool(query and query.get("dryRun")), "revision": 4, "results": []}

    monkeypatch.setattr(BulkheadClient, "request", request)
    return made


def run(capsys, **args):
    with patch_module_args(dict(server_url=URL, **args)):
        with pytest.raises(SystemExit) as done:
            global_network_policies.main()
    return done.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("content", [None, "", "# every policy moved elsewhere\n", "---\n"])
def test_a_folder_or_file_without_documents_deletes_nothing(tmp_path, capsys, requests, content):
    """An empty folder (or one of *.yaml.j2 templates), or an empty file, synced the tier
    to no policy at all: every policy of it deleted, where `bulkhead apply -f` refuses."""
    src = tmp_path / "policies"
    src.mkdir()
    (src / "web.yaml.j2").write_text("kind: GlobalNetworkPolicy\n")
    if content is not None:
        src = src / "all.yaml"
        src.write_text(content)
    code, result = run(capsys, tier="platform", src=str(src))
    assert code == 1, result
    assert result["msg"] == (
        f"src: {src} holds no document (in a *.yaml, *.yml or *.json file): nothing was synced, "
        "since with none every policy of the tier platform would be deleted; to delete them "
        "all, give definition: []")
    assert requests == []


def test_text_without_documents_deletes_nothing(capsys, requests):
    code, result = run(capsys, owner="team-payments", definition="\n# nothing rendered\n")
    assert code == 1, result
    assert result["msg"].startswith("definition: the text holds no document: nothing was "
                                    "synced, since with none every policy of the owner "
                                    "team-payments would be deleted")
    assert requests == []


def test_an_empty_list_still_deletes_every_policy_of_the_tier(capsys, requests):
    code, result = run(capsys, tier="platform", definition=[], _ansible_check_mode=True)
    assert code == 0, result
    assert requests == [("POST", "/v1/sync", {"tier": "platform", "dryRun": "true"}, "[]")]
