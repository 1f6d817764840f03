"""Soak: streaming watchers, writes and status reports against one server for a long time.

    .venv/bin/python agent/benchmarks/soak.py                      # 1,000 watchers, 10 min
    .venv/bin/python agent/benchmarks/soak.py --watchers 100 --duration 60 --json
    .venv/bin/python agent/benchmarks/soak.py --datastore etcd --max-rss-mib 600

Starts a `bulkhead-server` (and, with `--datastore etcd`, Debian's `etcd`) on 127.0.0.1
with real mutual TLS, then, in this one asyncio process:
- W streaming watchers (`/v1/watch?stream=true`), each its own TLS connection with an
  agent certificate, reconnecting from the revision they hold when a stream breaks;
- a writer: `POST /v1/apply` of GlobalNetworkSet and GlobalNetworkPolicy updates at a
  steady rate, some bodies with several documents;
- N nodes posting `/v1/status/NODE` every `--status-interval` seconds, each with its own
  agent certificate (CN = the node);
- a sampler every `--sample-interval` seconds: server RSS (VmRSS) and open descriptors,
  datastore size on disk (SQLite file + WAL, or etcd's data folder), watchers connected,
  lag (revisions each watcher is behind the last acknowledged write), errors.
At the end the writer and reporters stop, one last write is made, and every watcher must
reach its revision (convergence). Exit status 1 if a watcher does not, if the server dies,
if there were more errors than `--max-errors` (default 0: a failed write, status post or
broken stream fails the run), or above `--max-rss-mib` / `--max-store-mib`.

The server gets the open-file limit this process started with (`--server-nofile` to set
another soft limit); this process raises its own soft limit to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bulkhead import pki
from bulkhead.agent.sync import lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # agent/, for tests.procs
from tests.procs import free_port, stop

V3 = "projectcalico.org/v3"
MIB = 1024 * 1024
MAX_IN_FLIGHT = 16  # writes waiting for their answer at once
HIST_MS = 120_000   # delivery latency histogram: one bucket per ms, the last one catches all


# ----------------------------------------------------------------------------- processes
class Process:
    """A child process with its output in a log file; stopped by `stop`, whatever state."""

    def __init__(self, argv: list[str], log: Path,
                 preexec: Callable[[], None] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        self.pid = self.proc.pid

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, wait: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `wait` seconds."""
        stop(self.proc, grace=wait)
        self._log.close()


def start_etcd(tmp: Path) -> tuple[Process, str, Path]:
    """Debian's etcd on two free ports; its client URL and data folder."""
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    data = tmp / "etcd-data"
    etcd = Process(["etcd", "--name", "bulkhead-soak", "--data-dir", str(data),
                    "--listen-client-urls", url, "--advertise-client-urls", url,
                    "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"bulkhead-soak={peer_url}", "--log-level", "warn"],
                   tmp / "etcd.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if etcd.proc.poll() is not None:
            raise RuntimeError(f"etcd exited: {etcd.tail()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return etcd, url, data
        except OSError:
            time.sleep(0.1)
    etcd.stop()
    raise RuntimeError("etcd did not become healthy within 30 s")


def start_server(tmp: Path, datastore: str, nofile: int,
                 extra: dict[str, Any] | None = None) -> tuple[Process, str]:
    port = free_port()
    config = tmp / "server.yaml"
    config.write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "datastore": datastore,
        "tlsCert": str(tmp / "server.crt"), "tlsKey": str(tmp / "server.key"),
        "clientCA": str(tmp / "ca.crt"), "logLevel": "warning",
        "flowLogs": {"path": str(tmp / "flows.sqlite")},   # not /var/lib/bulkhead
        **(extra or {})}))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def limit() -> None:  # in the child, before exec: the limit a service would start with
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    server = Process([sys.executable, "-m", "bulkhead.server.main", "--config", str(config)],
                     tmp / "server.log", preexec=limit)
    return server, f"https://127.0.0.1:{port}"


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile_limit(pid: int) -> int:
    """The soft open-file limit the process runs with now (it may have raised its own)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store_mib(paths: list[Path]) -> float:
    """Bytes on disk under `paths` (files, or folders walked), in MiB."""
    total = 0
    for path in paths:
        if path.is_dir():
            for root, _, files in os.walk(path):
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(root, name)).st_size
        elif path.exists():
            total += path.stat().st_size
    return total / MIB


def raise_own_nofile() -> tuple[int, int]:
    """Raise this process's soft open-file limit to the hard one; the limits before."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


