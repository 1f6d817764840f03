"""module_utils.waiter: with started_after, a node of `wanted` converges only on a report
from an agent started later (its counters' startedAt); other nodes are judged as before."""

from __future__ import annotations

import pytest

from ansible_collections.bulkhead.microseg.plugins.module_utils.waiter import (
    NotConverged,
    lagging,
    summarize,
    wait,
)


def answer(*nodes):
    return {"revision": 9, "converged": all(n.get("converged", True) for n in nodes),
            "nodes": [dict(n) for n in nodes]}


def node(name, started=None, converged=True):
    counters = {} if started is None else {"startedAt": started}
    return {"node": name, "appliedRevision": 9, "errors": [], "counters": counters,
            "converged": converged}


@pytest.mark.parametrize("started, expected", [
    (None, False),           # an agent that does not say when it started
    (True, False),           # not a number
    (99.5, False),           # started before
    (100.0, False),          # not after
    (100.25, True),
    (101, True),
])
def test_only_a_report_from_an_agent_started_after_counts(started, expected):
    result = summarize(answer(node("web-1", started), node("db-1")), ["web-1"], 9,
                       started_after=100.0)
    assert result["converged"] is expected
    web = result["nodes"][0]
    assert web["converged"] is expected
    assert ("restarted" in web) is not expected
    # db-1 was not restarted: its report from any agent does
    assert result["nodes"][1]["converged"] and "restarted" not in result["nodes"][1]
    if not expected:
        assert lagging(result) == ("web-1 (at 9, no report yet from an agent started after "
                                   "the restart)")


def test_without_started_after_the_old_report_does():
    assert summarize(answer(node("web-1", 50.0)), ["web-1"], 9)["converged"]


def test_the_wait_goes_on_until_the_new_agent_reports():
    answers = [answer(node("web-1", 50.0)), answer(node("web-1", 50.0)),
               answer(node("web-1", 150.0))]

    class Client:
        def nodes(self, revision):
            assert revision == 9
            return answers.pop(0)

    now = [0.0]
    result = wait(Client(), 9, ["web-1"], timeout=10, interval=1, clock=lambda: now[0],
                  sleep=lambda s: now.__setitem__(0, now[0] + s), started_after=100.0)
    assert result["converged"] and result["elapsed"] == 2.0 and not answers


def test_the_wait_times_out_naming_the_node_not_restarted():
    class Client:
        def nodes(self, revision):
            return answer(node("web-1", 50.0))

    now = [0.0]
    with pytest.raises(NotConverged, match=r"not converged: web-1 \(at 9, no report yet from "
                                           r"an agent started after the restart\)"):
        wait(Client(), 9, ["web-1"], timeout=3, interval=1, clock=lambda: now[0],
             sleep=lambda s: now.__setitem__(0, now[0] + s), started_after=100.0)


def test_at_revision_0_the_wait_still_asks_for_the_new_agent():
    """A fresh store (revision 0): without started_after one read, nothing waited for;
    with it, the wait goes on until the restarted agent reports."""
    asked = []

    class Client:
        def __init__(self, answers):
            self.answers = answers

        def nodes(self, revision):
            asked.append(revision)
            return self.answers.pop(0)

    old = answer(node("web-1", 50.0))
    assert "converged" not in wait(Client([old]), 0, ["web-1"], timeout=5)
    assert asked == [None]
    asked.clear()
    now = [0.0]
    result = wait(Client([answer(node("web-1", 50.0)), answer(node("web-1", 150.0))]), 0,
                  ["web-1"], timeout=5, clock=lambda: now[0],
                  sleep=lambda s: now.__setitem__(0, now[0] + s), started_after=100.0)
    assert result["converged"] and asked == [0, 0]
