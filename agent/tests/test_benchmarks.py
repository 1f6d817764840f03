"""The benchmark script runs end to end (small sizes); its figures live in docs, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "run.py"


def test_benchmarks_run_quick() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json"],
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(done.stdout)
    assert set(results) == {"selector", "evaluator"}
    assert results["evaluator"]["flows"] == 2_000
    assert 0 < results["evaluator"]["allowed_share"] < 1


def test_server_benchmark_runs_small() -> None:
    script = SCRIPT.parent / "server.py"
    done = subprocess.run([sys.executable, str(script), "--watchers", "20", "--changes", "2",
                           "--writes", "20", "--rounds", "2", "--client-writes", "3",
                           "--json"],
                          capture_output=True, text=True, timeout=300, check=True)
    results = json.loads(done.stdout)
    # The servers run on the loop their config's default picks (uvloop is a dependency).
    assert results["event_loop"] == "auto"
    assert results["server_event_loop"] == {"sqlite": "uvloop", "etcd": "uvloop"}
    assert set(results["watch"]) == {"sqlite-poll", "sqlite-stream", "etcd-poll", "etcd-stream"}
    for figures in results["watch"].values():
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert results["fanout"]["etcd_watch_streams"] == {"direct": 20, "through_server": 1}
    for figure in ("store_writes_per_s", "api_writes_per_s", "store_writes_concurrent_per_s",
                   "api_writes_concurrent_per_s", "api_writes_client_per_s"):
        assert set(results[figure]) == {"sqlite", "etcd"}
        assert all(rate > 0 for rate in results[figure].values())
    # One writer, the store's and the API's in turns: a ratio per round, and the
    # server's CPU per API write.
    for backend, one in results["one_writer"].items():
        ratio = one["ratio"]
        assert ratio["rounds"] == 2 and ratio["writes_per_round"] == 10
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
        assert one["api_per_s"] == results["api_writes_per_s"][backend]
        assert one["store_per_s"] == results["store_writes_per_s"][backend]
        assert one["server_cpu_ms_per_write"] >= 0   # CPU comes in clock ticks (10 ms)
        # The ceiling: the store's write plus a round trip that writes nothing.
        ceiling = one["ceiling"]
        assert 0 < ceiling["min"] <= ceiling["median"] <= ceiling["max"] < 1
        assert one["round_trips_per_s"] > 0
        # The same through the lean client, in the same rounds.
        lean = one["lean"]
        assert 0 < lean["ratio"]["min"] <= lean["ratio"]["median"] <= lean["ratio"]["max"]
        assert 0 < lean["ceiling"]["min"] <= lean["ceiling"]["max"] < 1
        assert lean["api_per_s"] > 0 and lean["round_trips_per_s"] > 0
        # One commit per write, one writer at a time; a write takes longer than its
        # commit in the server.
        assert lean["commits_per_write"] == 1
        assert 0 < lean["server_commit_ms"] < lean["write_ms"]
        assert one["store_commit_ms"] > 0


def test_event_loop_benchmark_runs_small() -> None:
    results = run_json("eventloop.py", "--rounds", "2", "--writes", "10", "--concurrent",
                       "16", "--writers", "4")
    assert results["rounds"] == 2
    for loop in ("asyncio", "uvloop"):
        rounds = results["rounds_figures"][loop]
        assert all(len(values) == 2 for values in rounds.values())
        assert all(ratio > 0 for ratio in rounds["lean_ratio"])
        assert all(rate > 0 for rate in rounds["concurrent_per_s"])
        # Every write is in some commit; a group commit takes several.
        assert all(0 < c <= 1 for c in rounds["concurrent_commits_per_write"])
    assert set(results["uvloop_over_asyncio"]) >= {"lean_ratio", "concurrent_per_s"}


def run_json(script: str, *args: str) -> Any:
    """The --json figures of benchmarks/SCRIPT run with `args`."""
    done = subprocess.run([sys.executable, str(SCRIPT.parent / script), *args, "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{script} exited {done.returncode}: {done.stderr[-4000:]}"
    return json.loads(done.stdout)


def test_flows_benchmark_runs_small() -> None:
    results = run_json("flows.py", "--flows", "6000", "--ingest", "2000", "--agents", "2",
                       "--repeat", "1")
    for kind in ("sqlite", "clickhouse"):
        figures = results[kind]
        assert figures["stored"] == 6000
        assert figures["store_ingest_per_s"] > 0 and figures["api_ingest_per_s"] > 0
        assert set(figures["store_queries"]) == set(figures["api_queries"]) == {
            "last_hour_deny", "last_hour_policy", "last_hour_top10", "last_hour_selector",
            "day_policy_staged_differs", "day_top10"}
        assert figures["store_queries"]["last_hour_top10"]["rows"] == 10
        assert figures["store_queries"]["day_policy_staged_differs"]["rows"] > 0
    # Both stores answer the same queries over the same records alike.
    assert {k: v["rows"] for k, v in results["sqlite"]["store_queries"].items()} == \
        {k: v["rows"] for k, v in results["clickhouse"]["store_queries"].items()}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_apply_benchmark_runs_small() -> None:
    results = run_json("apply.py", "--policies", "20", "--elements", "200", "--selecting", "4",
                       "--repeat", "1", "--changes", "3", "--scale", "10")
    assert results["sizes"]["policies"] == 20 and results["sizes"]["element_changes"] >= 1
    assert results["sizes"]["set_elements"] >= 200
    for figure in ("nft_f_s", "apply_s", "render_s", "render_apply_vs_nft_f"):
        assert results["full"][figure] > 0
    for figure in ("netlink_s", "nft_f_s", "netlink_vs_full_apply", "netlink_vs_nft_f"):
        assert results["label_change"][figure] > 0
    # The table's kernel memory (charged to this cgroup where it can be read), and the
    # fresh process that builds, calculates, renders and applies.
    # The cgroup's reading is a difference: at this size (a few KiB of table) memory the
    # kernel frees meanwhile (an earlier test's namespace, torn down in a worker) can make
    # it slightly negative. A reading, in MiB, of no more than the noise either way.
    memory = results["kernel_memory"]
    assert memory["memcg_kmem_mib"] is None or -4 < memory["memcg_kmem_mib"] < 64
    assert set(memory["meminfo_mib"]) == {"Slab", "VmallocUsed", "Percpu", "total"}
    fresh = results["fresh_process"]
    for figure in ("build_s", "calculate_s", "render_s", "apply_s", "peak_rss_mib"):
        assert fresh[figure] > 0
    assert fresh["calculate_render_apply_s"] >= fresh["apply_s"]
    # The agent's path at each fleet size (1,000 and 10 peers), the changes interleaved:
    # every change of each kind at each size counted, and the flatness figure is the
    # largest median over the smallest.
    sizes = results["end_to_end"]
    assert [e["host_endpoints"] for e in sizes] == [1001, 11]
    for e in sizes:
        for what in ("label_ms", "netset_ms"):
            assert e[what]["changes"] == 3
            assert 0 < e[what]["min"] <= e[what]["median"] <= e[what]["max"]
        assert e["incremental"] == 6 and e["from_scratch"] == 1
    label = results["end_to_end_flatness"]["label"]
    medians = [e["label_ms"]["median"] for e in sizes]
    assert label["largest_over_smallest_median"] == max(medians) / min(medians) >= 1
    # Paired against the smallest fleet round by round: the smallest is 1 against itself.
    assert label["paired_over_smallest"]["11"] == 1.0
    paired = label["paired_over_smallest"].values()
    assert label["largest_over_smallest_paired"] == max(paired) / min(paired) >= 1
    assert results["label_change_end_to_end_ms"] == medians[0]


def test_soak_benchmark_runs_small() -> None:
    script = SCRIPT.parent / "soak.py"
    done = subprocess.run([sys.executable, str(script), "--watchers", "20", "--nodes", "5",
                           "--duration", "8", "--status-interval", "2", "--heartbeat", "2",
                           "--sample-interval", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for figure in ("rss_start_mib", "rss_end_mib", "rss_max_mib", "store_start_mib",
                   "store_end_mib", "status_posts", "events_delivered", "lag_revisions_p50",
                   "lag_revisions_p99", "delivery_ms_p99", "errors", "samples"):
        assert figure in results
    assert results["connected_start"] == 20 and results["all_converged"]
    assert results["converged"] == 20 and results["final_revision"] is not None
    assert results["writes"] > 0 and results["status_posts"] > 0
    assert results["events_delivered"] > 0
    assert results["store_end_mib"] > results["store_start_mib"] > 0
    assert results["failures"] == [] and not results["server_died"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the lab's network namespaces")
def test_footprint_benchmark_runs_small() -> None:
    from tests.labfixture import unique_lab_name

    results = run_json("footprint.py", "--policies", "20", "--heps", "50", "--elements", "100",
                       "--selecting", "4", "--idle-seconds", "2", "--churn-seconds", "2",
                       "--churn-rate", "4", "--settle", "0.5", "--lab", unique_lab_name())
    assert results["sizes"]["policies"] == 20 and results["sizes"]["host_endpoints"] == 51
    # A Python agent: more than its interpreter, less than the goal's ceiling times four.
    assert 10 < results["rss_mib"] <= results["peak_rss_mib"] < 256
    assert results["churn_rss_mib"] <= results["peak_rss_mib"]
    assert 0 <= results["idle_core"] < 1 and 0 < results["churn_core"] < 2
    assert results["idle"]["samples"] >= 2 and results["churn"]["writes"] == 8
    assert results["agent_metrics"]["bulkhead_agent_applied_revision"] == \
        results["load"]["revision"] + 8
