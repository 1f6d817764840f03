"""A fake of the Host Compute Network API (`bulkhead.agent.hcn.Hcn`): a test double,
since HCN runs only on Windows. It holds endpoints in memory (id, name, addresses, a
policy list), answers a query with the properties JSON in the shape hcsshim's
HostComputeEndpoint has (`ID`, `Name`, `IpConfigurations`, `Policies`) and takes a
ModifyEndpointSettingRequest (ResourceType Policy, RequestType Update) by replacing the
endpoint's ACL policies with the request's, other policies kept. It does not know what
HCN does with anything else, and says so (ValueError). `failing` holds the numbers of
the modify calls (counted from 1 over the fake's life, `calls`) that fail (HcnError,
nothing changed), as HCN refusing a request would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bulkhead.agent.hcn import HcnError, HnsEndpoint
from bulkhead.dataplane.windows import hns_json
from bulkhead.dataplane.windows.fake_hns import FakeHns
from bulkhead.dataplane.windows.rules import AclRule


@dataclass
class FakeEndpoint:
    id: str
    name: str
    addresses: tuple[str, ...]
    policies: list[dict[str, Any]] = field(default_factory=list)


class FakeHcn:
    def __init__(self, endpoints: list[FakeEndpoint]) -> None:
        self.held = {e.id: e for e in endpoints}
        self.modified: list[str] = []        # ids, in the order modified
        self.calls = 0                       # modify calls so far
        self.failing: set[int] = set()       # the calls that fail

    def endpoints(self) -> list[HnsEndpoint]:
        return [HnsEndpoint(e.id, e.name, e.addresses) for e in self.held.values()]

    def query(self, endpoint: str) -> str:
        e = self.held.get(endpoint)
        if e is None:
            raise HcnError(f"HcnOpenEndpoint (endpoint {endpoint}): not found")
        return json.dumps({"ID": e.id.upper(), "Name": e.name,
                           "IpConfigurations": [{"IpAddress": a} for a in e.addresses],
                           "Policies": e.policies})

    def modify(self, endpoint: str, request: str) -> None:
        e = self.held.get(endpoint)
        if e is None:
            raise HcnError(f"HcnOpenEndpoint (endpoint {endpoint}): not found")
        doc = json.loads(request)
        if (doc.get("ResourceType"), doc.get("RequestType")) != ("Policy", "Update"):
            raise ValueError(f"the fake takes Policy Update requests only: {request[:200]}")
        self.calls += 1
        if self.calls in self.failing:
            raise HcnError(f"HcnModifyEndpoint (endpoint {endpoint}): HRESULT "
                           "0x80070057: the fake was told to fail")
        new = doc["Settings"].get("Policies", [])
        if any(p.get("Type") != "ACL" for p in new):
            raise ValueError("the fake replaces ACL policies only")
        e.policies = [p for p in e.policies if p.get("Type") != "ACL"] + new
        self.modified.append(endpoint)

    def acls(self, endpoint: str) -> list[AclRule]:
        return hns_json.parse(self.held[endpoint].policies)

    def fake_hns(self, endpoint: str) -> FakeHns:
        """The endpoint's ACLs as the fake HNS evaluates them."""
        return FakeHns(self.acls(endpoint))
