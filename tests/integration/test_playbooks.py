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

# A play on localhost whose modules reach the server through module_defaults.
HEADER = """\
- name: {name}
  hosts: localhost
  gather_facts: false
  module_defaults:
    group/bulkhead.microseg.bulkhead:
      server_url: "{{{{ bulkhead_server }}}}"
      ca_path: "{{{{ bulkhead_pki }}}}/ca.crt"
      client_cert: "{{{{ bulkhead_pki }}}}/admin.crt"
      client_key: "{{{{ bulkhead_pki }}}}/admin.key"
"""

PLAY = HEADER + """\
  roles:
    - {target}
"""


def playbook_env(server):
    env = server.env()
    for name in ("BULKHEAD_SERVER", "BULKHEAD_CA", "BULKHEAD_CERT", "BULKHEAD_KEY"):
        env.pop(name)
    return env


def run_playbook(server, tmp_path, name, text, *args, check=True):
    """ansible-playbook on TMP_PATH/NAME.yml holding `text`, the server's URL and PKI
    folder (and the shared files/) given as extra variables."""
    play = tmp_path / ("%s.yml" % name)
    play.write_text(text)
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({"bulkhead_server": server.url,
                                 "bulkhead_pki": str(server.pki),
                                 "bulkhead_files": str(HERE / "files")}))
    return run(["ansible-playbook", "-i", "localhost,", "-c", "local", str(play),
                "-e", "@%s" % extra] + list(args), playbook_env(server), cwd=str(tmp_path),
               check=check)


@pytest.mark.parametrize("target", TARGETS)
def test_target(target, clean_server, tmp_path: Path):
    run_playbook(clean_server, tmp_path, "play",
                 PLAY.format(name="Integration target %s" % target, target=target))


def test_stage_keeps_a_port_range_as_the_server_reads_it(own_server, tmp_path: Path):
    """playbooks/stage.yml reads the folder with the manifests filter: `ports: [20:21]` is
    staged as the range 20:21 (from_yaml_all's YAML 1.1 made it the port 1221). A server
    of its own: stage.yml waits for every agent that ever reported to the shared one."""
    srv = own_server
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-ftp.yaml").write_text(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n"
        "metadata: {name: ftp}\n"
        "spec:\n  selector: app == 'ftp'\n  types: [Ingress]\n  ingress:\n"
        "    - action: Allow\n      protocol: TCP\n      destination:\n"
        "        ports: [20:21, 990]\n")
    run(["ansible-playbook", "-i", "localhost,", "-c", "local",
         str(HERE.parents[1] / "playbooks" / "stage.yml"),
         "-e", "bulkhead_policy_dir=%s" % policies], srv.env(), cwd=str(tmp_path))
    staged = srv.request("GET", "/v1/resources/StagedGlobalNetworkPolicy/ftp")
    assert staged["spec"]["ingress"][0]["destination"]["ports"] == ["20:21", 990]
