"""A change wakes every streaming watcher with the same events: the line is built once and
the same bytes go to each (issue 23: no per-watcher copies of events)."""

from __future__ import annotations

import json

from bulkhead.server.app import _LastLine
from bulkhead.server.hub import WireEvent


def wire(revision: int, name: str) -> WireEvent:
    body = {"type": "ADDED", "kind": "GlobalNetworkSet", "name": name, "revision": revision,
            "object": {"metadata": {"name": name}}}
    return WireEvent(revision, "GlobalNetworkSet", name, json.dumps(body).encode())


def test_watchers_woken_by_one_change_share_one_line() -> None:
    memo = _LastLine()
    events = [wire(7, "a"), wire(8, "b")]
    first = memo.get(6, 8, events)
    assert memo.get(6, 8, list(events)) is first       # every watcher: the same bytes
    line = json.loads(first)
    assert first.endswith(b"\n")
    assert line["revision"] == 8 and [e["name"] for e in line["events"]] == ["a", "b"]
    # Another starting point or revision: its own line.
    assert json.loads(memo.get(7, 8, events[1:]))["events"][0]["name"] == "b"
    # The same revisions after the window was filled again (a re-list): built anew.
    again = [wire(7, "a2"), wire(8, "b2")]
    assert [e["name"] for e in json.loads(memo.get(6, 8, again))["events"]] == ["a2", "b2"]
