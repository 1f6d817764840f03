"""The roles (pki, server, agent, and the common tasks they share) and the playbooks.

Static: every role's argument spec renders with ansible-doc and documents exactly the
role's defaults; variables carry the role's prefix; every playbook passes --syntax-check;
the unit templates, rendered with the roles' defaults, pass `systemd-analyze verify` and
carry the hardening; the configuration files they render load in bulkhead's own loaders.
Real: the playbooks against a real server, the agent's uninstall, the unit's capability,
the preflight checks and the venv install, on localhost. The pki role's real runs are in
test_roles_pki.py.

Systemd does not run here (not PID 1): units are verified offline, under a --root that
holds a copy of this machine's unit directory. Starting the units is left to the lab
machines (Molecule)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from bulkhead import pki
from bulkhead.agent.config import load_config
from bulkhead.server.main import ServerConfig
from conftest import BIN, HERE, ansible_env, run, start_server, stop_server

ROOT = HERE.parents[1]
ROLES = ("pki", "server", "agent", "common")
PLAYBOOKS = sorted(p.name for p in (ROOT / "playbooks").glob("*.yml"))

# Two hosts: srv-1 runs the server and an agent, web-1 an agent reached on SSH port 2222.
INVENTORY = """\
all:
  children:
    bulkhead_servers:
      hosts:
        srv-1: {ansible_host: 198.18.0.10}
    bulkhead_agents:
      hosts:
        srv-1: {}
        web-1: {ansible_host: 198.18.0.11, ansible_port: 2222}
"""

HARDENING = {
    "server": {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
               "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/bulkhead",
               "CapabilityBoundingSet": "", "AmbientCapabilities": ""},
    "agent": {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
              "PrivateTmp": "yes", "ReadWritePaths": "/var/lib/bulkhead-agent",
              # CAP_NET_RAW: held DNS answers are sent on through a raw socket (the role's
              # default DNS mode, DelayDNSResponse)
              "CapabilityBoundingSet": "CAP_NET_ADMIN CAP_NET_RAW",
              "AmbientCapabilities": "CAP_NET_ADMIN CAP_NET_RAW"},
}


def env():
    e = dict(os.environ)
    e.update(ansible_env())
    e["PATH"] = "%s:%s" % (BIN, e.get("PATH", ""))
    return e


def read_yaml(path):
    return yaml.safe_load(path.read_text()) or {}


# ------------------------------------------------------------------------------ static
@pytest.mark.parametrize("role", ROLES)
def test_argument_spec_renders_and_documents_every_default(role):
    out = run(["ansible-doc", "-t", "role", "--json", "bulkhead.microseg.%s" % role], env())
    doc = json.loads(out.stdout)["bulkhead.microseg.%s" % role]
    documented = set()
    for entry in doc["entry_points"].values():
        assert entry["short_description"]
        for name, option in (entry.get("options") or {}).items():
            assert option.get("description"), (role, name)
            assert option.get("type"), (role, name)
            documented.add(name)
    defaults = set(read_yaml(ROOT / "roles" / role / "defaults" / "main.yml"))
    assert documented == defaults


@pytest.mark.parametrize("role", ROLES)
def test_variables_carry_the_role_prefix(role):
    """bulkhead_<role>_ for public variables, _bulkhead_<role>_ for private ones (vars/,
    register, set_fact): the check ansible-lint's var-naming[no-role-prefix] cannot make."""
    folder = ROOT / "roles" / role
    public, private = "bulkhead_%s_" % role, "_bulkhead_%s_" % role
    assert all(k.startswith(public) for k in read_yaml(folder / "defaults" / "main.yml"))
    assert all(k.startswith(private) for k in read_yaml(folder / "vars" / "main.yml"))
    for path in sorted((folder / "tasks").glob("*.yml")):
        for task in yaml.safe_load(path.read_text()) or []:
            for inner in [task, *task.get("block", [])]:
                names = list(inner.get("ansible.builtin.set_fact", {}) or {})
                if "register" in inner:
                    names.append(inner["register"])
                for name in names:
                    assert name.startswith((private, public)), (path.name, name)


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook, tmp_path):
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), "--syntax-check",
         str(ROOT / "playbooks" / playbook)], env())


RENDER = """\
- name: Render the {role} role's files with its defaults
  hosts: {host}
  connection: local
  gather_facts: false
  vars_files:
    - {root}/roles/{role}/defaults/main.yml
    - {root}/roles/{role}/vars/main.yml
  tasks:
    - name: Render
      ansible.builtin.template:
        src: "{root}/roles/{role}/templates/{{{{ item.0 }}}}"
        dest: "{out}/{{{{ inventory_hostname }}}}/{{{{ item.1 }}}}"
        mode: "0644"
      loop:
        - [bulkhead-{role}.service.j2, bulkhead-{role}.service]
        - [{role}.yaml.j2, {role}.yaml]
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """OUT/HOST/{bulkhead-ROLE.service, ROLE.yaml}: srv-1 the server's, web-1 the agent's."""
    tmp = tmp_path_factory.mktemp("rendered")
    (tmp / "hosts.yml").write_text(INVENTORY)
    plays = RENDER.format(role="server", host="srv-1", root=ROOT, out=tmp) + \
        RENDER.format(role="agent", host="web-1", root=ROOT, out=tmp)
    (tmp / "render.yml").write_text(plays)
    for host in ("srv-1", "web-1"):
        (tmp / host).mkdir()
    run(["ansible-playbook", "-i", str(tmp / "hosts.yml"), str(tmp / "render.yml")], env())
    return tmp


def directives(unit_text):
    """The [Service] section's Key=Value lines (the last one of a key wins)."""
    section, found = None, {}
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key] = value
    return found


@pytest.mark.parametrize(("role", "host"), [("server", "srv-1"), ("agent", "web-1")])
def test_units_verify_offline_and_are_hardened(rendered, role, host, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    unit = (rendered / host / ("bulkhead-%s.service" % role)).read_text()
    found = directives(unit)
    for key, value in HARDENING[role].items():
        assert found.get(key) == value, (key, found.get(key))
    # A root with this machine's units (for the targets the unit needs), the unit, and the
    # programs it runs.
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / ("bulkhead-%s.service" % role)).write_text(unit)
    for key, value in found.items():
        if key.startswith("Exec"):
            program = root / value.split()[0].lstrip("-@+!").lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    out = run(["systemd-analyze", "verify", "--man=no", "--root=%s" % root,
               "bulkhead-%s.service" % role], env(), check=False)
    assert out.returncode == 0, out.stderr
    # systemd only warns about unknown keys and values it cannot parse: none may be left.
    assert not re.search(r"Unknown|ignoring|Failed|Invalid", out.stdout + out.stderr), \
        out.stdout + out.stderr


def test_agent_config_loads_with_the_failsafe_ports(rendered):
    config = load_config(rendered / "web-1" / "agent.yaml")
    assert config.server == "https://198.18.0.10:7443"
    assert config.node == "web-1"
    assert config.enforcement == "observe"
    assert config.flow_logs is not None
    inbound = {str(p) for p in config.failsafe_inbound}
    outbound = {str(p) for p in config.failsafe_outbound}
    # the SSH port Ansible uses for web-1 (2222) and the server's port
    assert {"tcp:2222", "tcp:7443"} <= inbound
    assert "tcp:7443" in outbound


def test_server_config_loads(rendered):
    config = ServerConfig.load(rendered / "srv-1" / "server.yaml", {})
    assert config.listen == "0.0.0.0:7443"
    assert config.datastore == "sqlite:///var/lib/bulkhead/store.db"
    assert config.client_ca == "/etc/bulkhead/pki/ca.crt"


# ---------------------------------------------------------------------- Windows, static
# Windows hosts cannot be reached from here: the Windows path is checked by its syntax,
# the argument spec's validation, and the files it renders (loaded by the agent's loader).
WINDOWS_INVENTORY = """\
all:
  children:
    bulkhead_servers:
      hosts:
        srv-1: {ansible_host: 198.18.0.10}
    bulkhead_windows_agents:
      hosts:
        win-1: {ansible_host: 198.18.0.12, ansible_connection: winrm}
"""

WINDOWS_RENDER = """\
- name: Render the agent role's Windows files with its defaults
  hosts: win-1
  gather_facts: false
  vars_files:
    - {root}/roles/agent/defaults/main.yml
    - {root}/roles/agent/vars/main.yml
  tasks:
    - name: The role's own checks of the variables pass with the defaults
      ansible.builtin.include_tasks: "{{{{ item }}}}"
      loop:
        - {root}/roles/agent/tasks/checks.yml
        - {root}/roles/agent/tasks/windows_checks.yml
    - name: Render agent.yaml
      delegate_to: localhost
      ansible.builtin.template:
        src: {root}/roles/agent/templates/agent.yaml.j2
        dest: {out}/agent.yaml
        mode: "0644"
    - name: Write what the role computes
      delegate_to: localhost
      ansible.builtin.copy:
        content: "{{{{ {{'command': _bulkhead_agent_win_command, 'python': _bulkhead_agent_win_python,
                     'config': _bulkhead_agent_win_config, 'port': bulkhead_agent_ssh_port,
                     'hns_state': _bulkhead_agent_win_hns_state}}
                     | to_json }}}}"
        dest: {out}/computed.json
        mode: "0644"
"""

VALIDATE = """\
- name: The agent role's argument spec, for a Windows host's variables
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Validate
      ansible.builtin.validate_argument_spec:
        argument_spec: "{{{{ (lookup('ansible.builtin.file', '{root}/roles/agent/meta/argument_specs.yml')
                            | from_yaml).argument_specs.main.options }}}}"
        provided_arguments: {provided}
"""


def test_windows_playbook_syntax(tmp_path):
    (tmp_path / "hosts.yml").write_text(WINDOWS_INVENTORY)
    run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), "--syntax-check",
         str(ROOT / "playbooks" / "windows.yml")], env())


