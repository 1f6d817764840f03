"""The lab connection plugin without a lab: finding the machine in a state file, the
command line it runs, and become to root being a no-op."""

from __future__ import annotations

import json
import os
import sys

import pytest
from ansible.errors import AnsibleConnectionFailure
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import become_loader, connection_loader, init_plugin_loader

# The plugin as Ansible loads it (from the collection on ANSIBLE_COLLECTIONS_PATH, see
# run-collection-tests.sh): the loader refuses a plugin module imported before it did.
init_plugin_loader()
lab = sys.modules[type(connection_loader.get("bulkhead.microseg.lab", PlayContext(), None)).__module__]

ME = os.getpid()


def state(tmp_path, machines):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "state.json").write_text(json.dumps({"machines": machines}))
    return str(tmp_path)


def entry(pid=ME, start="now"):
    return {"pid": pid, "start": lab.process_start(ME) if start == "now" else start,
            "cgroup": "/sys/fs/cgroup/bhl-demo-h1"}


def test_finds_a_running_machine(tmp_path):
    root = state(tmp_path, {"h1": entry()})
    assert lab.find_machine(root, "demo", "h1") == (ME, "/sys/fs/cgroup/bhl-demo-h1")


@pytest.mark.parametrize("machines, lab_name, host, says", [
    ({"h1": entry()}, "other", "h1", "cannot read"),
    ({"h1": entry()}, "demo", "h2", "has no lab machine 'h2' (its machines: h1)"),
    ({}, "demo", "h1", "(its machines: none)"),
    ({"h1": entry(start=1)}, "demo", "h1", "is not running"),   # a reused pid
])
def test_refuses_what_is_not_a_running_machine(tmp_path, machines, lab_name, host, says):
    root = state(tmp_path, machines)
    with pytest.raises(AnsibleConnectionFailure, match=says.replace("(", r"\(").replace(")", r"\)")):
        lab.find_machine(root, lab_name, host)


def connection(tmp_path, **play):
    context = PlayContext()
    for key, value in play.items():
        setattr(context, key, value)
    conn = connection_loader.get("bulkhead.microseg.lab", context, None)
    conn.set_options(var_options={"inventory_hostname": "h1", "bulkhead_lab_name": "demo"},
                     direct={"state_root": state(tmp_path, {"h1": entry()})})
    return conn


def test_commands_enter_the_machine_in_its_cgroup(tmp_path):
    conn = connection(tmp_path)
    conn._connect()
    argv = conn._argv("echo hi")
    assert argv[:4] == ["/bin/sh", "-c", lab.JOIN_CGROUP, "/sys/fs/cgroup/bhl-demo-h1"]
    assert argv[4:13] == ["nsenter", "--target=%d" % ME, "--mount", "--uts", "--ipc", "--net",
                          "--pid", "--cgroup", "--"]
    assert argv[13:15] == ["/usr/bin/env", "-i"] and argv[-3:] == ["/bin/sh", "-c", "echo hi"]


@pytest.mark.parametrize("user, kept", [(None, False), ("root", False), ("postgres", True)])
def test_become_to_root_is_a_no_op(tmp_path, user, kept):
    conn = connection(tmp_path, become_user=user)
    plugin = become_loader.get("sudo")
    conn.set_become_plugin(plugin)
    assert (conn.become is plugin) is kept
