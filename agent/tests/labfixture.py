"""Lab fixtures (imported by conftest.py).

- `make_lab(hosts=2, **kw)`: builds a lab with a unique name ``t`` + 7 random
  characters; every lab it made is removed when the test ends, pass or fail.
- `make_module_lab`: the same, shared by a module's tests, removed after the module.
- `lab_sweep` (autouse, session): at the start and end of the session removes the
  ``bhl-t*`` labs of this session and of sessions that died, but never those of a test
  session running next to this one (their owner process is alive).
- `pytest_pycollect_makeitem`: `Testbed`, imported into test modules, is not collected
  as a test class, whatever its name says.

Lab names starting with ``t`` are for tests; do not give that prefix to a lab you keep.
Tests skip, with the reason, when not root (CI runs as root).
"""

from __future__ import annotations

import os
import secrets
import string
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from bulkhead.conformance.kernel import WireFlow, wire_verdicts_expecting
from bulkhead.lab import Lab, LabError, list_labs, remove_all
from bulkhead.testbed import Testbed

TEST_PREFIX = "t"
NEEDS_ROOT = "the lab needs root: it creates network namespaces (CI runs the tests as root)"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


def wire(bed: Testbed, flows: Sequence[WireFlow], expected: Sequence[bool]) -> list[bool]:
    """Each flow's verdict on the wire, an expected-allowed one that timed out probed again
    with a longer timeout (a loaded machine, not a deny), as the conformance runner does:
    compare it with `expected`."""
    return wire_verdicts_expecting(bed, flows, expected)[0]


def unique_lab_name() -> str:
    alphabet = string.ascii_lowercase + string.digits
    taken = set(list_labs())
    for _ in range(100):
        name = TEST_PREFIX + "".join(secrets.choice(alphabet) for _ in range(7))
        if name not in taken:
            return name
    raise RuntimeError("no free lab name found")


class LabFactory:
    """Builds labs and remembers them, to remove them all in `close`."""

    def __init__(self) -> None:
        self.labs: list[Lab] = []

    def __call__(self, hosts: Sequence[str] | int = 2, **kwargs: Any) -> Lab:
        need_root()
        lab = Lab(unique_lab_name(), hosts, **kwargs)
        self.labs.append(lab)
        return lab.up()

    def close(self) -> None:
        errors = []
        for lab in reversed(self.labs):
            try:
                lab.down()
            except LabError as e:
                errors.append(str(e))
        self.labs.clear()
        if errors:
            raise LabError("; ".join(errors))


@pytest.fixture
def make_lab() -> Iterator[LabFactory]:
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def make_module_lab() -> Iterator[LabFactory]:
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session", autouse=True)
def lab_sweep() -> Iterator[None]:
    if os.geteuid() == 0:
        remove_all(TEST_PREFIX, include_live=False)
    yield
    if os.geteuid() == 0:
        remove_all(TEST_PREFIX, include_live=False)


def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object
                              ) -> list[Any] | None:
    return [] if obj is Testbed else None
