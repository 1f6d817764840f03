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
