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
