"""The Windows dataplanes of the conformance runner (`--dataplane hns` and
`--dataplane windows-firewall`): the project's cases compiled for Windows and decided by
the backends' fakes agree with the expectations, or are refused with the reason; refused
cases are reported apart, neither passing nor failing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bulkhead.cli.main import main
from bulkhead.conformance import DATAPLANES, load_cases, report_json, report_text, run_cases
from tests.test_conformance import CASES_DIR, case, write

# What a Windows backend may refuse, and nothing else (docs/windows/flatten-hns.md,
# docs/windows/firewall.md).
REFUSALS = ("doNotTrack: Windows has no untracked", "preDNAT: Windows has no pre-DNAT",
            "domains: Windows has no address sets",
            "selector: selects network sets with allowedEgressDomains")
BACKEND_REFUSALS = {
    "hns": ("icmp: HNS ACLs match no ICMP type or code",
            "ports: HNS ACLs match the ports of TCP and UDP only"),
    "windows-firewall": ("ports: Windows Firewall takes ports only with TCP and UDP",),
}


def check_project_cases(dataplane: str) -> None:
    cases = load_cases(CASES_DIR)
    results = run_cases(cases, DATAPLANES[dataplane]())
    report = report_json(results)
    assert report["failed"] == [], report_text(results, dataplane)
    refused = report["refused"]
    for item in refused:
        assert any(r in item["reason"] for r in (*REFUSALS, *BACKEND_REFUSALS[dataplane])), item
    # Most cases run: refusals are the exception.
    assert len(cases) - len(refused) >= 0.9 * len(cases), refused
    assert report["probes"] == sum(len(c.expect) for c in cases) - sum(
        r["probes"] for r in refused)


def test_the_project_cases_on_hns() -> None:
    check_project_cases("hns")


def test_the_project_cases_on_windows_firewall() -> None:
    check_project_cases("windows-firewall")


def test_windows_firewall_without_its_compiler_says_so() -> None:
    try:
        import bulkhead.dataplane.windows.firewall  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"the windows-firewall dataplane needs "
                           r"bulkhead\.dataplane\.windows\.firewall"):
            DATAPLANES["windows-firewall"]()
    else:
        assert DATAPLANES["windows-firewall"]().name == "windows-firewall"


def test_a_refused_case_is_reported_apart(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ping = case(name="ping-type", tags=["icmp"], policies=[{
        "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
        "metadata": {"name": "echo"},
        "spec": {"selector": "app == 'db'", "ingress": [
            {"action": "Allow", "protocol": "ICMP", "icmp": {"type": 8}}]}}],
        expect=[{"from": "web", "to": "db", "proto": "ICMP", "port": None, "allowed": True}])
    wrong = case(name="wrong", expect=[{"from": "web", "to": "db", "proto": "TCP",
                                        "port": 80, "allowed": True}])
    path = write(tmp_path, ping, case(), wrong)
    assert main(["conformance", "run", str(path), "--dataplane", "hns"]) == 1
    out = capsys.readouterr().out
    assert ("== ping-type [icmp] REFUSED by hns: host endpoint db ingress: policy echo "
            "ingress rule 0: icmp: HNS ACLs match no ICMP type or code") in out
    assert "icmp                     0/0 cases (none run), 1 refused" in out
    assert "ingress                  1/2 cases (50%)" in out
    assert "1 passed, 1 failed, 1 refused (2/3 probes agree, dataplane hns)" in out
    assert main(["conformance", "run", str(path), "--dataplane", "hns", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["cases"] == 3 and data["probes"] == 3
    assert data["refused"] == [{"case": "ping-type", "probes": 1, "reason": (
        "host endpoint db ingress: policy echo ingress rule 0: icmp: HNS ACLs match no "
        "ICMP type or code")}]
    # Only refused and passing cases: the run succeeds.
    assert main(["conformance", "run", str(write(tmp_path, ping, case())), "--dataplane",
                 "hns"]) == 0
