"""Flow logs through a real bulkhead-server process with real certificates: ingest (only
an agent, only its own node's records, a batch whole or not at all, bounded), queries
with each filter, top talkers, retention, metrics, the JSON lines copy, and ClickHouse
(embedded by chdb) as the store."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bulkhead.agent.flowlogs import FlowLogCounters, ship_spool
from bulkhead.agent.http import HttpError, Session
from bulkhead.agent.spool import Spool
from bulkhead.client import ApiError, Connection
from bulkhead.client.flows import dns_logs, flows, send_dns, send_flows
from bulkhead.model.flowlog import MAX_BATCH, MAX_BATCH_BYTES, parse_batch
from bulkhead.server.flows import NodeBudget
from bulkhead.server.main import ServerConfig
from tests.flowfixture import flow_doc
from tests.test_server_process import ServerProcess, pki_dir, servers  # noqa: F401

Starter = Callable[..., ServerProcess]


@pytest.fixture
def make(pki_dir: Path, servers: list[ServerProcess]) -> Starter:  # noqa: F811
    """Starts a server on SQLite with the `flowLogs` section given (`{dir}` in its text:
    the server's folder); `servers` stops it."""
    def start(flow_logs: dict[str, Any] | None = None) -> ServerProcess:
        section = json.loads(json.dumps(flow_logs).replace("{dir}", str(pki_dir))) \
            if flow_logs else None
        server = ServerProcess(pki_dir, f"sqlite://{pki_dir}/store.db",
                               extra={"flowLogs": section} if section else None)
        servers.append(server)
        server.start()
        return server
    return start


def count(server: ServerProcess) -> int:
    return len(flows(server.conn, since=0)["flows"])


def metric(server: ServerProcess, line: str) -> int:
    text = server.conn.request("GET", "/metrics")
    for row in text.splitlines():
        if row.startswith(line + " "):
            return int(row.split()[-1])
    raise AssertionError(f"{line} not in /metrics")


def sample(now: float) -> list[dict[str, Any]]:
    return [
        flow_doc(end=now - 50, dst_name="db-1", dst_domains=["db.example.com",
                                                             "pg.example.com"]),
        flow_doc(end=now - 40, dst_name="db-2", reporter="dst", action="deny",
                 enforced_trace=["security|security.block|1|deny"], staged_action="deny",
                 staged_trace=["security|security.block|1|deny"], bytes_in=5000),
        flow_doc(end=now - 30, dst_name="cache-1", staged_action="deny",
                 staged_trace=["audit|audit.lockdown|-|deny"], dst_labels={"app": "cache"}),
        flow_doc(end=now - 7200, dst_name="old"),
    ]


def dsts(answer: dict[str, Any]) -> list[str]:
    return [f["dst_name"] for f in answer["flows"]]


def test_ingest_then_query_with_each_filter(make: Starter) -> None:
    server = make({"jsonLines": {"path": "{dir}/shipped/flows.jsonl"}})
    jsonl = server.config.parent / "shipped" / "flows.jsonl"
    agent = server.client("web-1", "agent")
    viewer = server.client("carol", "viewer")
    now = round(time.time(), 3)   # the server keeps times to the microsecond
    docs = sample(now)
    assert send_flows(agent, docs) == 4
    answer = flows(viewer)                              # the last hour, newest first
    assert dsts(answer) == ["cache-1", "db-2", "db-1"] and answer["truncated"] is False
    got = answer["flows"][2]
    assert {k: v for k, v in got.items() if k != "received"} == docs[0]
    assert abs(got["received"] - now) < 60
    assert dsts(flows(viewer, since=0)) == ["cache-1", "db-2", "db-1", "old"]
    assert dsts(flows(viewer, since=now - 45, until=now - 35)) == ["db-2"]
    assert dsts(flows(viewer, node="web-1", reporter="dst")) == ["db-2"]
    assert dsts(flows(viewer, node="web-2")) == []
    assert dsts(flows(viewer, action="deny")) == ["db-2"]
    assert dsts(flows(viewer, policy="security.block")) == ["db-2"]
    assert dsts(flows(viewer, policy="audit.lockdown")) == ["cache-1"]
    assert dsts(flows(viewer, tier="audit")) == ["cache-1"]
    assert dsts(flows(viewer, staged_differs=True)) == ["cache-1"]
    assert dsts(flows(viewer, selector="app == 'cache'")) == ["cache-1"]
    assert dsts(flows(viewer, selector="app == 'web'", limit=2)) == ["cache-1", "db-2"]
    assert dsts(flows(viewer, endpoint="db-1")) == ["db-1"]
    top = flows(viewer, top=2)
    assert [(t["dst_name"], t["bytes"]) for t in top["top"]] == [("db-2", 7000),
                                                                  ("cache-1", 3000)]
    # The JSON lines copy: one line per stored record, as stored.
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["dst_name"] for line in lines] == ["db-1", "db-2", "cache-1", "old"]
    assert metric(server, "bulkhead_flow_records_stored_total") == 4
    assert metric(server, "bulkhead_flow_batches_stored_total") == 1


