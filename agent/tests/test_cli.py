"""The `bulkhead` command line: subcommands, output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bulkhead.cli.main import main

RESOURCES = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: db-ingress}
spec:
  selector: app == 'db'
  ingress:
    - action: Allow
      protocol: TCP
      source: {selector: zone == 'dmz'}
      destination: {ports: [5432]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: web, labels: {app: web, zone: dmz}}
spec:
  node: web-1
  interfaceName: "*"
  expectedIPs: [198.18.0.11]
  profiles: [projectcalico-default-allow]
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: db, labels: {app: db}}
spec:
  node: db-1
  interfaceName: "*"
  expectedIPs: [198.18.0.12]
  profiles: [projectcalico-default-allow]
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "all.yaml").write_text(RESOURCES)
    return tmp_path / "all.yaml"


def test_validate(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(files)]) == 0
    assert "valid: 3 resources (1 GlobalNetworkPolicy, 2 HostEndpoint)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(RESOURCES.replace("ports: [5432]", "ports: [\"54-32\"]"))
    assert main(["validate", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert 'GlobalNetworkPolicy db-ingress: spec.ingress[0].destination.ports[0]: "54-32"' in err
    assert main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 2


def test_local_commands_read_label_values_as_apply_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bulkhead apply -f` writes `rack: 12` and `pci: true` as the labels "12" and "true"
    (bulkhead.api.label_value, the collection's rule, and calicoctl's: its YAML library
    writes a number or a boolean given to a string field as text); `validate` and
    `explain` read the same file the same way, not refuse it."""
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text(RESOURCES.replace("labels: {app: db}", "labels: {app: db, rack: 12}")
                       .replace("zone: dmz}", "zone: dmz, pci: true}")
                       .replace("selector: zone == 'dmz'", "selector: pci == 'true'"))
    assert main(["validate", "-f", str(numbers)]) == 0
    assert "valid: 3 resources" in capsys.readouterr().out
    assert main(["explain", "-f", str(numbers), "--from", "web", "--to", "db",
                 "--proto", "tcp", "--port", "5432"]) == 0
    out = capsys.readouterr().out
    assert "rack=12" in out and "pci=true" in out and "verdict: ALLOWED" in out
    null = tmp_path / "null.yaml"
    null.write_text(RESOURCES.replace("labels: {app: db}", "labels: {app: db, rack: null}"))
    assert main(["validate", "-f", str(null)]) == 2       # refused, as apply refuses it
    assert "metadata.labels.rack: a label value cannot be null" in capsys.readouterr().err


def test_explain_by_name_node_and_ip(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-f", str(files), "--from", "web", "--to", "db-1",
                 "--proto", "tcp", "--port", "5432"]) == 0
    out = capsys.readouterr().out
    assert "verdict: ALLOWED" in out and "Allow by policy db-ingress" in out
    assert main(["explain", "-f", str(files), "--from", "198.18.0.12", "--to", "web",
                 "--port", "80", "--exit-code"]) == 0
    assert main(["explain", "-f", str(files), "--from", "web", "--to", "db", "--port", "80",
                 "--exit-code"]) == 1
    capsys.readouterr()


def test_explain_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-f", str(files), "--from", "web", "--to", "db", "--port", "80",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["allowed"] is False and data["policy_allowed"] is False
    assert data["observed"] is False
    assert data["ingress"]["decided_by"] == "tier-default"
    assert data["egress"]["action"] == "Allow"


def test_explain_usage_errors(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-f", str(files), "--from", "nobody", "--to", "db",
                 "--port", "1"]) == 2
    assert "'nobody' is neither an IP address nor a HostEndpoint" in capsys.readouterr().err
    assert main(["explain", "-f", str(files), "--from", "web", "--to", "db"]) == 2
    assert "--port is needed for TCP" in capsys.readouterr().err
    assert main(["explain", "-f", str(files), "--from", "web", "--to", "db", "--port", "1",
                 "--failsafe", "tcp:x"]) == 2


EGRESS_BY_NAME = """
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: web-egress}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
    - action: Allow
      protocol: TCP
      destination: {domains: [api.example.com], ports: [443]}
"""


