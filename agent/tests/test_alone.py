"""`make test` runs the tests marked `alone` first, one at a time, and the others two at a
time (tests/conftest.py, ALONE): a module that builds namespaces, labs or nftables
tables in the kernel must be on that list, or its probes and traffic counts would share
the CPU with another test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ALONE, TESTS

# What such a module uses: the lab fixtures, Testbed and Lab, `ip netns`, `unshare`, the
# nftables applier, the namespace pair of tests/observe, a root check before it touches
# the kernel.
NEEDS_THE_MACHINE = re.compile(
    r"\bTestbed\b|\bmake_lab\b|\bmake_module_lab\b|\bLab\(|\"ip\", \"netns\"|"
    r"\bnetpair\b|\bunshare\b|\bNftApplier\(|\bneed_root\(|os\.geteuid\(\)")


def test_every_module_that_builds_namespaces_runs_alone() -> None:
    missing = sorted(
        path.relative_to(TESTS).as_posix() for path in TESTS.rglob("test_*.py")
        if path != Path(__file__).resolve() and NEEDS_THE_MACHINE.search(path.read_text())
        and path.relative_to(TESTS).as_posix() not in ALONE)
    assert not missing, f"add these to ALONE in tests/conftest.py: {missing}"


def test_alone_names_only_modules_that_exist() -> None:
    assert sorted(name for name in ALONE if not (TESTS / name).is_file()) == []


def test_the_first_pass_takes_the_alone_modules_and_the_second_the_others() -> None:
    """What the two passes of `make test` collect, from an alone module, a module that is
    alone for its time bound, and an ordinary one."""
    files = ["tests/test_nftables_load.py", "tests/test_server_hardening.py",
             "tests/test_selector.py"]

    def collected(marks: str) -> set[str]:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                               "--collect-only", "-q", "-m", marks, *files],
                              cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        # -q twice (pyproject's and this one): a line per file, "PATH: COUNT"
        return {line.split(": ")[0] for line in done.stdout.splitlines()
                if line.startswith("tests/") and ": " in line}

    assert collected("alone") == set(files[:2])
    assert collected("not alone") == {files[2]}
