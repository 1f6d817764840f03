"""policy_preview's gates and policy_promote seen as an operator sees them: whole
ansible-playbook runs against a real server, their exit code and output. The gate passes
at the threshold and stops the play one below it; promotion in --check --diff shows the
diff and writes nothing, then promotes, then a second run is ok.

Each play seeds the server with the policy_preview target's endpoints, staged policies
and records (its tasks/seed.yml), in a window of its own (`preview_hours_ago`)."""

from __future__ import annotations

import json
import re

from test_playbooks import HEADER, run_playbook

TASKS = """\
  tasks:
"""

SEED = """\
    - name: Seed the server
      ansible.builtin.import_role:
        name: policy_preview
        tasks_from: seed.yml
      vars:
        preview_hours_ago: {hours_ago}
"""

GATE = """\
    - name: Gate {label}
      bulkhead.microseg.policy_preview:
        until: "{{{{ preview_until }}}}"
        hours: 0.25
{options}
"""

PROMOTE = """\
    - name: Promote db-ingress
      bulkhead.microseg.policy_promote:
        names: [db-ingress]
        missing: ignore
"""


def playbook(server, tmp_path, name, tasks, *args):
    text = HEADER.format(name=name) + TASKS + "".join(tasks)
    return run_playbook(server, tmp_path, name, text, *args, check=False)


def recap(stdout):
    found = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+).*?failed=(\d+)", stdout)
    assert found, stdout
    return tuple(int(n) for n in found.groups())


def gate(label, **options):
    lines = "".join("        %s: %s\n" % (k, json.dumps(v)) for k, v in options.items())
    return GATE.format(label=label, options=lines.rstrip("\n"))


def test_max_denied_passes_at_six_and_stops_the_play_at_five(clean_server, tmp_path):
    done = playbook(clean_server, tmp_path, "max-denied",
                    [SEED.format(hours_ago=14), gate("at six", max_denied=6),
                     gate("at five", max_denied=5), gate("never reached", max_denied=100)])
    assert done.returncode == 2, done.stdout
    out = done.stdout
    assert re.search(r"TASK \[Gate at six\][^\n]*\nok: \[localhost\]", out), out
    assert "TASK [Gate at five]" in out and "TASK [Gate never reached]" not in out
    assert "policy preview gate failed: max_denied: 6 connections would be newly denied " \
        "(at most 5)" in out + done.stderr
    assert recap(out)[2] == 1


def test_protected_fails_on_a_hit_and_passes_without_one(clean_server, tmp_path):
    done = playbook(clean_server, tmp_path, "protected",
                    [SEED.format(hours_ago=18),
                     gate("no hit", promote=["cache-ingress"], protected="pci == 'true'"),
                     gate("hit", protected="pci == 'true'")])
    assert done.returncode == 2, done.stdout
    out = done.stdout + done.stderr
    assert re.search(r"TASK \[Gate no hit\][^\n]*\nok: \[localhost\]", done.stdout), out
    assert 'policy preview gate failed: protected: 2 connections to or from pci == "true" ' \
        "would be newly denied" in out


def test_promote_in_check_and_diff_mode_then_for_real_then_again(clean_server, tmp_path):
    seeded = playbook(clean_server, tmp_path, "seed", [SEED.format(hours_ago=22)])
    assert seeded.returncode == 0, seeded.stdout

    checked = playbook(clean_server, tmp_path, "promote", [PROMOTE], "--check", "--diff")
    assert checked.returncode == 0, checked.stdout
    assert recap(checked.stdout)[1] == 1
    for header in ("--- before: GlobalNetworkPolicy db-ingress",
                   "+++ after: GlobalNetworkPolicy db-ingress",
                   "--- before: StagedGlobalNetworkPolicy db-ingress",
                   "+++ after: StagedGlobalNetworkPolicy db-ingress"):
        assert header in checked.stdout, checked.stdout
    assert re.search(r'^\+\s+"selector": "app == \\"db\\""', checked.stdout, re.M), \
        checked.stdout
    staged = clean_server.request("GET", "/v1/resources/StagedGlobalNetworkPolicy")["items"]
    assert sorted(d["metadata"]["name"] for d in staged) == ["cache-ingress", "db-ingress"]

    promoted = playbook(clean_server, tmp_path, "promote", [PROMOTE], "--diff")
    assert promoted.returncode == 0 and recap(promoted.stdout)[1] == 1, promoted.stdout
    enforced = clean_server.request("GET", "/v1/resources/GlobalNetworkPolicy")["items"]
    assert [d["metadata"]["name"] for d in enforced] == ["db-ingress"]

    again = playbook(clean_server, tmp_path, "promote", [PROMOTE], "--diff")
    assert again.returncode == 0 and recap(again.stdout)[1] == 0, again.stdout
    assert "--- before" not in again.stdout
