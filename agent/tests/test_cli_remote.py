"""`bulkhead apply/create/replace/delete/get/diff/nodes` against a real server over mTLS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from bulkhead import pki
from bulkhead.cli.main import main
from tests.conftest import Server

MANIFEST = """
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.db-in, labels: {team: dba}}
spec:
  tier: security
  order: 10
  selector: app == 'db'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [5432]}}]
"""


@pytest.fixture
def as_admin(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    crt, key = pki.issue(server.pki, "alice", role="admin")
    monkeypatch.setenv("BULKHEAD_SERVER", server.url)
    monkeypatch.setenv("BULKHEAD_CA", str(server.pki / "ca.crt"))
    monkeypatch.setenv("BULKHEAD_CERT", str(crt))
    monkeypatch.setenv("BULKHEAD_KEY", str(key))
    monkeypatch.setenv("HOME", str(tmp_path))  # no stray ~/.config/bulkhead/config.yaml
    path = tmp_path / "policy.yaml"
    path.write_text(MANIFEST)
    return path


async def run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_apply_get_diff_delete(as_admin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(as_admin)
    assert await run("apply", "-f", f, "--dry-run") == 0
    assert "Tier security created (dry run)" in capsys.readouterr().out
    assert await run("get", "tiers") == 0
    assert capsys.readouterr().out.strip() == "NAME"
    assert await run("diff", "-f", f) == 1
    assert "+++ file/GlobalNetworkPolicy/security.db-in" in capsys.readouterr().out
    assert await run("apply", "-f", f) == 0
    out = capsys.readouterr().out
    assert "GlobalNetworkPolicy security.db-in created" in out and "revision" in out
    assert await run("diff", "-f", f) == 0
    assert await run("create", "-f", f) == 1
    assert "already exists; nothing was created" in capsys.readouterr().err
    assert await run("get", "gnp", "-o", "wide", "-l", "team == 'dba'") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "TIER", "ORDER", "SELECTOR", "LABELS"]
    assert out[1].split()[:3] == ["security.db-in", "security", "10"]
    for labels, mode in (({"app": "db"}, "-"),
                         ({"microseg.bulkhead.io/enforcement": "observe"}, "observe")):
        hep = {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
               "metadata": {"name": "db-1", "labels": labels},
               "spec": {"node": "db-1", "expectedIPs": ["198.18.0.12", "198.18.1.12"]}}
        (as_admin.parent / "hep.yaml").write_text(yaml.safe_dump(hep))
        assert await run("apply", "-f", str(as_admin.parent / "hep.yaml")) == 0
        capsys.readouterr()
        assert await run("get", "hep", "-o", "wide") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["NAME", "NODE", "INTERFACE", "IPS", "MODE", "LABELS"]
        # no interface: the column is blank
        assert out[1].split()[:4] == ["db-1", "db-1", "198.18.0.12,198.18.1.12", mode]
    assert await run("get", "GlobalNetworkPolicy", "security.db-in", "-o", "yaml") == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["spec"]["selector"] == 'app == "db"' and doc["metadata"]["resourceVersion"]
    assert await run("get", "gnp", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out)["items"][0]["kind"] == "GlobalNetworkPolicy"
    as_admin.write_text(MANIFEST.replace("5432", "5433"))
    assert await run("replace", "-f", f) == 0
    assert "security.db-in configured" in capsys.readouterr().out
    assert await run("delete", "tier", "security") == 1
    assert "still holds policies" in capsys.readouterr().err
    assert await run("delete", "gnp", "security.db-in") == 0
    assert await run("get", "gnp", "security.db-in") == 1
    assert "not found" in capsys.readouterr().err


async def test_delete_f_removes_what_apply_f_made(as_admin: Path, server: Server,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # issue 16: a Tier and its policies in one file; delete -f used to try the Tier first
    # and fail with "Tier security still holds policies", deleting nothing.
    f = str(as_admin)
    assert await run("apply", "-f", f) == 0
    capsys.readouterr()
    assert await run("delete", "-f", f, "--dry-run") == 0
    assert capsys.readouterr().out.splitlines() == [
        "GlobalNetworkPolicy security.db-in deleted (dry run)",
        "Tier security deleted (dry run)"]
    assert await run("get", "tiers") == 0
    assert capsys.readouterr().out.split() == ["NAME", "security"]
    assert await run("delete", "-f", f) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["GlobalNetworkPolicy security.db-in deleted", "Tier security deleted"]
    assert out[2].startswith("revision ")
    assert await run("get", "tiers") == 0
    assert capsys.readouterr().out.split() == ["NAME"]
    # Again: everything is gone, so nothing is deleted, unless told to skip what is gone.
    assert await run("delete", "-f", f) == 1
    assert "not found; nothing was deleted" in capsys.readouterr().err
    assert await run("delete", "-f", f, "--ignore-not-found") == 0
    assert "Tier security not found, skipped" in capsys.readouterr().out


async def test_delete_f_is_all_or_nothing(as_admin: Path, server: Server,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    f = str(as_admin)
    assert await run("apply", "-f", f) == 0
    other = as_admin.with_name("other.yaml")
    other.write_text(MANIFEST.split("---")[1].replace("security.db-in", "security.web-in"))
    assert await run("apply", "-f", str(other)) == 0
    capsys.readouterr()
    # The tier still holds a policy the file does not name: nothing is deleted.
    assert await run("delete", "-f", f) == 1
    err = capsys.readouterr().err
    assert "Tier security still holds policies: security.web-in" in err
    assert "nothing was deleted" in err
    assert await run("get", "gnp") == 0
    assert capsys.readouterr().out.split() == ["NAME", "security.db-in", "security.web-in"]


async def test_invalid_file_is_refused_before_sending(as_admin: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    as_admin.write_text(MANIFEST.replace("ports: [5432]", 'ports: ["54-32"]'))
    assert await run("apply", "-f", str(as_admin)) == 1
    assert 'spec.ingress[0].destination.ports[0]: "54-32"' in capsys.readouterr().err


async def test_nodes_and_unreachable(as_admin: Path, server: Server,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    async with server.client("web-1", "agent") as agent:
        async with agent.post("/v1/status/web-1", json={"appliedRevision": 7}) as r:
            assert r.status == 200
    assert await run("nodes", "--revision", "7") == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["web-1", "7"]
    assert await run("nodes", "--revision", "8") == 1
    monkeypatch.setenv("BULKHEAD_SERVER", "https://127.0.0.1:9")
    assert await run("get", "tiers") == 3
    assert "cannot reach bulkhead-server" in capsys.readouterr().err


async def test_nodes_name_each_agents_version_and_those_behind_the_server(
        as_admin: Path, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    """Each report's `User-Agent: bulkhead-agent/VERSION` is the node's agent version
    (`bulkhead nodes`, `/v1/nodes`, /metrics); a node whose agent runs another version
    than the server, or says none, is named under the table: what is left of an
    upgrade. A User-Agent of another form is not taken, and the report still counts."""
    import tomllib

    from bulkhead import __version__
    from bulkhead.agent.http import USER_AGENT
    assert f"bulkhead-agent/{__version__}" == USER_AGENT
    # The version agents and servers say is the package's own, as built.
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["version"] == __version__
    sent = {"web-1": USER_AGENT, "web-2": "bulkhead-agent/0.0.9",
            "web-3": "bulkhead-agent/" + "9" * 65, "web-4": 'bulkhead-agent/1.0"} 1 x{a="'}
    for node, agent_header in sent.items():
        async with server.client(node, "agent") as agent, \
                agent.post(f"/v1/status/{node}", json={"appliedRevision": 4},
                           headers={"User-Agent": agent_header}) as r:
            assert r.status == 200, await r.text()
    assert await run("nodes", "--revision", "4") == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.split("\n\n")[0].splitlines()[1:]}
    assert rows["web-1"][0:2] == ["web-1", "4"] and rows["web-1"][-2:] == [__version__, "yes"]
    assert [rows[n][-2] for n in ("web-2", "web-3", "web-4")] == ["0.0.9", "-", "-"]
    assert f"3 agents on another version than the server's ({__version__}): web-2 (0.0.9), " \
        "web-3 (unknown), web-4 (unknown)" in out
    async with server.client("val", "viewer") as viewer:
        async with viewer.get("/v1/nodes") as r:
            body = await r.json()
        assert body["serverVersion"] == __version__
        assert {n["node"]: n.get("agentVersion") for n in body["nodes"]} == {
            "web-1": __version__, "web-2": "0.0.9", "web-3": None, "web-4": None}
        async with viewer.get("/metrics") as r:
            text = await r.text()
    lines = text.splitlines()
    assert f'bulkhead_node_agent_info{{node="web-1",version="{__version__}"}} 1' in lines
    assert 'bulkhead_node_agent_info{node="web-2",version="0.0.9"} 1' in lines
    assert not any(line.startswith('bulkhead_node_agent_info{node="web-3"') for line in lines)


async def test_a_gone_node_is_forgotten_so_waits_end(as_admin: Path, server: Server,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A decommissioned (or down) host's last report held up every wait for ever: no
    command or API could remove it. `bulkhead delete node NAME` forgets it; its agent's
    next report brings it back."""
    async with server.client("web-1", "agent") as web1, \
            server.client("web-2", "agent") as web2:
        for client, node, revision in ((web1, "web-1", 7), (web2, "web-2", 3)):
            async with client.post(f"/v1/status/{node}",
                                   json={"appliedRevision": revision}) as r:
                assert r.status == 200
        assert await run("nodes", "--revision", "7") == 1       # web-2 holds it up
        capsys.readouterr()
        assert await run("delete", "node", "web-2", "--dry-run") == 0
        assert capsys.readouterr().out.strip() == "node web-2 forgotten (dry run)"
        assert await run("nodes", "--revision", "7") == 1
        capsys.readouterr()
        assert await run("delete", "node", "web-2") == 0
        assert capsys.readouterr().out.strip() == "node web-2 forgotten"
        assert await run("nodes", "--revision", "7") == 0
        capsys.readouterr()
        assert await run("delete", "node", "web-2") == 1
        assert "node web-2 has no status report" in capsys.readouterr().err
        assert await run("delete", "node", "web-2", "--ignore-not-found") == 0
        assert capsys.readouterr().out.strip() == "node web-2 not found, skipped"
        # The flag works for a resource named on the command line too (it was -f only).
        assert await run("delete", "hostendpoint", "nosuch", "--ignore-not-found") == 0
        assert capsys.readouterr().out.strip() == "HostEndpoint nosuch not found, skipped"
        assert await run("delete", "hostendpoint", "nosuch") == 1
        # Only an admin without tier limits: a node is no tier's.
        async with server.client("ops", "admin", tiers=("app",)) as ops, \
                server.client("eve", "viewer") as viewer:
            for client in (ops, viewer, web1):
                async with client.delete("/v1/status/web-1") as r:
                    assert r.status == 403, await r.text()
        async with web2.post("/v1/status/web-2", json={"appliedRevision": 7}) as r:
            assert r.status == 200
        capsys.readouterr()
        assert await run("nodes", "--revision", "7") == 0
        table = capsys.readouterr().out.split("\n\n")[0]
        assert [line.split()[0] for line in table.splitlines()[1:]] == ["web-1", "web-2"]