@pytest.mark.parametrize("dataplane", [None, "hns"])
def test_windows_files_load_in_the_agent(tmp_path, dataplane):
    from bulkhead.agent.hns_enforcer import STATE_FILE
    from bulkhead.agent.win_service import service_command_line

    (tmp_path / "hosts.yml").write_text(WINDOWS_INVENTORY)
    (tmp_path / "render.yml").write_text(WINDOWS_RENDER.format(root=ROOT, out=tmp_path))
    # (facts are not gathered: the host is taken for Windows as os_family would say)
    chosen = ["-e", "bulkhead_agent_windows_dataplane=%s" % dataplane] if dataplane else []
    run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "render.yml"),
         "-e", "_bulkhead_agent_windows=true", *chosen], env())
    computed = json.loads((tmp_path / "computed.json").read_text())
    assert computed["python"] == "C:\\Program Files\\Bulkhead\\python\\tools\\python.exe"
    assert computed["config"] == "C:\\ProgramData\\Bulkhead\\agent.yaml"
    # the SCM's command line is the one `bulkhead-agent service install` writes
    assert computed["command"] == service_command_line(computed["python"], computed["config"])
    assert int(computed["port"]) == 5986      # WinRM's, not SSH's
    config = load_config(tmp_path / "agent.yaml")
    assert config.dataplane == (dataplane or "windows-firewall")
    # the uninstall runs `--release` while the HNS enforcer's list is there
    assert computed["hns_state"] == config.state_dir + "\\" + STATE_FILE
    assert config.dns is None and config.flow_logs is None
    assert config.ca == "C:\\ProgramData\\Bulkhead\\pki\\ca.crt"
    assert config.state_dir == "C:\\ProgramData\\Bulkhead\\state"
    assert config.server == "https://198.18.0.10:7443" and config.node == "win-1"
    assert {"tcp:5986", "tcp:7443"} <= {str(p) for p in config.failsafe_inbound}


@pytest.mark.parametrize(("provided", "error"), [
    ({"bulkhead_agent_ssh_port": 5986, "bulkhead_agent_windows_start_mode": "delayed",
      "bulkhead_agent_windows_pki_ca_dir": "/srv/bulkhead/pki"}, None),
    ({"bulkhead_agent_ssh_port": 5986, "bulkhead_agent_windows_start_mode": "boot"},
     "bulkhead_agent_windows_start_mode must be one of: auto, delayed"),
    ({"bulkhead_agent_ssh_port": 5986, "bulkhead_agent_windows_dataplane": "hns"}, None),
    ({"bulkhead_agent_ssh_port": 5986, "bulkhead_agent_windows_dataplane": "nftables"},
     "bulkhead_agent_windows_dataplane must be one of: windows-firewall, hns"),
    ({"bulkhead_agent_ssh_port": "winrm"},
     "argument 'bulkhead_agent_ssh_port' is of type str and we were unable to convert to int"),
])
def test_windows_variables_are_validated(tmp_path, provided, error):
    # The spec's defaults are the role's defaults/main.yml (test_argument_spec_...); a
    # templated one (the port) is given here, as the role's own validation gets it.
    (tmp_path / "validate.yml").write_text(VALIDATE.format(root=ROOT, provided=json.dumps(provided)))
    out = run(["ansible-playbook", "-i", "localhost,", str(tmp_path / "validate.yml")], env(),
              check=error is None)
    if error is not None:
        assert out.returncode != 0 and error in out.stdout + out.stderr, out.stdout + out.stderr


# ------------------------------------------------------ the wheelhouse copy, for real
WHEELHOUSE = """\
- name: Bring a wheelhouse over
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: The common role's wheelhouse tasks
      ansible.builtin.include_role:
        name: bulkhead.microseg.common
        tasks_from: wheelhouse
      vars:
        bulkhead_common_wheelhouse: {src}
"""
COPY_TASK = re.compile(r"TASK \[bulkhead\.microseg\.common : Copy the wheelhouse[^\]]*\] \**\n(\w+)")
OWN_WHEEL_TASK = re.compile(r"TASK \[bulkhead\.microseg\.common : Copy the bulkhead wheel[^\]]*\] "
                            r"\**\n(\w+)")


@pytest.mark.skipif(os.geteuid() != 0, reason="the wheels belong to root")
def test_the_wheelhouse_is_copied_only_when_the_target_lacks_a_wheel(tmp_path):
    """The target keeps the dependencies' wheels by name (a name carries the version, a
    version's wheel is one file): a run whose wheels are all there copies no directory;
    a wheel missing there, or new on the controller, brings the copy back. The bulkhead
    wheel, rebuilt under the same name until its version changes, is compared by content
    on every run."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    own = "bulkhead_microseg-0.1.0-py3-none-any.whl"
    for name in (own, "a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl"):
        (src / name).write_text(name)
    (tmp_path / "play.yml").write_text(WHEELHOUSE.format(src=src))

    def play(*args):
        out = run(["ansible-playbook", str(tmp_path / "play.yml"),
                   "-e", "_bulkhead_common_wheelhouse_dest=%s" % dest, *args], env()).stdout
        copy, own_copy = COPY_TASK.search(out), OWN_WHEEL_TASK.search(out)
        assert copy and own_copy, out
        return copy.group(1), own_copy.group(1), int(re.search(r"changed=(\d+)", out).group(1))

    def there():
        return {p.name: p.read_text() for p in dest.iterdir()}

    assert play("--check") == ("changed", "changed", 3)   # nothing there yet: all would come
    assert not dest.exists()
    assert play() == ("changed", "ok", 2)                 # the directory and the copy
    assert there() == {p.name: p.read_text() for p in src.iterdir()}
    assert play() == ("skipping", "ok", 0)
    (dest / "b-2.0-py3-none-any.whl").unlink()
    (src / "c-3.0-py3-none-any.whl").write_text("c")
    assert play("--check") == ("changed", "ok", 1)
    assert play() == ("changed", "ok", 1)
    assert there() == {p.name: p.read_text() for p in src.iterdir()}
    assert play() == ("skipping", "ok", 0)
    (src / own).write_text("rebuilt")                     # the same version built again
    assert play() == ("skipping", "changed", 1)
    assert there()[own] == "rebuilt"
    assert play() == ("skipping", "ok", 0)


# ------------------------------------------------------- the playbooks, on a real server
# Two hosts whose endpoints the inventory gives directly (as the endpoints inventory
# plugin would). The failsafe probes of enforce.yml need something listening: the hosts'
# "SSH" port is the server's own port on 127.0.0.1.
FLEET = """\
all:
  vars:
    ansible_connection: local
    ansible_host: 127.0.0.1
    ansible_port: {port}
    bulkhead_probe_ssh_port: {port}
    bulkhead_agent_server_host: 127.0.0.1
    bulkhead_agent_server_port: {port}
  children:
    bulkhead_servers:
      hosts:
        node-1: {{}}
    bulkhead_agents:
      hosts:
        node-1:
          bulkhead_host_endpoint: {{metadata: {{name: node-1, labels: {{app: web}}}},
                                   spec: {{node: node-1, expectedIPs: [198.18.0.21]}}}}
        node-2:
          bulkhead_host_endpoint: {{metadata: {{name: node-2, labels: {{app: db}}}},
                                   spec: {{node: node-2, expectedIPs: [198.18.0.22]}}}}
"""


NEW_HOST = """\
        node-3:
          bulkhead_host_endpoint: {metadata: {name: node-3, labels: {app: web}},
                                   spec: {node: node-3, expectedIPs: [198.18.0.23]}}
