"""The connection plugin bulkhead.microseg.lab against two real lab machines (systemd
booted in lab hosts, see docs/lab.md): facts, commands, copy, fetch and become through a
real ansible-playbook run."""

from __future__ import annotations

import os
import secrets

import pytest

from bulkhead.lab import Lab

from conftest import ansible_env, run, write

PLAY = """\
- name: Work inside lab machines
  hosts: machines
  gather_facts: true
  tasks:
    - name: Facts are the machine's
      ansible.builtin.assert:
        that:
          - ansible_facts.hostname == inventory_hostname
          - ansible_facts.default_ipv4 == {} or ansible_facts.default_ipv4.address is undefined
          - ansible_facts.all_ipv4_addresses == [lab_address]
          - ansible_facts.service_mgr == 'systemd'
    - name: A command runs in the machine, as root
      ansible.builtin.command: cat /proc/1/comm
      register: comm
      changed_when: false
    - name: A file copied in
      ansible.builtin.copy:
        content: "written on {{ inventory_hostname }}\\n"
        dest: /etc/bulkhead-lab-test
        mode: "0640"
    - name: And fetched back
      ansible.builtin.fetch:
        src: /etc/bulkhead-lab-test
        dest: "{{ fetched }}/"
    - name: Become to root needs no sudo
      ansible.builtin.command: id -un
      become: true
      register: as_root
      changed_when: false
    - name: Become to another user with su
      ansible.builtin.command: id -un
      become: true
      become_user: nobody
      become_method: ansible.builtin.su
      become_flags: -s /bin/sh
      register: as_nobody
      changed_when: false
    - name: Systemd in the machine is running
      ansible.builtin.command: systemctl is-system-running
      register: running
      changed_when: false
    - name: What they said
      ansible.builtin.assert:
        that:
          - comm.stdout == 'systemd'
          - as_root.stdout == 'root'
          - as_nobody.stdout == 'nobody'
          - running.stdout == 'running'
"""


@pytest.fixture(scope="module")
def machines():
    if os.geteuid() != 0:
        pytest.skip("lab machines need root (network namespaces, systemd as PID 1)")
    lab = Lab("t" + secrets.token_hex(4)[:7], ["m1", "m2"], machines=True)
    try:
        yield lab.up()
    finally:
        lab.down()


def test_playbook_through_the_lab_connection(machines, tmp_path):
    lines = ["[machines]"] + ["%s lab_address=%s" % (h, machines.address(h)) for h in ("m1", "m2")]
    lines += ["[machines:vars]", "ansible_connection=bulkhead.microseg.lab",
              "bulkhead_lab_name=%s" % machines.name,
              "ansible_python_interpreter=/usr/bin/python3"]
    inventory = write(tmp_path, "hosts.ini", "\n".join(lines) + "\n")
    playbook = write(tmp_path, "play.yml", PLAY)
    env = {**os.environ, **ansible_env()}
    fetched = tmp_path / "fetched"
    run(["ansible-playbook", "-i", str(inventory), str(playbook), "-e", "fetched=%s" % fetched],
        env)
    for host in ("m1", "m2"):
        assert (fetched / host / "etc" / "bulkhead-lab-test").read_text() == "written on %s\n" % host
        assert machines.run(host, ["stat", "-c", "%a", "/etc/bulkhead-lab-test"]).stdout == "640\n"
    assert not os.path.exists("/etc/bulkhead-lab-test")


def test_a_stopped_machine_is_unreachable(machines, tmp_path):
    inventory = write(tmp_path, "hosts.ini", "m2 ansible_connection=bulkhead.microseg.lab "
                      "bulkhead_lab_name=%s\n" % machines.name)
    env = {**os.environ, **ansible_env()}
    machines.stop_machine("m2")
    done = run(["ansible", "-i", str(inventory), "m2", "-m", "ansible.builtin.ping"], env,
               check=False)
    assert done.returncode != 0
    assert "has no lab machine 'm2'" in done.stdout + done.stderr
