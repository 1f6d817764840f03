"""agent/benchmarks/collection.py runs on a tiny inventory and reports its figures (no
timing asserted: the figures come from the full run, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import sys

from conftest import HERE, ansible_env, run


def test_collection_benchmark_runs_small():
    env = dict(os.environ)
    env.update(ansible_env())
    script = HERE.parents[1] / "agent" / "benchmarks" / "collection.py"
    done = run([sys.executable, str(script), "--hosts", "60", "--rounds", "1", "--json"], env)
    result = json.loads(done.stdout)
    assert result["hosts"] == 60 and result["rounds"] == 1
    assert sorted(result["questions"]) == ["set-and-negation", "zone-and-app"]
    for figures in result["questions"].values():
        # the play asserted that the three methods agree; a question matches some hosts
        assert figures["matches"] > 0
        assert figures["lookup_ms"] > 0 and figures["jinja_ms"] > 0
        assert figures["jinja_over_lookup"] > 0