"""


def playbook(server, tmp_path, name, *args, check=True):
    e = server.env()
    return run(["ansible-playbook", "-i", str(tmp_path / "fleet.yml"),
                str(ROOT / "playbooks" / name), *args], e, check=check)


def modes(server):
    return {d["metadata"]["name"]: d["metadata"]["labels"]["microseg.bulkhead.io/enforcement"]
            for d in server.request("GET", "/v1/resources/HostEndpoint")["items"]}


def names(server, kind):
    items = server.request("GET", "/v1/resources/" + kind)["items"]
    return sorted(d["metadata"]["name"] for d in items)


def test_onboard_stage_preview_enforce_rollback(own_server, tmp_path):
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    policies = ROOT / "inventory-examples" / "policies"

    # onboard: observe by default; check mode writes nothing; a second run changes nothing
    out = playbook(server, tmp_path, "onboard.yml", "--check", "--diff")
    assert "changed=1" in out.stdout and modes(server) == {}
    playbook(server, tmp_path, "onboard.yml")
    assert modes(server) == {"node-1": "observe", "node-2": "observe"}
    assert "changed=0" in playbook(server, tmp_path, "onboard.yml").stdout

    # stage: every GlobalNetworkPolicy of the folder becomes a StagedGlobalNetworkPolicy
    playbook(server, tmp_path, "stage.yml", "-e", "bulkhead_policy_dir=%s" % policies,
             "--check", "--diff")
    assert names(server, "StagedGlobalNetworkPolicy") == []
    playbook(server, tmp_path, "stage.yml", "-e", "bulkhead_policy_dir=%s" % policies)
    staged = names(server, "StagedGlobalNetworkPolicy")
    assert len(staged) == 9 and names(server, "GlobalNetworkPolicy") == []
    assert "changed=0" in playbook(server, tmp_path, "stage.yml", "-e",
                                   "bulkhead_policy_dir=%s" % policies).stdout

    # preview: no flows logged, nothing newly denied: the gate passes; a report is kept
    report = tmp_path / "preview.json"
    playbook(server, tmp_path, "preview.yml", "-e", "bulkhead_preview_report=%s" % report)
    assert json.loads(report.read_text())["totals"]["newlyDenied"]["connections"] == 0

    # enforce: check mode promotes nothing; then promoted, hosts in enforce mode, probes pass
    playbook(server, tmp_path, "enforce.yml", "--check", "--diff")
    assert names(server, "StagedGlobalNetworkPolicy") == staged
    out = playbook(server, tmp_path, "enforce.yml")
    assert names(server, "StagedGlobalNetworkPolicy") == []
    assert names(server, "GlobalNetworkPolicy") == staged
    assert modes(server) == {"node-1": "enforce", "node-2": "enforce"}
    ssh_probe = out.stdout.split("SSH from the controller still reaches the host")[1]
    assert "ok: [node-1" in ssh_probe.split("TASK")[0]   # run, not skipped
    # The pipeline again with nothing new: onboarding keeps the hosts' modes, policies
    # enforced as written are not staged again, and nothing is promoted.
    for name, *args in (("onboard.yml",), ("stage.yml", "-e", "bulkhead_policy_dir=%s" % policies),
                        ("enforce.yml",)):
        again = playbook(server, tmp_path, name, *args).stdout
        assert "changed=0" in again and "changed=1" not in again, (name, again[-3000:])
    assert names(server, "StagedGlobalNetworkPolicy") == [] and \
        modes(server) == {"node-1": "enforce", "node-2": "enforce"}
    # A version staged and never promoted, then the folder back to the enforced version:
    # the staged copy becomes the folder's again, never left for enforce.yml to promote.
    changed = tmp_path / "policies-v2"
    shutil.copytree(policies, changed)
    app = changed / "20-application.yaml"
    app.write_text(app.read_text().replace("order: 100", "order: 150", 1))
    playbook(server, tmp_path, "stage.yml", "-e", "bulkhead_policy_dir=%s" % changed)
    assert names(server, "StagedGlobalNetworkPolicy") == ["application.web"]
    playbook(server, tmp_path, "stage.yml", "-e", "bulkhead_policy_dir=%s" % policies)
    staged_web = server.request("GET", "/v1/resources/StagedGlobalNetworkPolicy/application.web")
    assert staged_web["spec"]["order"] == 100
    playbook(server, tmp_path, "enforce.yml")
    assert names(server, "StagedGlobalNetworkPolicy") == []
    assert server.request("GET", "/v1/resources/GlobalNetworkPolicy/application.web")[
        "spec"]["order"] == 100
    # A new host is onboarded in observe mode; the enforced ones stay as they are.
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port) + NEW_HOST)
    playbook(server, tmp_path, "onboard.yml")
    assert modes(server) == {"node-1": "enforce", "node-2": "enforce", "node-3": "observe"}
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    playbook(server, tmp_path, "onboard.yml")
    assert modes(server) == {"node-1": "enforce", "node-2": "enforce"}

    # rollback: back to the revision before the promotion, found in the audit trail
    checked = playbook(server, tmp_path, "rollback.yml", "--check", "--diff").stdout
    assert "nothing written (check mode)" in checked, checked
    assert names(server, "GlobalNetworkPolicy") == staged
    done = playbook(server, tmp_path, "rollback.yml").stdout
    assert re.search(r"resources; revision [0-9]+", done), done
    assert names(server, "StagedGlobalNetworkPolicy") == staged
    assert names(server, "GlobalNetworkPolicy") == []
    assert modes(server) == {"node-1": "observe", "node-2": "observe"}
    assert "changed=0" in playbook(server, tmp_path, "rollback.yml").stdout


def test_onboard_refuses_an_empty_inventory(own_server, tmp_path):
    (tmp_path / "fleet.yml").write_text("all:\n  hosts:\n    web-1: {}\n")
    out = playbook(own_server, tmp_path, "onboard.yml", check=False)
    assert out.returncode == 2
    assert "would delete every endpoint" in out.stdout.replace("\n", " ") or \
        "Syncing nothing" in out.stdout


def test_onboard_syncs_nothing_while_a_host_cannot_be_labeled(own_server, tmp_path):
    """A host the endpoints plugin cannot label (a bad label value from its facts, say)
    gets no HostEndpoint: the sync's purge would delete its endpoint in the store, so
    onboard.yml stops before it, naming the host, and the store keeps every endpoint."""
    server = own_server
    fleet = tmp_path / "fleet.yml"
    config = tmp_path / "zz.bulkhead.yml"
    config.write_text("plugin: bulkhead.microseg.endpoints\nlabels:\n  os: os\n")
    env = dict(server.env(), ANSIBLE_INVENTORY_ENABLED="yaml,bulkhead.microseg.endpoints")

    def onboard(*args, check=True):
        return run(["ansible-playbook", "-i", str(fleet), "-i", str(config),
                    str(ROOT / "playbooks" / "onboard.yml"), *args], env, check=check)

    fleet.write_text("all:\n  hosts:\n    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: debian, ansible_host: 198.18.0.22}\n")
    onboard()
    assert names(server, "HostEndpoint") == ["node-1", "node-2"]
    fleet.write_text("all:\n  hosts:\n    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: \"openSUSE Leap\", ansible_host: 198.18.0.22}\n")
    out = onboard(check=False)
    assert out.returncode == 2, out.stdout
    text = " ".join(out.stdout.split())
    assert "Nothing synced" in text and "host node-2" in text, text
    assert names(server, "HostEndpoint") == ["node-1", "node-2"]
    # Onboarding a group the plugin made from labels: node-2, unlabeled, is in none of
    # them, and the purge would delete its endpoint all the same.
    out = onboard("-e", "bulkhead_onboard_group=label_os_debian", check=False)
    assert out.returncode == 2 and "Nothing synced" in " ".join(out.stdout.split()), out.stdout
    assert names(server, "HostEndpoint") == ["node-1", "node-2"]


def test_onboard_keeps_the_endpoint_of_a_host_without_an_address_now(own_server, tmp_path):
    """A host still in the inventory whose address is unknown now (no IP ansible_host
    and no facts: an expired fact cache) gets no HostEndpoint from the plugin; onboard.yml
    keeps its endpoint in the store as it is, saying so, instead of purging it and leaving
    the host unenforced. A host gone from the inventory is still deleted."""
    server = own_server
    fleet = tmp_path / "fleet.yml"
    config = tmp_path / "zz.bulkhead.yml"
    config.write_text("plugin: bulkhead.microseg.endpoints\nlabels:\n  os: os\n")
    env = dict(server.env(), ANSIBLE_INVENTORY_ENABLED="yaml,bulkhead.microseg.endpoints")

    def onboard(*args):
        return run(["ansible-playbook", "-i", str(fleet), "-i", str(config),
                    str(ROOT / "playbooks" / "onboard.yml"), *args], env)

    fleet.write_text("all:\n  hosts:\n"
                     "    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: debian, ansible_host: 198.18.0.22}\n"
                     "    node-3: {os: debian, ansible_host: 198.18.0.23}\n")
    onboard()
    before = {d["metadata"]["name"]: d for d in server.request(
        "GET", "/v1/resources/HostEndpoint")["items"]}
    assert sorted(before) == ["node-1", "node-2", "node-3"]
    # node-2 is known by name only now; node-3 left the inventory.
    fleet.write_text("all:\n  hosts:\n"
                     "    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: debian, ansible_host: node-2.example}\n")
    for args, written in ((("--check",), "nothing written (check mode)"), ((), "revision ")):
        out = onboard(*args)
        text = " ".join(out.stdout.split())
        assert "deleted 1 host endpoints; " + written in text, text
        assert ("kept as they are, the plugin having made no HostEndpoint for their hosts "
                "now (no address, or no node): node-2") in text, text
    after = {d["metadata"]["name"]: d for d in server.request(
        "GET", "/v1/resources/HostEndpoint")["items"]}
    assert sorted(after) == ["node-1", "node-2"]
    assert after["node-2"]["spec"] == before["node-2"]["spec"]
    assert after["node-2"]["metadata"]["resourceVersion"] == \
        before["node-2"]["metadata"]["resourceVersion"]
    # A mode given moves it too (enforce.yml's step), its addresses as they were.
    text = " ".join(onboard("-e", "bulkhead_enforcement=enforce").stdout.split())
    assert "written again as they were, with the mode given" in text, text
    after = {d["metadata"]["name"]: d for d in server.request(
        "GET", "/v1/resources/HostEndpoint")["items"]}
    assert after["node-2"]["spec"] == before["node-2"]["spec"]
    assert {n: d["metadata"]["labels"]["microseg.bulkhead.io/enforcement"]
            for n, d in after.items()} == {"node-1": "enforce", "node-2": "enforce"}
    # A mode given reaches only the hosts of the group onboarded.
    server.request("PUT", "/v1/resources/HostEndpoint/node-2", dict(
        after["node-2"], metadata={**after["node-2"]["metadata"], "labels": {
            **after["node-2"]["metadata"]["labels"],
            "microseg.bulkhead.io/enforcement": "observe"}}))
    fleet.write_text("all:\n  hosts:\n"
                     "    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: centos, ansible_host: node-2.example}\n")
    onboard("-e", "bulkhead_enforcement=enforce", "-e", "bulkhead_onboard_group=label_os_debian")
    mode = server.request("GET", "/v1/resources/HostEndpoint/node-2")["metadata"]["labels"]
    assert mode["microseg.bulkhead.io/enforcement"] == "observe"
    # An inventory that made no endpoint and holds none of the store's: still refused
    # (syncing it would delete every endpoint of the owner).
    fleet.write_text("all:\n  hosts:\n    other-1: {os: debian, ansible_host: other.example}\n")
    out = run(["ansible-playbook", "-i", str(fleet), "-i", str(config),
               str(ROOT / "playbooks" / "onboard.yml")], env, check=False)
    assert out.returncode == 2 and "Syncing nothing" in " ".join(out.stdout.split()), out.stdout
    assert names(server, "HostEndpoint") == ["node-1", "node-2"]
    # A host whose endpoint cannot even be named: nothing is synced (its endpoint could
    # not be told from one of a host gone).
    config.write_text("plugin: bulkhead.microseg.endpoints\nlabels:\n  os: os\n"
                      "endpoint_name: endpoint | default(inventory_hostname)\n")
    fleet.write_text("all:\n  hosts:\n"
                     "    node-1: {os: debian, ansible_host: 198.18.0.21}\n"
                     "    node-2: {os: debian, endpoint: '', ansible_host: 198.18.0.22}\n")
    out = run(["ansible-playbook", "-i", str(fleet), "-i", str(config),
               str(ROOT / "playbooks" / "onboard.yml")], env, check=False)
    text = " ".join(out.stdout.split())
    assert out.returncode == 2 and "endpoint_name gave nothing for 1 host(s) (node-2)" in text, \
        text
    assert names(server, "HostEndpoint") == ["node-1", "node-2"]


# ------------------------------------------------------- site.yml, check mode, no systemd
LOCAL = """\
all:
  vars:
    ansible_connection: local
  children:
    bulkhead_servers:
      hosts:
        srv-1: {ansible_host: 127.0.0.1}
    bulkhead_agents:
      hosts:
        srv-1: {}
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="site.yml becomes root")
def test_site_in_check_mode_on_a_host_systemd_does_not_run(tmp_path):
    """Here systemd is not PID 1 (`systemctl is-system-running`: offline): the roles stop
    with a message naming the override; with it, --check --diff runs through and writes
    nothing (not even the CA on the controller)."""
    if run(["systemctl", "is-system-running"], env(), check=False).stdout.strip() != "offline":
        pytest.skip("systemd runs this machine")
    (tmp_path / "hosts.yml").write_text(LOCAL)
    cmd = ["ansible-playbook", "-i", str(tmp_path / "hosts.yml"),
           str(ROOT / "playbooks" / "site.yml"), "--check", "--diff",
           "-e", "bulkhead_pki_ca_dir=%s" % (tmp_path / "ca")]
    out = run(cmd, env(), check=False)
    assert out.returncode == 2
    assert "bulkhead_server_allow_offline=true" in out.stdout
    # Two agents' hosts, in batches of one (bulkhead_agent_serial): the agent's play runs
    # its tasks once per batch.
    (tmp_path / "hosts.yml").write_text(LOCAL + "        agt-2: {ansible_host: 127.0.0.2}\n")
    out = run(cmd + ["-e", "bulkhead_server_allow_offline=true",
                     "-e", "bulkhead_agent_allow_offline=true",
                     "-e", '{"bulkhead_agent_serial": 1}'], env())
    assert re.search(r"srv-1\s+: .*failed=0", out.stdout) and \
        re.search(r"agt-2\s+: .*failed=0", out.stdout), out.stdout[-3000:]
    assert "tcp:7443" in out.stdout  # the agent's configuration in the diff
    assert out.stdout.count("TASK [bulkhead.microseg.agent : Is the agent running already?]") == 2
    assert not (tmp_path / "ca").exists()


