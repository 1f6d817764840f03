"""A change wakes every streaming watcher with the same events: the line is built once and
the same bytes go to each (issue 23: no per-watcher copies of events); an event's own
bytes are made once, from the store's JSON text of its document."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from bulkhead.server.app import _LastLine
from bulkhead.server.hub import WireEvent, _wire
from bulkhead.store.base import Event, EventType


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


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=12)


@given(doc=st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4),
       name=st.text(max_size=10), deleted=st.booleans(),
       indent=st.sampled_from([None, 0, 1]))
def test_an_event_on_the_wire_is_the_same_from_the_store_text_or_the_document(
        doc: dict[str, Any], name: str, deleted: bool, indent: int | None) -> None:
    """The hub puts the store's own JSON text of a document in the event's line instead
    of encoding the document again: the line decodes to the same event, and it stays one
    line (a text with line breaks, which the store never writes, is encoded again)."""
    kind: EventType = "DELETED" if deleted else "ADDED"
    text = json.dumps(doc, indent=indent)
    plain = _wire(Event(kind, "GlobalNetworkSet", name, 5, doc))
    from_text = _wire(Event(kind, "GlobalNetworkSet", name, 5, json.loads(text), text))
    assert json.loads(from_text.json) == json.loads(plain.json) == {
        "type": kind, "kind": "GlobalNetworkSet", "name": name, "revision": 5,
        "object": doc}
    assert b"\n" not in from_text.json and b"\r" not in from_text.json
    assert (from_text.revision, from_text.kind, from_text.name) == (5, "GlobalNetworkSet",
                                                                     name)
