"""Flow logs in the agent: read the kernel's logs, aggregate, spool, ship.

    read     NFLOG (the first packet of each connection, at every decision it meets), on
             the event loop as it arrives
    count    every flush interval: a conntrack dump (in a worker thread) for the counters
             of connections still open, or ended but still in the table (closing TCP
             stays 10 s after a reset, 120 s in TIME_WAIT); with `conntrackEvents`, also
             each connection's last counters from its destroy event
    flush    every flush interval: the aggregator's records to the spool on disk
    ship     the spool's files, oldest first, to the server (POST /v1/flows) over the
             agent's mTLS session; removed once stored. While the server is away they
             stay on disk up to a bound (drop-oldest, counted). A batch the server
             refuses (4xx) is dropped and counted: it would be refused again.

The kernel side is `bulkhead.observe` (NFLOG and ctnetlink sockets, the aggregator); the
rendered table's decisions (prefix -> decision) come from the enforcer after each apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bulkhead.agent.config import FlowLogSettings
from bulkhead.agent.http import HttpError, Session, Timeout
from bulkhead.agent.spool import Spool, SpoolWriteError
from bulkhead.agent.sync import error_of
from bulkhead.api import route
from bulkhead.model import ENFORCE, Snapshot
from bulkhead.observe.flows import FlowAggregator, Limits, tracked_key
from bulkhead.policy import Failsafes
from bulkhead.policy.trace import Decision

log = logging.getLogger("bulkhead.agent.flows")


@dataclass
class FlowLogCounters:
    records_sent: int = 0
    batches_sent: int = 0
    batches_refused: int = 0
    records_refused: int = 0
    ship_failures: int = 0
    nflog_overruns: int = 0
    conntrack_overruns: int = 0
    packets_read: int = 0
    failures: int = 0               # times the flow-log loop failed and was started again
    spool_failures: int = 0         # spool writes that failed (records kept for the next)
    extra: dict[str, int] = field(default_factory=dict)


class FlowLogs:
    def __init__(self, settings: FlowLogSettings, node: str, failsafes: Failsafes,
                 state_dir: Path, netns: str = "",
                 rule_hits: Callable[[], dict[str, int]] | None = None,
                 default_mode: str = ENFORCE) -> None:
        self.settings = settings
        self.default_mode = default_mode   # endpoints without the enforcement label
        self._rule_hits = rule_hits
        self._hits: dict[str, int] = {}
        # The kernel's side of the books: every logged first packet also counts in its
        # decision's named counter, so their sum is what the kernel logged. Logged but
        # not read (still queued, or dropped by the kernel for a full socket buffer):
        self._hits_total: int | None = None   # None: no look yet (the first sets the base)
        self._read_at_hits = 0
        self.unread = 0
        self.node = node
        self.failsafes = failsafes
        self.netns = netns
        self.spool = Spool(state_dir / "flows", settings.spool_bytes)
        self.counters = FlowLogCounters()
        self.aggregator: FlowAggregator | None = None
        self._previous: Mapping[str, Decision] = {}
        self._retired: dict[str, Decision] = {}   # older tables' prefixes, until a flush
        self._unspooled: list[Any] = []           # records a failed spool write kept
        self._kick = asyncio.Event()
        # The DNS name cache's lookup (address -> the names it was resolved from), for
        # the staged verdicts of `domains` rules; set by the daemon when it snoops.
        self.names: Callable[[Any], frozenset[str]] | None = None

    # -- policy --------------------------------------------------------------------------
    def update(self, snapshot: Snapshot, decisions: Mapping[str, Decision]) -> None:
        """A new table is in the kernel. Packets logged by the one before may still be
        queued: its prefixes stay known until the next flush."""
        self._retired.update(self._previous)
        merged = {**self._retired, **decisions}
        self._previous = decisions
        if self.aggregator is None:
            self.aggregator = FlowAggregator(
                self.node, snapshot, merged, self.failsafes,
                Limits(connections=self.settings.max_connections,
                       aggregates=self.settings.max_records), time.time(),
                default_mode=self.default_mode, names=self.names)
        else:
            self.aggregator.set_snapshot(snapshot, merged)

    def hits(self) -> list[tuple[str, str, str, str, str, int]]:
        """Each decision's hits at the last flush, for /metrics."""
        out = []
        for prefix, count in sorted(self._hits.items()):
            d = self._previous.get(prefix)
            if d is not None:
                out.append((d.direction.lower(), d.tier, d.policy,
                            "-" if d.rule is None else str(d.rule), d.action, count))
        return out

    def stats(self) -> dict[str, int]:
        """Counters for status and /metrics."""
        agg = self.aggregator
        dropped = dict(agg.dropped) if agg else {}
        return {
            "flowRecordsSent": self.counters.records_sent,
            "flowRecordsRefused": self.counters.records_refused,
            "flowRecordsSpooled": self.spool.records,
            "flowRecordsDroppedSpool": self.spool.dropped,
            "flowShipFailures": self.counters.ship_failures,
            "flowFailures": self.counters.failures,
            "flowSpoolFailures": self.counters.spool_failures,
            "flowNflogOverruns": self.counters.nflog_overruns,
            "flowConntrackOverruns": self.counters.conntrack_overruns,
            "flowPacketsRead": self.counters.packets_read,
            "flowPacketsUnread": self.unread,
            "flowOpenConnections": agg.open_connections if agg else 0,
            **{f"flowDropped_{k}": v for k, v in dropped.items()},
        }

    # -- running -------------------------------------------------------------------------
    async def run(self, session: Session, stopping: Callable[[], bool]) -> None:
        """Read, count, flush and ship until cancelled (or `stopping()`)."""
        from bulkhead.observe.conntrack import (
            Conntrack,
            ConntrackEvents,
            enable_accounting,
            enable_events,
        )
        from bulkhead.observe.nflog import NflogSocket

        # Counters for connections made from now on; with conntrackEvents, destroy
        # events for every connection (the default, 2, gives them only to connections
        # made while a reader listened).
        await asyncio.to_thread(enable_accounting, self.netns)
        if self.settings.conntrack_events:
            await asyncio.to_thread(enable_events, self.netns)
        loop = asyncio.get_running_loop()
        nflog = NflogSocket([self.settings.inbound_group, self.settings.outbound_group],
                            self.netns)
        events = ConntrackEvents(self.netns) if self.settings.conntrack_events else None
        conntrack = Conntrack(self.netns)

        broken: asyncio.Future[BaseException] = loop.create_future()

        def guarded(read: Callable[[], None]) -> Callable[[], None]:
            """A reader callback whose failure ends `run()` (to be started again): asyncio
            would only log it, and call it again and again."""
            def call() -> None:
                try:
                    read()
                except Exception as e:
                    if not broken.done():
                        broken.set_result(e)
            return call

        def read_nflog() -> None:
            packets = nflog.read(5000)
            self.counters.packets_read += len(packets)
            self.counters.nflog_overruns = nflog.overruns
            if self.aggregator is not None:
                for p in packets:
                    self.aggregator.packet(p)

        def read_events() -> None:
            assert events is not None
            ended = events.read(5000)
            self.counters.conntrack_overruns = events.overruns
            if self.aggregator is None:
                return
            now = time.time()
            for kind, entry in ended:
                if kind == "destroy":
                    self.aggregator.ended(tracked_key(entry), entry, now)

        loop.add_reader(nflog.fileno(), guarded(read_nflog))
        if events is not None:
            loop.add_reader(events.fileno(), guarded(read_events))
        shipper = asyncio.create_task(self._ship_forever(session, stopping), name="ship")
        try:
            while not stopping():
                with contextlib.suppress(TimeoutError):
                    failure = await asyncio.wait_for(asyncio.shield(broken),
                                                     self.settings.flush_interval)
                    raise RuntimeError(f"reading the kernel's logs failed: {failure!r}")
                await self.flush(conntrack)
        finally:
            loop.remove_reader(nflog.fileno())
            if events is not None:
                loop.remove_reader(events.fileno())
            shipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shipper
            # What was aggregated so far is kept for the next start.
            with contextlib.suppress(Exception):
                await self.flush(None)
            nflog.close()
            if events is not None:
                events.close()
            conntrack.close()

    async def flush(self, conntrack: Any) -> int:
        """Counts from a conntrack dump, then the interval's records to the spool."""
        if self.aggregator is None:
            return 0
        if conntrack is not None:
            entries = await asyncio.to_thread(conntrack.dump)
            # A dump cut at its limit does not tell which connections have ended.
            self.aggregator.counts(((tracked_key(e), e) for e in entries), time.time(),
                                   complete=conntrack.truncated == 0)
        if self._rule_hits is not None:
            try:
                self._hits = await asyncio.to_thread(self._rule_hits)
            except Exception as e:   # counters are a view: never stop the flow logs
                log.warning("rule hit counters not read: %s", e)
            else:
                self._balance(sum(self._hits.values()))
        records = [*self._unspooled, *self.aggregator.flush(time.time())]
        self._retired.clear()
        if records:
            try:
                await asyncio.to_thread(self.spool.put, records)
            except SpoolWriteError as e:
                # Kept for the next flush (disk full, ...), up to one interval's worth:
                # those not spooled before the failure.
                self._unspooled = records[e.written:][-self.settings.max_records:]
                self.counters.spool_failures += 1
                log.error("flow records not written to the spool; kept in memory: %s", e)
                return 0
            self._unspooled = []
            self._kick.set()
        return len(records)

    def _balance(self, total: int) -> None:
        """Logged (by the counters) against read, since the last look. Counters start
        again at 0 when the table is replaced whole: a smaller sum is a new table."""
        before = self._hits_total
        read = self.counters.packets_read - self._read_at_hits
        self._hits_total, self._read_at_hits = total, self.counters.packets_read
        if before is None:
            return   # what was logged before this agent read anything is not its to count
        logged = total - before if total >= before else total
        self.unread = max(0, self.unread + logged - read)

    async def _ship_forever(self, session: Session,
                            stopping: Callable[[], bool]) -> None:
        await ship_forever(lambda: self.ship(session), stopping, self._kick, self.spool,
                           self.counters, self.settings.flush_interval, "flow")

    async def ship(self, session: Session, timeout: float = 30.0) -> int:
        """Send the spool's files, oldest first; the number of records stored. Raises
        HttpError when the server cannot be reached (the files stay)."""
        return await ship_spool(session, self.spool, "flows", self.counters, timeout)


