"""bulkhead.agent.status: the counters and the report the agent posts, within what the
server keeps."""

from __future__ import annotations

import time

from bulkhead.agent.enforcer import EnforceReport
from bulkhead.agent.status import MAX_ERROR_CHARS, MAX_ERRORS, Counters, status_body


def report(full: bool) -> EnforceReport:
    return EnforceReport(4, full=full, changed=True, seconds=0.5,
                         counts={"rules": 7, "sets": 2}, warnings=[])


def test_counters_record_applies_and_repairs() -> None:
    counters = Counters(started_at=1700000000.123456)
    counters.record(report(full=True))
    counters.record(report(full=False))
    counters.record(report(full=True), repair=True)
    assert (counters.applies, counters.drift_repairs, counters.full_applies) == (2, 1, 2)
    assert counters.as_status() == {"applies": 2, "fullApplies": 2, "failures": 0,
                                    "driftRepairs": 1, "reconnects": 0, "rules": 7, "sets": 2,
                                    "startedAt": 1700000000.123}
    before = time.time()
    assert before - 0.001 <= Counters().as_status()["startedAt"] <= time.time() + 0.001


def test_the_report_keeps_what_the_server_keeps() -> None:
    long = "apply failed: " + "x" * 3000 + " the kernel keeps revision 3"
    errors = [long] + [f"error {i}" for i in range(MAX_ERRORS + 4)]
    body = status_body(3, errors, Counters())
    assert body["appliedRevision"] == 3 and len(body["errors"]) == MAX_ERRORS
    first = body["errors"][0]
    assert len(first) <= MAX_ERROR_CHARS and " ... (cut) ... " in first
    assert first.startswith("apply failed: ") and first.endswith("keeps revision 3")
    assert body["errors"][-1] == "... and 6 more errors"   # 25 errors, 19 sent as they are
    assert status_body(3, ["one"], Counters())["errors"] == ["one"]
