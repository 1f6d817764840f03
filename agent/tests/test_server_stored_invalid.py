"""Objects an older server took that today's checks refuse (a `domains` rule in a Deny,
since Calico Enterprise's rules were followed): they stay deletable (by whom their tier
concerns), a promotion of one says what is wrong with it, and a preview leaves them out
as the agents do, naming them. Before, every delete of such an object answered 500 and
every preview 422, blaming manifests that were never sent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bulkhead.store import Op
from bulkhead.store.sqlite import SQLiteStore
from tests.conftest import Server


def policy(kind: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": kind, "metadata": {"name": name},
            "spec": {"tier": "default", "selector": "all()", "types": ["Egress"],
                     "egress": [{"action": "Deny",
                                 "destination": {"domains": ["example.com"]}}]}}


async def stored_by_an_older_server(server: Server) -> None:
    """Written to the server's file as an older server took them (no checks), then
    waited for until the server's API has them."""
    old = SQLiteStore(server.pki / "s.db")
    try:
        await old.transaction([
            Op("put", "GlobalNetworkPolicy", "default.dd",
               policy("GlobalNetworkPolicy", "default.dd"), None),
            Op("put", "StagedGlobalNetworkPolicy", "default.sd",
               policy("StagedGlobalNetworkPolicy", "default.sd"), None)])
    finally:
        await old.close()
    async with server.client("web-1", "agent") as agent:   # the hub's view, as agents get it
        for _ in range(200):
            async with agent.get("/v1/snapshot") as r:
                if r.status == 200 and len((await r.json())["items"]) == 2:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("the server never saw the older server's objects")


async def test_an_object_todays_checks_refuse_can_still_be_deleted(server: Server,
                                                                   tmp_path: Path) -> None:
    await stored_by_an_older_server(server)
    async with server.client("ops", "admin", tiers=("security",)) as tier_admin:
        async with tier_admin.delete("/v1/resources/GlobalNetworkPolicy/default.dd") as r:
            assert r.status == 403, await r.text()   # not its tier: refused, never a 500
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/promote", json={"names": ["default.sd"]}) as r:
            text = await r.text()
            assert r.status == 422 and "as stored, by an older server" in text, text
            assert "nothing was promoted" in text
        async with admin.post("/v1/preview", json={"promote": "none"}) as r:
            answer = await r.json()   # the preview leaves them out, named
            assert r.status == 200, answer
            assert [m.split(":")[0] for m in answer["leftOut"]] == [
                "GlobalNetworkPolicy default.dd", "StagedGlobalNetworkPolicy default.sd"]
        async with admin.post("/v1/preview", json={"promote": ["default.sd"]}) as r:
            text = await r.text()   # not "not found": it is there, and refused
            assert r.status == 422 and "is stored, but left out" in text, text
    async with server.client("dee", "admin", tiers=("default",)) as tier_admin:
        async with tier_admin.delete("/v1/resources/GlobalNetworkPolicy/default.dd") as r:
            assert r.status == 200, await r.text()   # its tier's admin may
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/delete",
                              data="kind: StagedGlobalNetworkPolicy\n"
                                   "metadata: {name: default.sd}\n",
                              headers={"Content-Type": "application/yaml"}) as r:
            assert r.status == 200, await r.text()
        async with admin.get("/v1/resources/GlobalNetworkPolicy") as r:
            assert (await r.json())["items"] == []


async def test_a_policy_whose_tier_is_left_out_is_left_out_too(server: Server) -> None:
    """A Tier today's checks refuse (an order on a tier whose place is fixed) leaves its
    policies without a tier, as the agents see it: the preview leaves them out too and
    still answers."""
    old = SQLiteStore(server.pki / "s.db")
    try:
        await old.transaction([
            Op("put", "Tier", "kube-admin", {
                "apiVersion": "projectcalico.org/v3", "kind": "Tier",
                "metadata": {"name": "kube-admin"}, "spec": {"order": 5}}, None),
            Op("put", "GlobalNetworkPolicy", "kube-admin.p", {
                "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
                "metadata": {"name": "kube-admin.p"},
                "spec": {"tier": "kube-admin", "selector": "all()", "types": ["Ingress"]}},
               None)])
    finally:
        await old.close()
    async with server.client("web-1", "agent") as agent:
        for _ in range(200):
            async with agent.get("/v1/snapshot") as r:
                if r.status == 200 and len((await r.json())["items"]) == 2:
                    break
            await asyncio.sleep(0.05)
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/preview", json={"promote": "none"}) as r:
            answer = await r.json()
            assert r.status == 200, answer
            assert [m.split(":")[0] for m in answer["leftOut"]] == [
                "Tier kube-admin", "GlobalNetworkPolicy kube-admin.p"], answer["leftOut"]


async def test_a_tier_admin_cannot_delete_its_ordered_tier(server: Server) -> None:
    """Deleted and made again without its order, a tier would run after every ordered
    one: only an admin without tier limits sets a tier's order, so only one deletes an
    ordered tier."""
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/resources/Tier", json={
                "apiVersion": "projectcalico.org/v3", "kind": "Tier",
                "metadata": {"name": "t1"}, "spec": {"order": 100}}) as r:
            assert r.status == 201, await r.text()
    async with server.client("ops", "admin", tiers=("t1",)) as ops:
        async with ops.delete("/v1/resources/Tier/t1") as r:
            text = await r.text()
            assert r.status == 403 and "order of Tier t1" in text, text
        async with ops.post("/v1/delete", data="kind: Tier\nmetadata: {name: t1}\n",
                            headers={"Content-Type": "application/yaml"}) as r:
            assert r.status == 403, await r.text()