@pytest.mark.parametrize(("params", "message"), [
    ({"since": "yesterday"}, "since: 'yesterday' is not a time"),
    ({"since": "nan"}, "since: 'nan' is not a time"),
    ({"until": "10000000001"}, "until: '10000000001' is not a time"),
    ({"after": "-1"}, "after: '-1' is not a time"),
    ({"since": "10", "until": "5"}, "since: 10.0 is after until 5.0"),
    ({"action": "drop"}, "action: 'drop' is not one of allow, deny"),
    ({"reporter": "both"}, "reporter: 'both' is not one of src, dst"),
    ({"staged": "yes"}, "staged: 'yes': the one value is `differs`"),
    ({"selector": "app == "}, "selector: "),
    ({"limit": "10001"}, "limit: '10001' is not a number from 1 to 10,000"),
    ({"limit": "0"}, "limit: '0' is not a number from 1"),
    ({"top": "5", "limit": "5"}, "limit: not with top"),
    ({"policy": "a|b"}, "policy: 'a|b' is not a name"),
    ({"node": "x" * 254}, "node: 'xxxx"),
    ({"colour": "red"}, "colour: unknown parameter"),
])
def test_query_parameters_are_checked(make: Starter,
                                      params: dict[str, str], message: str) -> None:
    server = make()
    with pytest.raises(ApiError) as err:
        server.conn.request("GET", "/v1/flows", query=params)
    assert err.value.status == 400 and message in err.value.message, err.value.message


def test_a_parameter_given_twice_is_refused(make: Starter) -> None:
    server = make()
    with pytest.raises(ApiError) as err:
        server.conn.request("GET", "/v1/flows?node=a&node=b")
    assert err.value.status == 400 and "node: given more than once" in err.value.message


def test_another_nodes_records_are_refused_whole(make: Starter) -> None:
    server = make()
    agent = server.client("web-1", "agent")
    now = time.time()
    # The foreign record comes after a malformed one: the node is checked first.
    batch = [flow_doc(end=now - 5), flow_doc(end=now - 4, proto="tcp"),
             flow_doc(end=now - 3, node="db-1")]
    with pytest.raises(ApiError) as err:
        send_flows(agent, batch)
    assert err.value.status == 403
    assert "records[2].node: 'db-1' is not this agent's node ('web-1')" in err.value.message
    assert "nothing was stored" in err.value.message
    assert count(server) == 0
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="forbidden"}') == 1


def hep(name: str, node: str, ip: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": {"app": name.split("-")[0]}},
            "spec": {"node": node, "expectedIPs": [ip]}}