def site_with_two_versions(tmp_path, inventory, *extra):
    """site.yml --check with the server's version 0.1.0 and the agent's 0.1.1 on
    `inventory`, whose srv-1 runs both: the run fails (2) with the first play's refusal,
    naming both, and no CA made; its output."""
    (tmp_path / "hosts.yml").write_text(inventory)
    out = run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"),
               str(ROOT / "playbooks" / "site.yml"), "--check",
               "-e", "bulkhead_pki_ca_dir=%s" % (tmp_path / "ca"),
               "-e", "bulkhead_server_version=0.1.0", "-e", "bulkhead_agent_version=0.1.1",
               *extra], env(), check=False)
    text = " ".join(out.stdout.split())
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    assert "bulkhead_agent would install bulkhead-microseg 0.1.1 into /opt/bulkhead, where " \
           "bulkhead_server installs 0.1.0 in this run" in text, text[-3000:]
    assert not (tmp_path / "ca").exists()
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="site.yml becomes root")
def test_site_refuses_two_versions_for_one_venv_before_installing_anything(tmp_path):
    """A host running the server and the agent, which share a venv, each given its own
    version: site.yml's first play refuses it, naming both, before the server's play
    installs (it had installed, or downgraded, the server before the agent's play refused).
    --check as well, so that nothing would be installed here if the check let it by."""
    out = site_with_two_versions(tmp_path, LOCAL)
    assert "PLAY [Certificates and bulkhead-server]" not in out.stdout, out.stdout[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="site.yml becomes root")
def test_site_refusing_a_host_running_both_goes_on_with_the_other_hosts(tmp_path):
    """Two versions for srv-1's shared venv are srv-1's refusal: agt-2, an agent's host
    only, still gets the agents' play (--check), as when the agents' play refused them.
    The first play ran on srv-1 alone: its every host failed, and ansible-playbook ran no
    other play on any host of the fleet."""
    out = site_with_two_versions(tmp_path, LOCAL + "        agt-2: {ansible_host: 127.0.0.2}\n",
                                 "-e", "bulkhead_server_allow_offline=true",
                                 "-e", "bulkhead_agent_allow_offline=true")
    assert re.search(r"srv-1\s+: .*failed=1", out.stdout), out.stdout[-3000:]
    assert "PLAY [Certificates and bulkhead-agent]" in out.stdout, out.stdout[-3000:]
    assert re.search(r"agt-2\s+: ok=[1-9]\d*\s+.*unreachable=0\s+failed=0", out.stdout), \
        out.stdout[-3000:]


# srv-1 in both groups, on an SSH port nothing listens on: a task run on it finds it
# unreachable.
UNREACHABLE = """\
all:
  vars:
    ansible_host: 127.0.0.1
    ansible_port: 1
  children:
    bulkhead_servers:
      hosts:
        srv-1: {}
    bulkhead_agents:
      hosts:
        srv-1: {}
"""


@pytest.mark.parametrize("skip", [[], ["--skip-tags", "always"]], ids=["all", "skip-always"])
def test_site_checks_one_version_without_the_host_and_under_skip_tags(tmp_path, skip):
    """site.yml's first play reads both versions on the controller: a host it cannot reach
    is refused all the same (unreachable=0), also with --skip-tags always, which skips the
    roles' implicit ends (tagged always): the first play's meta: end_role then ran off the
    play and ansible-playbook stopped on an unexpected exception."""
    out = site_with_two_versions(tmp_path, UNREACHABLE, *skip)
    assert re.search(r"srv-1\s+: .*unreachable=0\s+failed=1", out.stdout), out.stdout[-3000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="site.yml becomes root")
def test_site_in_check_mode_on_a_fresh_host_systemd_runs(tmp_path):
    """--check on a host the roles have not installed yet, systemd running it (here told so
    through bulkhead_common_systemd_booted; the lab machines showed the same): the units
    are only about to be written, so nothing asks systemd to enable, start or restart them
    (systemd_service fails on a unit it cannot find, which stopped the whole run)."""
    if Path("/etc/systemd/system/bulkhead-server.service").exists() or \
            Path("/etc/systemd/system/bulkhead-agent.service").exists():
        pytest.skip("this machine has the units: not a fresh host")
    (tmp_path / "hosts.yml").write_text(LOCAL)
    out = run(["ansible-playbook", "-i", str(tmp_path / "hosts.yml"),
               str(ROOT / "playbooks" / "site.yml"), "--check", "--diff",
               "-e", "bulkhead_pki_ca_dir=%s" % (tmp_path / "ca"),
               "-e", "bulkhead_common_systemd_booted=true"], env(), check=False)
    assert out.returncode == 0, out.stdout[-5000:]
    assert "Could not find the requested service" not in out.stdout
    assert re.search(r"srv-1\s+: ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0", out.stdout)
    assert not (tmp_path / "ca").exists()


