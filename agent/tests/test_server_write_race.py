"""A tier-limited admin's PUT and DELETE are checked against the resource as read, and
commit only over that: another admin's change in between (moving a policy into a tier
outside this admin's, giving a Tier an order) makes them a 409. Before, they committed
over the change, checked against what it replaced."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from bulkhead.store import Stored
from bulkhead.store.sqlite import SQLiteStore
from tests.conftest import Server

V3 = "projectcalico.org/v3"


def tier(name: str, order: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {} if order is None else {"order": order}
    return {"apiVersion": V3, "kind": "Tier", "metadata": {"name": name}, "spec": spec}


def ssh(in_tier: str) -> dict[str, Any]:
    return {"apiVersion": V3, "kind": "GlobalNetworkPolicy", "metadata": {"name": "ssh"},
            "spec": {"tier": in_tier, "selector": "all()", "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "destination": {"ports": [22]}}]}}


def change_after_the_read(monkeypatch: pytest.MonkeyPatch, kind: str, name: str,
                          change: Callable[[], Awaitable[None]]) -> list[bool]:
    """The next read of (kind, name) returns what it read, after `change` has been made:
    the other admin's write lands between this request's read and its commit."""
    original = SQLiteStore.get
    done: list[bool] = []

    async def get(self: SQLiteStore, k: str, n: str) -> Stored:
        found = await original(self, k, n)
        if (k, n) == (kind, name) and not done:
            done.append(True)
            await change()
        return found

    monkeypatch.setattr(SQLiteStore, "get", get)
    return done


async def put(client: aiohttp.ClientSession, doc: dict[str, Any]) -> int:
    async with client.put(f"/v1/resources/{doc['kind']}/{doc['metadata']['name']}",
                          json=doc) as r:
        return r.status


async def test_a_tier_admins_write_over_a_change_it_did_not_read_is_refused(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    async with server.client("root", "admin") as root, \
            server.client("ops", "admin", tiers=("app",)) as ops:
        for doc in (tier("app"), tier("security", 10)):
            async with root.post("/v1/resources/Tier", json=doc) as r:
                assert r.status == 201, await r.text()
        async with root.post("/v1/resources/GlobalNetworkPolicy", json=ssh("app")) as r:
            assert r.status == 201, await r.text()

        async def moved() -> None:
            assert await put(root, ssh("security")) == 200

        # The policy: read in tier app, moved to security meanwhile.
        done = change_after_the_read(monkeypatch, "GlobalNetworkPolicy", "ssh", moved)
        assert await put(ops, ssh("app")) == 409
        assert done
        async with root.get("/v1/resources/GlobalNetworkPolicy/ssh") as r:
            assert (await r.json())["spec"]["tier"] == "security"
        monkeypatch.undo()

        # Its delete, the same way.
        assert await put(root, ssh("app")) == 200

        done = change_after_the_read(monkeypatch, "GlobalNetworkPolicy", "ssh", moved)
        async with ops.delete("/v1/resources/GlobalNetworkPolicy/ssh") as r:
            assert r.status == 409, await r.text()
        assert done
        async with root.get("/v1/resources/GlobalNetworkPolicy/ssh") as r:
            assert r.status == 200 and (await r.json())["spec"]["tier"] == "security"
        monkeypatch.undo()

        # A Tier's order, which a tier admin may never set nor take away.
        async def ordered() -> None:
            assert await put(root, tier("app", 5)) == 200

        done = change_after_the_read(monkeypatch, "Tier", "app", ordered)
        assert await put(ops, tier("app")) == 409
        assert done
        async with root.get("/v1/resources/Tier/app") as r:
            assert (await r.json())["spec"]["order"] == 5
        monkeypatch.undo()

        # Without a change in between, the same writes go through.
        assert await put(ops, tier("app")) == 403       # an order now: not this admin's
        assert await put(ops, ssh("app")) == 403        # in tier security now
        assert await put(root, ssh("app")) == 200
        assert await put(ops, ssh("app")) == 200
        async with ops.delete("/v1/resources/GlobalNetworkPolicy/ssh") as r:
            assert r.status == 200, await r.text()