def test_explain_reads_an_agents_name_cache(files: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from bulkhead.policy.names import NameCache, Record

    policy = tmp_path / "egress.yaml"
    policy.write_text(RESOURCES + EGRESS_BY_NAME)
    cache = NameCache()
    now = time.time()
    cache.learn([Record("api.example.com", "CNAME", "edge.cdn.example", 300),
                 Record("edge.cdn.example", "A", "198.18.3.4", 30)], now)
    saved = tmp_path / "dns-cache.json"
    cache.save(saved, now)
    args = ["explain", "-f", str(policy), "--from", "web", "--to", "198.18.3.4", "--port",
            "443", "--exit-code"]
    assert main(args) == 1      # without the names: the address is no one's
    capsys.readouterr()
    assert main([*args, "--dns-cache", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "verdict: ALLOWED" in out
    assert "allowed: 198.18.3.4 resolved from api.example.com via edge.cdn.example (TTL " \
        in out
    assert "198.18.3.4 resolved from edge.cdn.example (TTL " in out
    ttl = int(out.split("api.example.com via edge.cdn.example (TTL ")[1].split()[0])
    assert 25 <= ttl <= 30
    saved.write_text("{not json")
    assert main([*args, "--dns-cache", str(saved)]) == 2
    assert "--dns-cache" in capsys.readouterr().err


def test_selector_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selector", "b in {'y','x'} && has(a)", "--labels", "a=1", "b=x"]) == 0
    assert capsys.readouterr().out == '(b in {"x", "y"} && has(a))\nmatches\n'
    assert main(["selector", "has(a)", "--labels", "b=1"]) == 1
    assert main(["selector", "a =="]) == 2
    assert "at position 4: expected a quoted string" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    bulkhead = Path(sys.executable).parent / "bulkhead"
    done = subprocess.run([str(bulkhead), "selector", "all()"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "all()\n"


def test_local_errors_are_printed_without_control_characters(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text('apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\n'
                   'metadata: {name: "x\\e[2J"}\nspec: {}\n')
    assert main(["validate", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and '"x\\x1b[2J" is not a valid name' in err


DUAL_STACK = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: web-ingress}
spec:
  selector: app == 'web'
  ingress:
    - {action: Allow, protocol: ICMPv6, source: {nets: ["2001:2::/64"]}}
    - {action: Allow, protocol: TCP, ipVersion: 6, destination: {ports: [8080]}}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: web, labels: {app: web}}
spec:
  node: web-1
  interfaceName: "*"
  expectedIPs: [198.18.0.11, "2001:2::11"]
  profiles: [projectcalico-default-allow]
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: admin, labels: {app: admin}}
spec:
  node: admin-1
  interfaceName: "*"
  expectedIPs: [198.18.0.10, "2001:2::10"]
  profiles: [projectcalico-default-allow]
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: old, labels: {app: old}}
spec:
  node: old-1
  interfaceName: "*"
  expectedIPs: [198.18.0.9]
  profiles: [projectcalico-default-allow]
"""


def test_explain_names_a_dual_stack_host_at_the_address_of_the_flows_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A host named by --from/--to stands at its address of the flow's IP version: the
    one ICMPv6 or ICMP implies, -6 or -4, or that of an address given on the other side;
    never an ICMPv6 flow between IPv4 addresses."""
    path = tmp_path / "dual.yaml"
    path.write_text(DUAL_STACK)
    base = ["explain", "-f", str(path), "--from", "admin", "--failsafe", "off"]
    assert main([*base, "--to", "web", "--proto", "ICMPv6", "--exit-code"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flow 2001:2::10 -> 2001:2::11 ICMPv6 type 128"), out
    assert "Allow by policy web-ingress (tier default) ingress rule 0" in out
    assert main([*base, "--to", "web", "--proto", "ICMP"]) == 0
    assert capsys.readouterr().out.startswith("flow 198.18.0.10 -> 198.18.0.11 ICMP type 8")
    assert main([*base, "--to", "2001:2::11", "--port", "8080", "--exit-code"]) == 0
    assert capsys.readouterr().out.startswith("flow 2001:2::10 -> 2001:2::11 TCP/8080")
    assert main([*base, "--to", "web", "-6", "--port", "8080", "--exit-code"]) == 0
    assert capsys.readouterr().out.startswith("flow 2001:2::10 -> 2001:2::11 TCP/8080")
    # Nothing said: the source's first expectedIP, as before.
    assert main([*base, "--to", "web", "--port", "8080", "--exit-code"]) == 1
    assert capsys.readouterr().out.startswith("flow 198.18.0.10 -> 198.18.0.11 TCP/8080")
    # What cannot be: refused, naming the reason (exit 2).
    assert main([*base, "--to", "198.18.0.11", "--proto", "ICMPv6"]) == 2
    assert "--proto ICMPv6 is IPv6's; 198.18.0.11 is IPv4" in capsys.readouterr().err
    assert main([*base, "--to", "web", "-4", "--proto", "58"]) == 2
    assert "--proto 58 is IPv6's; -4 is IPv4" in capsys.readouterr().err
    assert main([*base, "--to", "old", "-6", "--port", "80"]) == 2
    assert "HostEndpoint old has no IPv6 address in its expectedIPs" in \
        capsys.readouterr().err


def test_explain_refuses_minus_4_or_6_beside_an_address_of_the_other_version(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-4 with an IPv6 --from (or -6 with an IPv4 --to) is refused, as --proto ICMPv6
    with an IPv4 address is: it explained the flow at the address's version, silently
    not the one asked for."""
    path = tmp_path / "dual.yaml"
    path.write_text(DUAL_STACK)
    base = ["explain", "-f", str(path), "--failsafe", "off", "--port", "8080"]
    assert main([*base, "--from", "2001:2::10", "--to", "web", "-4"]) == 2
    assert "-4 is IPv4's; 2001:2::10 is IPv6" in capsys.readouterr().err
    assert main([*base, "--from", "admin", "--to", "198.18.0.11", "-6"]) == 2
    assert "-6 is IPv6's; 198.18.0.11 is IPv4" in capsys.readouterr().err
    assert main([*base, "--from", "2001:2::10", "--to", "198.18.0.11"]) == 2
    assert "2001:2::10 is IPv6's; 198.18.0.11 is IPv4" in capsys.readouterr().err
    assert main([*base, "--from", "2001:2::10", "--to", "web", "-6"]) in (0, 1)
    assert capsys.readouterr().out.startswith("flow 2001:2::10 -> 2001:2::11 TCP/8080")
