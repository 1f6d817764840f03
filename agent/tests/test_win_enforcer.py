"""The Windows enforcer against a fake NetSecurity module (tests/pwshfixture.py): the
scripts it runs are the real ones, parsed by tree-sitter and carried out on rules held
in memory. The compile stage is injected (fixed rule lists): the compilers are tested on
their own."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import pytest

from bulkhead.agent.enforcer import EnforceError
from bulkhead.agent.win_enforcer import PowerShellRunner, RunnerError, WindowsFirewallEnforcer
from bulkhead.dataplane.windows import powershell
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.powershell import ProfileState, canonical, number
from bulkhead.dataplane.windows.rules import FirewallRule
from bulkhead.model import Snapshot, parse_resource
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import NodePlan
from tests.pwshfixture import FakeNetSecurity, syntax_errors
from tests.windowsplans import WEB, WEB_NEXT

SNAPSHOT = Snapshot.build([parse_resource({
    "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
    "metadata": {"name": "win1-ethernet", "labels": {"role": "web"}},
    "spec": {"node": "win1", "interfaceName": "Ethernet", "expectedIPs": ["198.18.0.10"]}})])


class Compiler:
    """Stands in for flatten + firewall.compile: gives `rules`, records the plans."""

    def __init__(self, rules: list[FirewallRule]) -> None:
        self.rules = rules
        self.plans: list[NodePlan] = []

    def __call__(self, plan: NodePlan) -> list[FirewallRule]:
        self.plans.append(plan)
        return list(self.rules)


def setup(rules: list[FirewallRule] = WEB
          ) -> tuple[WindowsFirewallEnforcer, FakeNetSecurity, Compiler]:
    fake, compiler = FakeNetSecurity(), Compiler(rules)
    return WindowsFirewallEnforcer("win1", Failsafes(), runner=fake, compile=compiler), \
        fake, compiler


def held(fake: FakeNetSecurity) -> list[FirewallRule]:
    return sorted((canonical(r) for r in fake.rules.values()), key=lambda r: r.name)


def numbered(rules: list[FirewallRule], generation: int) -> list[FirewallRule]:
    return sorted((canonical(r) for r in number(rules, generation)), key=lambda r: r.name)


def test_the_first_apply_adds_generation_1_and_sets_the_profiles() -> None:
    enforcer, fake, compiler = setup()
    report = enforcer.enforce(SNAPSHOT, 5)
    assert compiler.plans[0].node == "win1"
    assert [e.name for e in compiler.plans[0].endpoints] == ["win1-ethernet"]
    assert held(fake) == numbered(WEB, 1)
    assert all(fake.groups[n] == "bulkhead" for n in fake.rules)
    assert all(p.enforcing for p in fake.profiles.values())
    assert report.changed and report.full and report.created and report.revision == 5
    assert report.counts == {"rules": len(WEB), "allow": len(WEB) - 1, "block": 1,
                             "generation": 1}
    assert enforcer.drift() is None


def test_the_same_rules_again_change_nothing() -> None:
    enforcer, fake, _ = setup()
    enforcer.enforce(SNAPSHOT, 5)
    scripts = len(fake.scripts)
    report = enforcer.enforce(SNAPSHOT, 6)
    assert not report.changed and report.revision == 6 and enforcer.revision == 6
    assert fake.scripts[scripts:] == [powershell.list_script()]     # listed, nothing run
    # (the endpoint names its interface: the host's addresses are not read)
    assert held(fake) == numbered(WEB, 1)


def test_a_new_generation_replaces_the_old_one_blocks_first() -> None:
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    compiler.rules = WEB_NEXT
    fake.states.clear()
    report = enforcer.enforce(SNAPSHOT, 6)
    assert report.changed and not report.created and report.counts["generation"] == 2
    assert held(fake) == numbered(WEB_NEXT, 2)
    # The transient: at no moment is an Allow of a generation in without all of that
    # generation's Blocks (new: Blocks added first; old: Allows removed first).
    old, new = number(WEB, 1), number(WEB_NEXT, 2)
    for names in fake.states:
        for rules in (old, new):
            allows = {r.name for r in rules if r.action == "Allow"}
            blocks = {r.name for r in rules if r.action == "Block"}
            assert not (names & allows) or blocks <= names, sorted(names)
    assert any(names >= {r.name for r in old + new} for names in fake.states)


@pytest.mark.parametrize("at", [1, 4, len(WEB_NEXT)])
def test_a_failure_while_adding_leaves_the_previous_generation(at: int) -> None:
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    compiler.rules = WEB_NEXT
    fake.fail_new = fake.news + at
    with pytest.raises(EnforceError, match=r"generation 2 for revision 6 failed; the "
                                           r"previous rules stay.*injected failure"):
        enforcer.enforce(SNAPSHOT, 6)
    assert held(fake) == numbered(WEB, 1)
    assert enforcer.generation == 1 and enforcer.revision == 5
    assert enforcer.drift() is None
    # the next apply goes through, as generation 2 again (nothing of it was left)
    enforcer.enforce(SNAPSHOT, 6)
    assert held(fake) == numbered(WEB_NEXT, 2)


def test_a_failure_while_removing_the_old_is_reported_and_repaired() -> None:
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    compiler.rules = WEB_NEXT
    fake.fail_remove = fake.removes + 1
    with pytest.raises(EnforceError, match="generation 2 for revision 6 is enforced, but "
                                           "removing the older rules failed"):
        enforcer.enforce(SNAPSHOT, 6)
    assert {r.name for r in numbered(WEB_NEXT, 2)} <= set(fake.rules)
    reason = enforcer.drift()
    assert reason is not None and "rule bulkhead-1-1 of an older generation is left" in reason
    enforcer.repair()
    assert held(fake) == numbered(WEB_NEXT, 3)
    assert enforcer.drift() is None


def test_drift_names_a_removed_rule_and_repair_restores_it() -> None:
    enforcer, fake, _ = setup()
    enforcer.enforce(SNAPSHOT, 5)
    del fake.rules["bulkhead-1-3"]
    reason = enforcer.drift()
    assert reason is not None and "rule bulkhead-1-3 was removed" in reason
    report = enforcer.repair()
    assert report.changed and report.revision == 5
    assert held(fake) == numbered(WEB, 2)
    assert enforcer.drift() is None


def test_drift_names_a_changed_rule() -> None:
    enforcer, fake, _ = setup()
    enforcer.enforce(SNAPSHOT, 5)
    fake.rules["bulkhead-1-3"] = replace(fake.rules["bulkhead-1-3"],
                                         remote_addresses=("0.0.0.0/0",))
    reason = enforcer.drift()
    assert reason is not None and "rule bulkhead-1-3 was changed" in reason
    assert "missing: " in reason and "not wanted: " in reason


def test_drift_of_huge_rules_is_reported_in_bounded_text() -> None:
    wide = [FirewallRule(f"wide-{i}", "Inbound", "Allow", 6, local_ports=("80",),
                         remote_addresses=tuple(f"198.18.{j // 250}.{j % 250 + 1}"
                                                for j in range(5000))) for i in range(8)]
    enforcer, fake, _ = setup(wide)
    enforcer.enforce(SNAPSHOT, 5)
    for name in list(fake.rules):
        fake.rules[name] = replace(fake.rules[name], remote_addresses=("0.0.0.0/0",))
    reason = enforcer.drift()
    assert reason is not None and "was changed" in reason and "missing: " in reason
    assert len(reason) < 5000


@pytest.mark.parametrize(("tamper", "expected"), [
    (lambda f: f.disabled.add("bulkhead-1-2"), "rule bulkhead-1-2 is disabled"),
    (lambda f: f.profiles.__setitem__("Public", ProfileState("Public", "True", "Block",
                                                             "Allow")),
     "profile Public: enabled True, default inbound Block, default outbound Allow"),
    (lambda f: f.profiles.__setitem__("Domain", ProfileState("Domain", "False", "Block",
                                                             "Block")),
     "profile Domain: enabled False"),
])
def test_drift_names_disabled_rules_and_profiles(
        tamper: Callable[[FakeNetSecurity], object], expected: str) -> None:
    enforcer, fake, _ = setup()
    enforcer.enforce(SNAPSHOT, 5)
    tamper(fake)
    reason = enforcer.drift()
    assert reason is not None and expected in reason
    enforcer.repair()
    assert enforcer.drift() is None


def test_a_rule_added_to_the_group_behind_the_agents_back_is_drift() -> None:
    enforcer, fake, _ = setup()
    enforcer.enforce(SNAPSHOT, 5)
    fake.rules["allow-all"] = FirewallRule("allow-all", "Inbound", "Allow")
    fake.groups["allow-all"] = "bulkhead"
    reason = enforcer.drift()
    assert reason is not None and "rule allow-all in the group is not the agent's" in reason
    enforcer.repair()
    assert "allow-all" not in fake.rules and enforcer.drift() is None


@pytest.mark.parametrize("name", ["*", "bulkhead-*", "[a-z]*", "?*"])
def test_a_rule_named_as_a_wildcard_is_never_removed_by_name(name: str) -> None:
    """Remove-NetFirewallRule -Name takes wildcards: the rule `*` in the group must not
    make the apply remove every rule on the host (Windows' own, the new generation)."""
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    fake.rules["CoreNet-DHCP-In"] = FirewallRule("CoreNet-DHCP-In", "Inbound", "Allow", 17)
    fake.groups["CoreNet-DHCP-In"] = "@FirewallAPI.dll,-25000"
    fake.rules[name] = FirewallRule(name, "Inbound", "Allow")
    fake.groups[name] = "bulkhead"
    compiler.rules = WEB_NEXT
    report = enforcer.enforce(SNAPSHOT, 6)
    assert report.changed and report.counts["generation"] == 2
    assert "CoreNet-DHCP-In" in fake.rules and name in fake.rules
    left = [canonical(fake.rules["CoreNet-DHCP-In"]), canonical(fake.rules[name])]
    assert held(fake) == sorted([*numbered(WEB_NEXT, 2), *left], key=lambda r: r.name)
    reason = enforcer.drift()
    assert reason is not None and f"rule {name} in the group is not the agent's" in reason
    assert "remove it by hand" in reason


def test_the_fake_reads_remove_names_as_wildcards() -> None:
    from tests.pwshfixture import _wildcard_match
    assert _wildcard_match("*", "anything") and _wildcard_match("bulkhead-1-*", "BULKHEAD-1-7")
    assert _wildcard_match("[a-c]x?", "bxy") and not _wildcard_match("[a-c]x?", "dxy")
    assert _wildcard_match("a`*", "a*") and not _wildcard_match("a`*", "ab")
    assert not _wildcard_match("bulkhead-1-1", "bulkhead-1-10")


def test_a_restarted_agent_adopts_the_generation_it_finds() -> None:
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    again = WindowsFirewallEnforcer("win1", Failsafes(), runner=fake, compile=compiler)
    report = again.enforce(SNAPSHOT, 7)
    assert not report.changed and again.generation == 1
    assert again.drift() is None
    compiler.rules = WEB_NEXT
    assert again.enforce(SNAPSHOT, 8).counts["generation"] == 2


def test_dry_run_shows_the_script_and_the_diff_and_changes_nothing() -> None:
    enforcer, fake, compiler = setup()
    enforcer.enforce(SNAPSHOT, 5)
    before = dict(fake.rules)
    compiler.rules = WEB_NEXT
    script, diff = enforcer.dry_run(SNAPSHOT)
    assert fake.rules == before
    assert syntax_errors(script) == [] and "'bulkhead-2-1'" in script
    lines = diff.splitlines()
    assert any(line.startswith("-") and "'443'" in line for line in lines)
    assert any(line.startswith("+") and "-LocalPort '23'" in line for line in lines)
    assert not any(line.startswith(("-", "+")) and "failsafe tcp:22" in line
                   for line in lines if not line.startswith(("---", "+++")))


def test_what_the_compiler_refuses_is_an_enforce_error() -> None:
    def refuse(plan: NodePlan) -> list[FirewallRule]:
        raise Unsupported("policy default.db ingress rule 2", "notICMP", "no ICMP negation")
    fake = FakeNetSecurity()
    enforcer = WindowsFirewallEnforcer("win1", Failsafes(), runner=fake, compile=refuse)
    with pytest.raises(EnforceError, match=r"policy default\.db ingress rule 2: notICMP"):
        enforcer.enforce(SNAPSHOT, 1)
    assert fake.scripts == []


def test_nothing_applied_means_no_drift_and_nothing_to_repair() -> None:
    enforcer, fake, _ = setup()
    assert enforcer.drift() is None
    assert not enforcer.repair().changed
    assert fake.scripts == []


# The runner at its real boundary: a process fed the script on standard input.
def test_the_runner_feeds_the_script_on_stdin() -> None:
    run = PowerShellRunner([sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"])
    assert run("abc") == "cba\n"


def test_the_runner_reports_failure_with_what_was_printed() -> None:
    run = PowerShellRunner([sys.executable, "-c",
                            "import sys; print('bulkhead-added 3'); "
                            "print('boom', file=sys.stderr); sys.exit(1)"])
    with pytest.raises(RunnerError, match="exited with 1: boom") as e:
        run("x")
    assert powershell.added(e.value.stdout, 3)


def test_the_runner_reads_output_in_any_code_page_and_writes_only_ascii() -> None:
    # A byte that is no character in UTF-8 (an OEM code page's, say) is no crash.
    run = PowerShellRunner([sys.executable, "-c",
                            "import sys; sys.stdout.buffer.write(b'\\xff\\r\\nbulkhead-applied 1"
                            "\\r\\n')"])
    out = run("x")
    assert powershell.applied(out, 1) and out.startswith("\ufffd")
    with pytest.raises(RunnerError, match="not ASCII"):
        run("Write-Output '\u00e9'")


def test_the_runner_keeps_what_a_timed_out_script_printed() -> None:
    run = PowerShellRunner([sys.executable, "-c",
                            "import sys, time; print('bulkhead-added 3', flush=True); "
                            "time.sleep(5)"], timeout=1.0)
    with pytest.raises(RunnerError, match="did not finish") as e:
        run("x")
    assert powershell.added(e.value.stdout, 3)


def test_the_runner_names_powershell_by_its_full_path() -> None:
    from bulkhead.agent.win_enforcer import default_command
    # Not a bare name: Windows would look in the program's own and the current
    # directory first.
    assert PowerShellRunner().command[0].endswith(
        "\\System32\\WindowsPowerShell\\v1.0\\powershell.exe")
    assert default_command({"SystemRoot": "D:\\Win"})[0] == \
        "D:\\Win\\System32\\WindowsPowerShell\\v1.0\\powershell.exe"
    for bad in ({}, {"SystemRoot": "relative"}):
        assert default_command(bad)[0].startswith("C:\\Windows\\System32\\")
    assert default_command()[1:] == ["-NoProfile", "-NonInteractive", "-Command", "-"]


def test_the_runner_keeps_a_bounded_output() -> None:
    # 8 MiB printed, 1 MiB kept: an error, and the child is not blocked on a full pipe.
    run = PowerShellRunner([sys.executable, "-c",
                            "import sys; sys.stdin.read(); "
                            "sys.stdout.buffer.write(b'x' * (8 << 20))"],
                           timeout=30, max_output=1 << 20)
    with pytest.raises(RunnerError, match=f"more than {1 << 20} bytes"):
        run("x" * (1 << 20))       # a script larger than a pipe's buffer, too
    ok = PowerShellRunner([sys.executable, "-c",
                           "import sys; sys.stdout.write(str(len(sys.stdin.read())))"],
                          max_output=100)
    assert ok("y" * (3 << 20)) == str(3 << 20)


def test_the_runner_is_bounded_in_time() -> None:
    run = PowerShellRunner([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.5)
    with pytest.raises(RunnerError, match=r"did not finish in 0\.5 s"):
        run("x")
    with pytest.raises(RunnerError, match="cannot run"):
        PowerShellRunner(["/nonexistent/powershell.exe"])("x")


def test_the_default_compile_runs_the_windows_compilers() -> None:
    """The default compile stage over a real plan: flatten, then firewall.compile, per
    direction and interface."""
    from bulkhead.agent.win_enforcer import compile_plan
    from bulkhead.policy.plan import calculate

    plan = calculate(SNAPSHOT, "win1", {}, Failsafes())
    rules = compile_plan(plan)
    assert rules and all(canonical(r) for r in rules)
    assert {r.interface_alias for r in rules} == {"Ethernet", None}
    # On every interface: the failsafe Allows alone.
    assert all(r.action == "Allow" and r.name.startswith("failsafe-")
               for r in rules if r.interface_alias is None)
    assert {r.direction for r in rules} == {"Inbound", "Outbound"}

    def allows_ssh(r: FirewallRule) -> bool:
        spans = [p.split("-") for p in r.local_ports]
        return r.direction == "Inbound" and r.action == "Allow" and r.protocol in (6, None) \
            and (not spans or any(int(s[0]) <= 22 <= int(s[-1]) for s in spans))
    assert any(allows_ssh(r) for r in rules)          # the failsafe tcp:22
    fake = FakeNetSecurity()
    enforcer = WindowsFirewallEnforcer("win1", Failsafes(), runner=fake)
    enforcer.enforce(SNAPSHOT, 1)
    assert len(fake.rules) == len(rules) and enforcer.drift() is None


def test_the_conformance_plans_apply_and_list_back_unchanged() -> None:
    """The first case of every conformance file, compiled by the Windows compilers for
    its first probed host: the script parses, the fake applies it, and the listing reads
    back as no drift."""
    from pathlib import Path

    from bulkhead.conformance.cases import load_cases

    applied = 0
    for path in sorted((Path(__file__).parent / "conformance").glob("*.yaml")):
        case = load_cases(path)[0]
        host = case.expect[0].dst
        fake = FakeNetSecurity()
        enforcer = WindowsFirewallEnforcer(host, case.failsafes, runner=fake)
        try:
            enforcer.enforce(case.snapshot(), 1)
        except EnforceError as e:
            assert "not enforceable by Windows Firewall" in str(e), f"{path.name}: {e}"
            continue
        assert syntax_errors(fake.scripts[-1]) == []
        assert enforcer.drift() is None, f"{path.name} {case.name}"
        applied += 1
    assert applied


def test_an_endpoint_without_interface_name_is_found_by_its_address() -> None:
    snapshot = Snapshot.build([parse_resource({
        "apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
        "metadata": {"name": "win1-by-ip"},
        "spec": {"node": "win1", "expectedIPs": ["198.18.0.10"]}})])
    enforcer, fake, compiler = setup()
    fake.addresses = {"Ethernet 3": ["198.18.0.10", "fe80::5%7"], "Wi-Fi": ["198.18.9.9"]}
    report = enforcer.enforce(snapshot, 1)
    assert compiler.plans[-1].endpoints[0].interfaces == ("Ethernet 3",)
    assert report.warnings == []
    assert powershell.interfaces_script() in fake.scripts
    fake.addresses = {"Wi-Fi": ["198.18.9.9"]}
    report = enforcer.enforce(snapshot, 2)
    assert compiler.plans[-1].endpoints == []
    assert any("win1-by-ip" in w and "not enforced" in w for w in report.warnings)


@pytest.mark.parametrize("text", [
    "",   # no HostEndpoint for this node yet (installed before onboarding, or deleted)
    # an endpoint on Ethernet only; the server and WinRM are reached over Mgmt
    """{"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint",
        "metadata": {"name": "win1-ethernet"},
        "spec": {"node": "win1", "interfaceName": "Ethernet",
                 "expectedIPs": ["198.18.0.10"],
                 "profiles": ["projectcalico-default-allow"]}}"""])
def test_the_failsafes_hold_on_every_interface_whatever_the_endpoints(text: str) -> None:
    """The agent sets every profile's default to Block both ways, which covers every
    interface, so the failsafe Allows (the agent's server, WinRM) must too: on Linux
    they are accepted on every interface before any endpoint's chain (render.py), and
    docs/windows.md promises the default outbound Block never cuts the agent off its
    server. They were written only inside each endpoint's rules, on its interfaces."""
    import ipaddress
    import json

    from bulkhead.dataplane.windows.fake_firewall import FakeFirewall
    from bulkhead.model import EGRESS, INGRESS
    from bulkhead.policy.failsafe import FailsafePort

    failsafes = Failsafes(tuple(FailsafePort.parse(s) for s in ("tcp:5986", "udp:68")),
                          tuple(FailsafePort.parse(s) for s in ("tcp:7443", "udp:67")))
    snapshot = Snapshot.build([parse_resource(json.loads(text))] if text else [])
    fake = FakeNetSecurity()
    WindowsFirewallEnforcer("win1", failsafes, runner=fake).enforce(snapshot, 1)
    assert all(not p.enforcing or p.default_outbound == "Block"
               for p in fake.profiles.values())
    firewall = FakeFirewall(fake.rules.values())
    me, server = (int(ipaddress.ip_address(a)) for a in ("198.18.1.12", "198.18.1.10"))
    for interface in ("Mgmt", "Ethernet"):
        assert firewall.allows(EGRESS, 4, 6, me, server, 50000, 7443, None,
                               interface=interface), interface
        assert firewall.allows(INGRESS, 4, 6, me, server, 5986, 50000, None,
                               interface=interface), interface
        assert not firewall.allows(EGRESS, 4, 6, me, server, 50000, 7444, None,
                                   interface=interface) or text, interface
