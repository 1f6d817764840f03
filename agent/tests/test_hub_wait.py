"""The hub's wait: a change that lands between a wait's timer firing and the waiting
task's turn is sent, not skipped. Before, the wait answered with the hub's revision and
no events (a heartbeat on a stream, an empty answer to a long poll), and the agent took
that revision as reached: it never got the change, and reported itself converged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from bulkhead.server.hub import Hub
from bulkhead.store.sqlite import SQLiteStore
from tests.test_store_faults import put
from tests.test_store_group_commit import store  # noqa: F401  (the fixture)


class _TimerFiresAsAChangeLands:
    """Stands in for the hub's broadcast event during one wait: the change is committed
    and applied by the hub, and only then does the wait's timer report its timeout (the
    order the loop can run them in when both are due)."""

    def __init__(self, hub: Hub, datastore: SQLiteStore) -> None:
        self.hub, self.store = hub, datastore
        self.fired = False

    def set(self) -> None:          # the hub's broadcast of the change
        self.fired = True

    async def wait(self) -> None:
        before = self.hub.revision
        await self.store.transaction([put("late")])
        async with asyncio.timeout(10):
            while self.hub.revision == before:
                await asyncio.sleep(0.001)
        raise TimeoutError


@contextlib.asynccontextmanager
async def hub_at(datastore: SQLiteStore, writes: int) -> AsyncIterator[Hub]:
    """A hub following the store, once it holds `writes` writes made through the store."""
    hub = Hub(datastore)
    follower = asyncio.create_task(hub.run())
    try:
        for i in range(writes):
            await datastore.transaction([put(f"set-{i}")])
        async with asyncio.timeout(10):
            await hub.ready.wait()
            while hub.revision < writes:
                await asyncio.sleep(0.01)
        yield hub
    finally:
        follower.cancel()


async def test_a_change_as_the_timer_fires_is_sent_not_skipped(
        store: SQLiteStore) -> None:  # noqa: F811
    async with hub_at(store, 3) as hub:
        fake = _TimerFiresAsAChangeLands(hub, store)
        hub._tick = fake  # type: ignore[assignment]
        events, revision = await hub.wait(3, timeout=5)
        assert fake.fired
        assert revision == 4
        assert events is not None and [e.revision for e in events] == [4], events
        # And a wait with nothing new still answers at once with no events.
        assert await hub.wait(4, timeout=0) == ([], 4)


async def test_a_closing_hub_keeps_the_caller_where_it_was(
        store: SQLiteStore) -> None:  # noqa: F811
    """Shutting down, a wait answers at once without events, at the caller's own
    revision: at the hub's, the caller would skip the events in between."""
    async with hub_at(store, 3) as hub:
        hub.close()
        assert await hub.wait(1, timeout=5) == ([], 1)