def test_records_about_another_nodes_endpoint_are_refused_whole(make: Starter) -> None:
    """An agent reports its own endpoints' flows: a record whose reporting end (the
    destination of an ingress record) is a HostEndpoint the store has on another node
    is refused, batch and all; the other end may be anyone's, and an endpoint the store
    does not hold (deleted since) is taken."""
    server = make()
    for name, ip in (("web-1", "198.18.0.11"), ("db-1", "198.18.0.12")):
        server.conn.request("POST", "/v1/resources/HostEndpoint", hep(name, name, ip))
    agent = server.client("web-1", "agent")
    now = time.time()
    # web-1's own: egress to db-1, ingress from db-1, and one of an endpoint gone since
    send_flows(agent, [flow_doc(end=now - 5),
                       flow_doc(end=now - 4, reporter="dst", src_name="db-1",
                                dst_name="web-1"),
                       flow_doc(end=now - 3, src_name="web-old")])
    assert count(server) == 3
    # "db-1 saw a connection from web-1 denied": db-1's to say, not web-1's
    forged = flow_doc(end=now - 2, reporter="dst", action="deny", connections=1_000_000,
                      enforced_trace=["security|security.db-in|0|deny"])
    with pytest.raises(ApiError) as err:
        send_flows(agent, [flow_doc(end=now - 1), forged])
    # 409: the agent drops such a batch (an endpoint moved to another node would have
    # its spool send it again forever on a 403)
    assert err.value.status == 409
    assert ("records[1].dst_name: host endpoint 'db-1' is on node 'db-1', not this "
            "agent's ('web-1')") in err.value.message
    assert count(server) == 3
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="foreign_endpoint"}') == 1


def test_a_malformed_batch_is_refused_whole(make: Starter) -> None:
    server = make()
    agent = server.client("web-1", "agent")
    now = time.time()
    for bad, message in (
            (flow_doc(end=now, dst_port=70000), "records[1].dst_port: 70000 is outside"),
            (flow_doc(end=now, enforced_trace=["nope"]), "records[1].enforced_trace[0]: "),
            ({**flow_doc(end=now), "extra": 1}, "records[1].extra: unknown field")):
        with pytest.raises(ApiError) as err:
            send_flows(agent, [flow_doc(end=now - 1), bad])
        assert err.value.status == 400 and message in err.value.message, err.value.message
    for body in (b"[]", b'{"records": {}}', b'{"records": [], "more": 1}', b"{",
                 b'{"records": [NaN]}'):
        with pytest.raises(ApiError) as err:
            agent.request("POST", "/v1/flows", raw=body)
        assert err.value.status == 400, body
    assert count(server) == 0
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="invalid"}') == 8


def test_roles(make: Starter) -> None:
    server = make()
    agent = server.client("web-1", "agent")
    assert send_flows(agent, [flow_doc()]) == 1
    assert len(flows(server.client("carol", "viewer"))["flows"]) == 1
    assert len(flows(server.conn)["flows"]) == 1                     # admin
    for who, call in ((agent, lambda c: flows(c)),
                      (server.client("carol", "viewer"), lambda c: send_flows(c, [flow_doc()])),
                      (server.conn, lambda c: send_flows(c, [flow_doc()]))):
        with pytest.raises(ApiError) as err:
            call(who)
        assert err.value.status == 403, who.cert
    assert count(server) == 1
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="forbidden"}') == 2


def _raw_post(server: ServerProcess, agent: Connection, headers: dict[str, str],
              body: bytes = b"") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=agent.ca)
    ctx.load_cert_chain(str(agent.cert), agent.key)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=30)
    try:
        conn.putrequest("POST", "/v1/flows")
        for key, value in {"Content-Type": "application/json", **headers}.items():
            conn.putheader(key, value)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_oversize_bodies_and_too_many_records(make: Starter) -> None:
    server = make()
    agent = server.client("web-1", "agent")
    # Refused on the header alone: the body is never read.
    status, text = _raw_post(server, agent, {"Content-Length": str(MAX_BATCH_BYTES + 1)})
    assert status == 413 and f"larger than {MAX_BATCH_BYTES:,} bytes" in text
    doc = flow_doc()
    body = json.dumps({"records": [doc] * (MAX_BATCH + 1)}).encode()
    status, text = _raw_post(server, agent, {"Content-Length": str(len(body))}, body)
    assert status == 413 and f"5001 records; at most {MAX_BATCH}" in text
    assert count(server) == 0
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="too_large"}') == 2
    # The client splits what one request cannot hold.
    assert send_flows(agent, [doc] * (MAX_BATCH + 1)) == MAX_BATCH + 1
    assert metric(server, "bulkhead_flow_batches_stored_total") == 2


