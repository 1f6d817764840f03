"""The fan-out hub (Calico's Typha is the model): one watch on the datastore, any number
of agents served from memory.

The hub keeps the current objects and a bounded window of recent events, each serialized
to JSON once. An agent long-polls with the last revision it saw: it gets the events after
it, shared with every other agent, or a snapshot when its revision fell out of the window.
So the datastore is read once per change, not once per agent, and an agent costs one
waiting request, not a copy of the data.

At start (and after every re-list) the window is filled from the history the datastore
keeps, so agents resume across a server restart; compaction (`compact_forever`) trims the
datastore's history and the window together, keeping the last revisions with changes.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bulkhead.store import Datastore, Event, StoreError, TooOld

log = logging.getLogger("bulkhead.server.hub")

STATUS_KIND = "AgentStatus"  # agents' reports live in the store, outside the policy snapshot


@dataclass(frozen=True)
class WireEvent:
    revision: int
    kind: str
    name: str
    json: bytes      # {"type":..,"kind":..,"name":..,"revision":..,"object":..}


def _wire(event: Event) -> WireEvent:
    head = {"type": event.type, "kind": event.kind, "name": event.name,
            "revision": event.revision}
    if event.text is None or "\n" in event.text or "\r" in event.text:
        text = json.dumps({**head, "object": event.doc}, separators=(",", ":"))
    else:   # the document as the store wrote it (one line), not encoded again
        text = json.dumps(head, separators=(",", ":"))[:-1] + ',"object":' + event.text + "}"
    return WireEvent(event.revision, event.kind, event.name, text.encode())


class Hub:
    def __init__(self, store: Datastore, window: int = 10_000, history: int = 100_000
                 ) -> None:
        self.store = store
        self.window = window
        self.history = history        # revisions of the datastore's history read at start
        self.revision = 0
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._events: list[WireEvent] = []
        self._revisions: list[int] = []
        self._first_kept = 0          # events after this revision are all in the window
        self._compacted = 0           # the datastore's history was compacted up to here
        self._tick = asyncio.Event()  # set and replaced on every change: a broadcast
        self.ready = asyncio.Event()
        self.watchers = 0
        self.resyncs = 0
        self.closing = False          # set by close(): every wait returns at once

    # -- feeding from the store -------------------------------------------------------
    async def run(self) -> None:
        """Follow the store forever: list, then watch; re-list on TooOld or errors."""
        backoff = 0.2
        while True:
            try:
                items, revision = await self.store.list_resources()
                first_kept, history = await self._history(revision)
                self.objects = {(s.kind, s.name): s.doc for s in items}
                self._reset(revision, first_kept, history)
                self.ready.set()
                backoff = 0.2
                async for event in self.store.watch(revision):
                    self._apply([event])
            except TooOld:
                self.resyncs += 1
                log.warning("store history compacted past the hub; listing again")
            except Exception as e:   # never dies: agents would stop getting changes
                self.ready.clear()
                log.error("datastore error: %s; retrying in %.1f s",
                          e if isinstance(e, (StoreError, OSError))
                          else f"{type(e).__name__}: {e}", backoff)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 10.0)

    async def _history(self, revision: int) -> tuple[int, list[Event]]:
        """The datastore's kept events up to `revision`, and the revision they start after
        (`revision` itself when there is none to have)."""
        after = max(0, revision - self.history)
        for _ in range(3):
            if after >= revision:
                break
            try:
                return after, await self.store.history(after, revision)
            except TooOld as e:  # compacted meanwhile: from where the history starts now
                after = max(after + 1, e.oldest)
        return revision, []

    def _reset(self, revision: int, first_kept: int | None = None,
               history: Iterable[Event] = ()) -> None:
        """Objects at `revision` are in place; `history` are the events after `first_kept`
        up to `revision` (already in the objects): the window watchers resume from."""
        self.revision = revision
        self._events = [_wire(e) for e in history]
        self._revisions = [e.revision for e in self._events]
        self._first_kept = revision if first_kept is None else min(first_kept, revision)
        if len(self._events) > self.window:
            cut = len(self._events) - self.window
            self._first_kept = self._revisions[cut - 1]
            del self._events[:cut], self._revisions[:cut]
        self._broadcast()

    def _apply(self, events: Iterable[Event]) -> None:
        for event in events:
            key = (event.kind, event.name)
            if event.type == "DELETED":
                self.objects.pop(key, None)
            else:
                self.objects[key] = event.doc
            wire = _wire(event)
            self._events.append(wire)
            self._revisions.append(wire.revision)
            self.revision = max(self.revision, event.revision)
        if len(self._events) > 2 * self.window:
            cut = len(self._events) - self.window
            self._first_kept = self._revisions[cut - 1]
            del self._events[:cut], self._revisions[:cut]
        self._broadcast()

    def close(self) -> None:
        """Wake every waiting watcher and make later waits return at once (shutdown)."""
        self.closing = True
        self._broadcast()

    # -- compaction -------------------------------------------------------------------
    def compaction_point(self, retain: int) -> int:
        """The revision before the `retain` newest revisions with changes in the window
        (the window's start if it holds fewer): history up to there may go."""
        seen, last = 0, -1
        for revision in reversed(self._revisions):
            if revision != last:
                seen, last = seen + 1, revision
                if seen == retain:
                    return max(self._first_kept, revision - 1)
        return self._first_kept

    def forget(self, keep_after: int) -> None:
        """Drop the events at and before `keep_after`: the datastore no longer has them,
        so watchers from there take a snapshot here as they would after a restart."""
        keep_after = min(keep_after, self.revision)
        if keep_after <= self._first_kept:
            return
        cut = bisect.bisect_right(self._revisions, keep_after)
        del self._events[:cut], self._revisions[:cut]
        self._first_kept = keep_after

    async def compact(self, retain: int, max_revisions: int) -> int | None:
        """Compact the datastore to keep the last `retain` revisions with changes, and at
        most `max_revisions` revisions in all (on etcd, status reports take revisions
        too). The revision compacted to, or None when there was nothing to do."""
        if not self.ready.is_set():
            return None
        current = await self.store.revision()
        target = min(current, max(self.compaction_point(retain), current - max_revisions))
        if target <= self._compacted:
            return None
        await self.store.compact(target)
        self._compacted = target
        self.forget(target)
        return target

    async def compact_forever(self, interval: float, retain: int, max_revisions: int
                              ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                target = await self.compact(retain, max_revisions)
            except (StoreError, OSError) as e:
                log.warning("compaction failed: %s; trying again in %.0f s", e, interval)
                continue
            except Exception as e:   # never dies: the history would grow without bound
                log.error("compaction failed: %s: %s; trying again in %.0f s",
                          type(e).__name__, e, interval)
                continue
            if target is not None:
                log.info("compacted", extra={"fields": {"keepAfter": target,
                                                        "revision": self.revision}})

    def _broadcast(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    # -- serving agents ---------------------------------------------------------------
    def endpoint_node(self, name: str) -> str | None:
        """The node of the HostEndpoint `name` held now (None if none of that name): one
        dictionary read, safe from another thread (flow ingest asks from one)."""
        doc = self.objects.get(("HostEndpoint", name))
        spec = doc.get("spec") if isinstance(doc, dict) else None
        node = spec.get("node") if isinstance(spec, dict) else None
        return node if isinstance(node, str) else None

    def policy_objects(self) -> list[dict[str, Any]]:
        return [doc for (kind, _), doc in sorted(self.objects.items()) if kind != STATUS_KIND]

    def events_after(self, after: int) -> list[WireEvent] | None:
        """Policy events after `after`, or None if the window does not reach back there."""
        if after < self._first_kept:
            return None
        start = bisect.bisect_right(self._revisions, after)
        return [e for e in self._events[start:] if e.kind != STATUS_KIND]

    async def wait(self, after: int, timeout: float) -> tuple[list[WireEvent] | None, int]:
        """Events after `after` (waiting up to `timeout` for one) and the revision they
        bring the caller to; None instead of events means: take a snapshot.

        A caller ahead of this hub (`after` above its revision) waits for it to get there
        (a hub behind another server's on one etcd: agents' status reports move etcd's
        revision, which a hub sees only at its next policy event) and is then answered as
        any other, with a heartbeat at `after` meanwhile. Still ahead of the datastore
        itself when `timeout` runs out, it takes a snapshot: its revision is one this
        datastore never reached (a datastore restored from a backup), and with only
        events after it an agent would never see the changes in between."""
        self.watchers += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            timed_out = False
            while True:
                if self.closing:
                    # No events read here: the caller stays where it is (a revision
                    # above it could stand for events it never got).
                    return [], after
                events = self.events_after(after) if after <= self.revision else []
                if events is None or events:
                    return events, self.revision
                remaining = deadline - loop.time()
                if remaining > 0 and not timed_out:
                    try:
                        await asyncio.wait_for(self._tick.wait(), remaining)
                    except TimeoutError:
                        # A change may have come between the timer and this task's turn
                        # (its broadcast found the wait cancelled): look again before
                        # answering with a revision, which would then skip it for good.
                        timed_out = True
                    continue
                # Nothing after `after` up to self.revision, read with no await since.
                if after <= self.revision:
                    return [], self.revision
                try:
                    current = await self.store.revision()
                except (StoreError, OSError):
                    current = after          # the datastore cannot say: keep the caller
                return (None, self.revision) if after > current else ([], after)
        finally:
            self.watchers -= 1
