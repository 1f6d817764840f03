"""The server's event loop: asyncio's own and uvloop side by side, in one run.

    .venv/bin/python agent/benchmarks/eventloop.py [--rounds 10] [--writes 300]
        [--concurrent 500] [--writers 16] [--json]

Starts two `bulkhead-server` processes on 127.0.0.1 with real mutual TLS, each on SQLite
of its own, one with `eventLoop: asyncio`, one with `eventLoop: uvloop`. Each round, for
each server in turn (which goes first alternates), measures:
- one writer: `--writes` one-resource creates straight to a SQLite store in this process,
  then as many through the server's API with `LeanClient` (agent/benchmarks/server.py);
  the round's ratio is API rate / store rate, the figure issue 23's goal is stated in;
- `--writers` writers at once through the API (aiohttp's client, a connection each):
  writes per second, and the server's commits per write (its group commits, from
  `/metrics`);
- the server's CPU (all its threads) per write, for both.
Reports the median of the rounds per loop, and uvloop's figure over asyncio's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # server.py's helpers

from bulkhead import pki  # noqa: E402
from bulkhead.store.sqlite import SQLiteStore  # noqa: E402
from server import (  # noqa: E402
    LeanClient,
    Server,
    api_writes_concurrent,
    client_ssl,
    cpu_s,
    lean_writes,
    server_commits,
    server_loop,
    store_writes,
    wait_ready,
)

LOOPS = ("asyncio", "uvloop")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, dict[str, list[float]]] = {
        loop: {"lean_ratio": [], "lean_write_ms": [], "store_write_ms": [], "lean_cpu_ms": [],
               "concurrent_per_s": [], "concurrent_commits_per_write": [],
               "concurrent_cpu_ms": []}
        for loop in LOOPS}
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki.init_ca(tmp)
        pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
        admin_ssl = client_ssl(tmp, "bench-admin", "admin")
        servers = {loop: Server(tmp, f"sqlite://{tmp}/{loop}.db", loop, event_loop=loop)
                   for loop in LOOPS}
        store = SQLiteStore(tmp / "direct.db")
        leans: dict[str, LeanClient] = {}
        try:
            async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=admin_ssl)) as admin:
                for loop, server in servers.items():
                    await wait_ready(admin, server.url)
                    running = await server_loop(admin, server.url)
                    if running != loop:
                        raise RuntimeError(f"the server asked for {loop} runs on {running}")
                    leans[loop] = LeanClient(server.url, admin_ssl)
                    lean_writes(leans[loop], 50)   # warm: its first writes make its file
                for r in range(args.rounds):
                    for loop in (LOOPS if r % 2 == 0 else LOOPS[::-1]):
                        server, got = servers[loop], figures[loop]
                        pid = server.proc.pid
                        direct = await store_writes(store, args.writes, prefix=f"{loop}{r}-")
                        before = cpu_s(pid)
                        lean = lean_writes(leans[loop], args.writes)
                        got["lean_cpu_ms"].append(1000 * (cpu_s(pid) - before) / args.writes)
                        got["lean_ratio"].append(direct / lean)
                        got["lean_write_ms"].append(1000 * lean / args.writes)
                        got["store_write_ms"].append(1000 * direct / args.writes)
                        commits, _ = await server_commits(admin, server.url)
                        before = cpu_s(pid)
                        got["concurrent_per_s"].append(await api_writes_concurrent(
                            admin_ssl, server.url, args.concurrent, args.writers))
                        cpu = cpu_s(pid) - before
                        after, _ = await server_commits(admin, server.url)
                        got["concurrent_cpu_ms"].append(1000 * cpu / args.concurrent)
                        got["concurrent_commits_per_write"].append(
                            (after - commits) / args.concurrent)
        finally:
            for lean_client in leans.values():
                lean_client.close()
            await store.close()
            for server in servers.values():
                server.stop()
    medians = {loop: {name: statistics.median(values) for name, values in got.items()}
               for loop, got in figures.items()}
    return {"rounds": args.rounds, "writes": args.writes, "concurrent": args.concurrent,
            "writers": args.writers, "load": os.getloadavg(), "median": medians,
            "rounds_figures": figures,
            "uvloop_over_asyncio": {
                name: medians["uvloop"][name] / medians["asyncio"][name]
                for name in medians["asyncio"] if medians["asyncio"][name]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--writes", type=int, default=300,
                        help="one writer: writes per round, to the store and to each server")
    parser.add_argument("--concurrent", type=int, default=500,
                        help="writes per round from --writers writers at once")
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for loop, m in results["median"].items():
        print(f"{loop:8} one writer (lean client): API / store {m['lean_ratio']:.2f}, server "
              f"CPU {m['lean_cpu_ms']:.2f} ms/write;  {results['writers']} writers: "
              f"{m['concurrent_per_s']:.0f}/s, {m['concurrent_commits_per_write']:.2f} "
              f"commits/write, server CPU {m['concurrent_cpu_ms']:.2f} ms/write")
    over = results["uvloop_over_asyncio"]
    print(f"uvloop / asyncio: one-writer ratio {over['lean_ratio']:.2f}, concurrent rate "
          f"{over['concurrent_per_s']:.2f}, CPU per write {over['lean_cpu_ms']:.2f} (one "
          f"writer), {over['concurrent_cpu_ms']:.2f} (concurrent)  [medians of "
          f"{results['rounds']} rounds]")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
