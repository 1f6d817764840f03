"""bulkhead-server over real HTTPS with real certificates: the API and who may do what."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bulkhead import __version__, pki
from bulkhead.server.main import ServerConfig, serve
from tests.conftest import Server, serving
from tests.procs import free_port

POLICY = """
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: app-teams}
spec: {order: 500}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: app-teams.web-in}
spec:
  tier: app-teams
  selector: app == 'web'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [443]}}]
"""


def gnp(name: str, tier: str = "default", order: int = 1) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": name}, "spec": {"tier": tier, "order": order}}


async def test_no_client_certificate_is_refused(server: Server) -> None:
    ctx = ssl.create_default_context(cafile=str(server.pki / "ca.crt"))
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(ssl=ctx)) as c:
        with pytest.raises(aiohttp.ClientError):
            async with c.get("/v1/resources"):
                pass


async def test_a_certificate_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other)
    crt, key = pki.issue(other, "mallory", role="admin")
    ctx = ssl.create_default_context(cafile=str(server.pki / "ca.crt"))
    ctx.load_cert_chain(crt, key)
    async with aiohttp.ClientSession(server.url, connector=aiohttp.TCPConnector(ssl=ctx)) as c:
        with pytest.raises(aiohttp.ClientError):
            async with c.get("/v1/resources"):
                pass


async def test_admin_crud_and_errors(server: Server) -> None:
    async with server.client("alice", "admin") as c:
        async with c.post("/v1/resources/globalnetworkpolicies", json=gnp("a")) as r:
            assert r.status == 201
            made = await r.json()
        assert made["metadata"]["resourceVersion"]
        async with c.post("/v1/resources/GlobalNetworkPolicy", json=gnp("a")) as r:
            assert r.status == 409
        async with c.get("/v1/resources/GlobalNetworkPolicy/a") as r:
            assert (await r.json())["spec"]["order"] == 1
        stale = gnp("a", order=2)
        stale["metadata"]["resourceVersion"] = made["metadata"]["resourceVersion"]
        async with c.put("/v1/resources/GlobalNetworkPolicy/a", json=stale) as r:
            assert r.status == 200
        async with c.put("/v1/resources/GlobalNetworkPolicy/a", json=stale) as r:
            assert r.status == 409 and "changed since it was read" in await r.text()
        bad = gnp("b")
        bad["spec"]["ingress"] = [{"action": "Allow", "protocol": "TCP",
                                   "destination": {"ports": ["80-90"]}}]
        async with c.post("/v1/resources/GlobalNetworkPolicy", json=bad) as r:
            assert r.status == 422
            error = (await r.json())["error"]
        assert error["message"] == ('GlobalNetworkPolicy b: spec.ingress[0].destination.ports[0]:'
                                    ' "80-90" is not a port, a range "a:b" or a port name')
        async with c.post("/v1/resources/GlobalNetworkPolicy",
                          json=gnp("security.x", tier="security")) as r:
            assert r.status == 422
            assert 'tier "security" does not exist' in (await r.json())["error"]["message"]
        async with c.get("/v1/resources/GlobalNetworkPolicy", params={"selector": "a =="}) as r:
            assert r.status == 400
        async with c.delete("/v1/resources/GlobalNetworkPolicy/a") as r:
            assert r.status == 200
        async with c.delete("/v1/resources/GlobalNetworkPolicy/a") as r:
            assert r.status == 404


async def test_create_and_update_answer_alike_with_and_without_the_pre_read(
        server: Server) -> None:
    """An admin without tier limits writes without reading the resource first (the
    transaction refuses a create of what exists and an update of what is absent); a tier
    admin's write and a dry run read it first. The answers are the same either way, a
    refused write changes nothing, and a write's answer is the stored document, byte for
    byte what a GET of it returns."""
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "t1"}, "spec": {"order": 100}}
    async with server.client("alice", "admin") as admin, \
            server.client("ops", "admin", ("t1",)) as ops:
        async with admin.post("/v1/resources/Tier", json=tier) as r:
            assert r.status == 201
        async with admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp("t1.a", "t1")) as r:
            assert r.status == 201
            created = await r.read()
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        async with admin.get("/v1/resources/GlobalNetworkPolicy/t1.a") as r:
            assert await r.read() == created
            assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        answers = []
        for client, params in ((admin, {}), (ops, {}), (admin, {"dryRun": "true"})):
            async with client.post("/v1/resources/GlobalNetworkPolicy", params=params,
                                   json=gnp("t1.a", "t1", order=7)) as r:
                answers.append((r.status, (await r.json())["error"]))
            async with client.put("/v1/resources/GlobalNetworkPolicy/t1.b", params=params,
                                  json=gnp("t1.b", "t1")) as r:
                answers.append((r.status, (await r.json())["error"]))
        assert answers == 3 * [
            (409, {"code": 409, "reason": "AlreadyExists",
                   "message": "GlobalNetworkPolicy t1.a already exists"}),
            (404, {"code": 404, "reason": "NotFound",
                   "message": "GlobalNetworkPolicy t1.b not found"})], answers
        async with admin.get("/v1/resources/GlobalNetworkPolicy/t1.a") as r:
            assert await r.read() == created                 # the refused create: nothing
        async with admin.get("/v1/resources/GlobalNetworkPolicy/t1.b") as r:
            assert r.status == 404                           # the refused update: nothing
        update = json.loads(created)
        update["spec"]["order"] = 9
        async with ops.put("/v1/resources/GlobalNetworkPolicy/t1.a", json=update) as r:
            assert r.status == 200
            updated = await r.read()
        async with admin.get("/v1/resources/GlobalNetworkPolicy/t1.a") as r:
            assert await r.read() == updated and json.loads(updated)["spec"]["order"] == 9
        async with admin.delete("/v1/resources/GlobalNetworkPolicy/t1.a") as r:
            assert await r.read() == updated


async def test_apply_all_or_nothing_and_dry_run(server: Server) -> None:
    async with server.client("alice", "admin") as c:
        async with c.post("/v1/apply", params={"dryRun": "true"}, data=POLICY) as r:
            result = await r.json()
        assert [x["action"] for x in result["results"]] == ["created", "created"]
        async with c.get("/v1/resources/Tier") as r:
            assert (await r.json())["items"] == []          # dry run wrote nothing
        async with c.post("/v1/apply", data=POLICY) as r:
            assert r.status == 200 and (await r.json())["revision"]
        async with c.post("/v1/apply", data=POLICY) as r:
            assert [x["action"] for x in (await r.json())["results"]] == ["unchanged"] * 2
        changed = POLICY.replace("ports: [443]", "ports: [8443]") + """
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: broken}
spec: {order: "x"}
"""
        async with c.post("/v1/apply", data=changed) as r:
            assert r.status == 422 and "body: document 3: GlobalNetworkPolicy broken" in \
                (await r.json())["error"]["message"]
        async with c.get("/v1/resources/GlobalNetworkPolicy/app-teams.web-in") as r:
            ports = (await r.json())["spec"]["ingress"][0]["destination"]["ports"]
        assert ports == [443]                                # nothing half-applied
        async with c.delete("/v1/resources/Tier/app-teams") as r:
            assert r.status == 409 and "still holds policies" in await r.text()


async def test_rollback_and_export_work_off_the_event_loop(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback (or a sync) validates and compares every resource, an export strips and
    serializes every one: thousands of them take seconds of CPU, which on the event loop
    would stall every other client (agents' watches, /readyz). As apply's, that work runs
    in a worker thread."""
    from bulkhead.server import app

    loop_thread = threading.get_ident()
    on_loop: list[str] = []

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread:
                on_loop.append(name)
            return fn(*args, **kwargs)
        return wrapped

    async with server.client("alice", "admin") as c:
        async with c.post("/v1/apply", data=POLICY) as r:
            good = (await r.json())["revision"]
        changed = POLICY.replace("ports: [443]", "ports: [8443]")
        async with c.post("/v1/apply", data=changed) as r:
            assert r.status == 200
        for name in ("parse_resource", "_diff_entry", "_strip"):
            monkeypatch.setattr(app, name, spy(name, getattr(app, name)))
        async with c.get("/v1/export", params={"revision": str(good)}) as r:
            assert r.status == 200 and len((await r.json())["items"]) == 2
        async with c.post("/v1/rollback", params={"revision": str(good)}) as r:
            result = await r.json()
        assert r.status == 200, result
        assert [x["action"] for x in result["results"]] == ["configured", "unchanged"]
    assert on_loop == []


