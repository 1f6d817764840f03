"""HNS ACLs as HCN's JSON (the golden file is checked by tests/test_windows_powershell.py
with the scripts), and read back for drift."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bulkhead.dataplane.windows import hns_json
from bulkhead.dataplane.windows.hns_json import HnsJsonError
from bulkhead.dataplane.windows.rules import AclRule
from tests.windowsplans import WEB_ACLS


def test_the_request_has_hcns_shape() -> None:
    doc = hns_json.endpoint_request(WEB_ACLS)
    assert doc["ResourceType"] == "Policy" and doc["RequestType"] == "Update"
    policies = doc["Settings"]["Policies"]
    assert {p["Type"] for p in policies} == {"ACL"}
    first = policies[0]["Settings"]
    assert first == {"Protocols": "6", "Action": "Allow", "Direction": "In",
                     "LocalPorts": "22", "RuleType": "Switch", "Priority": 1000}
    priorities = [p["Settings"]["Priority"] for p in policies]
    assert priorities == sorted(priorities)
    # nothing unrestricted is spelled out, "Any" nowhere
    assert "Any" not in json.dumps(doc)
    block = next(p["Settings"] for p in policies if p["Settings"]["Priority"] == 1003)
    assert block == {"Action": "Block", "Direction": "In", "RuleType": "Switch",
                     "Priority": 1003}


def test_acls_read_back_equal_those_rendered() -> None:
    back = hns_json.parse(hns_json.render(WEB_ACLS), prefix="web")
    assert hns_json.drift(WEB_ACLS, back) == []
    assert [r.id for r in back] == [f"web-{n}" for n in range(1, len(WEB_ACLS) + 1)]
    # also from a bare Policies list with another policy type among them
    policies = hns_json.policies(WEB_ACLS)["Policies"]
    mixed = [{"Type": "OutBoundNAT", "Settings": {"Exceptions": ["198.18.0.0/15"]}}, *policies]
    assert hns_json.drift(WEB_ACLS, hns_json.parse(mixed)) == []


def test_drift_names_what_changed() -> None:
    found = hns_json.parse(hns_json.render(WEB_ACLS))
    at = next(i for i, r in enumerate(found) if "198.18.0.0/24" in r.remote_addresses)
    changed = [*found[:at], replace(found[at], remote_addresses=("198.18.0.0/16",)),
               *found[at + 1:]]
    problems = hns_json.drift(WEB_ACLS, changed)
    assert any(p.startswith("missing: ") and "198.18.0.0/24" in p for p in problems)
    assert any(p.startswith("not applied by the agent: ") and "198.18.0.0/16" in p
               for p in problems)
    assert hns_json.drift(WEB_ACLS, found[:-1])


@pytest.mark.parametrize(("change", "message"), [
    ({"remote_addresses": ("Any",)}, "ACL a: remote addresses: 'Any'"),
    ({"priority": 0}, "ACL a: priority: 0 is not 1-65535"),
    ({"priority": 70000}, "priority"),
    ({"action": "Deny"}, "action"),
    ({"direction": "Inbound"}, "direction"),
    ({"protocols": "6,17"}, "protocols: '6,17' is not one protocol"),
    ({"protocols": "1", "local_ports": ("80",)}, "ports: only with protocol 6"),
    ({"rule_type": "Wfp"}, "rule type"),
    ({"local_ports": ("80,81",)}, "local ports"),
    ({"local_ports": ("99999",)}, "local ports: '99999' is not a value"),
    ({"remote_ports": ("90-80",)}, "remote ports: '90-80' is not a value"),
    ({"local_ports": ("\u0668\u0660",)}, "local ports: "),     # Arabic-Indic 80: \d, not ASCII
    ({"protocols": "\u0666"}, "protocols: "),
])
def test_bad_acls_are_refused_naming_rule_and_field(change: dict[str, object],
                                                    message: str) -> None:
    rule = replace(AclRule("a", "Allow", "In", 1000, "6"), **change)  # type: ignore[arg-type]
    with pytest.raises(HnsJsonError, match=message):
        hns_json.render([rule])


@pytest.mark.parametrize("bad", ["nope", '{"Policies": {}}', "[1]",
                                 '[{"Type": "ACL", "Settings": {"Colour": "red"}}]',
                                 '[{"Type": "ACL", "Settings": {"Priority": "1"}}]',
                                 "[" * 100_000,             # nested too deep for json
                                 '"a string"',
                                 "[" + ",".join(['{"Type": "X"}'] * 50_001) + "]",
                                 '[{"Type": "ACL", "Settings": {"RemotePorts": "'
                                 + ",".join(["80"] * 10_001) + '"}}]'])
def test_json_of_another_shape_is_an_error(bad: str) -> None:
    with pytest.raises(HnsJsonError):
        hns_json.parse(bad)
