"""The flow record parser's batch rules the server relies on: another node's record is
refused as such before anything else, too many records as such, times to the µs."""

from __future__ import annotations

import time

import pytest

from bulkhead.model.flowlog import (
    MAX_BATCH,
    FlowRecordError,
    ForeignNode,
    TooManyRecords,
    parse_batch,
)
from tests.flowfixture import flow_doc


def test_another_nodes_record_is_foreign_before_a_malformed_one() -> None:
    batch = {"records": [flow_doc(proto="tcp"), flow_doc(node="db-1")]}
    with pytest.raises(ForeignNode, match=r"^records\[1\]\.node: 'db-1' is not this agent"):
        parse_batch(batch, time.time(), "web-1")
    # Without the node check the malformed record is what is wrong, named by its field.
    with pytest.raises(FlowRecordError, match=r"^records\[0\]\.proto: expected an integer"
                       ) as err:
        parse_batch(batch, time.time())
    assert not isinstance(err.value, ForeignNode)


def test_too_many_records_and_times_kept_to_the_microsecond() -> None:
    with pytest.raises(TooManyRecords, match=f"at most {MAX_BATCH}"):
        parse_batch({"records": [flow_doc()] * (MAX_BATCH + 1)}, time.time())
    (record,) = parse_batch({"records": [flow_doc(end=1_700_000_000.12345678)]},
                            time.time(), "web-1")
    assert record.end == 1_700_000_000.123457