NETSET = ("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: %s}\n"
          "spec: {nets: [%s]}\n")


async def test_a_write_during_a_rollback_fails_the_rollback_whole(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback plans from its reading of the whole store: a write that lands between
    that reading and its commit (a change it would leave, a resource it would not delete)
    made it answer 200 with a store unlike the revision. It is refused (409), nothing
    written; once again, it restores the revision."""
    from bulkhead.server import app

    async with server.client("alice", "admin") as alice, server.client("bob", "admin") as bob:
        async with alice.post("/v1/apply", data=NETSET % ("keep", "198.18.0.0/24") + "---\n" +
                              NETSET % ("x", "198.18.1.0/24")) as r:
            good = (await r.json())["revision"]
        async with alice.post("/v1/apply", data=NETSET % ("x", "198.18.2.0/24")) as r:
            assert r.status == 200
        real, entered, go = app._check_refs, asyncio.Event(), asyncio.Event()

        async def held(store: Any, resources: Any) -> None:   # after the rollback's plan
            entered.set()
            await go.wait()
            await real(store, resources)

        monkeypatch.setattr(app, "_check_refs", held)

        async def rollback() -> tuple[int, str]:
            async with alice.post("/v1/rollback", params={"revision": str(good)}) as r:
                return r.status, await r.text()

        rolling = asyncio.create_task(rollback())
        await asyncio.wait_for(entered.wait(), 10)
        monkeypatch.setattr(app, "_check_refs", real)
        async with bob.post("/v1/apply", data=NETSET % ("keep", "198.18.9.0/24") + "---\n" +
                            NETSET % ("late", "198.18.8.0/24")) as r:
            assert r.status == 200
        async with alice.get("/v1/export") as r:
            before = (await r.json())["items"]
        go.set()
        status, text = await asyncio.wait_for(rolling, 10)
        assert status == 409 and "the store changed" in text and "try again" in text, text
        async with alice.get("/v1/export") as r:
            assert (await r.json())["items"] == before
        async with alice.post("/v1/rollback", params={"revision": str(good)}) as r:
            assert r.status == 200
        async with alice.get("/v1/export") as r:
            now = (await r.json())["items"]
        async with alice.get("/v1/export", params={"revision": str(good)}) as r:
            assert now == (await r.json())["items"]


async def test_roles(server: Server) -> None:
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/apply", data=POLICY) as r:
            assert r.status == 200
    async with server.client("val", "viewer") as viewer:
        async with viewer.get("/v1/resources/GlobalNetworkPolicy") as r:
            assert r.status == 200
        async with viewer.post("/v1/resources/GlobalNetworkPolicy", json=gnp("v")) as r:
            assert r.status == 403
        async with viewer.delete("/v1/resources/Tier/app-teams") as r:
            assert r.status == 403
        async with viewer.post("/v1/apply", data=POLICY) as r:
            assert r.status == 403
        async with viewer.post("/v1/status/web-1", json={"appliedRevision": 1}) as r:
            assert r.status == 403
    async with server.client("web-1", "agent") as agent:
        async with agent.get("/v1/snapshot") as r:
            assert r.status == 200
        async with agent.get("/v1/resources/GlobalNetworkPolicy") as r:
            assert r.status == 403
        async with agent.post("/v1/resources/GlobalNetworkPolicy", json=gnp("x")) as r:
            assert r.status == 403
        async with agent.post("/v1/status/web-1", json={"appliedRevision": 3}) as r:
            assert r.status == 200
        async with agent.post("/v1/status/db-1", json={"appliedRevision": 3}) as r:
            assert r.status == 403 and "report status for node db-1" in await r.text()
    async with server.client("ops", "admin", tiers=("app-teams",)) as ops:
        async with ops.post("/v1/resources/GlobalNetworkPolicy",
                            json=gnp("app-teams.more", tier="app-teams")) as r:
            assert r.status == 201
        async with ops.post("/v1/resources/GlobalNetworkPolicy", json=gnp("plain")) as r:
            assert r.status == 403 and "allowed tiers: app-teams" in await r.text()
        async with ops.post("/v1/resources/HostEndpoint", json={
                "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
                "metadata": {"name": "h"}, "spec": {"node": "h", "interfaceName": "*"}}) as r:
            assert r.status == 403


async def test_watch_long_poll_and_snapshot(server: Server) -> None:
    async with server.client("alice", "admin") as admin, \
            server.client("web-1", "agent") as agent:
        async with agent.get("/v1/watch") as r:
            first = await r.json()
        assert first["type"] == "snapshot" and first["items"] == []
        waiting = asyncio.ensure_future(agent.get("/v1/watch", params={
            "revision": str(first["revision"]), "timeout": "20"}))
        await asyncio.sleep(0.2)
        async with admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp("w")) as r:
            assert r.status == 201
        resp = await asyncio.wait_for(waiting, 20)
        body = await resp.json()
        resp.release()
        assert body["type"] == "events"
        assert [(e["type"], e["name"]) for e in body["events"]] == [("ADDED", "w")]
        async with agent.get("/v1/watch", params={"revision": str(body["revision"]),
                                                  "timeout": "0.2"}) as r:
            assert (await r.json())["events"] == []


async def test_nodes_converged_and_probes(server: Server, request: pytest.FixtureRequest
                                         ) -> None:
    async with server.client("web-1", "agent") as agent:
        async with agent.post("/v1/status/web-1", json={
                "appliedRevision": 5,
                "counters": {"rules": 12, "startedAt": 1796644800.125}}) as r:
            assert r.status == 200
    async with server.client("val", "viewer") as viewer:
        async with viewer.get("/v1/nodes", params={"revision": "5"}) as r:
            body = await r.json()
        assert body["converged"] is True and \
            body["nodes"][0]["counters"] == {"rules": 12, "startedAt": 1796644800.125}
        async with viewer.get("/v1/nodes", params={"revision": "6"}) as r:
            assert (await r.json())["converged"] is False
        async with viewer.get("/healthz") as r:
            assert r.status == 200
        async with server.client("alice", "admin") as admin, \
                admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp("m1")) as r:
            assert r.status == 201
        async with viewer.get("/metrics") as r:
            text = await r.text()
        assert "bulkhead_revision " in text and 'route="/v1/nodes"' in text
        # The write above was one commit, timed.
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("bulkhead_datastore_commit")}
        assert values["bulkhead_datastore_commit_seconds_count"] == 1
        assert values["bulkhead_datastore_commit_seconds_sum"] > 0
        assert values["bulkhead_datastore_commit_failures_total"] == 0
        assert "# TYPE bulkhead_datastore_commit_seconds summary" in text
        # The loop the server runs on: this test's, asyncio's own or uvloop (conftest).
        loop = "uvloop" if request.node.name.endswith("[uvloop]") else "asyncio"
        assert type(asyncio.get_running_loop()).__module__.startswith(loop)
        assert f'bulkhead_server_info{{event_loop="{loop}",version="{__version__}"}} 1' in \
            text.splitlines()
        # Each node's last report, for alerts on the fleet (docs/observability.md).
        samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                       if line.startswith("bulkhead_node"))
        assert samples['bulkhead_node_applied_revision{node="web-1"}'] == "5"
        assert samples['bulkhead_node_errors{node="web-1"}'] == "0"
        assert samples["bulkhead_nodes"] == "1"
        assert samples['bulkhead_node_agent_start_time_seconds{node="web-1"}'] == \
            "1796644800.125"
        reported = int(samples['bulkhead_node_last_report_timestamp_seconds{node="web-1"}'])
        assert abs(time.time() - reported) < 120
        # Each family's samples follow its own HELP and TYPE lines, never another's.
        family = ""
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                family = line.split()[2]
            elif line and not line.startswith("#"):
                assert line.startswith(family), (family, line)


async def test_streaming_watch(server: Server) -> None:
    async with server.client("alice", "admin") as admin, \
            server.client("web-1", "agent") as agent:
        async with agent.get("/v1/watch", params={"stream": "true", "timeout": "0.3"}) as r:
            assert r.headers["Content-Type"].startswith("application/x-ndjson")
            first = json.loads(await r.content.readline())
            assert first["type"] == "snapshot"
            async with admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp("s1")) as w:
                assert w.status == 201
            seen = []
            while len(seen) < 2:
                line = json.loads(await asyncio.wait_for(r.content.readline(), 10))
                seen.append(line["type"])
                if line["type"] == "events":
                    assert [e["name"] for e in line["events"]] == ["s1"]
            assert "events" in seen and set(seen) <= {"events", "heartbeat"}


async def test_a_stopped_server_gives_its_signals_back(tmp_path: Path) -> None:
    """serve() handles SIGTERM, SIGINT and SIGHUP while it runs and gives them back when it
    stops, on either loop: uvloop's close() would leave its handlers in place, and the
    process would ignore SIGTERM and SIGINT from then on."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", server=True, hosts=("127.0.0.1",))
    config = ServerConfig(listen=f"127.0.0.1:{free_port()}",
                          datastore=f"sqlite://{tmp_path}/s.db",
                          tls_cert=str(tmp_path / "server.crt"),
                          tls_key=str(tmp_path / "server.key"),
                          client_ca=str(tmp_path / "ca.crt"))
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    started = asyncio.Event()
    task = asyncio.create_task(serve(config, started))
    await asyncio.wait_for(started.wait(), 10)
    serving = {sig: signal.getsignal(sig) for sig in signals}
    assert all(handler not in (signal.SIG_DFL, signal.default_int_handler)
               for handler in serving.values()), serving
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert {sig: signal.getsignal(sig) for sig in signals} == {
        signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler,
        signal.SIGHUP: signal.SIG_DFL}