# ------------------------------------------------------------------------------- the load
def netset(j: int, seq: int) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": "GlobalNetworkSet",
            "metadata": {"name": f"soak-set-{j}",
                         "labels": {"soak-set": str(j), "soak-seq": str(seq)}},
            "spec": {"nets": [f"10.{(seq >> 8) & 255}.{seq & 255}.0/24",
                              f"198.18.{j % 256}.0/24"]}}


def policy(j: int, seq: int) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": "GlobalNetworkPolicy",
            "metadata": {"name": f"soak-policy-{j}", "labels": {"soak-seq": str(seq)}},
            "spec": {"selector": f"app == 'soak{j % 20}'", "order": j,
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"selector": f"soak-set == '{j}'"},
                                  "destination": {"ports": [1024 + seq % 60000]}}]}}


def write_body(rng: random.Random, objects: int, seq: int, busy: set[tuple[str, int]]
               ) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """One apply body: 1 document (60%), 2 (30%) or 3 (10%), distinct objects, none of
    them in `busy` (being written by a request in flight: it would conflict)."""
    count = rng.choices((1, 2, 3), weights=(6, 3, 1))[0]
    free = [(kind, j) for kind in ("set", "policy") for j in range(objects)
            if (kind, j) not in busy]
    picks = rng.sample(free, min(count, len(free)))
    return [netset(j, seq) if kind == "set" else policy(j, seq) for kind, j in picks], picks


def percentile(values: list[int] | list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))])


def hist_percentile(hist: list[int], p: float) -> float:
    total = sum(hist)
    if total == 0:
        return 0.0
    want = p / 100 * total
    seen = 0
    for ms, count in enumerate(hist):
        seen += count
        if seen >= want:
            return float(ms)
    return float(len(hist) - 1)


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    store_mib: float
    connected: int
    server_watchers: int
    revision: int
    lag_max: int
    writes: int
    status_posts: int
    events: int
    errors: int


