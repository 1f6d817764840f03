"""The agent's flow-record spool: atomic files, oldest first, bounded, drops counted."""

from __future__ import annotations

from pathlib import Path

from bulkhead.agent.spool import Spool
from bulkhead.model.flowlog import End, FlowRecord, parse_record


def record(i: int) -> FlowRecord:
    return FlowRecord(100.0, 115.0, "n1", "dst", End("net", f"198.18.3.{i % 250}", {}, "private"),
                      End("hep", "db", {"app": "db"}), 6, 5432, "allow",
                      ("default|db|0|allow",), "allow", ("default|db|0|allow",),
                      connections=1, started=1, packets_in=i)


def test_records_come_back_oldest_first_in_batches_and_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "flows", max_bytes=10 << 20, batch=4)
    spool.put([record(i) for i in range(10)])     # 4 + 4 + 2
    spool.put([record(100)])
    assert spool.records == 11
    again = Spool(tmp_path / "flows", max_bytes=10 << 20, batch=4)   # a restarted agent
    seen = []
    while (item := again.oldest()) is not None:
        seen += [parse_record(r, now=200.0).packets_in for r in item.records]
        again.done(item.path)
    assert seen == [*range(10), 100]
    assert again.records == 0 and not list((tmp_path / "flows").iterdir())


def test_past_the_bound_the_oldest_go_and_are_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4000, batch=5)
    for start in range(0, 40, 5):
        spool.put([record(i) for i in range(start, start + 5)])
    assert spool.total_bytes <= 4000
    assert spool.dropped > 0 and spool.dropped + spool.records == 40
    first = spool.oldest()
    assert first is not None
    # The newest records are the ones kept.
    assert parse_record(first.records[0], now=200.0).packets_in == spool.dropped


def test_an_unreadable_file_or_a_half_written_one_is_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.put([record(1), record(2)])
    (tmp_path / "000000000009-3.tmp").write_text("{")   # a crash before the rename
    [path] = list(tmp_path.glob("*.jsonl"))
    path.write_text("{not json\n")
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.oldest() is None and again.dropped == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_the_directory_is_made_on_first_use_only(tmp_path: Path) -> None:
    """A dry run builds the agent, and so its spool: that must leave no directory behind."""
    spool = Spool(tmp_path / "flows", max_bytes=1 << 20)
    assert spool.records == 0 and not (tmp_path / "flows").exists()
    assert spool.oldest() is None
    assert (tmp_path / "flows").stat().st_mode & 0o777 == 0o700


def test_a_file_stays_within_one_request_body(tmp_path: Path) -> None:
    one = len(record(0).json().__repr__())
    spool = Spool(tmp_path, max_bytes=1 << 20, batch=1000, batch_bytes=64 + 3 * one)
    spool.put([record(i) for i in range(10)])
    counts = []
    while (item := spool.oldest()) is not None:
        counts.append(len(item.records))
        spool.done(item.path)
    assert sum(counts) == 10 and max(counts) <= 3 and len(counts) >= 4


def test_the_file_being_sent_is_never_trimmed_under_the_shipper(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=3000, batch=3)
    spool.put([record(i) for i in range(3)])
    sending = spool.oldest()
    assert sending is not None
    spool.put([record(i) for i in range(3, 12)])    # past the bound: the others go first
    assert sending.path.exists() and spool.total_bytes > 0
    spool.done(sending.path)
    rest = spool.oldest()
    assert rest is not None and rest.path != sending.path