async def test_a_compressed_body_is_refused_whole(server: Server) -> None:
    """A gzip body of 51 tiers: aiohttp would inflate it while Content-Length gives the
    compressed size, and a read by Content-Length applied the first tier only, with a 200.
    It is refused (415, naming the header) and nothing is written; the same text sent as
    it is (`identity`) applies every tier."""
    import gzip
    text = "".join(f"apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: t{i}}}\n"
                   f"spec: {{order: {100 + i}}}\n# {'x' * 40}{i}\n---\n" for i in range(51))
    async with server.client("alice", "admin") as c:
        for coding in ("gzip", "deflate", "br"):
            body = gzip.compress(text.encode()) if coding == "gzip" else text.encode()
            async with c.post("/v1/apply", data=body, headers={
                    "Content-Type": "application/yaml", "Content-Encoding": coding}) as r:
                assert r.status == 415, await r.text()
                assert f"Content-Encoding '{coding}'" in (await r.json())["error"]["message"]
        async with c.get("/v1/resources/Tier") as r:
            assert (await r.json())["items"] == []
        async with c.post("/v1/apply", data=text, headers={
                "Content-Type": "application/yaml", "Content-Encoding": "identity"}) as r:
            assert r.status == 200 and len((await r.json())["results"]) == 51