# ------------------------------------------------------------- agent uninstall, for real
UNINSTALL = """\
- name: Uninstall the agent
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: bulkhead.microseg.agent
      vars:
        bulkhead_agent_state: absent
        bulkhead_agent_allow_offline: true
        bulkhead_agent_config_dir: {tmp}/etc
        bulkhead_agent_pki_dir: {tmp}/etc/pki
        bulkhead_agent_state_dir: {tmp}/state
        bulkhead_agent_venv: {tmp}/venv
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
                    reason="needs root, nft and unshare")
@pytest.mark.parametrize("a_venv", [True, False])
def test_agent_uninstall_removes_its_table_and_nothing_else(tmp_path, a_venv):
    """In a network namespace of its own, with the agent's table and another one, on a
    host systemd does not run (the unit's part is `systemctl disable` only). The venv
    goes only when it is one (its pyvenv.cfg): whatever else is at that path stays. (Check
    mode and the second run, the same either way, only with a venv.)"""
    for folder in ("etc/pki", "state", "venv/bin"):
        (tmp_path / folder).mkdir(parents=True)
    if a_venv:
        (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    else:   # a file of someone else's keeps the configuration directory
        (tmp_path / "etc" / "other.conf").write_text("kept\n")
    for name in ("agent.key", "agent.crt", "ca.crt"):
        (tmp_path / "etc" / "pki" / name).write_text("-----\n")
    (tmp_path / "etc" / "agent.yaml").write_text("node: web-1\n")
    (tmp_path / "state" / "snapshot.json").write_text("{}")
    (tmp_path / "uninstall.yml").write_text(UNINSTALL.format(tmp=tmp_path))
    # The wheelhouse install_from: wheel copied, at a path of the test's own.
    wheelhouse = tmp_path / "cache" / "bulkhead" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    (wheelhouse / "bulkhead_microseg-1.0-py3-none-any.whl").write_text("wheel\n")
    if not a_venv:   # a file of someone else's keeps the cache directory
        (tmp_path / "cache" / "bulkhead" / "other").write_text("kept\n")
    play = "ansible-playbook %s -e _bulkhead_common_wheelhouse_dest=%s" % (
        tmp_path / "uninstall.yml", wheelhouse)
    script = ("set -e; nft add table inet bulkhead; nft add table inet host-own; "
              "%s --check --diff > check.out; nft list tables > after-check; "
              "ls etc >> after-check; "
              "%s > first.out; nft list tables > after; %s > second.out"
              % (play, play, play) if a_venv else
              "set -e; nft add table inet bulkhead; nft add table inet host-own; "
              "%s > first.out; nft list tables > after" % play)
    run(["unshare", "-n", "sh", "-c", script], env(), cwd=tmp_path)
    if a_venv:
        after_check = (tmp_path / "after-check").read_text()  # check mode: nothing removed
        assert "table inet bulkhead" in after_check and "agent.yaml" in after_check
        assert "changed=0" in (tmp_path / "second.out").read_text()
    assert (tmp_path / "after").read_text().split() == ["table", "inet", "host-own"]
    assert not (tmp_path / "etc" / "agent.yaml").exists()
    assert not (tmp_path / "state").exists()
    assert (tmp_path / "venv").exists() is not a_venv
    # The pki and configuration directories, left empty, go; another's file keeps its own.
    assert not (tmp_path / "etc" / "pki").exists()
    assert (tmp_path / "etc").exists() is not a_venv
    if not a_venv:
        assert os.listdir(tmp_path / "etc") == ["other.conf"]
    # The wheelhouse goes (no bulkhead-server here), and its cache directory left empty.
    assert not wheelhouse.exists()
    assert (tmp_path / "cache" / "bulkhead").exists() is not a_venv
    assert (tmp_path / "cache").exists()


# ------------------------------------------------- the agent unit's one capability, for real
AS_AGENT = ("setpriv --reuid 65534 --regid 65534 --clear-groups --no-new-privs "
            "--inh-caps -all,+net_admin,+net_raw --ambient-caps -all,+net_admin,+net_raw "
            "--bounding-set -all,+net_admin,+net_raw")


@pytest.mark.skipif(os.geteuid() != 0
                    or not all(shutil.which(p) for p in ("nft", "unshare", "setpriv")),
                    reason="needs root, nft, unshare and setpriv")
def test_the_agent_runs_as_a_user_with_cap_net_admin_only():
    """What the agent unit grants (User= not root, CAP_NET_ADMIN and CAP_NET_RAW bounding
    and ambient, NoNewPrivileges), made with setpriv in a network namespace of its own
    with a server: `--once` applies the table, the daemon runs with flow logs (NFLOG,
    ctnetlink, the net.netfilter sysctls) and DNS snooping ready to hold answers (the raw
    socket made) and logs no error. The dry run needs more (a throwaway network
    namespace), which is why the role runs it as root, outside the unit."""
    # pytest's own temporary directories are root's alone; the agent's user must get in
    with tempfile.TemporaryDirectory(prefix="bulkhead-roles-") as tmp:
        tmp_path = Path(tmp)
        tmp_path.chmod(0o755)
        _run_agent_as_nobody(tmp_path)


def _run_agent_as_nobody(tmp_path):
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    pki.issue(tmp_path, "web-1", role="agent")
    (tmp_path / "state").mkdir()
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "server": "https://127.0.0.1:7443", "node": "web-1", "ca": str(tmp_path / "ca.crt"),
        "cert": str(tmp_path / "web-1.crt"), "key": str(tmp_path / "web-1.key"),
        "stateDir": str(tmp_path / "state"), "flowLogs": {"enabled": True},
        "metricsListen": "", "driftInterval": 1}))
    shutil.chown(tmp_path / "state", "nobody")
    for name in ("web-1.key", "web-1.crt", "ca.crt", "agent.yaml"):
        shutil.chown(tmp_path / name, "nobody")
    agent = "%s %s --config %s" % (AS_AGENT, BIN / "bulkhead-agent", tmp_path / "agent.yaml")
    script = """
set -e
ip link set lo up
{bin}/bulkhead-server --listen 127.0.0.1:7443 --datastore sqlite://{d}/store.db \
  --tls-cert {d}/server.crt --tls-key {d}/server.key --client-ca {d}/ca.crt \
  --log-level warning > server.log 2>&1 &
server=$!
trap 'kill $server' EXIT
for i in $(seq 50); do {agent} --once > once.out 2> once.err && break; sleep 0.2; done
nft list tables > tables
timeout 10 {agent} 2> daemon.log &
daemon=$!
sleep 3
nft list set inet bulkhead dns_hold > hold || true
wait $daemon || true
cat /proc/sys/net/netfilter/nf_conntrack_acct > acct
""".format(bin=BIN, d=tmp_path, agent=agent)
    run(["unshare", "-n", "sh", "-c", script], env(), cwd=tmp_path)
    assert "applied revision" in (tmp_path / "once.out").read_text()
    assert "table inet bulkhead" in (tmp_path / "tables").read_text()
    log = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines()]
    assert any(e["msg"] == "connected" for e in log)
    assert [e for e in log if e["level"] in ("warning", "error")] == []
    assert (tmp_path / "acct").read_text().strip() == "1"
    # DNS answers can be held: the set is in the table, and the raw socket that sends
    # them on was made at start (without CAP_NET_RAW the agent logs an error, above).
    # (No policy names a domain here, so there is nothing to hold for.)
    assert "set dns_hold" in (tmp_path / "hold").read_text()


INJECTED = "/var/lib/x\nExecStartPre=+/bin/sh -c 'id > /tmp/pwned'"

UNIT_VALUES = [
    ("agent", "bulkhead_agent_state_dir", INJECTED),
    ("server", "bulkhead_server_state_dir", INJECTED),
    ("server", "bulkhead_server_user", "root\nExecStartPre=+/bin/true"),
    ("agent", "bulkhead_agent_user", "Bulk Head"),
    ("agent", "bulkhead_agent_venv", "/opt/bulk head"),
    ("agent", "bulkhead_agent_config_dir", "etc/bulkhead"),
    ("server", "bulkhead_server_venv", "/opt/%h"),
    ("server", "bulkhead_server_config_dir", "/etc/bulkhead\n"),
    ("agent", None, None),
    ("server", None, None),
]

SYSTEM_DIRS = [
    ("agent", "bulkhead_agent_state_dir", "/var/lib", True),
    ("agent", "bulkhead_agent_venv", "/opt", True),
    ("agent", "bulkhead_agent_config_dir", "/", True),
    ("agent", "bulkhead_agent_state_dir", "/var/lib/bulkhead-agent/..", True),
    ("server", "bulkhead_server_state_dir", "/var/lib/", True),
    ("server", "bulkhead_server_venv", "/usr/local", True),
    ("server", "bulkhead_server_config_dir", "/home/ops", True),
    ("agent", "bulkhead_agent_state_dir", "/var/lib/bulkhead-agent", False),
    ("server", "bulkhead_server_venv", "/opt/bulkhead", False),
    ("agent", "bulkhead_agent_config_dir", "/home/ops/bulkhead", False),
]


def cases_in_one_run(folder, title, cases, step, play_vars=None):
    """CASES in one ansible-playbook run on localhost (a run each takes 3-10 s): a block per
    case with STEP(case), the task under test, between two marks, and a rescue noting a
    refusal; the play written to FOLDER, titled TITLE, with PLAY_VARS. Each case's
    (refused, the output from its mark on)."""
    tasks = []
    for i, case in enumerate(cases):
        tasks.append({"name": "Case %d" % i, "block": [
            {"name": "Mark", "ansible.builtin.debug": {"msg": "@@ case %d @@" % i}},
            step(case),
            {"name": "Passed", "ansible.builtin.debug": {"msg": "@@ case %d passed @@" % i}},
        ], "rescue": [
            {"name": "Refused", "ansible.builtin.debug": {"msg": "@@ case %d refused @@" % i}},
        ]})
    play = folder / "cases.yml"
    play.write_text(json.dumps([{
        "name": title, "hosts": "localhost", "connection": "local", "gather_facts": False,
        **(play_vars or {}), "tasks": tasks}]))
    done = run(["ansible-playbook", "-i", "localhost,", str(play)], env())
    parts = re.split(r"@@ case (\d+) @@", done.stdout)
    found = {}
    for number, text in zip(parts[1::2], parts[2::2]):
        i = int(number)
        passed, refused = "@@ case %d passed @@" % i in text, "@@ case %d refused @@" % i in text
        assert passed != refused, text
        found[cases[i]] = (refused, text)
    assert len(found) == len(cases), done.stdout[-3000:]
    return found


@pytest.fixture(scope="module")
def unit_checks(tmp_path_factory):
    """Every case of the two tests below through the roles' tasks/unit_checks.yml in one
    ansible-playbook run: its value given to the included tasks. Each case's (refused,
    output)."""
    cases = sorted(set(c[:3] for c in UNIT_VALUES + SYSTEM_DIRS), key=repr)
    return cases_in_one_run(
        tmp_path_factory.mktemp("unit-checks"),
        "The roles' checks of the values their units are written with", cases,
        lambda case: {"name": "Check", "ansible.builtin.include_tasks": {
            "file": "%s/roles/%s/tasks/unit_checks.yml" % (ROOT, case[0])},
            "vars": {case[1]: case[2]} if case[1] else {}},
        {"vars_files": ["%s/roles/%s/defaults/main.yml" % (ROOT, r) for r in ("agent", "server")]})


@pytest.mark.parametrize(("role", "variable", "value"), UNIT_VALUES)
def test_unit_values_are_checked_naming_the_variable(unit_checks, role, variable, value):
    """User=, ExecStart= and ReadWritePaths= take these variables as they are: a newline
    in the state directory added a root ExecStartPre. The role's preflight refuses them,
    naming the variable; its defaults pass."""
    refused, text = unit_checks[(role, variable, value)]
    assert refused is (variable is not None), text
    if refused:
        assert "%s: %s is not " % (variable, json.dumps(value)) in text, text


@pytest.mark.parametrize(("role", "variable", "value", "refused"), SYSTEM_DIRS)
def test_a_directory_of_the_system_is_refused(unit_checks, role, variable, value, refused):
    """The role chowns these directories and the uninstall removes them whole: /var/lib
    given by mistake was chowned to the service's user, then deleted with what it holds.
    The preflight refuses a system directory (or one named through ..), naming the
    variable; a directory of bulkhead's own passes."""
    was_refused, text = unit_checks[(role, variable, value)]
    assert was_refused is refused, text
    if refused:
        assert "%s: %s is a directory of the system" % (variable, json.dumps(value)) in \
            text, text


KEY_OWNER_CASES = [(role, user) for role in ("agent", "server") for user in ("bulkhead", "root")]


