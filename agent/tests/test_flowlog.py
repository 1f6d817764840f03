"""The flow record parser's batch rules the server relies on: another node's record is
refused as such before anything else, too many records as such, times to the µs; and
the optional destination domain names."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bulkhead.model.flowlog import (
    MAX_BATCH,
    MAX_DOMAINS,
    MAX_NAME,
    FlowRecordError,
    ForeignNode,
    TooManyRecords,
    parse_batch,
    parse_record,
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


def test_times_beyond_a_float_are_refused_naming_the_field() -> None:
    """An integer too large for a float (an OverflowError in float()) is a bad time, named
    by its field and shown shortened."""
    for key in ("start", "end"):
        doc = {**flow_doc(), key: 10 ** 400}
        with pytest.raises(FlowRecordError, match=rf"^records\[0\]\.{key}: an integer of "
                           r"401 digits is not a time"):
            parse_batch({"records": [doc]}, time.time())


def test_destination_domains_are_optional_and_checked() -> None:
    """`dst_domains`: left out (an agent from before the field) or null is "not known";
    a list is the names, sorted; anything else is refused naming the field."""
    now = time.time()
    old = flow_doc()
    del old["dst_domains"]
    assert parse_record(old, now).dst_domains is None
    assert parse_record(flow_doc(dst_domains=None), now).dst_domains is None
    assert parse_record(flow_doc(dst_domains=[]), now).dst_domains == ()
    got = parse_record(flow_doc(dst_domains=["b.example.com", "a.example.com",
                                             "b.example.com"]), now)
    assert got.dst_domains == ("a.example.com", "b.example.com")
    assert parse_record(got.json(), now) == got
    bad = {"x": "dst_domains: expected a list of domain names or null, got a string",
           "many": f"dst_domains: more than {MAX_DOMAINS} names",
           "one": r"dst_domains\[1\]: expected a string, got a number",
           "upper": r"dst_domains\[0\]: 'Api.example.com' is not a lowercase name",
           "dot": r"dst_domains\[0\]: 'a.example.com.' is not a lowercase name",
           "empty": r"dst_domains\[0\]: must not be empty",
           "long": rf"dst_domains\[0\]: longer than {MAX_NAME} characters",
           "comma": r"dst_domains\[0\]: 'a,b.example' is not a domain name",
           "root": r"dst_domains\[0\]: '\.' is not a lowercase name without the final"}
    values: dict[str, Any] = {
        "x": "a.example.com", "many": [f"n{i}.example.com" for i in range(MAX_DOMAINS + 1)],
        "one": ["a.example.com", 7], "upper": ["Api.example.com"],
        "dot": ["a.example.com."], "empty": [""], "long": ["a" * (MAX_NAME + 1)],
        "comma": ["a,b.example"], "root": ["."]}
    for case, message in bad.items():
        with pytest.raises(FlowRecordError, match=message):
            parse_record(flow_doc(dst_domains=values[case]), now)

    # Only an egress record gives names.
    with pytest.raises(FlowRecordError, match="dst_domains: only an egress record"):
        parse_record(flow_doc(reporter="dst", dst_domains=[]), now)
    # An agent leaves the field out when it does not know (a server from before the
    # field refuses unknown fields); answers always have it.
    assert "dst_domains" not in parse_record(flow_doc(), now).wire()
    assert parse_record(flow_doc(), now).json()["dst_domains"] is None
    assert parse_record(flow_doc(dst_domains=["a.example"]), now).wire()["dst_domains"] == \
        ["a.example"]
