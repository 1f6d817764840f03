"""The rendered nftables tables of representative snapshots, kept as golden files in
tests/golden/nftables/ (as foomuuri keeps its expected rulesets), so a change to the
ruleset shows in review as a diff of those files.

Each table is rendered the agent's way (`NftablesEnforcer.ruleset`: the plan, then the
renderer) and compared byte for byte. When a change is meant, rewrite them:

    BULKHEAD_UPDATE_GOLDEN=1 pytest tests/test_nftables_golden.py
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from benchmarks.apply import resources as apply_benchmark_resources

from bulkhead.agent.nft_enforcer import NftablesEnforcer
from bulkhead.conformance.cases import load_cases
from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Failsafes

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "nftables"
CASES = TESTS / "conformance"
UPDATE = os.environ.get("BULKHEAD_UPDATE_GOLDEN") == "1"


def table(snapshot: Snapshot, node: str, failsafes: Failsafes,
          interfaces: Mapping[str, Sequence[str]] | None = None) -> str:
    """The `nft -f` script the agent of `node` would load."""
    enforcer = NftablesEnforcer(node, failsafes, interfaces=lambda: dict(interfaces or {}))
    return enforcer.ruleset(snapshot).script()


def conformance_tables(case_file: Path) -> str:
    """Every case of the file, rendered for the host its first probe goes to."""
    parts = []
    for case in load_cases(case_file):
        host = case.expect[0].dst
        parts.append(f"# case {case.name}, host {host}\n"
                     + table(case.snapshot(), host, case.failsafes))
    return "\n".join(parts)


def apply_benchmark_tables() -> str:
    """benchmarks/apply.py's store at a small size (8 policies, 2 selecting the receiver,
    40 network set addresses), before and after its label change."""
    parts = []
    for moved in (False, True):
        snapshot = Snapshot.build(parse_resource(d) for d in apply_benchmark_resources(
            policies=8, elements=40, selecting=2, moved=moved))
        parts.append(f"# apply benchmark, receiver on n1, moved={moved}\n"
                     + table(snapshot, "n1", Failsafes(), {"eth0": ["198.18.0.10"]}))
    return "\n".join(parts)


GOLDEN_FILES = {
    **{f"conformance-{p.stem}.nft": p for p in sorted(CASES.glob("*.yaml"))},
    "apply-benchmark.nft": None,
}


def rendered(name: str) -> str:
    source = GOLDEN_FILES[name]
    return apply_benchmark_tables() if source is None else conformance_tables(source)


def check_golden(path: Path, text: str) -> None:
    """Compare `text` with the golden file byte for byte; a unified diff on mismatch.
    BULKHEAD_UPDATE_GOLDEN=1 writes the file instead."""
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: BULKHEAD_UPDATE_GOLDEN=1 writes it")
    want = path.read_bytes().decode()
    if want != text:
        diff = difflib.unified_diff(want.splitlines(keepends=True),
                                    text.splitlines(keepends=True),
                                    f"{path.name} (golden)", f"{path.name} (rendered now)")
        lines = list(diff)
        shown = "".join(lines[:400]) + (f"... {len(lines) - 400} more lines\n"
                                        if len(lines) > 400 else "")
        pytest.fail(f"the rendered table differs from {path} (if the "
                    f"change is meant: BULKHEAD_UPDATE_GOLDEN=1):\n{shown}", pytrace=False)


@pytest.mark.parametrize("name", sorted(GOLDEN_FILES))
def test_rendered_tables_equal_the_golden_files(name: str) -> None:
    check_golden(GOLDEN / name, rendered(name))


def test_no_golden_file_is_left_over() -> None:
    assert {p.name for p in GOLDEN.glob("*.nft")} == set(GOLDEN_FILES)


def test_a_difference_shows_as_a_unified_diff(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__name__ + ".UPDATE", False)
    golden = tmp_path / "t.nft"
    golden.write_text("table inet bulkhead {\n\tchain a {\n\t\taccept\n\t}\n}\n")
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(golden, "table inet bulkhead {\n\tchain a {\n\t\tdrop\n\t}\n}\n")
    assert "-\t\taccept\n+\t\tdrop\n" in str(failed.value)
    check_golden(golden, golden.read_text())
