"""The benchmark script runs end to end (small sizes); its figures live in docs, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "run.py"


def test_benchmarks_run_quick() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"],
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(done.stdout)
    assert set(results) == {"selector", "label_index", "evaluator"}
    assert results["label_index"]["big_endpoints"] == 10_000
    assert results["evaluator"]["flows"] == 2_000
    assert 0 < results["evaluator"]["allowed_share"] < 1