async def test_a_watcher_ahead_of_the_store_takes_a_snapshot(server: Server) -> None:
    """A revision the datastore never reached (an agent from before a restore from
    backup): still ahead when the timeout runs out, the watcher is sent a snapshot with
    the store's revision; with events only after its own revision it would never see the
    changes in between. One a moment ahead (another server's hub ahead of this one) is
    answered with the events once the store gets past it."""
    async with server.client("alice", "admin") as admin, \
            server.client("web-1", "agent") as agent:
        async with admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp("a")) as r:
            assert r.status == 201
        async with agent.get("/v1/watch") as r:
            now = (await r.json())["revision"]
        for timeout in ("0", "0.3"):
            async with agent.get("/v1/watch", params={"revision": str(now + 1000),
                                                      "timeout": timeout}) as r:
                body = await r.json()
            assert body["type"] == "snapshot" and body["revision"] == now
            assert [i["metadata"]["name"] for i in body["items"]] == ["a"]
        async with agent.get("/v1/watch", params={"revision": str(now + 1000),
                                                  "timeout": "0.3", "stream": "true"}) as r:
            line = json.loads(await r.content.readline())
        assert line["type"] == "snapshot" and line["revision"] == now
        ahead = asyncio.ensure_future(agent.get("/v1/watch", params={
            "revision": str(now + 1), "timeout": "20"}))
        await asyncio.sleep(0.2)
        for name in ("b", "c"):
            async with admin.post("/v1/resources/GlobalNetworkPolicy", json=gnp(name)) as r:
                assert r.status == 201
        resp = await asyncio.wait_for(ahead, 20)
        body = await resp.json()
        resp.release()
        assert body["type"] == "events" and body["revision"] >= now + 2
        assert [e["name"] for e in body["events"]] == ["c"]   # after now + 1: b's was seen


