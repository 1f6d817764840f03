"""bulkhead-server under hostile input, over real mTLS: names in paths, duplicate JSON
keys, and who may read /metrics."""

from __future__ import annotations

import pytest
from yarl import URL

from tests.conftest import Server

NETSET = ('{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet", '
          '"metadata": {"name": "n1"}, "spec": {"nets": ["198.18.0.0/24"]}}')


@pytest.mark.parametrize("raw", ["we%20b", "web%3Fx", "a%2Fb", "%2E%2E", "%1B%5B2J", "UPPER",
                                 "x" * 300, "%C3%A9"])
async def test_invalid_names_in_paths_are_refused(server: Server, raw: str) -> None:
    async with server.client("alice", "admin") as c:
        for method in ("GET", "DELETE", "PUT"):
            url = URL(f"/v1/resources/hep/{raw}", encoded=True)
            async with c.request(method, url, data=b"{}") as r:
                assert r.status == 400, (method, raw, r.status)
                message = (await r.json())["error"]["message"]
            assert message.startswith("HostEndpoint ") and "is not a valid name" in message
        # Valid but absent: still 404, and a tier name has its own rules.
        async with c.get("/v1/resources/hep/web-1") as r:
            assert r.status == 404
        async with c.get("/v1/resources/tier/a.b") as r:
            assert r.status == 400
            assert "is not a valid tier name" in (await r.json())["error"]["message"]


async def test_duplicate_json_keys_are_refused(server: Server) -> None:
    headers = {"Content-Type": "application/json"}
    async with server.client("alice", "admin") as c:
        dup = NETSET.replace('"name": "n1"', '"name": "n1", "name": "n2"')
        async with c.post("/v1/resources/GlobalNetworkSet", data=dup, headers=headers) as r:
            assert r.status == 400
            assert "duplicate key 'name'" in (await r.json())["error"]["message"]
        async with c.post("/v1/apply", data=f"[{dup}]", headers=headers) as r:
            assert r.status == 400
            assert "duplicate key 'name'" in (await r.json())["error"]["message"]
        # Nothing was written; the same body without the duplicate is fine.
        async with c.get("/v1/resources/GlobalNetworkSet") as r:
            assert (await r.json())["items"] == []
    async with server.client("web-1", "agent") as agent:
        async with agent.post("/v1/status/web-1", headers=headers,
                              data='{"appliedRevision": 9, "appliedRevision": 1}') as r:
            assert r.status == 400
            assert "duplicate key 'appliedRevision'" in (await r.json())["error"]["message"]
    async with server.client("alice", "admin") as c:
        async with c.post("/v1/resources/GlobalNetworkSet", data=NETSET, headers=headers) as r:
            assert r.status == 201


async def test_metrics_are_for_admins_and_viewers(server: Server) -> None:
    for name, role, status in (("web-1", "agent", 403), ("val", "viewer", 200),
                               ("alice", "admin", 200)):
        async with server.client(name, role) as c, c.get("/metrics") as r:
            assert r.status == status, role
            if status == 200:
                assert "bulkhead_revision" in await r.text()
            else:
                assert (await r.json())["error"]["message"] == \
                    "agent web-1 may not GET /metrics"


async def test_a_caller_the_route_is_not_for_is_refused_before_its_path_is_read(
        server: Server) -> None:
    """The role first, then the name: an agent writing a resource is told it may not
    (403) whether the name in the path is valid or not; an admin is told what is wrong
    with the name (400)."""
    async with server.client("web-1", "agent") as agent:
        for name in ("good-name", "Bad_Name"):
            async with agent.put(f"/v1/resources/gnp/{name}", data=b"{}") as r:
                assert r.status == 403, (name, r.status)
            async with agent.delete(f"/v1/resources/gnp/{name}") as r:
                assert r.status == 403, (name, r.status)
    async with server.client("alice", "admin") as admin:
        async with admin.put("/v1/resources/gnp/Bad_Name", data=b"{}") as r:
            assert r.status == 400
            assert "is not a valid" in (await r.json())["error"]["message"]
        # A body of another kind is named, shortened: a megabyte of kind is not sent back.
        async with admin.post("/v1/resources/gnp", json={"kind": "K" * 1_000_000}) as r:
            assert r.status == 400
            message = (await r.json())["error"]["message"]
        assert message.startswith("the body is a 'KKKK") and len(message) < 200


async def test_history_limits_and_resource_versions_are_read_whole(server: Server) -> None:
    """`limit` is ASCII digits read whole ("00001000000" is a million, refused; "²" is no
    digit, a 400 not a 500). A `resourceVersion` that is not one this server wrote
    (digits) never reaches the store: the store's own words for "only create" and "only
    replace" are not versions; a PUT with one gets 409, as a stale one does; an apply of
    a manifest exported elsewhere ("123/456") still applies."""
    async with server.client("alice", "admin") as c:
        for raw in ("00001000000", "1001", "0", "²", "1" * 5000, "x"):
            async with c.get("/v1/history", params={"limit": raw}) as r:
                assert r.status == 400, (raw[:20], r.status)
                assert "limit:" in (await r.json())["error"]["message"]
        async with c.get("/v1/history", params={"limit": "0000000010"}) as r:
            assert r.status == 200
        tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
                "metadata": {"name": "ghost"}, "spec": {"order": 10}}
        for version in ("absent", "present", "x1", "123/456", -1):
            doc = {**tier, "metadata": {"name": "ghost", "resourceVersion": version}}
            async with c.put("/v1/resources/tier/ghost", json=doc) as r:
                assert r.status == 409, (version, r.status)
                assert "is not one this server wrote" in (await r.json())["error"]["message"]
        for version in ({"a": [1]}, "x" * 65, "a\nb"):
            doc = {**tier, "metadata": {"name": "ghost", "resourceVersion": version}}
            async with c.put("/v1/resources/tier/ghost", json=doc) as r:
                assert r.status == 422, (version, r.status)
                assert "metadata.resourceVersion: must be a version" in \
                    (await r.json())["error"]["message"]
        for version in ("absent", "present", "x1", {"a": [1]}, -1, "1" * 20):
            async with c.delete("/v1/resources/tier/ghost",
                                params={"resourceVersion": str(version)}) as r:
                assert r.status == 400, (version, r.status)
                assert "resourceVersion:" in (await r.json())["error"]["message"]
        async with c.get("/v1/resources/tier/ghost") as r:
            assert r.status == 404            # nothing was created
        async with c.post("/v1/resources/tier", json=tier) as r:
            created = (await r.json())["metadata"]["resourceVersion"]
        stale = {**tier, "metadata": {"name": "ghost",
                                      "resourceVersion": str(int(created) + 5)}}
        async with c.put("/v1/resources/tier/ghost", json=stale) as r:
            assert r.status == 409
        fresh = {**tier, "metadata": {"name": "ghost", "resourceVersion": int(created)}}
        async with c.put("/v1/resources/tier/ghost", json=fresh) as r:
            assert r.status == 200            # a number as YAML reads one is a version too
        exported = {**tier, "metadata": {"name": "elsewhere", "resourceVersion": "123/456"}}
        async with c.post("/v1/apply", json=[exported]) as r:
            assert r.status == 200, await r.text()
            assert [x["action"] for x in (await r.json())["results"]] == ["created"]
