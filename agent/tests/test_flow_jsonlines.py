"""The JSON lines copy for log shippers: one line per record, rotated by size as logrotate
does by default (rename, then create), at most `keep` files, a batch never split."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bulkhead.store.flowlog import JsonLinesSink
from tests.flowfixture import flow


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_record_is_one_line_with_received(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "logs" / "flows.jsonl", 1 << 20, 3)
    records = [flow(dst_name="a"), flow(dst_name="b")]
    written = sink.write(records, received=1234.5)
    got = lines(sink.path)
    assert got == [{**r.json(), "received": 1234.5} for r in records]
    assert written == sink.path.stat().st_size
    assert sink.path.stat().st_mode & 0o777 == 0o640
    assert sink.write([]) == 0


def test_rotation_renames_then_creates_and_keeps_n_files(tmp_path: Path) -> None:
    batch = [flow(dst_name=f"d{i}") for i in range(3)]
    one = len(json.dumps({**batch[0].json(), "received": 1.0}, separators=(",", ":"))) + 1
    sink = JsonLinesSink(tmp_path / "flows.jsonl", max_bytes=7 * one, keep=3)
    sink.write(batch, 1.0)
    sink.write(batch, 2.0)                        # 6 lines: fits
    inode = sink.path.stat().st_ino
    sink.write(batch, 3.0)                        # would make 9: rotate first
    assert sink.path.with_name("flows.jsonl.1").stat().st_ino == inode   # renamed, not copied
    assert sink.path.stat().st_ino != inode                              # a new file
    assert [x["received"] for x in lines(sink.path)] == [3.0] * 3
    assert [x["received"] for x in lines(sink.path.with_name("flows.jsonl.1"))] == \
        [1.0] * 3 + [2.0] * 3
    for stamp in (4.0, 5.0, 6.0, 7.0):
        sink.write(batch, stamp)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    # Every file holds whole batches; the newest lines are in flows.jsonl.
    stamps = [[x["received"] for x in lines(tmp_path / n)] for n in names]
    assert stamps == [[7.0] * 3, [5.0] * 3 + [6.0] * 3, [3.0] * 3 + [4.0] * 3]
    assert sink.rotations == 3


def test_a_batch_bigger_than_the_bound_gets_a_file_of_its_own(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "flows.jsonl", max_bytes=100, keep=2)
    sink.write([flow()], 1.0)
    sink.write([flow(), flow()], 2.0)
    assert [x["received"] for x in lines(sink.path)] == [2.0, 2.0]
    assert [x["received"] for x in lines(tmp_path / "flows.jsonl.1")] == [1.0]


def test_a_shipper_holding_the_old_file_reads_it_to_the_end(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "flows.jsonl", max_bytes=100, keep=2)
    sink.write([flow(dst_name="first")], 1.0)
    with open(sink.path) as shipper:              # tails by file descriptor, as shippers do
        sink.write([flow(dst_name="second")], 2.0)
        assert [json.loads(x)["dst_name"] for x in shipper] == ["first"]
    assert lines(sink.path)[0]["dst_name"] == "second"


def test_bounds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep at least 2"):
        JsonLinesSink(tmp_path / "f.jsonl", 100, 1)


def test_a_write_the_disk_refuses_raises(tmp_path: Path) -> None:
    sink = JsonLinesSink(tmp_path / "flows.jsonl", 1 << 20, 2)
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):           # root writes anyway: make it a folder
            sink.path.mkdir()
        with pytest.raises(OSError):
            sink.write([flow()])
    finally:
        os.chmod(tmp_path, 0o700)
