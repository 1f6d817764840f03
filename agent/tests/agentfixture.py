"""What the agent's tests share: a recording enforcer at the enforcer seam, a config for
an agent of node web-1, the agent run as a task, and waits on its state and the server's
view of it (polls with a deadline, never a fixed sleep)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bulkhead import pki
from bulkhead.agent.config import AgentConfig
from bulkhead.agent.daemon import Agent
from bulkhead.agent.enforcer import EnforceError, EnforceReport
from bulkhead.model import Snapshot
from tests.conftest import Server

NODE = "web-1"


class Recorder:
    """An Enforcer that records what reaches it (called from the agent's worker thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []
        self.fail: str | None = None
        self.drift_reason: str | None = None
        self.unenforced: list[str] = []   # what the "plan" leaves out, in every report
        self.repairs = 0
        self.dry_runs = 0
        self.applied: tuple[int, list[str]] | None = None
        self.collector: list[bool] = []   # gc.isenabled() in each enforce
        self.lock = threading.Lock()

    def _report(self, revision: int, names: list[str]) -> EnforceReport:
        return EnforceReport(revision, full=True, changed=True, seconds=0.25,
                             counts={"chains": len(names), "rules": 2 * len(names),
                                     "sets": 1, "elements": 3},
                             warnings=list(self.unenforced), unenforced=list(self.unenforced))

    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[tuple[str, str]] | None = None) -> EnforceReport:
        names = sorted(snapshot.policies)
        with self.lock:
            self.collector.append(gc.isenabled())
            self.calls.append((revision, names))
            if self.fail:
                raise EnforceError(self.fail)
            self.applied = (revision, names)
        return self._report(revision, names)

    def drift(self) -> str | None:
        return self.drift_reason

    def repair(self) -> EnforceReport:
        assert self.applied is not None
        self.repairs += 1
        self.drift_reason = None
        return self._report(*self.applied)

    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]:
        self.dry_runs += 1
        if self.fail:
            raise EnforceError(self.fail)
        names = sorted(snapshot.policies)
        return ("table inet bulkhead {\n" + "".join(f"  chain gnp-{n} {{\n  }}\n"
                                                  for n in names) + "}\n",
                "".join(f"+chain gnp-{n}\n" for n in names))


def gnp(name: str, tier: str = "default") -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"tier": tier, "order": 10, "selector": "app == 'web'",
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "destination": {"ports": [443]}}]}}


def config_for(url: str, pki_dir: Path, state: Path, **kw: Any) -> AgentConfig:
    crt, key = pki.issue(pki_dir, NODE, role="agent")
    values: dict[str, Any] = {
        "server": url, "node": NODE, "ca": str(pki_dir / "ca.crt"), "cert": str(crt),
        "key": str(key), "state_dir": str(state), "metrics_listen": "",
        "drift_interval": 60.0, "status_interval": 60.0, "heartbeat_interval": 0.3}
    values.update(kw)
    return AgentConfig(**values)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


Started = tuple[aiohttp.ClientSession, aiohttp.ClientSession, Recorder, Agent, int]


@contextlib.asynccontextmanager
async def started_after_a(server: Server, tmp_path: Path, **config: Any
                          ) -> AsyncIterator[Started]:
    """Policy a in the store, then an agent with a recorder running against the server:
    (admin session, viewer session, recorder, agent, revision of a)."""
    rec = Recorder()
    async with server.client("alice", "admin") as admin, \
            server.client("val", "viewer") as viewer:
        rev_a = await create(admin, gnp("a"))
        agent = Agent(config_for(server.url, server.pki, tmp_path / "state", **config), rec)
        async with running(agent):
            yield admin, viewer, rec, agent, rev_a


async def create(admin: aiohttp.ClientSession, doc: dict[str, Any]) -> int:
    async with admin.post(f"/v1/resources/{doc['kind']}", json=doc) as r:
        assert r.status == 201, await r.text()
        return int((await r.json())["metadata"]["resourceVersion"])


async def node_status(viewer: aiohttp.ClientSession) -> dict[str, Any]:
    async with viewer.get("/v1/nodes") as r:
        nodes: dict[str, dict[str, Any]] = {n["node"]: n for n in (await r.json())["nodes"]}
    return nodes.get(NODE, {})


async def wait_status(viewer: aiohttp.ClientSession, cond: Callable[[dict[str, Any]], bool],
                      what: str, timeout: float = 10.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await node_status(viewer)
        if status and cond(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for status {what}: {status}")
        await asyncio.sleep(0.05)


def make_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    directory.mkdir()
    pki.init_ca(directory)
    return directory



def retries(caplog: pytest.LogCaptureFixture) -> int:
    """How often the agent has said it cannot reach the server (it says so on the first,
    the second and every tenth attempt in a row)."""
    return sum(1 for r in caplog.records if r.getMessage() == "cannot reach the server; retrying")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() installs the JSON log handler on the root logger; put pytest's back.
    Autouse in the test modules that import it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
