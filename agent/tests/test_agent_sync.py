"""bulkhead.agent.sync: the snapshot and deltas from a real bulkhead-server reach the
enforcer with their revisions; the desired state leaves invalid objects out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bulkhead.agent.cache import load_cache
from bulkhead.agent.sync import Backoff, DesiredState
from bulkhead.model import API_VERSION
from tests.agentfixture import create, gnp, started_after_a, until, wait_status
from tests.conftest import Server


async def test_snapshot_then_deltas_reach_enforce_with_their_revisions(
        server: Server, tmp_path: Path) -> None:
    async with started_after_a(server, tmp_path) as (admin, viewer, rec, agent, rev_a):
        await until(lambda: rec.applied is not None, "the snapshot to be enforced")
        assert rec.calls == [(rev_a, ["a"])]          # the snapshot, first contact
        rev_b = await create(admin, gnp("b"))
        await until(lambda: rec.calls[-1][1] == ["a", "b"], "the event for b")
        assert len(rec.calls) == 2 and rec.calls[-1][0] >= rev_b
        await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_b,
                          f"appliedRevision >= {rev_b}")

        # A burst of writes coalesces into fewer applies than writes. The agent waits for
        # a quiet second here, not its 50 ms: on a loaded machine the server may commit
        # the five writes more than 50 ms apart, each then an apply of its own.
        agent.debounce = 1.0
        before = len(rec.calls)
        burst = [f"c{i}" for i in range(5)]
        revs = await asyncio.gather(*(create(admin, gnp(n)) for n in burst))
        await until(lambda: rec.calls[-1][1] == sorted(["a", "b", *burst]), "the burst")
        assert len(rec.calls) - before < len(burst)
        assert rec.calls[-1][0] >= max(revs)
        agent.debounce = 0.05

        async with admin.delete("/v1/resources/GlobalNetworkPolicy/a") as r:
            assert r.status == 200
        await until(lambda: rec.calls[-1][1] == sorted(["b", *burst]), "the delete")
        revisions = [rev for rev, _ in rec.calls]
        assert revisions == sorted(revisions)

        status = await wait_status(viewer, lambda s: s["appliedRevision"]
                                   >= rec.calls[-1][0], "the last apply")
        assert status["errors"] == []
        assert status["counters"]["applies"] == len(rec.calls)
        assert status["counters"]["rules"] == 2 * (len(burst) + 1)

    # The cache holds what was enforced last, at its revision.
    cached = load_cache(tmp_path / "state")
    assert cached is not None and cached.revision == rec.calls[-1][0]
    assert sorted(i["metadata"]["name"] for i in cached.items) == sorted(["b", *burst])


def test_invalid_objects_are_left_out_and_reported() -> None:
    state = DesiredState()
    state.replace([gnp("ok"), gnp("lost", tier="nowhere"),
                   {**gnp("bad"), "spec": {"selector": "app = 'x'"}},
                   {"kind": "Mystery", "metadata": {"name": "m"}}])
    snapshot, errors = state.build()
    assert sorted(snapshot.policies) == ["ok"]
    assert len(errors) == 3
    assert any('tier "nowhere" does not exist' in e for e in errors)
    assert any("GlobalNetworkPolicy bad: spec.selector" in e for e in errors)
    assert any("Mystery" in e for e in errors)



def test_changes_build_from_the_last_snapshot_and_say_what_changed() -> None:
    """A host endpoint or network set event: the snapshot is the last one with that entry
    replaced (the rest the same objects), and the change is named; anything else, or the
    first build, builds it whole (None). Either way it equals a build from scratch."""
    def hep(name: str, app: str, node: str = "n2") -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "HostEndpoint",
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"node": node, "expectedIPs": ["198.18.0.20"]}}

    def event(doc: dict[str, Any] | None, kind: str = "HostEndpoint",
              name: str = "") -> dict[str, Any]:
        if doc is None:
            return {"type": "DELETED", "kind": kind, "name": name}
        return {"type": "MODIFIED", "kind": doc["kind"], "name": doc["metadata"]["name"],
                "object": doc}

    state = DesiredState()
    state.replace([gnp("a"), hep("web-1", "web"), hep("db-1", "db")])
    first, _, changed = state.changes()
    assert changed is None
    version = state.version
    state.apply([event(hep("web-1", "cache")), event(None, name="db-1"),
                 event({**hep("x", "y"), "spec": {"node": "n2"}})])   # invalid
    snapshot, errors, changed = state.changes()
    assert changed == {("HostEndpoint", "web-1"), ("HostEndpoint", "db-1"),
                       ("HostEndpoint", "x")}
    assert state.version == version + 3
    assert snapshot.policies is first.policies
    assert snapshot.host_endpoints["web-1"].labels == {"app": "cache"}
    assert (snapshot, errors) == state.build()
    assert len(errors) == 1 and "HostEndpoint x" in errors[0]
    state.apply([event(gnp("b"))])
    snapshot, errors, changed = state.changes()
    assert changed is None and sorted(snapshot.policies) == ["a", "b"]
    assert (snapshot, errors) == state.build()
    state.replace(state.items())          # the same objects again: nothing changed
    assert state.changes()[2] == set()
    version = state.version               # an event that changes nothing (keys in
    state.apply([event(json.loads(json.dumps(gnp("b"), sort_keys=True)))])  # another order)
    assert state.version == version and state.changes()[2] == set()
    # Kept as compact JSON text, keys sorted: what the cache is written from.
    assert state.texts() == [json.dumps(d, separators=(",", ":"), sort_keys=True).encode()
                             for d in state.items()]
    assert [json.loads(t)["metadata"]["name"] for t in state.texts()] == \
        ["a", "b", "web-1", "x"]          # x is invalid: kept, left out of the snapshot


def _peer(name: str, app: str, revision: int = 7) -> dict[str, Any]:
    """A host endpoint on another node as the server sends it: with its stamps."""
    return {"apiVersion": API_VERSION, "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": {"app": app, "tier": "front"},
                         "resourceVersion": str(revision), "uid": f"uid-{name}",
                         "creationTimestamp": "2026-12-05T12:00:00Z"},
            "spec": {"node": f"node-{name}", "interfaceName": "eth0",
                     "expectedIPs": ["198.18.0.20"]}}


def test_what_the_server_stamps_is_not_kept_and_a_new_stamp_changes_nothing() -> None:
    state = DesiredState()
    state.replace([_peer("a", "web"), {**gnp("p"), "metadata": {
        "name": "p", "resourceVersion": "3", "uid": "u", "creationTimestamp": "t",
        "annotations": {"owner": "ops"}}}])
    snapshot, errors, _ = state.changes()
    assert errors == []
    for text in state.texts():
        meta = json.loads(text)["metadata"]
        assert not {"resourceVersion", "uid", "creationTimestamp"} & set(meta), meta
    hep = snapshot.host_endpoints["a"]
    assert (hep.metadata.resource_version, hep.metadata.uid,
            hep.metadata.creation_timestamp) == (None, None, None)
    assert hep.labels == {"app": "web", "tier": "front"} and hep.interface_name == "eth0"
    assert snapshot.policies["p"].metadata.annotations == {"owner": "ops"}
    version = state.version        # written again, unchanged: a new resourceVersion only
    state.apply([{"type": "MODIFIED", "kind": "HostEndpoint", "name": "a",
                  "object": _peer("a", "web", revision=8)}])
    assert state.version == version and state.changes()[2] == set()
    state.apply([{"type": "MODIFIED", "kind": "HostEndpoint", "name": "a",
                  "object": _peer("a", "db", revision=9)}])
    assert state.version == version + 1
    assert state.changes()[0].host_endpoints["a"].labels["app"] == "db"


def test_equal_labels_are_one_map_and_no_string_of_the_message_is_kept() -> None:
    """What is kept of an object is read from its own text: no piece of the decoded
    message (its strings) stays behind to hold the message's memory once dropped."""
    docs = [_peer(f"h{i}", f"web{i % 2}") for i in range(6)]
    message = json.loads(json.dumps({"items": docs}))["items"]
    state = DesiredState()
    state.replace(message)
    heps = state.changes()[0].host_endpoints
    assert heps["h0"].labels is heps["h2"].labels is heps["h4"].labels
    assert heps["h1"].labels is heps["h3"].labels
    assert heps["h0"].labels is not heps["h1"].labels
    assert heps["h0"].interface_name is heps["h1"].interface_name
    given = {id(s) for doc in message for s in (
        doc["kind"], doc["metadata"]["name"], doc["spec"]["node"],
        doc["spec"]["interfaceName"], *doc["metadata"]["labels"],
        *doc["metadata"]["labels"].values())}
    for key, hep in heps.items():
        kept = [key, hep.name, hep.node, hep.interface_name, *hep.labels,
                *hep.labels.values(), *next(k for k in state.objects if k[1] == key)]
        assert not {id(s) for s in kept} & given, key
    # From events too.
    event = json.loads(json.dumps({"type": "MODIFIED", "kind": "HostEndpoint",
                                   "name": "h9", "object": _peer("h9", "web1")}))
    state.apply([event])
    hep = state.changes()[0].host_endpoints["h9"]
    assert hep.labels is heps["h1"].labels
    kept_key = next(k for k in state.objects if k[1] == "h9")
    assert kept_key[1] is not event["name"] and hep.name is not event["name"]
    assert hep.node is not event["object"]["spec"]["node"]