def test_an_agent_over_its_bytes_a_minute_is_told_to_come_back(make: Starter) -> None:
    """Each node may send `nodeBytesPerMinute` of flow (and, apart, DNS) batches: past it,
    429 with Retry-After before its body is read, nothing stored, counted; other nodes
    are not held back. (A compromised host's agent otherwise filled the server's disk
    at the speed of the network.)"""
    server = make({"nodeBytesPerMinute": 4096})
    web, db = server.client("web-1", "agent"), server.client("db-1", "agent")
    now = time.time()
    batch = [flow_doc(end=now - 5, dst_name=f"d{i}") for i in range(8)]
    assert len(json.dumps({"records": batch})) > 4096
    assert send_flows(web, batch) == 8          # a full bucket takes one batch, any size
    with pytest.raises(ApiError) as err:
        send_flows(web, batch[:1])
    assert err.value.status == 429
    assert "agent web-1: more than 4,096 bytes of flow records a minute; nothing was " \
        "stored, send again in" in err.value.message
    status, text = _raw_post(server, web, {"Content-Length": "10"}, b"not json!!")
    assert status == 429, text                  # refused before the body is read
    assert send_flows(db, [flow_doc(end=now - 5, node="db-1")]) == 1
    assert count(server) == 9
    assert metric(server, 'bulkhead_flow_batches_refused_total{reason="rate_limited"}') == 2


