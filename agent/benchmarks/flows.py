"""Flow log storage benchmarks: SQLite and ClickHouse (chdb) side by side in one run.

    .venv/bin/python agent/benchmarks/flows.py [--flows 1000000] [--ingest 100000] [--json]

Needs the flows-test extra (chdb, clickhouse-connect). Starts its own bulkhead-servers on
127.0.0.1 with real mutual TLS, in a temporary folder it removes. Figures, for each store:
1. ingest: records/s stored in batches of 5,000 (the API's bound) straight into the store,
   and through the HTTPS API (POST /v1/flows from `--agents` agents at once, each its own
   node, as `bulkhead.client.flows.send_flows` sends them);
2. queries over `--flows` stored records spread over 23 hours (200 nodes, 2,000 host
   endpoints, 60 policies in 5 tiers, about 5% denied, 2% where staged differs), with the
   `--ingest` records of the last hour: the last hour with one filter (action=deny;
   policy=NAME; a selector, its scan bounded) and its top 10 talkers; the whole day with a
   policy and staged=differs (a few hundred records), and its top 10 talkers; best of
   `--repeat`, in milliseconds, straight to the store and through the API (the server
   opened on the same data).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # for tests.procs

from tests.procs import free_port, stop  # noqa: E402

from bulkhead import pki  # noqa: E402
from bulkhead.client import Connection, Unreachable  # noqa: E402
from bulkhead.client.flows import flows, send_flows  # noqa: E402
from bulkhead.model.flowlog import MAX_BATCH, End, FlowRecord, step  # noqa: E402
from bulkhead.selector import parse  # noqa: E402
from bulkhead.store.flowlog import FlowQuery, FlowStore  # noqa: E402
from bulkhead.store.flowlog.clickhouse import ClickHouseFlowStore, ClickHouseSettings  # noqa: E402
from bulkhead.store.flowlog.sqlite import SQLiteFlowStore  # noqa: E402
from run import best_of  # noqa: E402  (benchmarks/run.py, this script's folder)

NODES, ENDPOINTS, TIERS, POLICIES = 200, 2_000, 5, 60
SELECTOR = "app == 'app7' && zone == 'mgmt'"   # one end in 40 matches
# Records end in the last 23 hours: inside the default 24-hour retention (ClickHouse's TTL
# drops rows past it even as they are inserted).
SPAN = 23 * 3600.0


class Fleet:
    """Records as a fleet's agents would send them, from a fixed seed."""

    def __init__(self, seed: int, now: float) -> None:
        self.rng = random.Random(seed)
        self.now = now
        zones = ("dmz", "trusted", "restricted", "mgmt")
        self.labels = [{"app": f"app{i % 40}", "zone": zones[i % 4], "env": "prod"}
                       for i in range(ENDPOINTS)]
        self.policies = [(f"tier{p % TIERS}", f"tier{p % TIERS}.policy{p}")
                         for p in range(POLICIES)]

    def record(self, node: int | None = None, span: float = SPAN) -> FlowRecord:
        r = self.rng
        n = r.randrange(NODES) if node is None else node
        src, dst = (n * 10 + r.randrange(10)) % ENDPOINTS, r.randrange(ENDPOINTS)
        end = round(self.now - r.random() * span, 3)
        tier, policy = self.policies[r.randrange(POLICIES)]
        action = "deny" if r.random() < 0.05 else "allow"
        staged = ("deny" if action == "allow" else "allow") if r.random() < 0.02 else action
        trace = (step(tier, policy, r.randrange(5), action),)
        return FlowRecord(
            start=end - 15, end=end, node=f"node{n}", reporter=r.choice(("src", "dst")),
            src=End("hep", f"hep{src}", self.labels[src]),
            dst=End("hep", f"hep{dst}", self.labels[dst]), proto=6,
            dst_port=r.choice((22, 80, 443, 5432, 6379)), action=action,
            enforced_trace=trace, staged_action=staged,
            staged_trace=trace if staged == action else
            (step("audit", "audit.staged", None, staged),),
            connections=r.randrange(1, 20), started=r.randrange(0, 5),
            packets_in=r.randrange(1, 10_000), packets_out=r.randrange(1, 10_000),
            bytes_in=r.randrange(64, 10**7), bytes_out=r.randrange(64, 10**7))

    def batches(self, total: int, node: int | None = None, span: float = SPAN
                ) -> Iterator[list[FlowRecord]]:
        for start in range(0, total, MAX_BATCH):
            yield [self.record(node, span) for _ in range(min(MAX_BATCH, total - start))]


# ------------------------------------------------------------------------------ stores
def open_store(kind: str, tmp: Path) -> FlowStore:
    if kind == "sqlite":
        return SQLiteFlowStore(tmp / "flows.sqlite")
    return ClickHouseFlowStore(ClickHouseSettings(dsn=f"chdb://{tmp}/clickhouse",
                                                  database="bench"))


def flow_logs_config(kind: str, tmp: Path) -> dict[str, Any]:
    if kind == "sqlite":
        return {"path": str(tmp / "flows.sqlite")}
    return {"store": "clickhouse", "clickhouse": {"dsn": f"chdb://{tmp}/clickhouse",
                                                  "database": "bench"}}


def ingest_rate(store: FlowStore, fleet: Fleet, total: int) -> float:
    batches = list(fleet.batches(total, span=3600))
    started = time.perf_counter()
    for batch in batches:
        store.insert(batch)
    return total / (time.perf_counter() - started)


