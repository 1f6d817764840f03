"""A sync (`POST /v1/sync`) against writes that come between its readings and its commit,
in a server in this process on SQLite: writes beside it do not fail it, and with
`?preconditions=true` a document sent back as it was read cannot undo a write that came
after that reading (the host endpoints module's kept endpoints)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bulkhead.store import Op
from bulkhead.store.sqlite import SQLiteStore
from tests.conftest import Server

OWNER = "microseg.bulkhead.io/managed-by"
QUERY = {"kind": "HostEndpoint", "owner": "inv"}


def hep(name: str, ip: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": {OWNER: "inv", **labels}},
            "spec": {"node": name, "expectedIPs": [ip]}}


async def post(server: Server, path: str, docs: Any, query: dict[str, str]
               ) -> tuple[int, Any]:
    async with server.client("alice", "admin") as c:
        async with c.post(path, json=docs, params=query) as r:
            return r.status, await r.json()


async def endpoints(server: Server) -> dict[str, dict[str, Any]]:
    async with server.client("viewer", "viewer") as c:
        async with c.get("/v1/resources/HostEndpoint") as r:
            assert r.status == 200
            return {d["metadata"]["name"]: d for d in (await r.json())["items"]}


def writes_after_listing(monkeypatch: pytest.MonkeyPatch, docs: list[dict[str, Any]]
                         ) -> list[str]:
    """After the next listing of HostEndpoint (a sync's reading of its scope), another
    writer writes `docs`, one transaction each, before the sync commits; their names."""
    listed = SQLiteStore.list_resources
    written: list[str] = []

    async def list_then_write(self: SQLiteStore, kind: str | None = None,
                              selector: Any = None) -> Any:
        answer = await listed(self, kind, selector)
        if kind == "HostEndpoint" and not written:
            for doc in docs:
                written.append(doc["metadata"]["name"])
                await self.transaction([Op("put", doc["kind"], written[-1], doc)])
        return answer

    monkeypatch.setattr(SQLiteStore, "list_resources", list_then_write)
    return written


async def test_writes_beside_a_sync_do_not_fail_it(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a sync's reading of its scope and its commit, another writer writes
    something outside the scope (a network set, another owner's endpoint) and creates an
    endpoint of the owner: the sync commits all the same, as if it came first (the new
    endpoint stays, as if created just after it). It is not committed on a reading of the
    whole store, as a rollback is: a write anywhere would fail it, and independent
    owners syncing at once would fail one another."""
    status, _ = await post(server, "/v1/apply", [hep("h1", "198.18.0.1")], {})
    assert status == 200
    other = hep("o1", "198.18.0.5")
    other["metadata"]["labels"][OWNER] = "other"
    netset = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
              "metadata": {"name": "n1"}, "spec": {"nets": ["198.18.0.0/24"]}}
    written = writes_after_listing(monkeypatch, [netset, other, hep("late", "198.18.0.9")])
    status, answer = await post(server, "/v1/sync", [hep("h2", "198.18.0.2")], QUERY)
    assert status == 200, answer
    assert written == ["n1", "o1", "late"]
    assert sorted((r["name"], r["action"]) for r in answer["results"]) == \
        [("h1", "deleted"), ("h2", "created")]
    assert sorted(await endpoints(server)) == ["h2", "late", "o1"]


async def test_owners_syncing_at_once_all_commit(server: Server) -> None:
    """Eight owners sync their own endpoints at once, each scope its own."""
    async def one(i: int) -> tuple[int, Any]:
        doc = hep(f"h{i}", f"198.18.1.{i}")
        doc["metadata"]["labels"][OWNER] = f"o{i}"
        return await post(server, "/v1/sync", [doc], {**QUERY, "owner": f"o{i}"})

    answers = await asyncio.gather(*(one(i) for i in range(8)))
    assert [status for status, _ in answers] == [200] * 8, answers
    assert sorted(await endpoints(server)) == sorted(f"h{i}" for i in range(8))


async def test_preconditions_keep_a_document_read_earlier_from_undoing_a_later_write(
        server: Server) -> None:
    """h1 read at one version, then changed by another writer: sent back as read with
    `preconditions=true`, it is refused (409 naming it and both versions), and the later
    write stands; at its current version it is left as it is (not written). Without
    preconditions the copy read earlier overwrites the later write (the reason for them),
    and a version on a resource gone since is refused too."""
    status, _ = await post(server, "/v1/apply", [hep("h1", "198.18.0.1")], {})
    assert status == 200
    read = (await endpoints(server))["h1"]
    first = read["metadata"]["resourceVersion"]
    status, _ = await post(server, "/v1/apply", [hep("h1", "198.18.0.1", app="web")], {})
    assert status == 200
    later = (await endpoints(server))["h1"]["metadata"]["resourceVersion"]
    desired = [read, hep("h2", "198.18.0.2")]
    for dry in ("true", "false"):
        status, answer = await post(server, "/v1/sync", desired,
                                    {**QUERY, "preconditions": "true", "dryRun": dry})
        assert status == 409, answer
        assert answer["error"]["message"] == (
            f"HostEndpoint h1: resourceVersion is {later}, not {first}: it changed after "
            "it was read; read it again; nothing was changed")
    now = await endpoints(server)
    assert sorted(now) == ["h1"] and now["h1"]["metadata"]["labels"]["app"] == "web"
    # At its version: kept as it is, not written; h2 created.
    current = now["h1"]
    status, answer = await post(server, "/v1/sync", [current, hep("h2", "198.18.0.2")],
                                {**QUERY, "preconditions": "true"})
    assert status == 200, answer
    assert [(r["name"], r["action"]) for r in answer["results"]] == \
        [("h1", "unchanged"), ("h2", "created")]
    assert (await endpoints(server))["h1"]["metadata"]["resourceVersion"] == later
    # Without preconditions, a version is not looked at: the copy read first is written.
    status, answer = await post(server, "/v1/sync", [read, hep("h2", "198.18.0.2")], QUERY)
    assert status == 200 and answer["results"][0]["action"] == "configured", answer
    assert "app" not in (await endpoints(server))["h1"]["metadata"]["labels"]
    # A version given for a resource deleted since; a flag that is not one.
    gone = {**hep("h3", "198.18.0.3"), "metadata": {
        "name": "h3", "labels": {OWNER: "inv"}, "resourceVersion": "7"}}
    status, answer = await post(server, "/v1/sync", [gone], {**QUERY, "preconditions": "1"})
    assert status == 409 and answer["error"]["message"] == (
        "HostEndpoint h3: resourceVersion is 7, but it does not exist (deleted after it was "
        "read, or never written); read it again; nothing was changed"), answer
    status, answer = await post(server, "/v1/sync", [], {**QUERY, "preconditions": "maybe"})
    assert status == 400 and "preconditions: 'maybe' is not true or false" in \
        answer["error"]["message"], answer
    assert sorted(await endpoints(server)) == ["h1", "h2"]
