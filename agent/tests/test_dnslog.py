"""DNS log records: the agent's aggregation of exchanges, and the strict parser the server
runs on what agents send (every field named when wrong, a batch whole or not at all)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from bulkhead.model.dnslog import (
    FIELDS,
    MAX_ANSWERS,
    DnsRecordError,
    parse_dns_batch,
    parse_dns_record,
)
from bulkhead.model.flowlog import End, ForeignNode, TooManyRecords
from bulkhead.observe.dns import DnsPacket
from bulkhead.observe.dnslogs import DnsLogAggregator
from bulkhead.policy.names import Record
from tests.nftfixture import hep, snap

NOW = 1_800_000_000.0
CLIENT, SERVER = ipaddress.ip_address("198.18.0.11"), ipaddress.ip_address("198.18.0.53")


def message(answer: bool, at: float, qname: str = "www.example.org", rcode: str = "NOERROR",
            records: tuple[Record, ...] = (), id_: int = 7) -> DnsPacket:
    return DnsPacket(answer, id_, CLIENT, 40000, SERVER, 53, qname, "A",
                     rcode if answer else "", records if answer else (), at)


def good() -> dict[str, Any]:
    return {"start": NOW - 10, "end": NOW, "node": "web-1", "client_type": "hep",
            "client_name": "web", "client_labels": {"app": "web"}, "client_scope": "",
            "server_type": "net", "server_name": "198.18.0.53", "server_labels": {},
            "server_scope": "private", "qname": "api.example.com", "qtype": "A",
            "rcode": "NOERROR", "answers": ["api.example.com A 198.18.3.4"], "count": 3,
            "latency_count": 2, "latency_mean_ms": 1.5, "latency_max_ms": 2.25}


def test_exchanges_aggregate_by_ends_question_code_and_answers() -> None:
    agg = DnsLogAggregator("web-1", snap(hep("web", "web-1", str(CLIENT), {"app": "web"})))
    chain = (Record("www.example.org", "CNAME", "edge.cdn.example", 30),
             Record("edge.cdn.example", "A", "198.18.0.14", 5))
    for i in range(3):
        query = message(False, NOW + i) if i < 2 else None   # the third: query unseen
        agg.exchange(message(True, NOW + i + 0.002 * (i + 1), records=chain), query)
    agg.exchange(message(True, NOW + 5, qname="gone.example", rcode="NXDOMAIN"),
                 message(False, NOW + 4.999))
    records = sorted(agg.flush(NOW + 15), key=lambda r: r.qname)
    assert [r.qname for r in records] == ["gone.example", "www.example.org"]
    gone, www = records
    assert (gone.rcode, gone.answers, gone.count, gone.latency_count) == \
        ("NXDOMAIN", (), 1, 1)
    assert www.client == End("hep", "web", {"app": "web"})
    assert www.server == End("net", "198.18.0.53", {}, "private")
    assert www.answers == ("edge.cdn.example A 198.18.0.14",
                           "www.example.org CNAME edge.cdn.example")
    assert (www.start, www.end, www.count, www.latency_count) == (NOW + 0.002, NOW + 15, 3, 2)
    assert www.latency_mean_ms == 3.0 and www.latency_max_ms == 4.0
    # Flushed records are gone; what comes back parses as the server would parse it.
    assert agg.flush(NOW + 30) == []
    for r in records:
        assert parse_dns_record(r.json(), NOW + 30, "web-1") == r


def test_what_the_aggregator_makes_the_server_takes_whatever_the_wire_said() -> None:
    """A type named with a hyphen, answers longer than a record takes, a name cut at its
    bound: the record is still one the server's parser accepts."""
    import dns.message

    from bulkhead.observe.dns import parse_packet
    from tests.observe.test_dns import packet

    query = dns.message.make_query("odd.example", "NSAP-PTR")
    wire = parse_packet(packet(query, answer=False))
    assert wire.qtype == "TYPE23"
    long = "a" * 63 + "." + "b" * 63 + "." + "c" * 30 + ".example"
    agg = DnsLogAggregator("n", snap())
    agg.exchange(message(True, NOW, qname="x" * 300 + ".", records=(
        Record(long, "CNAME", long + "x", 30), Record(long, "A", "198.18.0.1", 30))), None)
    agg.exchange(DnsPacket(True, 1, CLIENT, 4, SERVER, 53, "odd.example", wire.qtype,
                           "NOERROR", (), NOW), None)
    for record in agg.flush(NOW + 1):
        assert parse_dns_record(record.json(), NOW + 1, "n") == record
        assert all(len(a) <= 300 for a in record.answers)


def test_a_query_read_after_its_answer_leaves_the_latency_unknown() -> None:
    agg = DnsLogAggregator("n", snap())
    agg.exchange(message(True, NOW), message(False, NOW + 0.001))   # read late
    agg.exchange(message(True, NOW + 1), message(False, NOW + 0.998))
    (record,) = agg.flush(NOW + 2)
    assert (record.count, record.latency_count) == (2, 1)
    assert record.latency_mean_ms == record.latency_max_ms == 2.0


def test_the_aggregator_is_bounded() -> None:
    agg = DnsLogAggregator("n", snap(), max_records=10)
    for i in range(15):
        agg.exchange(message(True, NOW, qname=f"n{i}.example"), None)
    assert len(agg.flush(NOW + 1)) == 10 and agg.dropped == 5


@pytest.mark.parametrize(("change", "field"), [
    ({"qname": "API.example.com"}, "qname"),
    ({"qname": "api.example.com."}, "qname"),
    ({"qtype": "A A"}, "qtype"),
    ({"rcode": "NO\nERROR"}, "rcode"),
    ({"answers": ["only two"]}, "answers[0]"),
    ({"answers": ["a A 1"] * (MAX_ANSWERS + 1)}, "answers"),
    ({"count": 0}, "count"),
    ({"latency_count": 4}, "latency_count"),
    ({"latency_mean_ms": -1}, "latency_mean_ms"),
    ({"latency_max_ms": float("nan")}, "latency_max_ms"),
    ({"latency_mean_ms": 10 ** 400}, "latency_mean_ms"),   # beyond a float: no OverflowError
    ({"start": 10 ** 400}, "start"),
    ({"server_type": "net", "server_name": "resolver"}, "server_name"),
    ({"start": NOW + 1}, "start"),
    ({"extra": 1}, "extra"),
])
def test_a_bad_record_is_refused_naming_its_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(DnsRecordError, match=f"^{field.replace('[', '.').replace(']', '.')}"):
        parse_dns_record({**good(), **change}, NOW)


def test_a_batch_is_taken_whole_or_refused() -> None:
    assert len(parse_dns_batch({"records": [good(), good()]}, NOW, "web-1")) == 2
    assert set(good()) == set(FIELDS)
    bad = {**good(), "count": -1}
    with pytest.raises(DnsRecordError, match=r"^records\[1\]\.count"):
        parse_dns_batch({"records": [good(), bad]}, NOW)
    # Another node's record is refused as forbidden before anything else is looked at.
    with pytest.raises(ForeignNode):
        parse_dns_batch({"records": [bad, {**good(), "node": "db-1"}]}, NOW, "web-1")
    with pytest.raises(TooManyRecords):
        parse_dns_batch({"records": [good()] * 5001}, NOW)
    with pytest.raises(DnsRecordError):
        parse_dns_batch({"flows": []}, NOW)