# Each query: its API parameters; `hours` back from now (the API's default, 1, if absent).
QUERIES: dict[str, dict[str, Any]] = {
    "last_hour_deny": {"action": "deny"},
    "last_hour_policy": {"policy": "tier3.policy13"},
    "last_hour_top10": {"top": 10},
    "last_hour_selector": {"selector": SELECTOR},
    "day_policy_staged_differs": {"policy": "tier3.policy13", "staged_differs": True,
                                  "hours": 24},
    "day_top10": {"top": 10, "hours": 24},
}


def _api(params: dict[str, Any], now: float) -> dict[str, Any]:
    return {"since": now - 3600 * params.get("hours", 1),
            **{k: v for k, v in params.items() if k != "hours"}}


def store_queries(store: FlowStore, now: float, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, params in QUERIES.items():
        q = FlowQuery(since=now - 3600 * params.get("hours", 1), action=params.get("action"),
                      policy=params.get("policy"),
                      staged_differs=params.get("staged_differs", False),
                      selector=parse(params["selector"]) if "selector" in params else None)
        if "top" in params:
            n = int(params["top"])
            seconds = best_of(lambda q=q, n=n: store.top(q, n), repeat)
            found = len(store.top(q, n).top)
        else:
            seconds = best_of(lambda q=q: store.query(q), repeat)
            found = len(store.query(q).flows)
        out[name] = {"ms": 1000 * seconds, "rows": found}
    return out


def api_queries(conn: Connection, now: float, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, params in QUERIES.items():
        seconds = best_of(lambda p=params: flows(conn, **_api(p, now)), repeat)
        out[name] = {"ms": 1000 * seconds}
    return out


# ------------------------------------------------------------------------------ server
class Server:
    def __init__(self, tmp: Path, flow_logs: dict[str, Any], name: str) -> None:
        self.port = free_port()
        config = tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "datastore": f"sqlite://{tmp}/{name}.db",
            "tlsCert": str(tmp / "server.crt"), "tlsKey": str(tmp / "server.key"),
            "clientCA": str(tmp / "ca.crt"), "logLevel": "error", "flowLogs": flow_logs}))
        exe = Path(sys.executable).parent / "bulkhead-server"
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(exe), "--config", str(config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.tmp = tmp

    def client(self, name: str, role: str) -> Connection:
        crt, key = pki.issue(self.tmp, name, role=role)
        return Connection(f"https://127.0.0.1:{self.port}", str(self.tmp / "ca.crt"),
                          str(crt), str(key), timeout=120)

    def wait_ready(self, conn: Connection) -> None:
        for _ in range(300):
            if self.proc.poll() is not None:
                raise RuntimeError(f"bulkhead-server exited {self.proc.returncode}")
            try:
                conn.request("GET", "/readyz")
                return
            except Unreachable:
                time.sleep(0.1)
        raise RuntimeError("bulkhead-server not ready")

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def api_ingest_rate(server: Server, fleet: Fleet, total: int, agents: int) -> float:
    senders = [server.client(f"node{i}", "agent") for i in range(agents)]
    work = [list(fleet.batches(total // agents, node=i, span=3600)) for i in range(agents)]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            for batch in work[i]:
                send_flows(senders[i], batch)
        except BaseException as e:  # reported below, after the others finish
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(agents)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return agents * (total // agents) / (time.perf_counter() - started)


# --------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict[str, Any]:
    now = time.time()
    results: dict[str, Any] = {"flows": args.flows, "ingest_records": args.ingest,
                               "agents": args.agents}
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-flows-") as tmp_name:
        root = Path(tmp_name)
        pki.init_ca(root)
        pki.issue(root, "server", server=True, hosts=("127.0.0.1",))
        for kind in ("sqlite", "clickhouse"):
            figures: dict[str, Any] = {}
            # 1a. ingest straight into an empty store, then fill it to --flows.
            tmp = root / kind
            tmp.mkdir()
            store = open_store(kind, tmp)
            figures["store_ingest_per_s"] = ingest_rate(store, Fleet(1, now), args.ingest)
            fleet = Fleet(2, now)
            started = time.perf_counter()
            for batch in fleet.batches(max(0, args.flows - args.ingest)):
                store.insert(batch)
            figures["fill_seconds"] = time.perf_counter() - started
            figures["stored"] = store.count()
            # 2a. queries straight to the store.
            figures["store_queries"] = store_queries(store, now, args.repeat)
            store.close()   # the server opens the same data (chdb: one engine a process)
            # 2b and 1b: through a server on the same data.
            server = Server(root, flow_logs_config(kind, tmp), kind)
            try:
                admin = server.client("bench-admin", "admin")
                server.wait_ready(admin)
                figures["api_queries"] = api_queries(admin, now, args.repeat)
                figures["api_ingest_per_s"] = api_ingest_rate(server, Fleet(3, now),
                                                              args.ingest, args.agents)
            finally:
                server.stop()
            results[kind] = figures
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flows", type=int, default=100_000,
                        help="records stored for the queries (default 100,000; the figures "
                        "in docs/benchmarks.md use 1,000,000)")
    parser.add_argument("--ingest", type=int, default=20_000,
                        help="records ingested for the ingest rates (default 20,000)")
    parser.add_argument("--agents", type=int, default=4, help="agents sending at once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for kind in ("sqlite", "clickhouse"):
        r = results[kind]
        print(f"{kind:<10} ingest: store {r['store_ingest_per_s']:,.0f} records/s, HTTPS API "
              f"{r['api_ingest_per_s']:,.0f} records/s ({args.agents} agents); "
              f"{r['stored']:,} stored (filled in {r['fill_seconds']:.0f} s)")
        for name in QUERIES:
            s, a = r["store_queries"][name], r["api_queries"][name]
            print(f"{'':<10} {name:<20} store {s['ms']:8.1f} ms ({s['rows']} rows), "
                  f"API {a['ms']:8.1f} ms")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
