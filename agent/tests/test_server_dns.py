"""DNS logs through a real bulkhead-server process with real certificates: ingest (only an
agent, only its own node's records, a batch whole or not at all), queries with each
filter, `--follow`'s `after`, bad parameters, retention, metrics, the JSON lines copy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bulkhead.client import ApiError
from bulkhead.client.flows import dns_logs, send_dns
from tests.test_server_flows import Starter, hep, make, metric  # noqa: F401
from tests.test_server_process import pki_dir, servers  # noqa: F401


def record(end: float, qname: str = "api.example.com", node: str = "web-1",
           **change: Any) -> dict[str, Any]:
    return {"start": end - 10, "end": end, "node": node, "client_type": "hep",
            "client_name": node, "client_labels": {"app": "web"}, "client_scope": "",
            "server_type": "net", "server_name": "198.18.0.53", "server_labels": {},
            "server_scope": "private", "qname": qname, "qtype": "A", "rcode": "NOERROR",
            "answers": [f"{qname} A 198.18.3.4"], "count": 2, "latency_count": 2,
            "latency_mean_ms": 1.25, "latency_max_ms": 1.5, **change}


def names(answer: dict[str, Any]) -> list[str]:
    return [r["qname"] for r in answer["dns"]]


def test_ingest_then_query_with_each_filter(make: Starter) -> None:  # noqa: F811
    server = make({"jsonLines": {"path": "{dir}/shipped/flows.jsonl"}})
    agent = server.client("web-1", "agent")
    viewer = server.client("carol", "viewer")
    now = round(time.time(), 3)
    docs = [record(now - 50), record(now - 40, "a.cdn.example"),
            record(now - 30, "gone.example", rcode="NXDOMAIN", answers=[]),
            record(now - 7200, "old.example")]
    assert send_dns(agent, docs) == 4
    assert names(dns_logs(viewer)) == ["gone.example", "a.cdn.example", "api.example.com"]
    got = dns_logs(viewer, since=0)["dns"]
    assert got[-1]["qname"] == "old.example"
    first = dict(got[-2])
    assert first.pop("received") >= now - 1 and first == record(now - 50)
    assert names(dns_logs(viewer, qname="*.cdn.example")) == ["a.cdn.example"]
    assert names(dns_logs(viewer, qname="*.example")) == ["gone.example", "a.cdn.example"]
    assert names(dns_logs(viewer, qname="api.example.com")) == ["api.example.com"]
    assert names(dns_logs(viewer, rcode="nxdomain")) == ["gone.example"]
    assert names(dns_logs(viewer, client="web-1", limit=1)) == ["gone.example"]
    assert dns_logs(viewer, client="web-1", limit=1)["truncated"] is True
    assert names(dns_logs(viewer, node="db-1")) == []
    assert names(dns_logs(viewer, since=now - 45, until=now - 35)) == ["a.cdn.example"]
    # --follow: what was stored at or after a time, oldest first.
    later = time.time()
    assert send_dns(agent, [record(now, "new.example")]) == 1
    assert names(dns_logs(viewer, after=later)) == ["new.example"]
    # The JSON lines copy for shippers, beside the flows' file.
    shipped = server.config.parent / "shipped" / "dns-flows.jsonl"
    lines = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert [d["qname"] for d in lines] == [d["qname"] for d in docs] + ["new.example"]
    assert metric(server, "bulkhead_dns_records_stored_total") == 5


def test_only_an_agent_sends_and_only_its_own_records(make: Starter) -> None:  # noqa: F811
    server = make()
    now = time.time()
    with pytest.raises(ApiError) as refused:
        send_dns(server.client("carol", "admin"), [record(now)])
    assert refused.value.status == 403
    with pytest.raises(ApiError) as foreign:
        send_dns(server.client("web-1", "agent"), [record(now), record(now, node="db-1")])
    assert foreign.value.status == 403 and "nothing was stored" in str(foreign.value)
    with pytest.raises(ApiError) as bad:
        send_dns(server.client("web-1", "agent"), [record(now), record(now, count=0)])
    assert bad.value.status == 400 and "records[1].count" in str(bad.value)
    # Agents do not read the logs.
    with pytest.raises(ApiError) as reader:
        dns_logs(server.client("web-1", "agent"))
    assert reader.value.status == 403
    assert dns_logs(server.client("carol", "admin"), since=0)["dns"] == []
    assert metric(server, 'bulkhead_dns_batches_refused_total{reason="forbidden"}') == 2
    assert metric(server, 'bulkhead_dns_batches_refused_total{reason="invalid"}') == 1


def test_lookups_of_another_nodes_endpoint_are_refused_whole(make: Starter  # noqa: F811
                                                              ) -> None:
    """An agent reports its own host's lookups: a record whose client is a HostEndpoint
    the store has on another node is refused, batch and all, with the 409 the agent drops
    a batch on; an endpoint the store does not hold is taken."""
    server = make()
    for name, ip in (("web-1", "198.18.0.11"), ("db-1", "198.18.0.12")):
        server.conn.request("POST", "/v1/resources/HostEndpoint", hep(name, name, ip))
    agent = server.client("web-1", "agent")
    now = time.time()
    assert send_dns(agent, [record(now - 5), record(now - 4, client_name="web-old")]) == 2
    with pytest.raises(ApiError) as err:
        send_dns(agent, [record(now - 3), record(now - 2, "evil.example",
                                                 client_name="db-1")])
    assert err.value.status == 409
    assert ("records[1].client_name: host endpoint 'db-1' is on node 'db-1', not this "
            "agent's ('web-1')") in err.value.message
    assert "nothing was stored" in err.value.message
    assert len(dns_logs(server.client("carol", "viewer"), since=0)["dns"]) == 2
    assert metric(server, 'bulkhead_dns_batches_refused_total{reason="foreign_endpoint"}') == 1


@pytest.mark.parametrize(("query", "param"), [
    ({"qname": "API.example.com"}, "qname"), ({"qname": "*."}, "qname"),
    ({"qname": "a b"}, "qname"), ({"rcode": "NO ERROR"}, "rcode"),
    ({"since": "yesterday"}, "since"), ({"limit": "0"}, "limit"), ({"verb": "x"}, "verb"),
])
def test_bad_parameters_are_refused_by_name(make: Starter, query: dict[str, str],  # noqa: F811
                                            param: str) -> None:
    server = make()
    with pytest.raises(ApiError) as refused:
        server.client("carol", "viewer").request("GET", "/v1/dns", query=query)
    assert refused.value.status == 400 and str(refused.value).find(param) >= 0


def test_retention_deletes_old_records(make: Starter, tmp_path: Path) -> None:  # noqa: F811
    server = make({"retention": 0.01, "expireInterval": 0.2})   # 36 s
    now = time.time()
    assert send_dns(server.client("web-1", "agent"), [record(now - 100), record(now)]) == 2
    viewer = server.client("carol", "viewer")
    deadline = time.monotonic() + 20
    while len(dns_logs(viewer, since=0)["dns"]) != 1:
        assert time.monotonic() < deadline, "the old record was not expired"
        time.sleep(0.2)
    # counted once the delete's transaction is back, a moment after the rows are gone
    while metric(server, "bulkhead_dns_records_expired_total") == 0:
        assert time.monotonic() < deadline, "the expiry was not counted"
        time.sleep(0.1)
    assert metric(server, "bulkhead_dns_records_expired_total") == 1
