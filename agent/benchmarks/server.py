"""Store and server benchmarks: every figure side by side in one run.

    .venv/bin/python agent/benchmarks/server.py [--watchers 1000] [--changes 20]
        [--writes 500] [--writers 16] [--event-loop auto|uvloop|asyncio] [--json]

Needs `etcd` (Debian's etcd-server) on PATH; starts its own etcd and bulkhead-servers on
127.0.0.1 and stops them. Figures:
1. write throughput: single-resource transactions per second, SQLite and etcd, straight
   to the store and through the HTTPS API: one writer at a time (sequential; the store's
   and the API's in turns, `--rounds` rounds, the ratio per round; and the server's CPU
   per API write, which moves less with the machine's load than a rate; and the ceiling
   a write through the API could reach: the store's write plus an authenticated
   round trip that writes nothing; the same writes and round trips through a lean
   client, `LeanClient`, in the same rounds: `lean`; and what of a write is the store's
   commit, straight and in the server, from `store.commits` and the server's
   `bulkhead_datastore_commit_seconds`), and
   `--writers` writers at once (each its own task; through the API each its own
   connection), both sides under the same conditions; and one writer through the
   project's own client (`bulkhead.client`, a connection per request, as the CLI and the
   collection's modules make);
2. watch notify latency: N agents watching one server (long-poll, and streaming), a change
   written, the time until each agent has it (p50, p99 over all agents and changes),
   SQLite and etcd;
3. server memory per watcher: RSS with N watchers waiting minus RSS with none, over N;
4. fan-out: the same change reaching N streaming watchers through one server (one etcd
   watch) vs N
   watchers each holding their own etcd watch stream: latency ratio, and etcd watch
   streams used (1 vs N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # for tests.conftest's EtcdProcess and free_port

from tests.conftest import EtcdProcess, free_port  # noqa: E402
from tests.procs import stop  # noqa: E402

from bulkhead import pki  # noqa: E402
from bulkhead.server.main import EVENT_LOOPS  # noqa: E402
from bulkhead.store import Op  # noqa: E402
from bulkhead.store.etcd import EtcdStore  # noqa: E402
from bulkhead.store.sqlite import SQLiteStore  # noqa: E402

SEEN_TIMEOUT = 60.0   # seconds every watcher has to see a change


def netset(name: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
            "metadata": {"name": name}, "spec": {"nets": ["198.18.0.0/24"]}}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Server:
    def __init__(self, tmp: Path, datastore: str, name: str, logs: Path | None = None,
                 event_loop: str = "auto") -> None:
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        config = tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{self.port}", "datastore": datastore,
            "tlsCert": str(tmp / "server.crt"), "tlsKey": str(tmp / "server.key"),
            "clientCA": str(tmp / "ca.crt"), "logLevel": "info" if logs else "error",
            "eventLoop": event_loop,
            "flowLogs": {"path": str(tmp / f"{name}-flows.sqlite")}}))  # not /var/lib/bulkhead
        exe = Path(sys.executable).parent / "bulkhead-server"
        log = open(logs / f"{name}.log", "wb") if logs else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen([str(exe), "--config", str(config)],
                                     stdout=log, stderr=log)
        if logs:
            log.close()  # type: ignore[union-attr]

    def stop(self) -> None:
        stop(self.proc)


def client_ssl(tmp: Path, name: str, role: str) -> ssl.SSLContext:
    crt, key = pki.issue(tmp, name, role=role)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    ctx.load_cert_chain(crt, key)
    return ctx


async def wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with session.get(url + "/readyz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


# ---------------------------------------------------------------------- write throughput
async def store_writes(store: Any, count: int, prefix: str = "w") -> float:
    """Seconds for `count` one-resource creates straight to the store, one at a time."""
    start = time.perf_counter()
    for i in range(count):
        name = f"{prefix}{i}"
        await store.transaction([Op("put", "GlobalNetworkSet", name, netset(name))])
    return time.perf_counter() - start


async def api_writes(session: aiohttp.ClientSession, url: str, count: int) -> float:
    """Seconds for `count` creates through the API, one at a time, on one connection."""
    start = time.perf_counter()
    for i in range(count):
        async with session.post(url + "/v1/resources/GlobalNetworkSet",
                                json=netset(f"api{i}-{time.time_ns()}")) as r:
            assert r.status == 201, await r.text()
    return time.perf_counter() - start


async def api_round_trips(session: aiohttp.ClientSession, url: str, count: int) -> float:
    """Seconds for `count` authenticated requests that write nothing (a GET of a resource
    that does not exist: TLS, HTTP, the client certificate's identity and revocation,
    routing, the name check, one store read, a 404), one at a time, on one connection:
    what any API write pays before its own work and the commit."""
    start = time.perf_counter()
    for _ in range(count):
        async with session.get(url + "/v1/resources/GlobalNetworkSet/absent") as r:
            assert r.status == 404, await r.text()
            await r.read()
    return time.perf_counter() - start


class LeanClient:
    """One keep-alive HTTPS connection driven by hand: a blocking TLS socket, each HTTP/1.1
    request written in one `sendall` and its answer read by Content-Length. The least a
    Python client can cost, so a figure taken with it shows the server's cost more than
    the client library's (aiohttp's client takes about as long per request as the
    server's whole answer to a GET). Benchmark use only: it reads only what this
    server sends (no chunked answers, no redirects)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        raw = socket.create_connection((host, int(port)), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ssl_context.wrap_socket(raw, server_hostname=host)
        self.host = host

    def request(self, method: str, path: str, body: bytes = b"") -> int:
        """The answer's status; its body read and dropped."""
        self.sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in lines[1:]
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            rest += chunk
        return int(lines[0].split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


def lean_writes(client: LeanClient, count: int) -> float:
    """`api_writes` through the lean client."""
    start = time.perf_counter()
    for i in range(count):
        body = json.dumps(netset(f"lean{i}-{time.time_ns()}")).encode()
        status = client.request("POST", "/v1/resources/GlobalNetworkSet", body)
        assert status == 201, status
    return time.perf_counter() - start


def lean_round_trips(client: LeanClient, count: int) -> float:
    """`api_round_trips` through the lean client."""
    start = time.perf_counter()
    for _ in range(count):
        status = client.request("GET", "/v1/resources/GlobalNetworkSet/absent")
        assert status == 404, status
    return time.perf_counter() - start


async def server_commits(session: aiohttp.ClientSession, url: str) -> tuple[int, float]:
    """The server's commits so far and their seconds (`bulkhead_datastore_commit_seconds`
    in /metrics)."""
    async with session.get(url + "/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("bulkhead_datastore_commit_seconds_")}
    return (int(values["bulkhead_datastore_commit_seconds_count"]),
            values["bulkhead_datastore_commit_seconds_sum"])


async def server_loop(session: aiohttp.ClientSession, url: str) -> str:
    """The event loop the server says it runs on (`bulkhead_server_info` in /metrics)."""
    async with session.get(url + "/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    line = next(line for line in text.splitlines()
                if line.startswith("bulkhead_server_info{"))
    return line.split('event_loop="', 1)[1].split('"', 1)[0]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_writer(store: Any, session: aiohttp.ClientSession, url: str, pid: int,
                     count: int, rounds: int, tag: str, lean: LeanClient
                     ) -> dict[str, Any]:
    """One writer straight to the store and one through the API, in turns: `rounds`
    rounds of `count / rounds` writes each way (which goes first alternates), so a burst
    of other work on the machine falls on both sides alike; the ratio of each round's
    two rates, and the server's CPU (all its threads) per API write. Beside them, in the
    same rounds, as many authenticated requests that write nothing (`api_round_trips`):
    `ceiling` is the ratio an API write would reach if it cost that round trip plus the
    store's own write and nothing else (store time / (store time + round trip time)),
    the most any work on the write's own path could bring the ratio to. The same writes
    and round trips through `LeanClient`, in the same rounds, give `lean`: the ratio
    and the ceiling with the least a client can cost."""
    per = max(1, count // rounds)
    direct_s = api_s = trip_s = lean_s = lean_trip_s = server_cpu = 0.0
    direct_commit_s = lean_commit_s = 0.0
    direct_commits = lean_commits = 0
    ratios: list[float] = []
    ceilings: list[float] = []
    lean_ratios: list[float] = []
    lean_ceilings: list[float] = []
    sides = ("store", "api", "trip", "lean", "lean_trip")
    for r in range(rounds):
        d = a = t = la = lt = 0.0
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "store":
                before_n, before_s = store.commits.count, store.commits.seconds
                d = await store_writes(store, per, prefix=f"{tag}{r}-")
                direct_commits += store.commits.count - before_n
                direct_commit_s += store.commits.seconds - before_s
            elif side == "trip":
                t = await api_round_trips(session, url, per)
            elif side == "lean":
                before_n, before_s = await server_commits(session, url)
                la = lean_writes(lean, per)
                after_n, after_s = await server_commits(session, url)
                lean_commits += after_n - before_n
                lean_commit_s += after_s - before_s
            elif side == "lean_trip":
                lt = lean_round_trips(lean, per)
            else:
                before = cpu_s(pid)
                a = await api_writes(session, url, per)
                server_cpu += cpu_s(pid) - before
        direct_s, api_s, trip_s = direct_s + d, api_s + a, trip_s + t
        lean_s, lean_trip_s = lean_s + la, lean_trip_s + lt
        ratios.append(d / a)
        ceilings.append(d / (d + t))
        lean_ratios.append(d / la)
        lean_ceilings.append(d / (d + lt))
    n = rounds * per
    return {"store_per_s": n / direct_s, "api_per_s": n / api_s,
            "round_trips_per_s": n / trip_s,
            "ratio": {**spread(ratios), "rounds": rounds, "writes_per_round": per},
            "ceiling": spread(ceilings),
            "server_cpu_ms_per_write": 1000 * server_cpu / n,
            # The store's own commit (BEGIN to the durable COMMIT; etcd's txn request)
            # per write, straight and inside the server: what of a write is the commit.
            "store_commit_ms": 1000 * direct_commit_s / max(1, direct_commits),
            "lean": {"api_per_s": n / lean_s, "round_trips_per_s": n / lean_trip_s,
                     "ratio": spread(lean_ratios), "ceiling": spread(lean_ceilings),
                     "write_ms": 1000 * lean_s / n,
                     "server_commit_ms": 1000 * lean_commit_s / max(1, lean_commits),
                     "commits_per_write": lean_commits / n}}


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of per-round figures."""
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


def client_writes(url: str, tmp: Path, count: int) -> float:
    """Writes per second through the project's own client (`bulkhead.client`, what the
    CLI uses; the collection's modules work the same way through
    `ansible.module_utils.urls`): one request per HTTPS connection, head and body in one
    write, one at a time."""
    from bulkhead.client import Connection

    conn = Connection(server=url, ca=str(tmp / "ca.crt"), cert=str(tmp / "bench-admin.crt"),
                      key=str(tmp / "bench-admin.key"))
    start = time.perf_counter()
    for i in range(count):
        conn.request("POST", "/v1/resources/GlobalNetworkSet",
                     netset(f"cli{i}-{time.time_ns()}"))
    return count / (time.perf_counter() - start)


async def store_writes_concurrent(store: Any, count: int, writers: int) -> float:
    """`count` one-resource transactions from `writers` tasks at once."""
    async def writer(w: int) -> None:
        for i in range(w, count, writers):
            await store.transaction([Op("put", "GlobalNetworkSet", f"c{i}",
                                        netset(f"c{i}"))])
    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return count / (time.perf_counter() - start)


async def api_writes_concurrent(ssl_context: ssl.SSLContext, url: str, count: int,
                                writers: int) -> float:
    """`count` creates from `writers` clients at once, each on a connection of its own
    (opened before the clock starts)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def warm() -> None:
            async with session.get(url + "/healthz") as r:
                await r.read()
        await asyncio.gather(*(warm() for _ in range(writers)))

        async def writer(w: int) -> None:
            for i in range(w, count, writers):
                async with session.post(url + "/v1/resources/GlobalNetworkSet",
                                        json=netset(f"apic{i}-{time.time_ns()}")) as r:
                    assert r.status == 201, await r.text()
        start = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        return count / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ watching
async def watchers_latency(url: str, agent_ssl: ssl.SSLContext, admin: aiohttp.ClientSession,
                           n: int, changes: int, pid: int | None, stream: bool
                           ) -> dict[str, float]:
    connector = aiohttp.TCPConnector(ssl=agent_ssl, limit=0)
    latencies: list[float] = []
    written: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url + "/v1/snapshot") as r:
            start_rev = (await r.json())["revision"]
        rss_idle = rss_kib(pid) if pid else 0
        counts = [0] * n
        seen: list[set[str]] = [set() for _ in range(n)]
        connected = asyncio.Event()
        waiting = [0]

        def take(i: int, body: dict[str, Any]) -> None:
            """The changes an answer brings agent i: its events, or, when the server
            answers a snapshot (the agent's revision left its window, as after a resync),
            the changes the snapshot holds (an agent takes the whole state then)."""
            now = time.perf_counter()
            if body.get("type") == "snapshot":
                names = {d.get("metadata", {}).get("name") for d in body.get("items", [])}
            else:
                names = {e.get("name") for e in body.get("events", [])}
            for name in names & written.keys() - seen[i]:
                seen[i].add(name)
                latencies.append(now - written[name])
            counts[i] = len(seen[i])

        async def poll_agent(i: int) -> None:
            revision = start_rev
            while counts[i] < changes:
                waiting[0] += 1
                if waiting[0] >= n:
                    connected.set()
                async with session.get(url + "/v1/watch", params={
                        "revision": str(revision), "timeout": "60"}) as r:
                    body = await r.json()
                waiting[0] -= 1
                take(i, body)
                revision = body["revision"]

        async def stream_agent(i: int) -> None:
            async with session.get(url + "/v1/watch", params={
                    "revision": str(start_rev), "timeout": "60", "stream": "true"}) as r:
                waiting[0] += 1
                if waiting[0] >= n:
                    connected.set()
                while counts[i] < changes:
                    take(i, json.loads(await r.content.readline()))

        agent = stream_agent if stream else poll_agent
        tasks = [asyncio.create_task(agent(i)) for i in range(n)]
        await asyncio.wait_for(connected.wait(), 120)
        await asyncio.sleep(1.0)  # let every request reach the server and wait
        rss_busy = rss_kib(pid) if pid else 0
        for c in range(changes):
            name = f"change{time.time_ns()}-{c}"
            written[name] = time.perf_counter()
            async with admin.post(url + "/v1/resources/GlobalNetworkSet",
                                  json=netset(name)) as r:
                assert r.status == 201
            await all_saw(counts, c, name)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return {"p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99),
            "all_ms": 1000 * max(latencies),
            "rss_per_watcher_kib": (rss_busy - rss_idle) / n if pid else 0.0}


async def all_saw(counts: list[int], change: int, name: str) -> None:
    """Until every watcher has seen `change` (its count past it), at most SEEN_TIMEOUT
    seconds: a watcher that misses an event fails the run, naming it, never hangs it."""
    deadline = time.monotonic() + SEEN_TIMEOUT
    while sum(1 for x in counts if x > change) < len(counts):
        if time.monotonic() > deadline:
            behind = [i for i, x in enumerate(counts) if x <= change]
            raise RuntimeError(f"watchers {behind[:10]} (of {len(counts)}) did not see change "
                               f"{change} ({name}) within {SEEN_TIMEOUT:g} s")
        await asyncio.sleep(0.005)


async def direct_etcd_latency(endpoint: str, prefix: str, n: int, changes: int
                              ) -> dict[str, float]:
    """N watchers each with its own etcd watch stream (what agents would do without a hub)."""
    writer = EtcdStore([endpoint], prefix=prefix)
    start = await writer.revision()
    latencies: list[float] = []
    written: dict[str, float] = {}
    counts = [0] * n
    stores = [EtcdStore([endpoint], prefix=prefix) for _ in range(n)]

    async def watch(i: int) -> None:
        async for event in stores[i].watch(start):
            latencies.append(time.perf_counter() - written[event.name])
            counts[i] += 1
            if counts[i] == changes:
                return

    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    await asyncio.sleep(2.0)  # every stream open
    for c in range(changes):
        name = f"direct{c}"
        written[name] = time.perf_counter()
        await writer.transaction([Op("put", "GlobalNetworkSet", name, netset(name))])
        await all_saw(counts, c, name)
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for s in [writer, *stores]:
        await s.close()
    return {"p50_ms": 1000 * pct(latencies, 50), "p99_ms": 1000 * pct(latencies, 99),
            "all_ms": 1000 * max(latencies)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"watchers": args.watchers, "changes": args.changes,
                               "event_loop": args.event_loop}
    with tempfile.TemporaryDirectory(prefix="bulkhead-bench-") as tmp_name:
        tmp = Path(tmp_name)
        pki.init_ca(tmp)
        pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
        etcd = EtcdProcess(tmp)
        servers: list[Server] = []
        try:
            results["load_start"] = os.getloadavg()
            # 1. writes straight to the stores, many writers at once (one writer: below,
            # in turns with the API's)
            sqlite = SQLiteStore(tmp / "direct.db")
            results["store_writes_concurrent_per_s"] = {
                "sqlite": await store_writes_concurrent(sqlite, args.writes, args.writers)}
            await sqlite.close()
            etcd_store = EtcdStore([etcd.url], prefix="/direct/")
            results["store_writes_concurrent_per_s"]["etcd"] = await store_writes_concurrent(
                etcd_store, args.writes, args.writers)
            await etcd_store.close()

            admin_ssl = client_ssl(tmp, "bench-admin", "admin")
            agent_ssl = client_ssl(tmp, "bench-agent", "agent")
            results["store_writes_per_s"] = {}
            results["api_writes_per_s"] = {}
            results["one_writer"] = {}
            results["api_writes_client_per_s"] = {}
            results["api_writes_concurrent_per_s"] = {}
            results["writers"] = args.writers
            results["watch"] = {}
            for backend, datastore in (("sqlite", f"sqlite://{tmp}/server.db"),
                                       ("etcd", f"etcd://127.0.0.1:{etcd.client_port}/srv")):
                for mode in ("poll", "stream"):
                    # A fresh server per mode, so its memory figure is its own.
                    server = Server(tmp, datastore, f"{backend}-{mode}", args.server_logs,
                                    args.event_loop)
                    servers.append(server)
                    async with aiohttp.ClientSession(
                            connector=aiohttp.TCPConnector(ssl=admin_ssl)) as admin:
                        await wait_ready(admin, server.url)
                        if mode == "poll":
                            direct: Any = SQLiteStore(tmp / "direct.db") \
                                if backend == "sqlite" else \
                                EtcdStore([etcd.url], prefix="/direct/")
                            results.setdefault("server_event_loop", {})[backend] = \
                                await server_loop(admin, server.url)
                            lean = LeanClient(server.url, admin_ssl)
                            try:
                                one = await one_writer(direct, admin, server.url,
                                                       server.proc.pid, args.writes,
                                                       args.rounds, "w", lean)
                            finally:
                                lean.close()
                            await direct.close()
                            results["one_writer"][backend] = one
                            results["store_writes_per_s"][backend] = one["store_per_s"]
                            results["api_writes_per_s"][backend] = one["api_per_s"]
                            results["api_writes_client_per_s"][backend] = \
                                await asyncio.to_thread(client_writes, server.url, tmp,
                                                        args.client_writes)
                            results["api_writes_concurrent_per_s"][backend] = \
                                await api_writes_concurrent(admin_ssl, server.url,
                                                            args.writes, args.writers)
                        results["watch"][f"{backend}-{mode}"] = await watchers_latency(
                            server.url, agent_ssl, admin, args.watchers, args.changes,
                            server.proc.pid, stream=mode == "stream")
                    server.stop()
            direct = await direct_etcd_latency(etcd.url, "/srv/", args.watchers, args.changes)
            via = results["watch"]["etcd-stream"]
            results["fanout"] = {
                "direct_etcd": direct,
                "through_server": {k: via[k] for k in ("p50_ms", "p99_ms", "all_ms")},
                "p99_direct_over_server": direct["p99_ms"] / via["p99_ms"],
                "etcd_watch_streams": {"direct": args.watchers, "through_server": 1}}
        finally:
            for s in servers:
                s.stop()
            etcd.stop()
    results["load_end"] = os.getloadavg()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--writers", type=int, default=16,
                        help="writers at once for the concurrent write figures")
    parser.add_argument("--rounds", type=int, default=10,
                        help="one writer: rounds of --writes/--rounds writes straight to "
                             "the store and as many through the API, in turns")
    parser.add_argument("--client-writes", type=int, default=100,
                        help="writes through the project's own client (a connection each)")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS,
                        default="auto", help="the servers' eventLoop (default: auto, as "
                        "a server's config has it)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--server-logs", type=Path, metavar="DIR",
                        help="keep each server's log (level info) in DIR")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    w, a = results["store_writes_per_s"], results["api_writes_per_s"]
    print(f"writes/s      store: sqlite {w['sqlite']:.0f}, etcd {w['etcd']:.0f};  "
          f"HTTPS API: sqlite {a['sqlite']:.0f}, etcd {a['etcd']:.0f}  (one writer, in "
          f"turns)")
    for backend, one in results["one_writer"].items():
        r = one["ratio"]
        print(f"              {backend}: API / store {r['median']:.2f} (median of "
              f"{r['rounds']} rounds, {r['min']:.2f}-{r['max']:.2f}; goal >= 0.5; a write "
              f"costing a no-write round trip ({one['round_trips_per_s']:.0f}/s) plus the "
              f"store's write would reach {one['ceiling']['median']:.2f}); server "
              f"CPU {one['server_cpu_ms_per_write']:.2f} ms per API write; the project's "
              f"client (a connection per write) "
              f"{results['api_writes_client_per_s'][backend]:.0f}/s")
        lean = one["lean"]
        print(f"              {backend}, lean client: API / store {lean['ratio']['median']:.2f} "
              f"({lean['api_per_s']:.0f}/s; ceiling {lean['ceiling']['median']:.2f}, "
              f"round trips {lean['round_trips_per_s']:.0f}/s); a write "
              f"{lean['write_ms']:.2f} ms, its commit in the server "
              f"{lean['server_commit_ms']:.2f} ms, straight to the store "
              f"{one['store_commit_ms']:.2f} ms")
    w, a = results["store_writes_concurrent_per_s"], results["api_writes_concurrent_per_s"]
    print(f"writes/s      store: sqlite {w['sqlite']:.0f}, etcd {w['etcd']:.0f};  "
          f"HTTPS API: sqlite {a['sqlite']:.0f}, etcd {a['etcd']:.0f}  "
          f"({args.writers} writers at once)")
    for backend, r in results["watch"].items():
        print(f"watch {backend:<12} {args.watchers} watchers x {args.changes} changes: "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, all reached in "
              f"{r['all_ms']:.1f} ms; {r['rss_per_watcher_kib']:.1f} KiB RSS per watcher")
    f = results["fanout"]
    print(f"fan-out       direct etcd watches p99 {f['direct_etcd']['p99_ms']:.1f} ms "
          f"({args.watchers} etcd streams) vs through the server p99 "
          f"{f['through_server']['p99_ms']:.1f} ms (1 stream): ratio "
          f"{f['p99_direct_over_server']:.2f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
