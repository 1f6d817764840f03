"""Ansible for the demo, through its public interfaces only: `ansible-playbook` and
`ansible-inventory`, configured with documented ``ANSIBLE_*`` settings. Nothing here
imports Ansible.

Everything Ansible writes (fact cache, temp files) goes under one home directory; the
collection is found there too, as a link to the repository (`--root`). The recorded
facts reach the fact cache the way gathered ones would: a play (`demo-facts.yml`) sets
them with `cacheable: true`, and Ansible's jsonfile cache plugin stores them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bulkhead.demo import DemoError
from bulkhead.testbed import BIN

EXAMPLES = "inventory-examples"
PLAYBOOK = "playbooks/demo.yml"
FACTS_PLAYBOOK = "playbooks/demo-facts.yml"
HOSTS_INVENTORY = "inventory/hosts.yml"  # the example inventory without its plugin
COLLECTION = ("bulkhead", "microseg")
FORKS = 16       # every host's facts at once
TIMEOUT = 300.0


class Ansible:
    """Ansible's tools run in the example inventory's folder of repository `root` (with
    its ansible.cfg), writing under `home`."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.examples = root / EXAMPLES
        self.home = home
        for needed in (self.examples / "ansible.cfg", root / PLAYBOOK, root / FACTS_PLAYBOOK):
            if not needed.exists():
                raise DemoError(f"{needed} is missing: run the demo from Bulkhead's "
                                "repository root (make demo)")

    @property
    def facts(self) -> Path:
        return self.home / "facts"

    def settings(self) -> dict[str, str]:
        """The ANSIBLE_* settings: this repository's collection and ansible.cfg, and
        everything written under `home`."""
        return {"ANSIBLE_CONFIG": str(self.examples / "ansible.cfg"),
                "ANSIBLE_HOME": str(self.home),
                "ANSIBLE_COLLECTIONS_PATH": str(self.home / "collections"),
                "ANSIBLE_CACHE_PLUGIN": "jsonfile",
                "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(self.facts),
                "ANSIBLE_NOCOLOR": "1"}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **self.settings(), **(extra or {}),
                "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def link_collection(self) -> None:
        """ansible_collections/bulkhead/microseg under home, a link to the repository
        (what tests/collection-tree.sh --link lays out)."""
        link = self.home.joinpath("collections", "ansible_collections", *COLLECTION)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(self.root, target_is_directory=True)

    def cache_facts(self) -> None:
        """Put the recorded facts into the fact cache with the facts play."""
        done = self._run(["ansible-playbook", "--forks", str(FORKS), "-i", HOSTS_INVENTORY,
                          str(self.root / FACTS_PLAYBOOK)])
        if done.returncode != 0:
            raise DemoError(f"caching the recorded facts failed:\n{done.stdout[-3000:]}"
                            f"{done.stderr[-3000:]}")

    def take_facts(self, other: Ansible) -> None:
        """The fact cache `other` filled, as Ansible wrote it, in this home."""
        shutil.copytree(other.facts, self.facts, dirs_exist_ok=True)

    def inventory(self) -> dict[str, Any]:
        """`ansible-inventory --list`, with Ansible's marks of untrusted strings
        ({"__ansible_unsafe": value}) replaced by their values."""
        done = self._run(["ansible-inventory", "--list"])
        if done.returncode != 0:
            raise DemoError(f"ansible-inventory failed:\n{done.stderr.strip()}")
        listing: dict[str, Any] = json.loads(done.stdout, object_hook=_unmarked)
        return listing

    def playbook(self, extra_env: Mapping[str, str], say: Callable[[str], None],
                 extra_vars: Mapping[str, str] | None = None) -> None:
        """Run the demo's playbook (with `-e NAME=VALUE` for each of `extra_vars`), each
        line of its output through `say`."""
        flags = [f for k, v in (extra_vars or {}).items() for f in ("-e", f"{k}={v}")]
        proc = subprocess.Popen([str(BIN / "ansible-playbook"), str(self.root / PLAYBOOK),
                                 *flags],
                                cwd=self.examples, env=self.env(extra_env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                say(line.rstrip())
        if proc.wait(timeout=TIMEOUT) != 0:
            raise DemoError(f"ansible-playbook failed (exit {proc.returncode}); see above")

    def _run(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=self.examples,
                              env=self.env(), capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)


def _unmarked(obj: dict[str, Any]) -> Any:
    return obj["__ansible_unsafe"] if obj.keys() == {"__ansible_unsafe"} else obj