@pytest.fixture(scope="module")
def key_owner_checks(tmp_path_factory):
    """Each role's preflight with a 0600 key of root's, its service user bulkhead and then
    root, in one ansible-playbook run. The pki directory of each role, and each case's
    (refused, output)."""
    base = tmp_path_factory.mktemp("key-owner")
    dirs = {}
    for role in ("agent", "server"):
        pki = dirs[role] = base / role
        pki.mkdir()
        for name in ("ca.crt", "%s.crt" % role, "%s.key" % role):
            (pki / name).write_text("x\n")
        (pki / ("%s.key" % role)).chmod(0o600)
    found = cases_in_one_run(
        base, "The roles' preflight, the key's owner and the service's user", KEY_OWNER_CASES,
        lambda case: {"name": "Preflight", "ansible.builtin.include_role": {
            "name": "bulkhead.microseg.%s" % case[0], "tasks_from": "preflight"},
            "vars": {"bulkhead_%s_allow_offline" % case[0]: True,
                     "bulkhead_%s_pki_dir" % case[0]: str(dirs[case[0]]),
                     "bulkhead_%s_user" % case[0]: case[1],
                     "bulkhead_agent_server_host": "127.0.0.1"}})
    return dirs, found


@pytest.mark.skipif(os.geteuid() != 0, reason="the key belongs to root")
@pytest.mark.parametrize("role", ["agent", "server"])
def test_a_service_user_that_cannot_read_its_key_is_refused(key_owner_checks, role):
    """The key is 0600, its owner the pki role's bulkhead_pki_owner: a service user
    changed alone crash-looped on "Permission denied" while the run passed. The
    preflight now fails naming both users; the key's owner passes."""
    dirs, found = key_owner_checks
    said = "%s/%s.key belongs to root and is 0600, but bulkhead-%s runs as bulkhead" % (
        dirs[role], role, role)
    for user, refused in (("bulkhead", True), ("root", False)):
        was_refused, text = found[(role, user)]
        assert was_refused is refused, text
        if refused:
            assert said in text, text[-3000:]
        else:
            assert "Fail when the service's user cannot read its key" in text
            assert said not in text and "belongs to" not in text, text[-3000:]


# ------------------------------------------------ the wait after a restart, twice in a run
TWICE = """\
- name: The agent role's wait, in a second run of the role on a host
  hosts: web-1
  connection: local
  gather_facts: false
  environment:
    PATH: "{stub}:{{{{ lookup('ansible.builtin.env', 'PATH') }}}}"
  vars:
    bulkhead_agent_node_name: web-1
    bulkhead_agent_server_host: 127.0.0.1
    bulkhead_agent_pki_dir: {pki}
    bulkhead_agent_user: root
    bulkhead_agent_api_url: {url}
    bulkhead_agent_api_ca_path: {pki}/ca.crt
    bulkhead_agent_api_client_cert: {pki}/admin.crt
    bulkhead_agent_api_client_key: {pki}/admin.key
    bulkhead_agent_wait_timeout: 2
  tasks:
    - name: The handler's restart in the role's first run
      ansible.builtin.command: "true"
      changed_when: true
      register: _bulkhead_agent_restarted

    - name: The role's second run, its preflight, nothing to restart
      ansible.builtin.include_role:
        name: bulkhead.microseg.agent
        tasks_from: preflight

    - name: Its wait
      ansible.builtin.include_role:
        name: bulkhead.microseg.agent
        tasks_from: wait

    - name: "@@ the wait passed @@"
      ansible.builtin.debug:

    - name: A restart in this run does wait for the agent it started
      block:
        - name: The handler's restart in this run
          ansible.builtin.command: "true"
          changed_when: true
          register: _bulkhead_agent_restarted

        - name: Its wait
          ansible.builtin.include_role:
            name: bulkhead.microseg.agent
            tasks_from: wait

        - name: Not here
          ansible.builtin.fail:
            msg: the wait passed on the report of the agent before the restart
      rescue:
        - name: "@@ the wait failed: {{{{ ansible_failed_result.msg }}}} @@"
          ansible.builtin.debug:
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the key belongs to root")
def test_a_restart_in_an_earlier_run_of_the_role_is_not_waited_for(tmp_path):
    """The wait asks a report of an agent started after the preflight when the handler
    restarted it: a restart an earlier run of the role made on the host (a second
    include_role, another play of the same ansible-playbook run) stayed registered, so the
    second run waited for a restart it never made and failed after its timeout, though the
    agent ran and reported the revision. systemctl is a stand-in saying the agent runs."""
    d = tmp_path / "pki"
    d.mkdir()
    pki.init_ca(d)
    pki.issue(d, "server", server=True, hosts=("127.0.0.1",))
    pki.issue(d, "admin", role="admin")
    pki.issue(d, "web-1", role="agent")
    shutil.copy(d / "web-1.crt", d / "agent.crt")
    shutil.copy(d / "web-1.key", d / "agent.key")
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "systemctl").write_text(
        "#!/bin/sh\ncase \"$1\" in is-system-running) echo running;; is-active) echo active;; "
        "esac\n")
    (stub / "systemctl").chmod(0o755)
    srv = start_server(d, who="admin")
    try:
        revision = srv.request("GET", "/v1/nodes")["revision"]
        srv.request("POST", "/v1/status/web-1", {"appliedRevision": revision, "counters": {
            "startedAt": round(time.time() - 600, 3)}}, who="web-1")   # running for a while
        play = tmp_path / "play.yml"
        play.write_text(TWICE.format(stub=stub, pki=d, url=srv.url))
        done = run(["ansible-playbook", "-i", "web-1,", str(play)], env(), check=False)
    finally:
        stop_server(srv)
    assert "@@ the wait passed @@" in done.stdout, done.stdout[-4000:]
    assert re.search(r"@@ the wait failed: .*web-1 \(at \d+, no report yet from an agent "
                     r"started after the restart\)", done.stdout), done.stdout[-4000:]
    assert done.returncode == 0, done.stdout[-4000:]


# ------------------------------------------------------ the venv install, for real
INSTALL_TASK = re.compile(r"TASK \[bulkhead\.microseg\.common : Install bulkhead-microseg into the "
                          r"venv[^\]]*\] \**\n(\w+)")


def fake_wheel(directory, version):
    """A bulkhead_microseg wheel of `version` holding one empty module: what pip needs of it."""
    name = "bulkhead_microseg-%s" % version
    path = directory / ("%s-py3-none-any.whl" % name)
    files = {"bulkhead_fake/__init__.py": "",
             "%s.dist-info/METADATA" % name:
                 "Metadata-Version: 2.1\nName: bulkhead-microseg\nVersion: %s\n" % version,
             "%s.dist-info/WHEEL" % name:
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["%s.dist-info/RECORD" % name] = "".join("%s,,\n" % f for f in files) + \
        "%s.dist-info/RECORD,,\n" % name
    with zipfile.ZipFile(path, "w") as whl:
        for arcname, text in files.items():
            whl.writestr(arcname, text)
    return path


SHARED = """\
- name: The server's install
  hosts: localhost
  connection: local
  gather_facts: false
  handlers:
    - name: Restart the server
      ansible.builtin.debug:
        msg: restart bulkhead-server
      listen: bulkhead installed
  tasks:
    - name: The common role's install tasks
      ansible.builtin.include_role:
        name: bulkhead.microseg.common
        tasks_from: install
      vars: {{bulkhead_common_role: bulkhead_server, bulkhead_common_install_from: wheel,
             bulkhead_common_wheelhouse: "{{{{ server_wheelhouse }}}}", bulkhead_common_venv: {venv},
             bulkhead_common_python: /usr/bin/python3, bulkhead_common_user: root}}

- name: The agent's install, into the same venv
  hosts: localhost
  connection: local
  gather_facts: false
  handlers:
    - name: Restart the agent
      ansible.builtin.debug:
        msg: restart bulkhead-agent
      listen: bulkhead installed
  tasks:
    - name: The common role's install tasks
      ansible.builtin.include_role:
        name: bulkhead.microseg.common
        tasks_from: install
      vars: {{bulkhead_common_role: bulkhead_agent, bulkhead_common_install_from: wheel,
             bulkhead_common_wheelhouse: "{{{{ agent_wheelhouse }}}}", bulkhead_common_venv: {venv},
             bulkhead_common_python: /usr/bin/python3, bulkhead_common_user: root}}
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                    reason="the wheelhouse belongs to root; needs /usr/bin/python3 with venv")
def test_a_shared_venv_restarts_both_services_and_holds_one_version(tmp_path):
    """On a host running both, the server's play and the agent's (site.yml) install into
    one venv: when the first play changes it, the agent, started from the venv before, is
    restarted too though its own pip finds nothing to do; two versions for the one venv are
    refused, not installed in turn on every run. --check on the venv holding the wheel's
    version reports no install (and so no restart), as the run does; with a new version it
    says the run would install it (given extra_args, the pip module's check mode says
    changed without looking) and installs nothing."""
    old, new, venv, dest = (tmp_path / "old", tmp_path / "new", tmp_path / "venv",
                            tmp_path / "dest")
    old.mkdir()
    new.mkdir()
    fake_wheel(old, "0.1.0")
    fake_wheel(new, "0.1.1")
    (tmp_path / "play.yml").write_text(SHARED.format(venv=venv))

    def play(server, agent, *args, check=True):
        return run(["ansible-playbook", str(tmp_path / "play.yml"),
                    "-e", "_bulkhead_common_wheelhouse_dest=%s" % dest,
                    "-e", "server_wheelhouse=%s" % server, "-e", "agent_wheelhouse=%s" % agent,
                    *args], env(), check=check).stdout

    def restarted(out):
        return [s for s in ("server", "agent") if "restart bulkhead-%s" % s in out]

    def installs(out):   # the install task's state in each play
        return INSTALL_TASK.findall(out)

    first = play(old, old)
    assert restarted(first) == ["server", "agent"] and installs(first) == ["changed", "ok"]
    again = play(old, old)
    assert restarted(again) == [] and installs(again) == ["ok", "ok"], again
    checked = play(old, old, "--check")
    assert restarted(checked) == [] and installs(checked) == ["ok", "ok"], checked
    checked = play(new, new, "--check")   # a new version: it would install it
    assert restarted(checked) == ["server", "agent"], checked
    assert installs(checked)[0] == "changed", checked
    assert list((venv / "lib").glob("python3*/site-packages/bulkhead_microseg-0.1.0.dist-info"))
    upgrade = play(new, new)
    assert restarted(upgrade) == ["server", "agent"], upgrade
    assert "was changed earlier in this run (bulkhead_server)" in upgrade
    assert restarted(play(new, new)) == []
    mixed = play(old, new, check=False)
    assert "failed=1" in mixed, mixed
    assert "bulkhead_agent would install bulkhead-microseg 0.1.1 into %s, where " \
           "bulkhead_server installs 0.1.0 in this run" % venv in mixed, mixed


