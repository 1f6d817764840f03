"""doNotTrack policies: rendered at raw priority with `notrack`, and on a real kernel an
allowed untracked flow leaves no conntrack entry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import gnp, hep, snap

UNTRACKED = gnp("memcache", {
    "selector": "app == 'db'", "doNotTrack": True, "applyOnForward": True,
    "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [5001]}},
                {"action": "Deny", "protocol": "TCP", "destination": {"ports": [5003]}}],
    "egress": [{"action": "Allow", "protocol": "TCP", "source": {"ports": [5001]}}]})
TRACKED = gnp("db", {"selector": "app == 'db'", "ingress": [
    {"action": "Allow", "protocol": "TCP", "destination": {"ports": [5002]}}]})


def docs() -> list[dict[str, Any]]:
    # On its interface (v1 in the kernel test): an endpoint on every interface ("*")
    # takes no untracked policy, as in Calico.
    return [hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"), UNTRACKED, TRACKED]


def test_untracked_policies_get_raw_chains_with_notrack() -> None:
    plan = calculate(snap(*docs()), "n1", {}, Failsafes())
    (endpoint,) = plan.endpoints
    assert [(p.name, p.untracked) for p in endpoint.ingress.early] == [("memcache", True)]
    rs = render(plan)
    pre, out = rs.chains["raw_prerouting"], rs.chains["raw_output"]
    assert pre.hook == "type filter hook prerouting priority raw; policy accept;"
    assert out.hook == "type filter hook output priority raw; policy accept;"
    # Failsafe ports stay tracked and are decided before any policy, as in the filter chains.
    assert any("@fs_in accept" in r for r in pre.rules)
    assert pre.rules[-1] == "iifname vmap @raw_in"
    (element,) = rs.sets["raw_in"].elements
    assert element.startswith('"v1" : jump u_')
    (jump,) = rs.chains[element.split()[-1]].rules
    policy = rs.chains[jump.split()[1]]
    assert policy.name.startswith("n_")
    lines = "\n".join(policy.rules)
    # A run of plain rules is one map lookup; Allow takes the packet out of conntrack.
    name = lines.split("vmap @")[1].split()[0]
    assert "6 . 5001 : goto untracked_accept" in rs.sets[name].elements
    assert "6 . 5003 : drop" in rs.sets[name].elements
    assert rs.chains["untracked_accept"].rules == ("notrack accept",)
    # The filter chains still evaluate the policy first, with plain verdicts.
    endpoint = next(c for n, c in rs.chains.items() if n.startswith("e_") and
                    "untracked policy" not in c.rules[0] and "memcache" in c.rules[0])
    filter_policy = rs.chains[endpoint.rules[0].split()[1]]
    assert "goto" not in "\n".join(filter_policy.rules)
    filter_map = "\n".join(filter_policy.rules).split("vmap @")[1].split()[0]
    assert "6 . 5001 : accept" in rs.sets[filter_map].elements
    # No untracked policy: no raw chains at all.
    plain = render(calculate(snap(*docs()[::2]), "n1", {}, Failsafes()))
    assert not any(n.startswith(("raw_", "u_", "n_", "untracked")) for n in plain.chains)


# --------------------------------------------------------------------- on a real kernel
SERVER = """
import socket, sys, time
socks = []
for port in (5001, 5002, 5003):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("198.18.7.2", port)); s.listen(8); s.settimeout(0.2); socks.append(s)
print("ready", flush=True)
end = time.time() + 30
while time.time() < end:
    for s in socks:
        try:
            c, _ = s.accept(); c.sendall(b"hi"); c.close()
        except OSError:
            pass
"""

CLIENT = """
import socket, sys
s = socket.socket(); s.settimeout(1.5)
try:
    s.connect(("198.18.7.2", int(sys.argv[1]))); print(s.recv(2).decode())
except OSError as e:
    print("blocked" if isinstance(e, TimeoutError) else "refused")
"""


def run(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=True, timeout=30).stdout


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    client, server = f"bhnt-c-{tag}", f"bhnt-s-{tag}"
    try:
        for ns in (client, server):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", client, "link", "add", "v0", "type", "veth", "peer", "name",
                        "v1", "netns", server], check=True)
        for ns, dev, addr in ((client, "v0", "198.18.7.1/24"), (server, "v1", "198.18.7.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        yield client, server
    finally:
        for ns in (client, server):
            subprocess.run(["ip", "netns", "delete", ns], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_an_allowed_untracked_flow_leaves_no_conntrack_entry(pair: tuple[str, str]) -> None:
    client, server = pair
    applier = NftApplier(netns=server)
    applier.apply(render(calculate(snap(*docs()), "n1", {}, Failsafes.off())))
    listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, "-c", SERVER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        outcomes = {port: run(client, sys.executable, "-c", CLIENT, str(port)).strip()
                    for port in (5001, 5002, 5003)}
        time.sleep(0.2)
        entries = run(server, "conntrack", "-L", "-p", "tcp")
    finally:
        listener.kill()
        listener.wait()
    assert outcomes == {5001: "hi", 5002: "hi", 5003: "blocked"}
    assert "dport=5002" in entries          # the tracked flow is in the table
    assert "dport=5001" not in entries      # the untracked one never was
    assert "dport=5003" not in entries      # dropped at raw priority, before conntrack