@dataclass
class Soak:
    """Everything the tasks share; one event loop, so no locks."""

    args: argparse.Namespace
    url: str
    server: Process
    store_paths: list[Path]
    rng: random.Random = field(default_factory=lambda: random.Random(15))
    revisions: list[int] = field(default_factory=list)
    connected: list[bool] = field(default_factory=list)
    reconnects: int = 0
    snapshots: int = 0
    events: int = 0
    lines: int = 0
    latency_hist: list[int] = field(default_factory=lambda: [0] * (HIST_MS + 1))
    sent: dict[int, float] = field(default_factory=dict)    # write seq -> time sent
    seq: int = 0
    writes_ok: int = 0
    writes_failed: int = 0
    writes_skipped: int = 0
    write_ms: list[float] = field(default_factory=list)
    documents: int = 0
    last_write_revision: int = 0
    status_ok: int = 0
    status_failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    lags: list[int] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False

    def error(self, what: str, detail: str) -> None:
        self.errors[what] += 1
        if len(self.first_errors) < 20:
            self.first_errors.append(f"{time.monotonic() - self.started:.1f}s {what}: "
                                     f"{detail[:300]}")

    # -- watchers ---------------------------------------------------------------------
    def _line(self, i: int, raw: bytes) -> None:
        message = json.loads(raw)
        self.lines += 1
        kind = message.get("type")
        if kind == "snapshot":
            self.snapshots += 1
        elif kind == "events":
            now = time.perf_counter()
            seqs = set()
            for event in message["events"]:
                self.events += 1
                labels = (event.get("object") or {}).get("metadata", {}).get("labels", {})
                if "soak-seq" in labels:
                    seqs.add(int(labels["soak-seq"]))
            for seq in seqs:
                if seq in self.sent:
                    ms = int(1000 * (now - self.sent[seq]))
                    self.latency_hist[min(ms, HIST_MS)] += 1
        elif kind != "heartbeat":
            raise ValueError(f"unknown watch line type {kind!r}")
        self.revisions[i] = max(self.revisions[i], int(message["revision"]))

    async def watcher(self, i: int, session: aiohttp.ClientSession,
                      connecting: asyncio.Semaphore) -> None:
        heartbeat = self.args.heartbeat
        timeout = aiohttp.ClientTimeout(total=None, connect=30, sock_read=3 * heartbeat + 1)
        first = True
        while not self.stopping:
            if not first:
                self.reconnects += 1
            first = False
            params = {"stream": "true", "timeout": str(heartbeat)}
            if self.revisions[i] >= 0:
                params["revision"] = str(self.revisions[i])
            try:
                async with connecting:   # a bounded number of TLS handshakes at once
                    resp = await session.get(self.url + "/v1/watch", params=params,
                                             timeout=timeout)
                async with resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(
                            resp.request_info, (), status=resp.status,
                            message=(await resp.text())[:200])
                    async for line in lines(resp.content.iter_any()):
                        self._line(i, line)
                        self.connected[i] = True
                    if not self.stopping:
                        self.error("watch", "the server closed the stream")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as e:
                if not self.stopping:
                    self.error(f"watch {type(e).__name__}", str(e) or repr(e))
            self.connected[i] = False
            if not self.stopping:
                await asyncio.sleep(0.5 + self.rng.random())

    # -- writer and status reporters ---------------------------------------------------
    async def apply(self, session: aiohttp.ClientSession, docs: list[dict[str, Any]],
                    seq: int, counted: bool = True) -> int | None:
        """POST /v1/apply; its revision, or None on an error. `counted`: a load write
        (the seed and the final write are not counted)."""
        self.sent[seq] = sent = time.perf_counter()
        try:
            async with session.post(self.url + "/v1/apply", data=json.dumps(docs),
                                    timeout=aiohttp.ClientTimeout(total=30)) as r:
                body = await r.text()
                if r.status != 200:
                    self.writes_failed += 1
                    self.error(f"write HTTP {r.status}", body)
                    return None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.writes_failed += 1
            self.error(f"write {type(e).__name__}", str(e) or repr(e))
            return None
        if counted:
            self.write_ms.append(1000 * (time.perf_counter() - sent))
            self.writes_ok += 1
            self.documents += len(docs)
        revision = json.loads(body)["revision"]
        self.last_write_revision = max(self.last_write_revision, int(revision))
        return int(revision)

    async def writer(self, session: aiohttp.ClientSession, until: float) -> None:
        """A write every 1/rate seconds, each sent on time whether or not the previous one
        was answered (the offered load holds when the server slows down), at most
        MAX_IN_FLIGHT at once (a slot is skipped, and counted, beyond that); then waits
        for the writes in flight."""
        interval = 1.0 / self.args.write_rate
        in_flight: set[asyncio.Task[None]] = set()
        busy: set[tuple[str, int]] = set()

        async def write(docs: list[dict[str, Any]], seq: int,
                        picks: list[tuple[str, int]]) -> None:
            try:
                await self.apply(session, docs, seq)
            finally:
                busy.difference_update(picks)

        next_at = time.monotonic()
        while not self.stopping and next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            if len(in_flight) >= MAX_IN_FLIGHT:
                self.writes_skipped += 1
                continue
            self.seq += 1
            docs, picks = write_body(self.rng, self.args.objects, self.seq, busy)
            busy.update(picks)
            task = asyncio.create_task(write(docs, self.seq, picks))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=60)

    async def reporter(self, k: int, node: str, session: aiohttp.ClientSession,
                       until: float) -> None:
        interval = self.args.status_interval
        await asyncio.sleep(self.rng.random() * interval)   # agents do not report in step
        reports = 0
        while not self.stopping and time.monotonic() < until:
            reports += 1
            applied = self.revisions[k] if k < len(self.revisions) else self.last_write_revision
            body = {"appliedRevision": max(applied, 0), "errors": [],
                    "counters": {"soakReports": reports}}
            try:
                async with session.post(f"{self.url}/v1/status/{node}", json=body,
                                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                    text = await r.text()
                    if r.status == 200:
                        self.status_ok += 1
                    else:
                        self.status_failed += 1
                        self.error(f"status HTTP {r.status}", text)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                self.status_failed += 1
                self.error(f"status {type(e).__name__}", str(e) or repr(e))
            await asyncio.sleep(interval)

    # -- sampling ---------------------------------------------------------------------
    async def server_metrics(self, admin: aiohttp.ClientSession) -> dict[str, int]:
        try:
            async with admin.get(self.url + "/metrics",
                                 timeout=aiohttp.ClientTimeout(total=10)) as r:
                text = await r.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.error(f"metrics {type(e).__name__}", str(e) or repr(e))
            return {}
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("bulkhead_revision", "bulkhead_watchers"):
                out[name] = int(float(value))
        return out

    async def sample(self, admin: aiohttp.ClientSession, keep_lags: bool = True) -> Sample:
        metrics = await self.server_metrics(admin)
        lags = [max(0, self.last_write_revision - r) for r in self.revisions]
        if keep_lags and self.last_write_revision:
            self.lags.extend(lags)
        s = Sample(t=time.monotonic() - self.started, rss_mib=rss_mib(self.server.pid),
                   fds=open_fds(self.server.pid), store_mib=store_mib(self.store_paths),
                   connected=sum(self.connected),
                   server_watchers=metrics.get("bulkhead_watchers", -1),
                   revision=metrics.get("bulkhead_revision", -1),
                   lag_max=max(lags, default=0), writes=self.writes_ok,
                   status_posts=self.status_ok, events=self.events,
                   errors=sum(self.errors.values()))
        self.samples.append(s)
        return s

    async def sampler(self, admin: aiohttp.ClientSession, until: float,
                      out: Callable[[str], None]) -> None:
        while not self.stopping and time.monotonic() < until:
            await asyncio.sleep(min(self.args.sample_interval,
                                    max(0.0, until - time.monotonic())))
            if self.server.proc.poll() is not None:
                return
            out(row(await self.sample(admin)))


HEADER = (f"{'t s':>6} {'RSS MiB':>8} {'fds':>5} {'store MiB':>9} {'watching':>8} "
          f"{'srv':>5} {'revision':>8} {'lag':>5} {'writes':>6} {'status':>6} "
          f"{'events':>9} {'errors':>6}")


def row(s: Sample) -> str:
    return (f"{s.t:6.0f} {s.rss_mib:8.1f} {s.fds:5d} {s.store_mib:9.2f} {s.connected:8d} "
            f"{s.server_watchers:5d} {s.revision:8d} {s.lag_max:5d} {s.writes:6d} "
            f"{s.status_posts:6d} {s.events:9d} {s.errors:6d}")


def client_ssl(tmp: Path, name: str, role: str) -> ssl.SSLContext:
    crt, key = pki.issue(tmp, name, role=role)
    ctx = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    ctx.load_cert_chain(crt, key)
    return ctx


async def wait_ready(admin: aiohttp.ClientSession, url: str, server: Process) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"bulkhead-server exited: {server.tail()}")
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with admin.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"bulkhead-server not ready within 60 s: {server.tail()}")


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=30)