def test_a_nodes_batches_sent_together_share_its_budget(make: Starter) -> None:
    """Batches of one node arriving at once: the first takes the bucket (charged what its
    Content-Length says, before its body is read), the next is refused at its headers."""
    server = make({"nodeBytesPerMinute": 4096})
    web = server.client("web-1", "agent")
    ctx = ssl.create_default_context(cafile=web.ca)
    ctx.load_cert_chain(str(web.cert), web.key)
    now = time.time()
    body = json.dumps({"records": [flow_doc(end=now - 5, dst_name=f"d{i}")
                                   for i in range(8)]}).encode()
    head = (f"POST /v1/flows HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
    socks = []
    try:
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            socks.append(tls)
            tls.sendall(head + body[:100])   # the rest comes later
        time.sleep(0.5)
        answers = []
        for tls in socks:
            with contextlib.suppress(OSError):   # already answered and closed
                tls.sendall(body[100:])
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            answers.append(int(answer.split(b" ", 2)[1]))
    finally:
        for tls in socks:
            tls.close()
    assert answers == [200, 429, 429]
    assert count(server) == 8


def spooled(tmp_path: Path, count: int) -> tuple[Spool, Sequence[Any]]:
    """An agent's spool for web-1 with one batch of `count` records in it, and them."""
    now = time.time()
    records = parse_batch({"records": [flow_doc(end=now - 5, dst_name=f"d{i}")
                                       for i in range(count)]}, now, "web-1")
    spool = Spool(tmp_path / "spool", 1 << 20, batch=count)
    spool.put(records)
    return spool, records


async def test_the_agent_keeps_a_batch_told_to_come_back_in_its_spool(
        make: Starter, tmp_path: Path) -> None:
    """The agent's side of a 429: the batch stays on disk for later, not dropped."""
    server = make({"nodeBytesPerMinute": 4096})
    web = server.client("web-1", "agent")
    spool, records = spooled(tmp_path, 8)
    spool.put(records[:1])
    ctx = ssl.create_default_context(cafile=web.ca)
    ctx.load_cert_chain(str(web.cert), web.key)
    counters = FlowLogCounters()
    async with Session(f"https://127.0.0.1:{server.port}", ctx) as session:
        with pytest.raises(HttpError, match="429"):
            await ship_spool(session, spool, "flows", counters)
    assert spool.records == 1 and counters.records_sent == 8
    assert counters.batches_refused == 0 and count(server) == 8


async def test_the_agent_drops_a_batch_naming_another_nodes_endpoint(
        make: Starter, tmp_path: Path) -> None:
    """The agent's side of a 409 (an endpoint its records name is on another node now,
    say moved while the records waited): the batch is dropped and counted, and the
    spool goes on with the next one instead of sending it again forever."""
    server = make()
    server.conn.request("POST", "/v1/resources/HostEndpoint", hep("db-1", "db-1",
                                                                 "198.18.0.12"))
    now = time.time()
    moved = parse_batch({"records": [flow_doc(end=now - 5, reporter="dst")]}, now, "web-1")
    fine = parse_batch({"records": [flow_doc(end=now - 4)]}, now, "web-1")
    spool = Spool(tmp_path / "spool", 1 << 20, batch=1)
    spool.put(moved)
    spool.put(fine)
    web = server.client("web-1", "agent")
    ctx = ssl.create_default_context(cafile=web.ca)
    ctx.load_cert_chain(str(web.cert), web.key)
    counters = FlowLogCounters()
    async with Session(f"https://127.0.0.1:{server.port}", ctx) as session:
        assert await ship_spool(session, spool, "flows", counters) == 1
    assert spool.records == 0 and counters.records_refused == 1 and count(server) == 1


def test_a_node_budget_refills_at_its_rate_and_forgets_idle_nodes() -> None:
    clock = [1000.0]
    budget = NodeBudget(6000, max_nodes=3, clock=lambda: clock[0])   # 100 bytes a second
    assert budget.wait("a") == 0
    budget.charge("a", 9000)                 # a batch bigger than the bucket: in debt
    assert budget.wait("a") == pytest.approx(30.01)
    clock[0] += 30
    assert budget.wait("a") == pytest.approx(0.01)
    clock[0] += 0.02
    assert budget.wait("a") == 0
    clock[0] += 3600                         # never more than a minute's worth
    budget.charge("a", 6000)
    assert budget.wait("a") > 0
    for node in ("b", "c", "d"):             # b, c full again: dropped first
        budget.charge(node, 0)
    assert set(budget._buckets) <= {"a", "d"} and "a" in budget._buckets
    for node in ("e", "f", "g"):             # none full: down to three quarters, oldest out
        budget.charge(node, 100)
    assert len(budget._buckets) <= 3 and "g" in budget._buckets


def test_retention_expires_old_records(make: Starter) -> None:
    server = make({"retention": 1, "expireInterval": 0.2})
    agent = server.client("web-1", "agent")
    now = time.time()
    assert send_flows(agent, [flow_doc(end=now - 3 * 3600, dst_name="old"),
                              flow_doc(end=now - 60, dst_name="fresh")]) == 2
    deadline = time.monotonic() + 20
    while dsts(flows(server.conn, since=0)) != ["fresh"]:
        assert time.monotonic() < deadline, dsts(flows(server.conn, since=0))
        time.sleep(0.2)
    # counted once the delete's transaction is back, a moment after the rows are gone
    while metric(server, "bulkhead_flow_records_expired_total") == 0:
        assert time.monotonic() < deadline, "the expiry was not counted"
        time.sleep(0.1)
    assert metric(server, "bulkhead_flow_records_expired_total") == 1


def test_clickhouse_store_through_the_server(make: Starter) -> None:
    if importlib.util.find_spec("chdb") is None:
        pytest.fail("chdb is not installed: `make test` installs the flows-test extra")
    server = make({"store": "clickhouse", "clickhouse": {
        "dsn": "chdb://{dir}/clickhouse", "database": "bulkhead_test"}})
    agent = server.client("web-1", "agent")
    now = time.time()
    assert send_flows(agent, sample(now)[:3]) == 3
    assert dsts(flows(server.conn)) == ["cache-1", "db-2", "db-1"]
    assert dsts(flows(server.conn, policy="audit.lockdown")) == ["cache-1"]
    assert dsts(flows(server.conn, selector="app == 'cache'")) == ["cache-1"]
    assert flows(server.conn, top=1)["top"][0]["dst_name"] == "db-2"
    with pytest.raises(ApiError) as err:
        send_flows(agent, [flow_doc(end=now), flow_doc(end=now, node="db-1")])
    assert err.value.status == 403 and count(server) == 3
    # DNS logs go to a table beside the flows' (dnsTable, default dns_logs).
    lookup = {"start": now - 10, "end": now - 5, "node": "web-1", "client_type": "hep",
              "client_name": "web-1", "client_labels": {}, "client_scope": "",
              "server_type": "net", "server_name": "198.18.0.53", "server_labels": {},
              "server_scope": "private", "qname": "api.example.com", "qtype": "A",
              "rcode": "NOERROR", "answers": ["api.example.com A 198.18.3.4"], "count": 1,
              "latency_count": 1, "latency_mean_ms": 0.5, "latency_max_ms": 0.5}
    assert send_dns(agent, [lookup]) == 1
    [got] = dns_logs(server.conn, qname="*.example.com")["dns"]
    assert got["answers"] == lookup["answers"] and got["end"] == round(lookup["end"], 6)
    assert not (server.config.parent / "dns.sqlite").exists()


@pytest.mark.parametrize(("section", "message"), [
    ({"colour": 1}, "flowLogs.colour: unknown key"),
    ({"store": "postgres"}, "flowLogs.store: 'postgres' is not one of sqlite, clickhouse"),
    ({"retention": 0}, "flowLogs.retention: 0 is not a number from"),
    ({"nodeBytesPerMinute": 100}, "flowLogs.nodeBytesPerMinute: 100 is not a whole number "
     "from 1024"),
    ({"jsonLines": {"maxBytes": 10}}, "flowLogs.jsonLines.path: required"),
    ({"jsonLines": {"path": "/x", "keep": 1}}, "flowLogs.jsonLines.keep: 1 is not a whole "
     "number from 2"),
    ({"store": "clickhouse"}, "flowLogs.clickhouse: required with store: clickhouse"),
    ({"store": "clickhouse", "clickhouse": {"host": "h", "dsn": "chdb:///x"}},
     "give dsn, or host"),
    ({"store": "clickhouse", "clickhouse": {"host": "h", "table": "a-b"}},
     "flowLogs.clickhouse.table: 'a-b' is not a name"),
    ({"clickhouse": {"host": "h"}}, "flowLogs.clickhouse: only with store: clickhouse"),
    ({"store": "clickhouse", "clickhouse": {"host": "h", "dnsTable": "flows"}},
     "flowLogs.clickhouse.dnsTable: must differ from flowLogs.clickhouse.table"),
])
def test_config_errors_name_the_key(tmp_path: Path, section: dict[str, Any],
                                    message: str) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(json.dumps({"flowLogs": section}))
    with pytest.raises(SystemExit) as err:
        ServerConfig.load(path, {})
    assert message in str(err.value), err.value


def test_clickhouse_configured_without_its_package_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bulkhead.store.flowlog import config

    monkeypatch.setattr(config, "available", lambda: False)
    path = tmp_path / "server.yaml"
    path.write_text(json.dumps({"flowLogs": {"store": "clickhouse",
                                             "clickhouse": {"host": "ch.example"}}}))
    with pytest.raises(SystemExit, match=r"needs the clickhouse-connect package.*"
                       r"bulkhead-microseg\[clickhouse\]"):
        ServerConfig.load(path, {})


def test_defaults_put_flows_beside_the_datastore(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(json.dumps({"datastore": f"sqlite://{tmp_path}/state/store.db"}))
    config = ServerConfig.load(path, {}).flow_log_config()
    assert (config.store, config.path, config.retention_hours, config.json_lines) == (
        "sqlite", tmp_path / "state" / "flows.sqlite", 24.0, None)


def test_a_jsonlines_failure_is_counted_never_a_refusal(tmp_path: Path) -> None:
    """What the store took stays taken: the JSON lines file is a copy for shippers."""
    from bulkhead.server.flows import FlowLogs
    from bulkhead.store.flowlog import FlowLogConfig, JsonLinesSink

    config = FlowLogConfig.parse(None, tmp_path)
    sink = JsonLinesSink(tmp_path / "logs" / "flows.jsonl", 4096, 2)
    (tmp_path / "logs").rmdir()
    (tmp_path / "logs").write_text("")            # its folder is a file now: writes fail
    logs = FlowLogs(config, config.open(), sink)
    try:
        body = json.dumps({"records": [flow_doc(), flow_doc()]})
        assert logs.ingest(body, "web-1") == 2
        assert logs.store.count() == 2
        assert "bulkhead_flow_jsonlines_errors_total 1" in logs.metrics()
    finally:
        logs.close()


async def test_a_batch_sent_again_after_its_answer_was_lost_is_stored_once(
        make: Starter, tmp_path: Path) -> None:
    """The agent keeps a spool file until it sees a 200: a batch whose answer was lost
    after the server stored it (a reset connection, the client's timeout) is sent again.
    It carries the same Idempotency-Key (a hash of the body), and the server, which keeps
    the last keys of each node, stores it once (it was stored twice: doubled bytes in the
    top talkers)."""
    server = make()
    web = server.client("web-1", "agent")
    spool, _ = spooled(tmp_path, 50)
    item = spool.oldest()
    assert item is not None
    body = json.dumps({"records": item.records}, separators=(",", ":")).encode()
    ctx = ssl.create_default_context(cafile=web.ca)
    ctx.load_cert_chain(str(web.cert), web.key)
    # The first sending: the server stores it, the agent never reads the answer.
    lost = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    lost.request("POST", "/v1/flows", body, {
        "Content-Type": "application/json",
        "Idempotency-Key": hashlib.sha256(body).hexdigest()[:32]})
    deadline = time.monotonic() + 10
    while count(server) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    lost.close()
    assert count(server) == 50
    # The agent sends the file again, as it does: answered 200, the file goes, stored once.
    counters = FlowLogCounters()
    async with Session(f"https://127.0.0.1:{server.port}", ctx) as session:
        await ship_spool(session, spool, "flows", counters)
    assert spool.records == 0 and counters.batches_sent == 1
    assert count(server) == 50
    assert metric(server, "bulkhead_flow_batches_duplicate_total") == 1
    assert metric(server, "bulkhead_flow_batches_stored_total") == 1
    # A key that is not one is refused, naming the header.
    bad = http.client.HTTPSConnection("127.0.0.1", server.port, context=ctx, timeout=10)
    try:
        bad.request("POST", "/v1/flows", body, {"Content-Type": "application/json",
                                                "Idempotency-Key": "not one!"})
        answer = bad.getresponse()
        assert answer.status == 400
        assert "Idempotency-Key: 1 to 64 letters" in answer.read().decode()
    finally:
        bad.close()
    assert count(server) == 50


def test_an_address_is_found_in_any_of_its_forms(make: Starter) -> None:
    """Agents write an address in its one form (`2001:db8::1`); `endpoint` and the DNS
    logs' `client` given another form of it (upper case, zeros written out) found
    nothing: an empty answer reads as no traffic."""
    server = make()
    now = round(time.time(), 3)
    net = {"dst_type": "net", "dst_labels": {}, "dst_scope": "private"}
    send_flows(server.client("web-1", "agent"), [flow_doc(end=now - 5, dst_name="2001:db8::1",
                                                          **net)])
    client = {"client_type": "net", "client_name": "2001:db8::5", "client_scope": "private",
              "client_labels": {}}
    send_dns(server.client("web-1", "agent"), [{
        "start": now - 10, "end": now - 5, "node": "web-1", **client,
        "server_type": "net", "server_name": "198.18.0.53", "server_labels": {},
        "server_scope": "private", "qname": "a.example", "qtype": "A", "rcode": "NOERROR",
        "answers": [], "count": 1, "latency_count": 0, "latency_mean_ms": 0,
        "latency_max_ms": 0}])
    viewer = server.client("carol", "viewer")
    for form in ("2001:db8::1", "2001:DB8:0:0::1", "2001:0db8::0001"):
        assert dsts(flows(viewer, endpoint=form)) == ["2001:db8::1"], form
    assert [r["qname"] for r in dns_logs(viewer, client="2001:0DB8::5")["dns"]] == ["a.example"]
    assert dsts(flows(viewer, endpoint="db-1")) == []      # a name is still a name


def test_a_record_keeps_an_ipv6_end_in_its_canonical_form(make: Starter) -> None:
    """An IPv6 address has many spellings; records keep the canonical one, whatever a
    sender wrote, so a query by address finds them."""
    from tests.test_server_dns import record

    server = make()
    agent = server.client("web-1", "agent")
    viewer = server.client("carol", "viewer")
    now = round(time.time(), 3)
    v6 = {"dst_type": "net", "dst_labels": {}, "dst_scope": "private"}
    assert send_flows(agent, [flow_doc(end=now - 40, dst_name="2001:0DB8:0::2", **v6)]) == 1
    assert dsts(flows(viewer, endpoint="2001:db8::2")) == ["2001:db8::2"]
    client = {"client_type": "net", "client_labels": {}, "client_scope": "private"}
    assert send_dns(agent, [record(now - 20, client_name="2001:DB8:0::1", **client)]) == 1
    assert [r["client_name"] for r in dns_logs(viewer, client="2001:db8::1")["dns"]] == \
        ["2001:db8::1"]