async def ship_forever(ship: Callable[[], Awaitable[int]], stopping: Callable[[], bool],
                       kick: asyncio.Event, spool: Spool, counters: FlowLogCounters,
                       interval: float, what: str) -> None:
    """Ship when kicked (a flush wrote the spool) or every `interval`, until `stopping()`;
    the shipper never dies: on failure the records wait on disk and it tries again later
    (1 s, doubling up to `interval`)."""
    delay = 1.0
    while not stopping():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(kick.wait(), interval)
        kick.clear()
        try:
            await ship()
            delay = 1.0
        except Exception as e:
            counters.ship_failures += 1
            log.warning(f"{what} records not sent; kept on disk", extra={"fields": {
                "reason": str(e) or type(e).__name__, "spooled": spool.records}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, interval)


async def ship_spool(session: Session, spool: Spool, which: str,
                     counters: FlowLogCounters, timeout: float = 30.0) -> int:
    """Send a spool's files to `POST /v1/<which>` (flows, dns), oldest first, each removed
    once the server answered for it; the number of records stored. Raises HttpError when
    the server cannot be reached or is unwell (the files stay)."""
    sent = 0
    while (item := spool.oldest()) is not None:
        body = json.dumps({"records": item.records}, separators=(",", ":")).encode()
        # The same key when the batch is sent again (its answer lost): stored once.
        key = hashlib.sha256(body).hexdigest()[:32]
        async with session.post(route(which), data=body,
                                headers={"Content-Type": "application/json",
                                         "Idempotency-Key": key},
                                timeout=Timeout(total=timeout, connect=timeout)) as r:
            if r.status not in (200, 400, 409, 413):
                # The server is unwell or busy, older than these logs, or refuses the
                # session (a certificate being revoked or rotated): keep them. (409: a
                # record names an endpoint the store has on another node now.)
                raise HttpError(f"POST /v1/{which}: {await error_of(r)}")
            if r.status != 200:   # this batch itself is wrong: sent again, refused again
                counters.batches_refused += 1
                counters.records_refused += len(item.records)
                log.error("the server refused records; dropped", extra={"fields": {
                    "route": which, "status": r.status, "reason": await error_of(r),
                    "records": len(item.records)}})
            else:
                counters.batches_sent += 1
                counters.records_sent += len(item.records)
                sent += len(item.records)
        failed = await asyncio.to_thread(spool.done, item.path)
        if failed is not None:   # logged by the spool
            counters.spool_failures += 1
    return sent