# ------------------------------------------------------------------------------------ run
async def soak(args: argparse.Namespace, tmp: Path, server: Process, url: str,
               store_paths: list[Path], server_nofile: int) -> dict[str, Any]:
    out: Callable[[str], None] = (lambda text: print(text, file=sys.stderr, flush=True)) \
        if args.json else (lambda text: print(text, flush=True))
    admin_ssl = client_ssl(tmp, "soak-admin", "admin")
    nodes = [f"soak-node-{k:04d}" for k in range(args.nodes)]
    sessions: list[aiohttp.ClientSession] = []
    tasks: list[asyncio.Task[None]] = []
    state = Soak(args, url, server, store_paths)
    state.revisions = [-1] * args.watchers
    state.connected = [False] * args.watchers
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=admin_ssl))
    sessions.append(admin)
    try:
        await wait_ready(admin, url, server)
        result: dict[str, Any] = {"server_nofile_soft": nofile_limit(server.pid)}
        # Every object the writer will update exists before the watchers come (the
        # snapshot each watcher gets first is the fleet's, not an empty one).
        seed = [netset(j, 0) for j in range(args.objects)] + \
            [policy(j, 0) for j in range(args.objects)]
        if await state.apply(admin, seed, 0, counted=False) is None:
            raise RuntimeError(f"seeding the store failed: {state.first_errors}")
        rss_idle = rss_mib(server.pid)
        # One session per node: its certificate (CN = the node) for its watchers and its
        # status reports; each watch stream holds a connection of its own.
        for node in nodes:
            ctx = client_ssl(tmp, node, "agent")
            sessions.append(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=0)))
        node_sessions = sessions[1:]
        connecting = asyncio.Semaphore(64)
        connect_start = time.monotonic()
        tasks += [asyncio.create_task(state.watcher(i, node_sessions[i % len(nodes)],
                                                    connecting))
                  for i in range(args.watchers)]
        deadline = connect_start + args.connect_timeout
        while sum(state.connected) < args.watchers and time.monotonic() < deadline \
                and server.proc.poll() is None:
            await asyncio.sleep(0.1)
        connect_s = time.monotonic() - connect_start
        connected_start = sum(state.connected)
        out(f"{connected_start} of {args.watchers} watchers connected in {connect_s:.1f} s "
            f"(server open-file limit {result['server_nofile_soft']})")
        if connected_start < args.watchers:
            out("not every watcher connected: going on with those that did")
        await asyncio.sleep(1.0)
        out(HEADER)
        first = await state.sample(admin, keep_lags=False)
        out(row(first))
        cpu_start, own_cpu_start = cpu_seconds(server.pid), time.process_time()
        load_start = os.getloadavg()[0]
        phase_start = time.monotonic()
        until = phase_start + args.duration
        load = [asyncio.create_task(state.writer(admin, until))]
        load += [asyncio.create_task(state.reporter(k, node, node_sessions[k], until))
                 for k, node in enumerate(nodes)]
        sampler = asyncio.create_task(state.sampler(admin, until, out))
        while time.monotonic() < until and server.proc.poll() is None:
            await asyncio.sleep(0.2)
        # The writer finishes its writes in flight; status reports just stop.
        await cancel_all([*load[1:], sampler])
        await asyncio.wait(load[:1], timeout=90)
        await cancel_all(load[:1])
        server_died = server.proc.poll() is not None
        cpu_s = cpu_seconds(server.pid) - cpu_start
        own_cpu_s = time.process_time() - own_cpu_start
        load_end = os.getloadavg()[0]
        phase_s = time.monotonic() - phase_start
        # Convergence: one last write, nothing after it; every watcher must reach it.
        final_revision = None
        converged = 0
        converge_s = 0.0
        if not server_died:
            state.seq += 1
            final_revision = await state.apply(admin, [netset(0, state.seq)], state.seq,
                                               counted=False)
            converge_start = time.monotonic()
            while final_revision is not None and time.monotonic() < \
                    converge_start + args.converge_timeout and server.proc.poll() is None:
                converged = sum(r >= final_revision for r in state.revisions)
                if converged == args.watchers:
                    break
                await asyncio.sleep(0.05)
            converge_s = time.monotonic() - converge_start
        server_died = server.proc.poll() is not None
        last = await state.sample(admin, keep_lags=False) if not server_died else None
        if last is not None:
            out(row(last))
        nodes_reported = -1
        if not server_died:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with admin.get(url + "/v1/nodes",
                                     timeout=aiohttp.ClientTimeout(total=30)) as r:
                    nodes_reported = len((await r.json())["nodes"])
        state.stopping = True
        await cancel_all(tasks)
        tasks.clear()
        end = last or state.samples[-1]
        rss_values = [s.rss_mib for s in state.samples]
        store_values = [s.store_mib for s in state.samples]
        result.update({
            "datastore": args.datastore, "duration_s": round(phase_s, 1),
            "watchers": args.watchers, "nodes": args.nodes, "write_rate": args.write_rate,
            "status_interval_s": args.status_interval, "heartbeat_s": args.heartbeat,
            "objects": 2 * args.objects, "server_nofile_given": server_nofile,
            "server_died": server_died,
            "server_exit_code": server.proc.poll(),
            "rss_idle_mib": round(rss_idle, 1), "rss_start_mib": round(first.rss_mib, 1),
            "rss_end_mib": round(end.rss_mib, 1), "rss_max_mib": round(max(rss_values), 1),
            "store_start_mib": round(first.store_mib, 2),
            "store_end_mib": round(end.store_mib, 2),
            "store_max_mib": round(max(store_values), 2),
            "fds_start": first.fds, "fds_end": end.fds,
            "fds_max": max(s.fds for s in state.samples),
            "server_cpu_percent": round(100 * cpu_s / phase_s, 1),
            "client_cpu_percent": round(100 * own_cpu_s / phase_s, 1),
            "load_average_start": load_start, "load_average_end": load_end,
            "connect_s": round(connect_s, 1), "connected_start": connected_start,
            "connected_end": end.connected, "reconnects": state.reconnects,
            "snapshots": state.snapshots,
            "writes": state.writes_ok, "writes_failed": state.writes_failed,
            "writes_skipped": state.writes_skipped,
            "writes_per_s": round(state.writes_ok / phase_s, 2),
            "write_ms_p50": round(percentile(state.write_ms, 50), 1),
            "write_ms_p99": round(percentile(state.write_ms, 99), 1),
            "documents_written": state.documents,
            "status_posts": state.status_ok, "status_failed": state.status_failed,
            "nodes_reported": nodes_reported,
            "events_delivered": state.events, "lines_received": state.lines,
            "lag_revisions_p50": percentile(state.lags, 50),
            "lag_revisions_p99": percentile(state.lags, 99),
            "lag_revisions_max": max(state.lags, default=0),
            "delivery_ms_p50": hist_percentile(state.latency_hist, 50),
            "delivery_ms_p99": hist_percentile(state.latency_hist, 99),
            "delivery_ms_max": hist_percentile(state.latency_hist, 100),
            "final_revision": final_revision,
            "server_revision_end": end.revision,
            "converged": converged, "converge_s": round(converge_s, 2),
            "all_converged": final_revision is not None and converged == args.watchers,
            "errors": sum(state.errors.values()), "errors_by_kind": dict(state.errors),
            "first_errors": state.first_errors,
            "samples": [vars(s) | {"t": round(s.t, 1), "rss_mib": round(s.rss_mib, 1),
                                   "store_mib": round(s.store_mib, 3)}
                        for s in state.samples],
        })
        if server_died or result["errors"]:
            result["server_log_tail"] = server.tail()
        return result
    finally:
        state.stopping = True
        await cancel_all(tasks)
        for session in sessions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 10)