def test_the_shared_label_maps_stay_within_the_objects_count() -> None:
    state = DesiredState()
    state.replace([_peer("a", "x")])
    for i in range(500):         # one endpoint, relabelled again and again
        state.apply([{"type": "MODIFIED", "kind": "HostEndpoint", "name": "a",
                      "object": _peer("a", f"app{i}")}])
    assert len(state._labels) <= 2 * 1 + 64
    assert state.changes()[0].host_endpoints["a"].labels["app"] == "app499"


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(base=0.2, cap=1.0)
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next() <= ceiling
    assert backoff.attempt == len(ceilings)
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next() <= 0.2


def test_an_object_too_deep_to_write_out_is_left_out_not_the_end_of_the_agent() -> None:
    """json.loads (the watch reader) accepts nesting that writing the object back out,
    a few frames deeper, does not: the object is reported and left out of the snapshot
    and of the cache; the agent goes on."""
    def loads(n: int) -> bool:
        try:
            json.loads("[" * n + "]" * n)
            return True
        except RecursionError:
            return False

    low, high = 1, 1 << 20       # the deepest nesting the decoder takes here
    while low + 1 < high:
        middle = (low + high) // 2
        low, high = (middle, high) if loads(middle) else (low, middle)
    deep: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "HostEndpoint",
                            "metadata": {"name": "x"},
                            "spec": json.loads("[" * (low - 2) + "]" * (low - 2))}
    state = DesiredState()
    state.replace([gnp("a")])

    def nested(levels: int) -> None:   # as deep in the stack as the daemon calls it
        if levels:
            return nested(levels - 1)
        state.apply([{"type": "MODIFIED", "kind": "HostEndpoint", "name": "x",
                      "object": deep}])
        return None

    nested(50)
    snapshot, errors, _ = state.changes()
    assert sorted(snapshot.policies) == ["a"] and "x" not in snapshot.host_endpoints
    assert any("HostEndpoint x" in e and "nested too deeply" in e for e in errors), errors
    assert [json.loads(t)["metadata"]["name"] for t in state.texts()] == ["a"]


