"""Every endpoint x every role: what is allowed answers, what is forbidden gets 403."""

from __future__ import annotations

import pytest

from tests.conftest import Server
from tests.flowfixture import flow_doc

TIER = {"apiVersion": "projectcalico.org/v3", "kind": "Tier", "metadata": {"name": "t1"},
        "spec": {}}
SET = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
       "metadata": {"name": "n1"}, "spec": {"nets": ["198.18.0.0/24"]}}
STAGED = {"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
          "metadata": {"name": "s1"}, "spec": {"selector": "all()"}}
APPLY = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata: {name: n2}\n"

# (method, path, body): each endpoint of the API.
ENDPOINTS = {
    "snapshot": ("GET", "/v1/snapshot", None),
    "watch": ("GET", "/v1/watch?timeout=0", None),
    "list": ("GET", "/v1/resources", None),
    "list-kind": ("GET", "/v1/resources/GlobalNetworkSet", None),
    "get": ("GET", "/v1/resources/GlobalNetworkSet/n1", None),
    "create": ("POST", "/v1/resources/Tier", TIER),
    "replace": ("PUT", "/v1/resources/GlobalNetworkSet/n1", SET),
    "delete": ("DELETE", "/v1/resources/GlobalNetworkSet/n1?dryRun=true", None),
    "apply": ("POST", "/v1/apply?dryRun=true", APPLY),
    "delete-many": ("POST", "/v1/delete?dryRun=true", APPLY.replace("n2", "n1")),
    "sync": ("POST", "/v1/sync?tier=t1&dryRun=true", "[]"),
    "rollback": ("POST", "/v1/rollback?revision=1&dryRun=true", None),
    "promote": ("POST", "/v1/promote", {"names": ["s1"], "dryRun": True}),
    "export": ("GET", "/v1/export", None),
    "history": ("GET", "/v1/history", None),
    "status-own": ("POST", "/v1/status/web-1", {"appliedRevision": 1}),
    "status-other": ("POST", "/v1/status/db-1", {"appliedRevision": 1}),
    "nodes": ("GET", "/v1/nodes", None),
    "flows": ("GET", "/v1/flows", None),
    "flows-send-own": ("POST", "/v1/flows", {"records": [flow_doc(node="web-1")]}),
    "flows-send-other": ("POST", "/v1/flows", {"records": [flow_doc(node="db-1")]}),
    "metrics": ("GET", "/metrics", None),
    "healthz": ("GET", "/healthz", None),
    "readyz": ("GET", "/readyz", None),
}
ALLOWED = {
    # Status and flows are each node's own: no admin reports for a node (it could fake
    # convergence or traffic).
    "admin": set(ENDPOINTS) - {"status-own", "status-other", "flows-send-own",
                               "flows-send-other"},
    "viewer": {"snapshot", "watch", "list", "list-kind", "get", "nodes", "metrics", "healthz",
               "readyz", "export", "history", "flows"},
    # An agent is named web-1: it reads the snapshot and reports for itself only.
    "agent": {"snapshot", "watch", "status-own", "flows-send-own", "healthz", "readyz"},
    # An admin limited to tier t1 may write t1 (a Tier resource), nothing outside tiers
    # (nor promote s1, a policy of tier default).
    "tier-admin": {"snapshot", "watch", "list", "list-kind", "get", "create", "nodes",
                   "metrics", "healthz", "readyz", "sync", "export", "history", "flows"},
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
async def test_authorization_matrix(server: Server, role: str) -> None:
    async with server.client("alice", "admin") as admin:
        async with admin.post("/v1/resources/GlobalNetworkSet", json=SET) as r:
            assert r.status == 201
        async with admin.post("/v1/resources/StagedGlobalNetworkPolicy", json=STAGED) as r:
            assert r.status == 201
    name, cert_role, tiers = {"admin": ("alice", "admin", ()),
                              "viewer": ("val", "viewer", ()),
                              "agent": ("web-1", "agent", ()),
                              "tier-admin": ("ops", "admin", ("t1",))}[role]
    failures = []
    async with server.client(name, cert_role, tiers) as client:
        for endpoint, (method, path, body) in ENDPOINTS.items():
            kwargs = {"data": body} if isinstance(body, str) else {"json": body}
            async with client.request(method, path, **kwargs) as r:
                status = r.status
            allowed = endpoint in ALLOWED[role]
            if (allowed and status >= 400) or (not allowed and status != 403):
                failures.append(f"{role} {endpoint}: {status}")
    assert failures == []