def check_bounds(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    failures = []
    if result["server_died"]:
        failures.append(f"the server exited (code {result['server_exit_code']})")
    if not result["all_converged"]:
        failures.append(f"{result['watchers'] - result['converged']} of {result['watchers']} "
                        f"watchers did not reach the final revision {result['final_revision']}")
    if result["errors"] > args.max_errors:
        failures.append(f"{result['errors']} errors (failed writes, status posts, watch "
                        f"streams) > --max-errors {args.max_errors}: {result['errors_by_kind']}")
    if args.max_rss_mib is not None and result["rss_max_mib"] > args.max_rss_mib:
        failures.append(f"server RSS {result['rss_max_mib']} MiB > --max-rss-mib "
                        f"{args.max_rss_mib}")
    if args.max_store_mib is not None and result["store_max_mib"] > args.max_store_mib:
        failures.append(f"datastore {result['store_max_mib']} MiB > --max-store-mib "
                        f"{args.max_store_mib}")
    return failures


async def run(args: argparse.Namespace, nofile_before: int) -> dict[str, Any]:
    server_nofile = args.server_nofile or nofile_before
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main_task is not None:
        loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    with tempfile.TemporaryDirectory(prefix="bulkhead-soak-") as tmp_name:
        tmp = Path(tmp_name)
        pki.init_ca(tmp)
        pki.issue(tmp, "server", server=True, hosts=("127.0.0.1",))
        etcd: Process | None = None
        server: Process | None = None
        try:
            if args.datastore == "etcd":
                etcd, etcd_url, etcd_data = start_etcd(tmp)
                datastore = f"etcd://{etcd_url.removeprefix('http://')}/soak"
                store_paths = [etcd_data]
            else:
                db = tmp / "soak.db"
                datastore = f"sqlite://{db}"
                store_paths = [db, Path(f"{db}-wal")]
            compaction = {k: v for k, v in (("compactionInterval", args.compaction_interval),
                                            ("compactionRetain", args.compaction_retain))
                          if v is not None}
            server, url = start_server(tmp, datastore, server_nofile, compaction)
            result = await soak(args, tmp, server, url, store_paths, server_nofile)
            if etcd is not None:
                result["etcd_rss_end_mib"] = round(rss_mib(etcd.pid), 1)
            # Every client is gone: how long the server takes to exit on SIGTERM.
            stopping = time.monotonic()
            server.stop(wait=args.heartbeat + 20)
            result["server_stop_s"] = round(time.monotonic() - stopping, 1)
            result["server_stop_code"] = server.proc.returncode
            return result
        finally:
            if server is not None:
                server.stop(wait=args.heartbeat + 20)
            if etcd is not None:
                etcd.stop()
            loop.remove_signal_handler(signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of writes and status reports (default 600)")
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--write-rate", type=float, default=5.0, help="applies per second")
    parser.add_argument("--nodes", type=int, default=100, help="nodes reporting status")
    parser.add_argument("--status-interval", type=float, default=10.0,
                        help="seconds between one node's status reports")
    parser.add_argument("--objects", type=int, default=50,
                        help="GlobalNetworkSets and as many GlobalNetworkPolicies updated")
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="the watch's timeout= (heartbeat seconds), as agents use")
    parser.add_argument("--datastore", choices=("sqlite", "etcd"), default="sqlite")
    parser.add_argument("--sample-interval", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to wait for every watcher's first line")
    parser.add_argument("--converge-timeout", type=float, default=60.0)
    parser.add_argument("--server-nofile", type=int, default=0,
                        help="the server's soft open-file limit (default: this process's "
                        "at start)")
    parser.add_argument("--max-rss-mib", type=float, help="fail above this server RSS")
    parser.add_argument("--max-store-mib", type=float, help="fail above this datastore size")
    parser.add_argument("--max-errors", type=int, default=0,
                        help="fail above this many errors (default 0)")
    parser.add_argument("--compaction-interval", type=float,
                        help="the server's compactionInterval (default: the server's, 300 s)")
    parser.add_argument("--compaction-retain", type=int,
                        help="the server's compactionRetain (default: the server's, 10,000)")
    parser.add_argument("--json", action="store_true",
                        help="the summary as JSON on stdout (the table goes to stderr)")
    args = parser.parse_args()
    if args.watchers < 1 or args.nodes < 1 or args.write_rate <= 0 or args.duration <= 0:
        parser.error("--watchers, --nodes, --write-rate and --duration must be positive")
    nofile_before, _ = raise_own_nofile()
    try:
        result = asyncio.run(run(args, nofile_before))
    except KeyboardInterrupt:
        print("interrupted; the server and temporary files are cleaned up", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("stopped; the server and temporary files are cleaned up", file=sys.stderr)
        return 143
    failures = check_bounds(args, result)
    result["failures"] = failures
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        summary = {k: v for k, v in result.items() if k != "samples"}
        print(f"server RSS MiB: idle {result['rss_idle_mib']}, start {result['rss_start_mib']}, "
              f"end {result['rss_end_mib']}, max {result['rss_max_mib']};  datastore MiB: "
              f"start {result['store_start_mib']}, end {result['store_end_mib']}")
        print(f"{result['writes']} writes ({result['documents_written']} documents), "
              f"{result['status_posts']} status posts, {result['events_delivered']} events "
              f"delivered; lag p50/p99 {result['lag_revisions_p50']:.0f}/"
              f"{result['lag_revisions_p99']:.0f} revisions, delivery p50/p99 "
              f"{result['delivery_ms_p50']:.0f}/{result['delivery_ms_p99']:.0f} ms; "
              f"{result['converged']}/{result['watchers']} converged; "
              f"{result['errors']} errors")
        print(json.dumps(summary, indent=2))
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
