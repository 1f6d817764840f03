"""A sync (`POST /v1/sync`) against writes that come between its readings and its commit,
in a server in this process on SQLite: it commits on its reading of the scope or not at
all, and with `?preconditions=true` a document sent back as it was read cannot undo a
write that came after that reading (the host endpoints module's kept endpoints)."""

from __future__ import annotations

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


def creates_after_listing(monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """After each of the next `times` listings of HostEndpoint (a sync's reading of its
    scope), another writer creates an endpoint of the owner, before the sync commits;
    the names created."""
    listed = SQLiteStore.list_resources
    created: list[str] = []

    async def list_then_a_create(self: SQLiteStore, kind: str | None = None,
                                 selector: Any = None) -> Any:
        answer = await listed(self, kind, selector)
        if kind == "HostEndpoint" and len(created) < times:
            created.append(f"late{len(created)}")
            await self.transaction([Op("put", "HostEndpoint", created[-1],
                                       hep(created[-1], "198.18.0.9"))])
        return answer

    monkeypatch.setattr(SQLiteStore, "list_resources", list_then_a_create)
    return created


async def test_a_sync_commits_on_its_reading_of_the_scope(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint of the owner created after the sync read the owner's endpoints (and
    before its commit) is not in the body, so the sync would leave it standing and call
    the owner's endpoints exactly the body's: the commit is refused, and the sync reads
    its scope and plans again, deleting it; a write after each of three readings fails
    the sync, 409, nothing written."""
    status, _ = await post(server, "/v1/apply", [hep("h1", "198.18.0.1")], {})
    assert status == 200
    created = creates_after_listing(monkeypatch, 1)
    status, answer = await post(server, "/v1/sync", [hep("h2", "198.18.0.2")], QUERY)
    assert status == 200, answer
    assert created == ["late0"]
    assert sorted((r["name"], r["action"]) for r in answer["results"]) == \
        [("h1", "deleted"), ("h2", "created"), ("late0", "deleted")]
    assert sorted(await endpoints(server)) == ["h2"]
    created = creates_after_listing(monkeypatch, 3)
    status, answer = await post(server, "/v1/sync", [hep("h3", "198.18.0.3")], QUERY)
    assert status == 409, answer
    assert created == ["late0", "late1", "late2"]
    message = answer["error"]["message"]
    assert message.startswith("the store changed: a resource was written after revision")
    assert message.endswith("nothing was changed, try again")
    assert sorted(await endpoints(server)) == ["h2", "late0", "late1", "late2"]
    status, answer = await post(server, "/v1/sync", [hep("h3", "198.18.0.3")], QUERY)
    assert status == 200, answer
    assert sorted(await endpoints(server)) == ["h3"]


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
        "HostEndpoint h3: resourceVersion is 7, but it does not exist: it was deleted after "
        "it was read; read it again; nothing was changed"), answer
    status, answer = await post(server, "/v1/sync", [], {**QUERY, "preconditions": "maybe"})
    assert status == 400 and "preconditions: 'maybe' is not true or false" in \
        answer["error"]["message"], answer
    assert sorted(await endpoints(server)) == ["h1", "h2"]
