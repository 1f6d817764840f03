"""Each target under targets/ is a role run by ansible-playbook against a real server.

The connection comes from module_defaults on the action group (not the environment),
so the playbooks also test meta/runtime.yml's action_groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import HERE, run

TARGETS = sorted(p.name for p in (HERE / "targets").iterdir()
                 if (p / "tasks" / "main.yml").exists())

PLAY = """\
- name: Integration target {target}
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/bulkhead.microseg.bulkhead:
      server_url: "{{{{ bulkhead_server }}}}"
      ca_path: "{{{{ bulkhead_pki }}}}/ca.crt"
      client_cert: "{{{{ bulkhead_pki }}}}/admin.crt"
      client_key: "{{{{ bulkhead_pki }}}}/admin.key"
  roles:
    - {target}
"""


def playbook_env(server):
    env = server.env()
    for name in ("BULKHEAD_SERVER", "BULKHEAD_CA", "BULKHEAD_CERT", "BULKHEAD_KEY"):
        env.pop(name)
    return env


@pytest.mark.parametrize("target", TARGETS)
def test_target(target, clean_server, tmp_path: Path):
    play = tmp_path / "play.yml"
    play.write_text(PLAY.format(target=target))
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({"bulkhead_server": clean_server.url,
                                 "bulkhead_pki": str(clean_server.pki),
                                 "bulkhead_files": str(HERE / "files")}))
    run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(play),
         "-e", "@%s" % extra], playbook_env(clean_server), cwd=str(tmp_path))
