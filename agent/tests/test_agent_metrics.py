"""bulkhead.agent.metrics: the agent's /metrics in Prometheus' text format."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from bulkhead.agent.daemon import Agent
from tests.agentfixture import Recorder, config_for, create, gnp, running, until
from tests.conftest import Server, free_port


async def test_metrics_endpoint(server: Server, tmp_path: Path) -> None:
    rec = Recorder()
    port = free_port()
    async with server.client("alice", "admin") as admin:
        rev = await create(admin, gnp("a"))
    agent = Agent(config_for(server.url, server.pki, tmp_path / "state",
                             metrics_listen=f"127.0.0.1:{port}"), rec)
    async with running(agent), aiohttp.ClientSession() as plain:
        await until(lambda: agent.counters.applies == 1 and agent.connected, "the apply")
        async with plain.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    lines = set(text.splitlines())
    assert f"bulkhead_agent_applied_revision {agent.applied_revision}" in lines
    assert agent.applied_revision >= rev
    for line in ("bulkhead_agent_connected 1", "bulkhead_agent_applies_total 1",
                 "bulkhead_agent_full_applies_total 1", "bulkhead_agent_apply_failures_total 0",
                 "bulkhead_agent_drift_repairs_total 0", "bulkhead_agent_last_apply_seconds 0.25",
                 'bulkhead_agent_ruleset_objects{kind="rules"} 2',
                 'bulkhead_agent_ruleset_objects{kind="elements"} 3',
                 "# TYPE bulkhead_agent_applies_total counter"):
        assert line in lines, line