CONFIGURE = """\
- name: The agent role's configuration
  hosts: web-1
  connection: local
  gather_facts: false
  vars:
    bulkhead_common_systemd_booted: false   # its handler: nothing to restart here
  tasks:
    - name: The agent role's configure tasks
      ansible.builtin.include_role:
        name: bulkhead.microseg.agent
        tasks_from: configure
      vars:
        bulkhead_common_user_pending: false
        bulkhead_agent_user: root
        bulkhead_agent_venv: {venv}
        bulkhead_agent_config_dir: {tmp}/etc
        bulkhead_agent_state_dir: {tmp}/state
        # the unit beside them, not in this machine's /etc/systemd/system
        _bulkhead_agent_unit: ../../..{tmp}/bulkhead-agent.service
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the role chowns what it writes")
def test_an_agent_config_the_agent_refuses_is_not_written(tmp_path):
    """agent.yaml is read by the installed agent's loader before it replaces the old one: a
    value the agent refuses fails the task naming it, and the file in place (with which the
    running agent was started) stays, so no restart takes every agent into a crash loop."""
    (tmp_path / "hosts.yml").write_text(INVENTORY)
    (tmp_path / "play.yml").write_text(CONFIGURE.format(venv=BIN.parent, tmp=tmp_path))
    cmd = ["ansible-playbook", "-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml")]
    run(cmd, env())
    written = (tmp_path / "etc" / "agent.yaml").read_text()
    assert load_config(tmp_path / "etc" / "agent.yaml").node == "web-1"
    out = run(cmd + ["-e", '{"bulkhead_agent_config": {"driftInterval": "abc"}}'], env(),
              check=False)
    assert out.returncode == 2, out.stdout
    assert "failed to validate" in out.stdout and "driftInterval" in out.stdout, out.stdout
    assert (tmp_path / "etc" / "agent.yaml").read_text() == written
    run(cmd + ["-e", '{"bulkhead_agent_config": {"driftInterval": 45}}'], env())
    assert load_config(tmp_path / "etc" / "agent.yaml").drift_interval == 45


STAGED_AND_ENFORCED = [
    {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
     "metadata": {"name": "default.trial"},
     "spec": {"selector": "app == 'web'", "types": ["Ingress"],
              "ingress": [{"action": "Allow", "protocol": "TCP",
                           "destination": {"ports": [8080]}}]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
     "metadata": {"name": "default.manual"},
     "spec": {"selector": "app == 'db'", "types": ["Ingress"],
              "ingress": [{"action": "Allow", "protocol": "TCP",
                           "destination": {"ports": [5432]}}]}},
]


def test_rollback_finds_the_promotion_not_a_delete_or_a_sync_that_looks_like_one(
        own_server, tmp_path):
    """rollback.yml's "last promotion" is an entry that deleted a staged policy and wrote
    the GlobalNetworkPolicy of its name: not a `bulkhead delete -f` of a staged and an
    enforced policy in one transaction, nor a tier's sync deleting a staged policy and
    writing another policy, both of which came after it."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    staged = dict(STAGED_AND_ENFORCED[0], metadata={"name": "default.web"})
    server.request("POST", "/v1/apply", [staged])
    before = server.request("POST", "/v1/promote", {"names": ["default.web"]})["revision"] - 1
    assert names(server, "GlobalNetworkPolicy") == ["default.web"]
    # Later: a staged and an enforced policy applied, then deleted in one transaction;
    # then a staged policy applied and a sync of tier default that drops it.
    server.request("POST", "/v1/apply", STAGED_AND_ENFORCED)
    server.request("POST", "/v1/delete", STAGED_AND_ENFORCED)
    server.request("POST", "/v1/apply", STAGED_AND_ENFORCED[:1])
    web = server.request("GET", "/v1/resources/GlobalNetworkPolicy/default.web")
    server.request("POST", "/v1/sync?tier=default", [
        {k: web[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": "default.web"}},
        STAGED_AND_ENFORCED[1]])
    kinds = [c["kind"] for c in server.request("GET", "/v1/history?limit=1")["entries"][0]["changes"]]
    assert sorted(kinds) == ["GlobalNetworkPolicy", "StagedGlobalNetworkPolicy"], kinds
    checked = " ".join(playbook(server, tmp_path, "rollback.yml", "--check").stdout.split())
    assert "TASK [Roll back to revision %d]" % before in checked, checked
    playbook(server, tmp_path, "rollback.yml")
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.web"]
    assert names(server, "GlobalNetworkPolicy") == []


def test_rollback_finds_a_promotion_by_its_operation_a_deletion_alone_too(own_server, tmp_path):
    """An audit entry says which request wrote it: rollback.yml finds a promotion of a
    stagedAction Delete policy alone (which writes no policy), and prints the promotion it
    undoes. Entries an older server wrote, without an operation, are read as before."""
    import sqlite3
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    server.request("POST", "/v1/apply", [dict(STAGED_AND_ENFORCED[0],
                                              metadata={"name": "default.web"})])
    first = server.request("POST", "/v1/promote", {"names": ["default.web"]})["revision"]
    server.request("POST", "/v1/apply", [
        STAGED_AND_ENFORCED[1],
        {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
         "metadata": {"name": "default.manual"}, "spec": {"stagedAction": "Delete"}}])
    second = server.request("POST", "/v1/promote", {"names": ["default.manual"]})["revision"]
    assert names(server, "GlobalNetworkPolicy") == ["default.web"]
    checked = " ".join(playbook(server, tmp_path, "rollback.yml", "--check").stdout.split())
    assert "The last promotion: revision %d," % second in checked, checked
    assert "by admin (default.manual); back to revision %d." % (second - 1) in checked
    assert "TASK [Roll back to revision %d]" % (second - 1) in checked, checked
    # The same entries as an older server wrote them: the deletion alone is not found.
    db = sqlite3.connect(str(server.pki / "store.db"))
    try:
        with db:
            db.execute("UPDATE audit SET doc = json_remove(doc, '$.operation') "
                       "WHERE revision IN (?, ?)", (first, second))
    finally:
        db.close()
    checked = " ".join(playbook(server, tmp_path, "rollback.yml", "--check").stdout.split())
    assert "TASK [Roll back to revision %d]" % (first - 1) in checked, checked


def test_onboarding_a_group_leaves_the_endpoints_of_the_other_hosts(own_server, tmp_path):
    """onboard.yml with bulkhead_onboard_group deletes only the endpoints of hosts gone
    from the inventory: a host still there, outside the group, keeps its endpoint (and
    its mode) as it is, in --check as for real."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    playbook(server, tmp_path, "onboard.yml")
    web = ("-e", "bulkhead_onboard_group=bulkhead_servers", "-e", "bulkhead_enforcement=enforce")
    checked = " ".join(playbook(server, tmp_path, "onboard.yml", "--check", *web).stdout.split())
    assert "deleted 0 host endpoints" in checked, checked
    text = " ".join(playbook(server, tmp_path, "onboard.yml", *web).stdout.split())
    assert modes(server) == {"node-1": "enforce", "node-2": "observe"}
    assert "left as they are, their hosts being outside group bulkhead_servers: node-2" in text, text
    # A host that left the inventory still loses its endpoint.
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port).split("        node-2:")[0])
    playbook(server, tmp_path, "onboard.yml", *web)
    assert modes(server) == {"node-1": "enforce"}


def test_a_wait_that_times_out_after_the_write_says_it_was_written(own_server, tmp_path):
    """onboard.yml's sync writes, then its wait times out (an agent stuck at an older
    revision): the task fails as changed, with what it wrote and the revision, and says
    the change stays and how to find the agent that lags."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    pki.issue(server.pki, "node-1", role="agent")
    server.request("POST", "/v1/status/node-1", {"appliedRevision": 0}, who="node-1")
    out = playbook(server, tmp_path, "onboard.yml", "-e", "bulkhead_wait_timeout=1",
                   check=False)
    assert out.returncode == 2, out.stdout
    text = " ".join(out.stdout.split())
    assert '"changed": true, "created": ["node-1", "node-2"]' in text, text
    assert "written at revision 1, which stays" in text, text
    assert "not converged: node-1 (at 0)" in text and "bulkhead nodes --revision 1" in text
    assert modes(server) == {"node-1": "observe", "node-2": "observe"}


def test_enforce_names_the_revision_to_go_back_to_before_a_step_fails(own_server, tmp_path):
    """enforce.yml prints the revision before the promotion before promoting: when the
    promotion's wait times out (an agent stuck), the run stops having promoted, and the
    revision to return to is in its output."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    before = server.request("POST", "/v1/apply", [
        dict(STAGED_AND_ENFORCED[0], metadata={"name": "default.web"})])["revision"]
    pki.issue(server.pki, "node-1", role="agent")
    server.request("POST", "/v1/status/node-1", {"appliedRevision": before}, who="node-1")
    out = playbook(server, tmp_path, "enforce.yml", "-e", "bulkhead_wait_timeout=1",
                   check=False)
    assert out.returncode == 2, out.stdout
    assert names(server, "GlobalNetworkPolicy") == ["default.web"]
    text = " ".join(out.stdout.split())
    assert "Revision %d is the store before this promotion" % before in text, text


def test_preview_takes_its_gates_from_the_inventory_too(own_server, tmp_path):
    """preview.yml's settings in the inventory's group_vars/all reach the preview (play
    variables of the same name hid them: a protected selector kept there was dropped and
    the gate passed): a selector the server refuses fails the play, naming it."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    report = tmp_path / "preview.json"
    (tmp_path / "group_vars" / "all.yml").write_text(
        "bulkhead_preview_max_denied: 7\nbulkhead_preview_report: %s\n" % report)
    out = playbook(server, tmp_path, "preview.yml")
    assert "connections newly denied 7]" in out.stdout and report.exists(), out.stdout
    (tmp_path / "group_vars" / "all.yml").write_text("bulkhead_preview_protected: 'app =='\n")
    out = playbook(server, tmp_path, "preview.yml", check=False)
    assert out.returncode == 2 and "protected" in out.stdout, out.stdout


def _staged_web(name, port):
    return {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"selector": "app == 'web'", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "destination": {"ports": [port]}}]}}


