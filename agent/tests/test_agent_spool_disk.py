"""The agent's flow-record spool on a disk that fails under it: a tmpfs of the test's own
(mounted as root, unmounted pass or fail), filled up, or remounted read-only as an ext4
`errors=remount-ro` would be. Nothing the server stored is sent twice, nothing is
spooled twice, and no half-written file is left behind."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bulkhead.agent.config import FlowLogSettings
from bulkhead.agent.flowlogs import FlowLogCounters, FlowLogs, ship_spool
from bulkhead.agent.http import Session
from bulkhead.agent.spool import Spool, SpoolWriteError
from bulkhead.model import Snapshot
from bulkhead.model.flowlog import parse_batch
from bulkhead.policy import Failsafes
from tests.flowfixture import flow_doc
from tests.labfixture import need_root
from tests.test_server_flows import Starter, count, make  # noqa: F401
from tests.test_server_process import pki_dir, servers  # noqa: F401

PAGE = 4096


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of its own."""
    need_root()
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                    str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    """A file taking the disk's free space but `leave` bytes (whole pages)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (free - leave))
    return filler


def records(n: int, start: int = 0) -> list:   # type: ignore[type-arg]
    now = time.time()
    return list(parse_batch({"records": [flow_doc(end=now - 100 + i, dst_port=1000 + i)
                                         for i in range(start, start + n)]}, now, "web-1"))


def test_a_flush_the_disk_stops_midway_keeps_only_what_was_not_spooled(disk: Path,
                                                                       tmp_path: Path
                                                                       ) -> None:
    """Room for one file of ten records: a flush of twenty writes the first, fails on
    the second (no `.tmp` left), and keeps only the ten not spooled for the next flush;
    once there is room, the spool holds each record once."""
    sizer = Spool(tmp_path / "sizer", 1 << 20, batch=10)
    sizer.put(records(10))
    size = sizer.total_bytes
    flows = FlowLogs(FlowLogSettings(), "web-1", Failsafes(), disk / "state")
    flows.spool.batch = 10
    flows.update(Snapshot.build([]), {})
    flows.spool.put([])                       # the directory, before the disk fills
    filler = fill(disk, -(-size // PAGE) * PAGE)
    batch = records(20)
    with pytest.raises(SpoolWriteError) as err:
        flows.spool.put(batch)
    assert err.value.written == 10 and "10 of the records were spooled" in str(err.value)
    assert flows.spool.records == 10
    assert not list(flows.spool.directory.glob("*.tmp"))
    flows.spool.done(flows.spool.oldest().path)   # type: ignore[union-attr]
    # The agent's own flush: the first ten spooled, the second ten kept in memory.
    flows._unspooled = batch
    assert asyncio.run(flows.flush(None)) == 0
    assert flows.counters.spool_failures == 1 and len(flows._unspooled) == 10
    assert flows.spool.records == 10
    filler.unlink()
    assert asyncio.run(flows.flush(None)) == 10
    ports = []
    while (item := flows.spool.oldest()) is not None:
        ports += [r["dst_port"] for r in item.records]
        flows.spool.done(item.path)
    assert sorted(ports) == list(range(1000, 1020))


def test_a_file_sent_but_not_removable_is_not_sent_again(disk: Path, make: Starter  # noqa: F811
                                                         ) -> None:
    """The disk goes read-only under the spool: the server stores each file once (its
    removal fails, is counted and logged, and the file is forgotten), and the next
    shipping sends nothing again."""
    server = make()
    spool = Spool(disk / "flows", 1 << 20, batch=2)
    spool.put(records(4))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=30)
    web = server.client("web-1", "agent")
    ctx = ssl.create_default_context(cafile=web.ca)
    ctx.load_cert_chain(str(web.cert), web.key)
    counters = FlowLogCounters()

    async def ship() -> int:
        async with Session(f"https://127.0.0.1:{server.port}", ctx) as session:
            return await ship_spool(session, spool, "flows", counters)

    assert asyncio.run(ship()) == 4
    assert count(server) == 4 and counters.spool_failures == 2 and spool.unremoved == 2
    assert asyncio.run(ship()) == 0
    assert count(server) == 4 and spool.records == 0
    assert len(list((disk / "flows").glob("*.jsonl"))) == 2   # still there: read-only