HEP = """
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: web, labels: {app: web}}
spec: {node: web-1, interfaceName: eth0}
"""


async def test_names_are_url_encoded(as_admin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    as_admin.write_text(HEP)
    assert await run("apply", "-f", str(as_admin)) == 0
    capsys.readouterr()
    # Unencoded, `?x` would start a query string: `web` deleted and --dry-run lost.
    assert await run("delete", "hep", "web?x", "--dry-run") == 1
    err = capsys.readouterr().err
    assert 'HostEndpoint "web?x" is not a valid name' in err and "HTTP 400" in err
    assert await run("get", "hep", "web") == 0
    assert capsys.readouterr().out.split() == ["NAME", "web"]
    for name in ("we b", "web#x", "web/x", "..", "%2e", "web&dryRun=false", "web\x1b[2J", "é"):
        for argv in (("get", "hep", name), ("delete", "hep", name)):
            assert await run(*argv) == 1, argv
            err = capsys.readouterr().err
            assert err.startswith("error: ") and "HTTP 4" in err and "\x1b" not in err, err
    assert await run("get", "hep", "web") == 0


async def test_server_strings_are_printed_without_control_characters(
        as_admin: Path, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    async with server.client("web-1", "agent") as agent:
        async with agent.post("/v1/status/web-1", json={
                "appliedRevision": 3, "errors": ["nft: \x1b[2Jcleared\x07 your\rscreen"]}) as r:
            assert r.status == 200
    assert await run("nodes") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "web-1: nft: \\x1b[2Jcleared\\x07 your\\rscreen" in out
    assert await run("nodes", "-o", "json") == 0
    assert "\x1b" not in capsys.readouterr().out


async def test_json_files_with_duplicate_keys_are_refused(
        as_admin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dup = as_admin.with_suffix(".json")
    dup.write_text('{"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet", '
                   '"metadata": {"name": "a", "name": "b"}, "spec": {}}')
    for argv in (("apply", "-f", str(dup)), ("validate", "-f", str(dup))):
        assert await run(*argv) == 2
        assert "duplicate key 'name'" in capsys.readouterr().err
    assert await run("get", "globalnetworksets") == 0
    assert capsys.readouterr().out.split() == ["NAME"]


async def test_label_values_follow_the_one_rule(as_admin: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # issue 17: booleans are true/false and numbers as written, as the collection writes
    # them, so `pci == 'true'` finds endpoints whichever writer made them; null is refused.
    hep = as_admin.with_name("hep.yaml")
    hep.write_text("apiVersion: projectcalico.org/v3\nkind: HostEndpoint\n"
                   "metadata: {name: web-1, labels: {pci: true, prio: 1, zone: dmz}}\n"
                   "spec: {node: web-1, expectedIPs: [198.18.0.11]}\n")
    assert await run("apply", "-f", str(hep)) == 0
    capsys.readouterr()
    assert await run("get", "hep", "-l", "pci == 'true' && prio == '1'") == 0
    assert capsys.readouterr().out.split()[:2] == ["NAME", "web-1"]
    hep.write_text(hep.read_text().replace("prio: 1", "owner: null"))
    assert await run("apply", "-f", str(hep)) == 2
    err = capsys.readouterr().err
    assert "metadata.labels.owner: a label value cannot be null" in err


async def test_history_answers_a_bounded_number_of_changes_and_says_so(
        as_admin: Path, server: Server, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One answer of GET /v1/history holds at most HISTORY_MAX_CHANGES changes (the
    first entry whole): older entries are left out with `truncated`, and `bulkhead
    history` says so on stderr."""
    from bulkhead.server import app as server_app
    monkeypatch.setattr(server_app, "HISTORY_MAX_CHANGES", 5)
    async with server.client("alice", "admin") as admin:
        for batch in (["a", "b", "c"], ["d", "e", "f"]):
            body = "\n---\n".join(
                json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
                            "metadata": {"name": n}, "spec": {"nets": ["198.18.9.0/24"]}})
                for n in batch)
            async with admin.post("/v1/apply", data=body,
                                  headers={"Content-Type": "application/yaml"}) as r:
                assert r.status == 200, await r.text()
        async with admin.get("/v1/history") as r:
            answer = await r.json()
        assert [len(e["changes"]) for e in answer["entries"]] == [3]
        assert answer["truncated"] is True
        async with admin.get("/v1/history", params={"name": "a"}) as r:
            answer = await r.json()
        assert [len(e["changes"]) for e in answer["entries"]] == [3]
        assert "truncated" not in answer
    assert await run("history") == 0
    captured = capsys.readouterr()
    assert "history: 1 entries, the most one answer holds" in captured.err
    assert captured.out.count("apply") == 1
