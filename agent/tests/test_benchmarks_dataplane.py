"""The dataplane, convergence and flow-flood benchmarks run end to end on tiny sizes, in
labs named by the test fixtures' scheme (so the session sweep removes them if a run dies).
No timing is asserted: the figures live in docs/benchmarks.md; here only that they are
produced."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labfixture import NEEDS_ROOT, unique_lab_name

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason=NEEDS_ROOT)


def run_script(name: str, *args: str) -> dict[str, object]:
    # The lab belongs to this test session: a sweep by a session next to it leaves it.
    env = {**os.environ, "BULKHEAD_LAB_OWNER": str(os.getpid())}
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), "--lab", unique_lab_name(),
                           "--json", *args], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, object] = json.loads(done.stdout)
    return results


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build tcpbench.c")
def test_dataplane_benchmark_runs_small() -> None:
    results = run_script("dataplane.py", "--policies", "12", "--elements", "60",
                         "--selecting", "3", "--naive-rules", "60", "--rounds", "1",
                         "--stream-rounds", "1", "--seconds", "0.3", "--stream-seconds", "0.3",
                         "--flow-logs", "--dns", "--ten-x")
    configs = {"none", "floor", "bulkhead", "naive", "bk-flows", "bk-dns", "bk-10x"}
    for figure in ("conn_per_s", "throughput_gbit_s"):
        by_stat = results[figure]
        assert isinstance(by_stat, dict) and set(by_stat) == {"best", "median"}
        for values in by_stat.values():
            assert set(values) == configs and all(v > 0 for v in values.values())
    ratios = results["ratios"]
    assert isinstance(ratios, dict)
    for stat in ("best", "median"):
        assert ratios[stat]["conn_vs_none"]["none"] == 1.0
        assert ratios[stat]["bulkhead_vs_floor_conn"] > 0
    assert len(ratios["bulkhead_vs_floor_conn_per_cycle"]) == 1
    assert ratios["per_cycle"]["bulkhead/floor"]["median"] > 0
    rulesets = results["rulesets"]
    assert isinstance(rulesets, dict)
    assert rulesets["bulkhead"]["policies"] == 12
    assert rulesets["bulkhead"]["policies_selecting_receiver"] == 3
    assert rulesets["naive"]["rules"] == 61     # 60 listed addresses and the client's
    # Flow logs: the reader in bk-flows saw the connections made to it.
    flows = results["flow_logs"]
    assert isinstance(flows, dict) and flows["connections_made"] > 0
    assert flows["missed_share"] < 0.5   # a reader that saw little is broken, not slow
    assert ratios["per_cycle"]["bk-flows/bulkhead"]["median"] > 0
    assert rulesets["bk-flows"]["decisions"] > 0
    # DNS snooping: the same table with the logging rules for the trusted resolvers.
    assert ratios["per_cycle"]["bk-dns/bulkhead"]["median"] > 0
    assert len(rulesets["bk-dns"]["snoop_rules"]) == 4    # held and logged, per family
    # Ten times the scale: the same meaning from ten times the policies and addresses.
    assert rulesets["bk-10x"]["policies"] == 120
    assert rulesets["bk-10x"]["policies_selecting_receiver"] == 30
    assert rulesets["bk-10x"]["network_set_addresses"] == 600
    assert ratios["per_cycle"]["bk-10x/floor"]["median"] > 0
    assert ratios["per_cycle"]["bk-10x/bulkhead"]["median"] > 0
    for host in ("bulkhead", "bk-10x"):
        assert set(rulesets[host]["kernel_memory"]["meminfo_mib"]) == {
            "Slab", "VmallocUsed", "Percpu", "total"}


def test_dns_race_benchmark_runs_small() -> None:
    results = run_script("dnsrace.py", "--names", "8")
    modes = results["modes"]
    assert isinstance(modes, dict) and set(modes) == {"NoDelay", "DelayDNSResponse"}
    for mode, m in modes.items():
        assert m["before_answer"] == "blocked", mode
        assert m["answers_read"] == 8 and m["elements_written"] == 8, mode
        latency = m["answer_to_kernel_ms"]
        assert latency["samples"] == 8 and 0 < latency["p50"] <= latency["p99"], mode
        assert m["failed"] == 0, mode   # every connection got through in the end
    assert modes["NoDelay"]["released"] == 0
    held = modes["DelayDNSResponse"]
    assert held["released"] == 8 and held["answer_held_ms"]["samples"] == 8
    # Held until the element is in the kernel: no first SYN is lost.
    assert held["raced"] == 0


def test_convergence_benchmark_runs_small() -> None:
    results = run_script("convergence.py", "--hosts", "2", "--writes", "2", "--gap", "0.1")
    assert results["hosts"] == 2
    for figure in ("kernel_every_host_ms", "kernel_per_host_ms", "status_every_host_ms"):
        values = results[figure]
        assert isinstance(values, dict)
        assert 0 < values["p50"] <= values["p99"]
    details = results["write_details"]
    assert isinstance(details, list) and len(details) == 2
    assert all(set(w["kernel_ms"]) == {"h1", "h2"} for w in details)
    applies = results["agent_applies"]
    assert isinstance(applies, dict) and applies["applies"] >= 4   # 2 writes x 2 agents


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build tcpbench.c")
def test_flowflood_benchmark_runs_small() -> None:
    results = run_script("flowflood.py", "--seconds", "1", "--flush", "1", "--wait", "30")
    made, got = results["connections_made"], results["connections_stored"]
    assert isinstance(made, int) and isinstance(got, int) and made > 0
    assert got > made // 2   # records reached the server (the figure is in the docs)
    counters = results["agent_counters"]
    assert isinstance(counters, dict) and counters["flowRecordsSent"] > 0
    assert isinstance(results["agent_peak_rss_mib"], float)
