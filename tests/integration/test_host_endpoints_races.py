"""host_endpoints against another writer, with the real server: an endpoint the purge
keeps is sent back as the module read it, so a change another writer made to it after
that reading must not be undone. The module runs in this process (as in the unit tests),
and the other writer's change comes between its reading and its write."""

from __future__ import annotations

import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.bulkhead.microseg.plugins.module_utils.service import ResourceService
from ansible_collections.bulkhead.microseg.plugins.modules import host_endpoints

OWNER = "microseg.bulkhead.io/managed-by"


def hep(name, ip, **labels):
    return {"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
            "metadata": {"name": name, "labels": dict({OWNER: "east"}, **labels)},
            "spec": {"node": name, "expectedIPs": [ip]}}


def endpoints(server):
    return dict((d["metadata"]["name"], d) for d in
                server.request("GET", "/v1/resources/HostEndpoint")["items"])


@pytest.fixture
def fleet(clean_server):
    """The owner east's web-1, web-2 and db-1 on the session's server."""
    clean_server.request("POST", "/v1/apply",
                         [hep("web-1", "198.18.0.1"), hep("web-2", "198.18.0.2"),
                          hep("db-1", "198.18.0.3")])
    return clean_server


def run_module(server, capsys):
    """host_endpoints with web-1 listed, db-1 kept: web-2 goes, in one sync."""
    crt, key = server.cert("admin")
    args = dict(server_url=server.url, ca_path=str(server.pki / "ca.crt"), client_cert=crt,
                client_key=key, owner="east", keep=["db-1"],
                endpoints=[{"metadata": {"name": "web-1"},
                            "spec": {"node": "web-1", "expectedIPs": ["198.18.0.11"]}}])
    with patch_module_args(args):
        with pytest.raises(SystemExit) as done:
            host_endpoints.main()
    return done.value.code, json.loads(capsys.readouterr().out)


def other_writer_after_reads(server, monkeypatch, times):
    """After each of the module's first `times` readings of the endpoints, another writer
    moves db-1 (a new label value each time); returns the list of values written."""
    found = ResourceService.find
    written = []

    def find_then_a_write(self, kind=None, name=None, selector=None):
        answer = found(self, kind, name, selector)
        if kind == "HostEndpoint" and name is None and len(written) < times:
            written.append("moved-%d" % len(written))
            server.request("POST", "/v1/apply",
                           [hep("db-1", "198.18.0.3", zone=written[-1])])
        return answer

    monkeypatch.setattr(ResourceService, "find", find_then_a_write)
    return written


def test_a_kept_endpoint_changed_meanwhile_is_not_undone(fleet, monkeypatch, capsys):
    """db-1 changes after the module read it: the sync refuses the copy read (409,
    nothing written), the module reads again and syncs; db-1 keeps the other writer's
    change, web-1 is written and web-2 deleted."""
    written = other_writer_after_reads(fleet, monkeypatch, 1)
    code, result = run_module(fleet, capsys)
    assert code == 0, result
    assert written == ["moved-0"]
    assert (result["updated"], result["deleted"], result["kept"]) == \
        (["web-1"], ["web-2"], ["db-1"])
    now = endpoints(fleet)
    assert sorted(now) == ["db-1", "web-1"]
    assert now["db-1"]["metadata"]["labels"].get("zone") == "moved-0"
    assert now["web-1"]["spec"]["expectedIPs"] == ["198.18.0.11"]


def test_a_module_that_keeps_losing_the_race_fails_having_written_nothing(
        fleet, monkeypatch, capsys):
    written = other_writer_after_reads(fleet, monkeypatch, 10)
    code, result = run_module(fleet, capsys)
    assert code == 1, result
    assert len(written) == host_endpoints.SYNC_ATTEMPTS == 3
    assert "HostEndpoint db-1: resourceVersion is" in result["msg"]
    assert result["msg"].endswith(
        "it changed after it was read; read it again; nothing was changed (the owner's host "
        "endpoints changed while the module read and wrote them, 3 times in a row)")
    now = endpoints(fleet)
    assert sorted(now) == ["db-1", "web-1", "web-2"]
    assert now["web-1"]["spec"]["expectedIPs"] == ["198.18.0.1"]
    assert now["db-1"]["metadata"]["labels"]["zone"] == "moved-2"
