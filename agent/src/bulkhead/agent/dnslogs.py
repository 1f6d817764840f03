"""DNS logs in the agent: the snooper's exchanges (an answer and its query) aggregated per
flush interval (`bulkhead.observe.dnslogs`), spooled on disk and shipped to the server
(`POST /v1/dns`), as flow records are (agent/flowlogs.py): on with flow logs, at their
flush interval, a quarter of their spool's bound on disk while the server is away
(drop-oldest, counted), a batch the server refuses dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkhead.agent.config import FlowLogSettings
from bulkhead.agent.flowlogs import FlowLogCounters, ship_forever, ship_spool
from bulkhead.agent.http import Session
from bulkhead.agent.spool import Spool, SpoolWriteError
from bulkhead.model import Snapshot
from bulkhead.observe.dns import DnsPacket
from bulkhead.observe.dnslogs import DnsLogAggregator

log = logging.getLogger("bulkhead.agent.dnslogs")


class DnsLogs:
    def __init__(self, settings: FlowLogSettings, node: str, state_dir: Path) -> None:
        self.settings = settings
        self.node = node
        self.spool = Spool(state_dir / "dns", max(1 << 20, settings.spool_bytes // 4))
        self.counters = FlowLogCounters()
        self.aggregator: DnsLogAggregator | None = None
        self._unspooled: list[Any] = []
        self._kick = asyncio.Event()

    def update(self, snapshot: Snapshot) -> None:
        """A new policy: the ends of the records (host endpoints, network sets) from it."""
        if self.aggregator is None:
            self.aggregator = DnsLogAggregator(self.node, snapshot,
                                               max_records=self.settings.max_records)
        else:
            self.aggregator.set_snapshot(snapshot)

    def exchange(self, answer: DnsPacket, query: DnsPacket | None) -> None:
        if self.aggregator is not None:
            self.aggregator.exchange(answer, query)

    def stats(self) -> dict[str, int]:
        return {"dnsLogRecordsSent": self.counters.records_sent,
                "dnsLogRecordsRefused": self.counters.records_refused,
                "dnsLogRecordsSpooled": self.spool.records,
                "dnsLogRecordsDroppedSpool": self.spool.dropped,
                "dnsLogShipFailures": self.counters.ship_failures,
                "dnsLogDropped": self.aggregator.dropped if self.aggregator else 0}

    async def flush(self) -> int:
        """The interval's records to the spool (kept in memory, bounded, if it fails)."""
        if self.aggregator is None:
            return 0
        records = [*self._unspooled, *self.aggregator.flush(time.time())]
        if not records:
            return 0
        try:
            await asyncio.to_thread(self.spool.put, records)
        except SpoolWriteError as e:   # kept: those not spooled before the failure
            self._unspooled = records[e.written:][-self.settings.max_records:]
            self.counters.spool_failures += 1
            log.error("DNS log records not written to the spool; kept in memory: %s", e)
            return 0
        self._unspooled = []
        self._kick.set()
        return len(records)

    async def ship(self, session: Session, timeout: float = 30.0) -> int:
        return await ship_spool(session, self.spool, "dns", self.counters, timeout)

    async def run(self, session: Session, stopping: Callable[[], bool]) -> None:
        """Flush every interval and ship until cancelled (or `stopping()`)."""
        shipper = asyncio.create_task(ship_forever(
            lambda: self.ship(session), stopping, self._kick, self.spool, self.counters,
            self.settings.flush_interval, "DNS log"), name="ship-dns")
        try:
            while not stopping():
                await asyncio.sleep(self.settings.flush_interval)
                await self.flush()
        finally:
            shipper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shipper
            with contextlib.suppress(Exception):
                await self.flush()
