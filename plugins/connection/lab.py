# -*- coding: utf-8 -*-
# Copyright: Bulkhead developers
# Apache License 2.0 (see LICENSE or https://www.apache.org/licenses/LICENSE-2.0)

from __future__ import annotations

DOCUMENTATION = r"""
name: lab
short_description: Run tasks inside a Bulkhead lab machine
version_added: 0.1.0
author: Bulkhead developers (@bulkhead-microseg)
description:
  - Runs Ansible's commands inside a lab machine of a Bulkhead lab on this controller
    (C(bulkhead lab up --machines)), that is a lab host whose network namespace boots
    systemd as PID 1 in PID, mount, UTS, IPC and cgroup namespaces of its own.
  - Every command enters all namespaces of the machine's PID 1 with C(nsenter), in the
    machine's cgroup, with a clean environment (C(PATH), C(HOME=/root), C(LANG=C.UTF-8)),
    as root. Files are copied in and out through the same route (C(cat) inside the
    machine), so paths, symlinks and mounts are the machine's own.
  - The machine is found in the lab's state file, C(/run/bulkhead-lab/LAB/state.json); a
    machine that was stopped or rebooted since is refused, never another process that
    got its PID.
requirements:
  - Root on the controller, and C(nsenter) (util-linux) there.
  - A lab built on this controller with lab machines (see the collection's docs/lab.md).
options:
  lab_name:
    description: The lab's name (C(bulkhead lab up --name)).
    type: str
    default: demo
    vars:
      - name: bulkhead_lab_name
    env:
      - name: BULKHEAD_LAB_NAME
  lab_host:
    description: The lab host (a lab machine) to run in; by default the inventory host's name.
    type: str
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: bulkhead_lab_host
  state_root:
    description: Where labs keep their state.
    type: path
    default: /run/bulkhead-lab
    env:
      - name: BULKHEAD_LAB_STATE_ROOT
notes:
  - Commands run as root already. C(become) to root is therefore ignored (a role written
    with C(become=true) runs unchanged, and the machine needs no C(sudo)). C(become) to
    another user runs the become method's tool inside the machine (C(su) or C(sudo) of the
    machine's root filesystem, that is the controller's own, if installed); password
    prompts are not supported, and root needs none.
  - Pipelining is supported.
  - The remote user is ignored.
"""

EXAMPLES = r"""
# inventory: the lab machines by their lab host names
# [lab]
# h1
# h2
# [lab:vars]
# ansible_connection=bulkhead.microseg.lab
# bulkhead_lab_name=demo

- name: Check a lab machine
  hosts: lab
  gather_facts: false
  tasks:
    - name: Show the machine's addresses
      ansible.builtin.command: ip -br addr
      changed_when: false
"""

import json
import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_native, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()

NAMESPACES = ("--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup")
ENVIRONMENT = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/sh", "LANG=C.UTF-8")
# Moves the shell into the machine's cgroup ($0), then becomes the rest of the line.
JOIN_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


def process_start(pid):
    """The start time of `pid` (clock ticks since boot), None if it is gone or a zombie;
    as bulkhead.lab.processes has it (the collection's plugins never import bulkhead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def find_machine(state_root, lab, host):
    """(pid, cgroup) of lab `lab`'s machine `host`, from the lab's state file."""
    path = os.path.join(state_root, lab, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise AnsibleConnectionFailure(
            "lab %s: cannot read %s (%s); is the lab up (bulkhead lab status)?"
            % (lab, path, to_native(e)))
    machine = (state.get("machines") or {}).get(host)
    if not machine:
        hosts = ", ".join(sorted(state.get("machines") or {})) or "none"
        raise AnsibleConnectionFailure(
            "lab %s has no lab machine %r (its machines: %s)" % (lab, host, hosts))
    pid = int(machine["pid"])
    if process_start(pid) != machine.get("start"):
        raise AnsibleConnectionFailure(
            "lab machine %s of lab %s is not running (its systemd, pid %d, is gone)"
            % (host, lab, pid))
    return pid, machine["cgroup"]


class Connection(ConnectionBase):
    """Commands and files inside a Bulkhead lab machine, through nsenter."""

    transport = "bulkhead.microseg.lab"
    has_pipelining = True

    def __init__(self, *args, **kwargs):
        self._become = None
        super().__init__(*args, **kwargs)
        self._pid = None
        self._cgroup = None

    @property
    def become(self):
        """The become plugin, or None when it would only make root root again: commands
        run as root already, and a lab machine need not have sudo."""
        # The play context has the task's become_user (keyword, variable or command line)
        # before the executor sets the plugin's options, which it does only if this is
        # not None.
        user = getattr(self._play_context, "become_user", None) or "root"
        return None if user == "root" else self._become

    @become.setter
    def become(self, plugin):
        self._become = plugin

    def _connect(self):
        if not self._connected:
            lab, host = self.get_option("lab_name"), self.get_option("lab_host")
            self._pid, self._cgroup = find_machine(self.get_option("state_root"), lab, host)
            self._play_context.remote_user = "root"
            display.vvv("ESTABLISH LAB CONNECTION to %s of lab %s (systemd pid %d)"
                        % (host, lab, self._pid), host=host)
            self._connected = True
        return self

    def _argv(self, command):
        """The command line that runs shell `command` in the machine."""
        return ["/bin/sh", "-c", JOIN_CGROUP, self._cgroup,
                "nsenter", "--target=%d" % self._pid, *NAMESPACES, "--",
                "/usr/bin/env", "-i", *ENVIRONMENT, "/bin/sh", "-c", command]

    def _run(self, command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, in_data=None):
        self._connect()
        display.vvv("EXEC %s" % to_text(command), host=self.get_option("lab_host"))
        try:
            proc = subprocess.Popen(self._argv(command), stdin=stdin, stdout=stdout,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            raise AnsibleConnectionFailure("cannot run nsenter: %s" % to_native(e))
        out, err = proc.communicate(in_data)
        return proc.returncode, out or b"", err or b""

    def exec_command(self, cmd, in_data=None, sudoable=True):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        if sudoable and self.become and self.become.expect_prompt():
            raise AnsibleError("the lab connection runs as root already and cannot answer a "
                               "become password prompt; drop become_pass (or become)")
        stdin = subprocess.PIPE if in_data is not None else subprocess.DEVNULL
        return self._run(to_text(cmd), stdin=stdin, in_data=to_bytes(in_data)
                         if in_data is not None else None)

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        display.vvv("PUT %s TO %s" % (in_path, out_path), host=self.get_option("lab_host"))
        self._copy(in_path, "cat > %s" % shlex.quote(out_path),
                   "put %s into the lab machine at %s" % (in_path, out_path), fetch=False)

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        display.vvv("FETCH %s TO %s" % (in_path, out_path), host=self.get_option("lab_host"))
        self._copy(out_path, "cat -- %s" % shlex.quote(in_path),
                   "fetch %s from the lab machine" % in_path, fetch=True)

    def _copy(self, local, command, what, fetch):
        """Stream local file `local` into `command` run in the machine, or (`fetch`) the
        command's output into `local`."""
        try:
            with open(to_bytes(local, errors="surrogate_or_strict"), "wb" if fetch else "rb") as f:
                rc, _out, err = (self._run(command, stdout=f) if fetch
                                 else self._run(command, stdin=f))
        except OSError as e:
            raise AnsibleError("failed to %s: %s" % (what, to_native(e)))
        if rc != 0:
            raise AnsibleError("failed to %s: %s" % (what, to_native(err).strip()))

    def close(self):
        self._connected = False