async def test_a_watch_line_nested_too_deeply_breaks_the_stream_not_the_agent() -> None:
    """A hostile server's line deeper than the JSON decoder goes is the stream's end (the
    agent reconnects), like any broken line; it does not escape as RecursionError. Lines
    are queued as they came, decoded when their turn comes."""
    from bulkhead.agent.sync import SyncError, watch_lines, watch_message

    deep = b'{"type": "events", "events": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"

    class Deep:
        async def iter_chunks(self) -> Any:
            yield deep + b"\n"
            yield b'{"type": "heartbeat"}\n[1]\nnot json\n'

    queue: asyncio.Queue[Any] = asyncio.Queue()
    await watch_lines(Deep(), queue)  # type: ignore[arg-type]
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert got[:4] == [deep, b'{"type": "heartbeat"}', b"[1]", b"not json"]
    assert isinstance(got[4], SyncError) and "closed" in str(got[4])
    with pytest.raises(SyncError, match="RecursionError"):
        watch_message(deep)
    assert watch_message(got[1]) == {"type": "heartbeat"}
    with pytest.raises(SyncError, match="expected a JSON object"):
        watch_message(b"[1]")
    with pytest.raises(SyncError, match="not JSON"):
        watch_message(b"not json")


async def test_the_lines_waiting_for_the_agent_are_bounded() -> None:
    """A server that sends faster than the agent applies (a burst during a long apply, or
    a hostile one: 64,000 lines of 16 KB grew the agent by a gigabyte) fills the queue
    to its bound and then waits: the rest stays in the socket, where TCP holds the server
    back. A line larger than the bound still goes in alone; every line comes out in
    order."""
    from bulkhead.agent.sync import LineQueue, watch_lines

    line = b"x" * 16_000

    class Flood:
        sent = 0

        async def iter_chunks(self) -> Any:
            for _ in range(1000):
                Flood.sent += 1
                yield line + b"\n"

    queue = LineQueue(limit=100_000)
    reader = asyncio.create_task(watch_lines(Flood(), queue))  # type: ignore[arg-type]
    for _ in range(50):
        await asyncio.sleep(0)
    assert queue.queued <= 100_000 and Flood.sent <= 8       # six lines queued, one held
    got = 0
    while got < 1000:
        item = await asyncio.wait_for(queue.get(), 5)
        assert item == line
        got += 1
        assert queue.queued <= 100_000
    assert isinstance(await asyncio.wait_for(queue.get(), 5), Exception)   # then the end
    await reader
    big = LineQueue(limit=10)
    await asyncio.wait_for(big.put(line), 1)                  # alone, over the bound
    assert big.queued == len(line) and await big.get() == line
