"""What the agent reports: counters, errors, and the status it posts to the server.

`POST /v1/status/NODE` carries `appliedRevision`, `errors` (empty when all is well: the
server's `/v1/nodes?revision=R` counts a node converged only then) and `counters`.
Reporting is best effort: a server that cannot be reached never holds up enforcement.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bulkhead.agent.enforcer import EnforceReport
from bulkhead.agent.http import Session, Timeout
from bulkhead.agent.sync import SyncError, error_of
from bulkhead.api import route


@dataclass
class Counters:
    applies: int = 0               # successful enforce calls
    full_applies: int = 0          # applies and repairs that replaced the whole table
    failures: int = 0              # enforce or repair calls that raised
    drift_repairs: int = 0
    reconnects: int = 0            # watch streams that ended and were opened again
    status_failures: int = 0       # status reports the server did not take
    last_apply_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)  # from the last report
    # When this process started (Unix seconds, the host's clock): a report from the agent
    # a restart started is told from one its predecessor sent (agent_status started_after).
    started_at: float = field(default_factory=time.time)

    def record(self, report: EnforceReport, repair: bool = False) -> None:
        if repair:
            self.drift_repairs += 1
        else:
            self.applies += 1
        self.full_applies += int(report.full)
        self.last_apply_seconds = report.seconds
        self.counts = {str(k): int(v) for k, v in report.counts.items()}

    def as_status(self) -> dict[str, float]:
        return {"applies": self.applies, "fullApplies": self.full_applies,
                "failures": self.failures, "driftRepairs": self.drift_repairs,
                "reconnects": self.reconnects, **self.counts,
                "startedAt": round(self.started_at, 3)}


# What the server keeps of a report (bulkhead-server keeps 20 errors, cuts each to 1,024
# characters and refuses a body over 64 KiB): the agent sends no more.
MAX_ERRORS = 20
MAX_ERROR_CHARS = 1000


def status_body(applied_revision: int, errors: list[str], counters: Counters
                ) -> dict[str, Any]:
    """The report; errors past MAX_ERRORS are counted in the last one, long ones cut in
    the middle (the start says what failed, the end what the kernel keeps)."""
    half = MAX_ERROR_CHARS // 2 - 10
    sent = [e if len(e) <= MAX_ERROR_CHARS else f"{e[:half]} ... (cut) ... {e[-half:]}"
            for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        sent[-1] = f"... and {len(errors) - MAX_ERRORS + 1} more errors"
    return {"appliedRevision": applied_revision, "errors": sent,
            "counters": counters.as_status()}


async def post_status(session: Session, node: str, body: dict[str, Any],
                      timeout: float = 10.0) -> None:
    """Raises SyncError when the server refuses, HttpError when unreachable."""
    async with session.post(route("status", node=node), json_body=body,
                            timeout=Timeout(total=timeout, connect=timeout)) as r:
        if r.status != 200:
            raise SyncError(f"POST /v1/status/{node}: {await error_of(r)}")
