"""The agent's flow-log books: what the kernel logged (hit counters) against what the
agent read, across table replacements."""

from __future__ import annotations

from pathlib import Path

from bulkhead.agent.config import FlowLogSettings
from bulkhead.agent.flowlogs import FlowLogs
from bulkhead.policy import Failsafes


def test_unread_counts_what_the_kernel_logged_and_the_agent_never_read(tmp_path: Path
                                                                       ) -> None:
    flows = FlowLogs(FlowLogSettings(), "n1", Failsafes(), tmp_path)
    flows._balance(500)             # logged before this agent read anything: the base
    assert flows.unread == 0
    flows.counters.packets_read += 100
    flows._balance(600)
    assert flows.unread == 0
    flows._balance(700)             # 100 logged, none read yet (queued, or lost)
    assert flows.unread == 100
    flows.counters.packets_read += 60
    flows._balance(700)             # 60 of them read late: 40 never will be
    assert flows.unread == 40
    flows.counters.packets_read += 10
    flows._balance(10)              # a new table: its counters start at 0
    assert flows.unread == 40
    assert flows.stats()["flowPacketsUnread"] == 40


def test_flow_logs_that_fail_start_again_and_never_stop_the_agent(tmp_path: Path) -> None:
    import asyncio
    from typing import Any

    from bulkhead.agent.daemon import Agent
    from bulkhead.pki import init_ca
    from tests.agentfixture import Recorder, config_for

    init_ca(tmp_path / "pki")
    config = config_for("https://127.0.0.1:1", tmp_path / "pki", tmp_path / "state",
                        flow_logs=FlowLogSettings())
    agent = Agent(config, Recorder())
    assert agent.flow_logs is not None
    agent.flow_retry = 0.01
    calls = []

    async def run(session: Any, stopping: Any) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("a bug in the flow pipeline")
        agent._stopping = True

    agent.flow_logs.run = run  # type: ignore[method-assign]
    asyncio.run(agent._flows_forever(None))  # type: ignore[arg-type]
    assert len(calls) == 3 and agent.flow_logs.counters.failures == 2
    assert agent.status()["counters"]["flowFailures"] == 2