async def test_a_watcher_ahead_of_this_hub_but_not_of_the_datastore_keeps_waiting() -> None:
    """On one etcd a hub's revision moves only with policy events while agents' status
    reports move etcd's: an agent failing over from a server that listed later is ahead
    of this hub but not of the datastore. It gets heartbeats at its own revision, then
    the events after it; only a revision the datastore never reached takes a snapshot,
    and a datastore that cannot tell keeps the caller waiting."""
    from bulkhead.server.hub import Hub
    from bulkhead.store import Unavailable

    class Store:
        current = 200
        fails = False

        async def revision(self) -> int:
            if Store.fails:
                raise Unavailable("etcd is gone")
            return Store.current

    hub = Hub(Store())  # type: ignore[arg-type]
    hub._reset(100)
    assert await hub.wait(180, 0.05) == ([], 180)          # behind the store: heartbeat
    Store.fails = True
    assert await hub.wait(180, 0.05) == ([], 180)
    Store.fails, Store.current = False, 150
    assert await hub.wait(180, 0.05) == (None, 100)        # never reached: a snapshot


@pytest.mark.parametrize("mode", ["all", "errors", "off"])
async def test_access_log_takes_every_request_the_errors_or_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    """`accessLog`: a fleet's status and flow reports fill the server's journal with a
    line each (about 1.4 MB an agent a day); `errors` keeps the requests answered 400 and
    up, `off` none, without lowering the server's own logLevel."""
    async with serving(tmp_path, access_log=mode) as srv, srv.client("val", "viewer") as viewer:
        with caplog.at_level("INFO", logger="bulkhead.server.access"):
            caplog.clear()
            async with viewer.get("/v1/resources/Tier") as r:
                assert r.status == 200
            async with viewer.get("/v1/resources/Tier/nosuch") as r:
                assert r.status == 404
    lines = [(rec.fields["path"], rec.fields["status"])  # type: ignore[attr-defined]
             for rec in caplog.records if rec.name == "bulkhead.server.access"]
    assert lines == {"all": [("/v1/resources/Tier", 200), ("/v1/resources/Tier/nosuch", 404)],
                     "errors": [("/v1/resources/Tier/nosuch", 404)], "off": []}[mode]


def test_access_log_takes_only_its_three_modes() -> None:
    with pytest.raises(SystemExit, match="accessLog: 'some' is not one of all, errors, off"):
        ServerConfig.load(None, {"access_log": "some"})