def _previewed_a_and_b(server, tmp_path):
    """The fleet, default.a and default.b staged, preview.yml's report of them kept: the
    report's path and enforce.yml's arguments that promote from it."""
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    server.request("POST", "/v1/apply", [_staged_web("default.a", 80),
                                         _staged_web("default.b", 443)])
    report = tmp_path / "preview.json"
    playbook(server, tmp_path, "preview.yml", "-e", "bulkhead_preview_report=%s" % report)
    return report, ("-e", "bulkhead_enforce_preview_report=%s" % report)


def test_enforce_promotes_what_the_preview_judged_and_nothing_else(own_server, tmp_path):
    """With the report preview.yml kept, enforce.yml promotes the staged policies the
    preview judged, as it judged them: one staged again after the preview fails the play
    and nothing is promoted; one staged after the preview stays staged."""
    server = own_server
    report, pinned = _previewed_a_and_b(server, tmp_path)
    assert sorted(json.loads(report.read_text())["promotedVersions"]) == [
        "default.a", "default.b"]
    changed = server.request("POST", "/v1/apply", [_staged_web("default.b", 8443)])["revision"]
    for check in (("--check",), ()):
        out = playbook(server, tmp_path, "enforce.yml", *pinned, *check, check=False)
        assert out.returncode == 2, out.stdout
        text = " ".join(out.stdout.split())
        assert "StagedGlobalNetworkPolicy default.b: resourceVersion is %d" % changed in text
        assert "nothing was promoted" in text, text
        assert names(server, "GlobalNetworkPolicy") == []
    # Previewed again; a policy staged after that preview is left staged, and said so.
    playbook(server, tmp_path, "preview.yml", "-e", "bulkhead_preview_report=%s" % report)
    server.request("POST", "/v1/apply", [_staged_web("default.c", 22)])
    out = playbook(server, tmp_path, "enforce.yml", *pinned)
    assert "left staged: default.c" in " ".join(out.stdout.split()), out.stdout
    assert names(server, "GlobalNetworkPolicy") == ["default.a", "default.b"]
    assert server.request("GET", "/v1/resources/GlobalNetworkPolicy/default.b")[
        "spec"]["ingress"][0]["destination"]["ports"] == [8443]
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.c"]
    # Run again on the same report: nothing left to promote, and said why.
    out = playbook(server, tmp_path, "enforce.yml", *pinned)
    text = " ".join(out.stdout.split())
    assert "Not staged any more (promoted by an earlier run, or deleted), left out: " \
        "default.a, default.b" in text, text
    assert "changed=0" in out.stdout and names(server, "StagedGlobalNetworkPolicy") == [
        "default.c"]
    # A file that is not such a preview, or one beside bulkhead_enforce_policies: refused.
    (tmp_path / "other.json").write_text('{"promoted": ["default.c"]}')
    for args in (("-e", "bulkhead_enforce_preview_report=%s" % (tmp_path / "other.json")),
                 (*pinned, "-e", '{"bulkhead_enforce_policies": ["default.c"]}')):
        out = playbook(server, tmp_path, "enforce.yml", *args, check=False)
        assert out.returncode == 2 and "not a preview this playbook can promote" in \
            " ".join(out.stdout.split()), out.stdout
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.c"]


def test_stage_and_rollback_take_their_settings_from_the_inventory_too(own_server, tmp_path):
    """stage.yml's folder and wait timeout, and rollback.yml's revision and wait timeout,
    kept in group_vars/all reach the plays (play variables of the same name hid them):
    an agent that never catches up fails each within the inventory's 1 s."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    (tmp_path / "group_vars").mkdir()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(json.dumps(dict(_staged_web("default.web", 80),
                                                     kind="GlobalNetworkPolicy")))
    pki.issue(server.pki, "node-1", role="agent")
    server.request("POST", "/v1/status/node-1", {"appliedRevision": 0}, who="node-1")
    (tmp_path / "group_vars" / "all.yml").write_text(
        "bulkhead_policy_dir: %s\nbulkhead_wait_timeout: 1\n" % policies)
    out = playbook(server, tmp_path, "stage.yml", check=False)
    assert out.returncode == 2 and "not converged: node-1 (at 0)" in out.stdout, out.stdout
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.web"]
    server.request("POST", "/v1/apply", [_staged_web("default.x", 22)])
    (tmp_path / "group_vars" / "all.yml").write_text(
        "bulkhead_rollback_revision: 1\nbulkhead_wait_timeout: 1\n")
    out = playbook(server, tmp_path, "rollback.yml", check=False)
    assert out.returncode == 2 and "not converged: node-1" in out.stdout, out.stdout
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.web"]


def test_enforce_refuses_a_preview_part_of_which_is_not_staged_any_more(own_server, tmp_path):
    """The preview judged a and b together: b deleted after it, promoting a alone would
    enforce what no preview judged, so the play fails and nothing is promoted; once every
    one is gone (the preview promoted by an earlier run) it is a no-op."""
    server = own_server
    report, pinned = _previewed_a_and_b(server, tmp_path)
    server.request("DELETE", "/v1/resources/StagedGlobalNetworkPolicy/default.b")
    for check in (("--check",), ()):
        out = playbook(server, tmp_path, "enforce.yml", *pinned, *check, check=False)
        text = " ".join(out.stdout.split())
        assert out.returncode == 2, text
        assert "default.b, judged by the preview, is not staged any more" in text, text
        assert names(server, "GlobalNetworkPolicy") == []
        assert names(server, "StagedGlobalNetworkPolicy") == ["default.a"]
    server.request("DELETE", "/v1/resources/StagedGlobalNetworkPolicy/default.a")
    out = playbook(server, tmp_path, "enforce.yml", *pinned)
    assert "changed=0" in out.stdout and names(server, "GlobalNetworkPolicy") == []


def test_enforce_names_a_preview_report_it_cannot_read(own_server, tmp_path):
    """A report that is not JSON, or not there: the play fails naming the setting and the
    file, before anything is read from the server or promoted."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    server.request("POST", "/v1/apply", [_staged_web("default.a", 80)])
    (tmp_path / "report.yaml").write_text("promoted: [default.a]\n")
    for report in (tmp_path / "report.yaml", tmp_path / "absent.json"):
        out = playbook(server, tmp_path, "enforce.yml", "-e",
                       "bulkhead_enforce_preview_report=%s" % report, check=False)
        text = " ".join(out.stdout.split())
        assert out.returncode == 2, text
        assert "bulkhead_enforce_preview_report=%s: cannot read a preview's JSON" % report \
            in text, text
        assert "Read the store's revision" not in text, text
    assert names(server, "StagedGlobalNetworkPolicy") == ["default.a"]


def test_the_preview_report_is_found_where_it_was_written_and_its_gates_count(
        own_server, tmp_path):
    """A relative report path is the working directory's, for preview.yml writing it and
    enforce.yml reading it; a report whose gates failed is not promoted."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    (tmp_path / "fleet.yml").write_text(FLEET.format(port=port))
    server.request("POST", "/v1/apply", [_staged_web("default.a", 80)])
    work = tmp_path / "work"
    work.mkdir()

    def play(name, *args):
        # As a shell starts it in `work`: its working directory, and PWD saying so.
        return run(["ansible-playbook", "-i", str(tmp_path / "fleet.yml"),
                    str(ROOT / "playbooks" / name), *args], dict(server.env(), PWD=str(work)),
                   cwd=str(work), check=False)

    # A preview that fails (a selector the server refuses) keeps a report saying so.
    out = play("preview.yml", "-e", "bulkhead_preview_report=preview.json",
               "-e", "bulkhead_preview_protected='app =='")
    assert out.returncode == 2 and (work / "preview.json").exists(), out.stdout
    assert json.loads((work / "preview.json").read_text())["gates"]["passed"] is False
    out = play("preview.yml", "-e", "bulkhead_preview_report=preview.json")
    assert out.returncode == 0, out.stdout
    report = json.loads((work / "preview.json").read_text())
    assert report["gates"] == {"passed": True, "failed": []}
    assert report["promoted"] == ["default.a"]
    # The same preview, its gates failed: enforce.yml refuses it.
    failed = dict(report, gates={"passed": False, "failed": ["max_denied: 3 connections "
                                                             "would be newly denied (at most 0)"]})
    (work / "failed.json").write_text(json.dumps(failed))
    out = play("enforce.yml", "-e", "bulkhead_enforce_preview_report=failed.json")
    text = " ".join(out.stdout.split())
    assert out.returncode == 2 and "failed.json: that preview failed its gates (max_denied: 3 " \
        "connections would be newly denied (at most 0)); nothing was promoted" in text, text
    assert names(server, "GlobalNetworkPolicy") == []
    out = play("enforce.yml", "-e", "bulkhead_enforce_preview_report=preview.json")
    assert out.returncode == 0, out.stdout
    assert names(server, "GlobalNetworkPolicy") == ["default.a"]
