"""Domain policy end to end: a real DNS server in a lab host answers with TTLs the test
controls, a real agent snoops the answers, and probes on the wire see the domain sets at
work.

    h1  the client: an agent; egress allowed to api.example.com (TCP 8080), to the
        addresses of a network set's allowedEgressDomains (*.cdn.example), and nothing
        else but the failsafe ports (DNS among them)
    h2  a web server (api.example.com, and b.example.net on the same address)
    h3  the trusted resolver (`bulkhead.lab.dnsd`); the agent's only trusted server
    h4  an untrusted resolver that says api.example.com is h5
    h5  another web server (edge.cdn.example, behind www.example.org's CNAME)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bulkhead.conformance.kernel import WireFlow, wire_verdicts
from bulkhead.model import API_VERSION
from bulkhead.testbed import Testbed
from tests.labfixture import need_root, unique_lab_name

HOSTS = ("h1", "h2", "h3", "h4", "h5")
PORT = 8080


def ip(host: str) -> str:
    return f"198.18.0.{10 + HOSTS.index(host)}"


ZONE = {
    "api.example.com": {"A": [ip("h2")], "ttl": 3},
    "b.example.net": {"A": [ip("h2")], "ttl": 30},
    "long.example.com": {"A": [ip("h2")], "ttl": 600},
    "www.example.org": {"CNAME": "edge.cdn.example", "ttl": 30},
    "edge.cdn.example": {"A": [ip("h5")], "ttl": 30},
}
FORGED = {"api.example.com": {"A": [ip("h5")], "ttl": 600}}

DOCS: list[dict[str, Any]] = [
    {"apiVersion": API_VERSION, "kind": "HostEndpoint",
     "metadata": {"name": "h1", "labels": {"app": "client"}},
     "spec": {"node": "h1", "interfaceName": "*", "expectedIPs": [ip("h1")]}},
    {"apiVersion": API_VERSION, "kind": "GlobalNetworkSet",
     "metadata": {"name": "cdn", "labels": {"egress": "cdn"}},
     "spec": {"allowedEgressDomains": ["*.cdn.example"]}},
    {"apiVersion": API_VERSION, "kind": "GlobalNetworkPolicy",
     "metadata": {"name": "client-egress"},
     "spec": {"selector": "app == 'client'", "types": ["Egress"], "egress": [
         {"action": "Allow", "protocol": "TCP",
          "destination": {"domains": ["api.example.com", "long.example.com"],
                          "ports": [PORT]}},
         {"action": "Allow", "protocol": "TCP",
          "destination": {"selector": "egress == 'cdn'", "ports": [PORT]}}]}},
]


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    need_root()
    settings = {"dns": {"trustedServers": [ip("h3")], "cacheSaveInterval": 1}}
    with Testbed(unique_lab_name(), list(HOSTS), agent_hosts=["h1"],
                 agent_settings=settings) as testbed:
        for host, zone in (("h3", ZONE), ("h4", FORGED)):
            path = testbed.dir / f"zone-{host}.json"
            path.write_text(json.dumps(zone))
            testbed.lab.spawn(host, [sys.executable, "-m", "bulkhead.lab.dnsd", "--zone",
                                     str(path), "--listen", ip(host)],
                              testbed.dir / f"dnsd-{host}.log")
        testbed.enforce(DOCS, "dns")
        yield testbed


def ask(bed: Testbed, name: str, server: str = "h3") -> dict[str, Any]:
    done = bed.lab.run("h1", [sys.executable, "-m", "bulkhead.lab.dnsd", "--ask", name,
                              "--server", ip(server)], timeout=30)
    assert done.returncode == 0, done.stderr[-500:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def reach(bed: Testbed, *hosts: str) -> list[bool]:
    return wire_verdicts(bed, [WireFlow("h1", ip("h1"), h, ip(h), "TCP", PORT)
                               for h in hosts], timeout=1.0)


def dns_metric(bed: Testbed, counter: str) -> float:
    return bed.agent_metrics("h1").get(f'bulkhead_agent_dns{{counter="{counter}"}}', -1.0)


def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def agent_pid(bed: Testbed) -> int:
    return bed.agents["h1"].pid


def flush(bed: Testbed) -> None:
    """SIGUSR1: the agent forgets every name and empties the domain sets."""
    os.kill(agent_pid(bed), signal.SIGUSR1)
    wait_for(lambda: dns_metric(bed, "dnsCacheNames") == 0, "the flushed cache")


def test_an_allowed_name_opens_after_its_answer_and_closes_when_its_ttl_ends(
        bed: Testbed) -> None:
    flush(bed)
    assert reach(bed, "h2", "h5") == [False, False]
    assert ask(bed, "api.example.com") == {"rcode": "NOERROR", "addresses": [ip("h2")],
                                           "chain": []}
    assert reach(bed, "h2", "h5") == [True, False]
    # The element's timeout is the TTL (3 s): after it, the address is closed again,
    # with no user-space sweep.
    table = bed.table("h1") or ""
    assert f"{ip('h2')} timeout 3s" in table
    wait_for(lambda: ip("h2") not in (bed.table("h1") or ""), "the element to expire")
    assert reach(bed, "h2") == [False]
    p99 = dns_metric(bed, "dnsAnswerToKernelP99Ms")
    assert 0 < p99 < 1000


def test_a_cname_chain_and_a_network_sets_wildcard_domain(bed: Testbed) -> None:
    flush(bed)
    answer = ask(bed, "www.example.org")
    assert answer["chain"] == ["edge.cdn.example"] and answer["addresses"] == [ip("h5")]
    # www.example.org is allowed by nothing; its CNAME's target matches *.cdn.example.
    assert reach(bed, "h5", "h2") == [True, False]


def test_an_address_two_names_share_is_open_once_either_allowed_name_resolves(
        bed: Testbed) -> None:
    flush(bed)
    # b.example.net is not allowed: resolving it opens nothing.
    assert ask(bed, "b.example.net")["addresses"] == [ip("h2")]
    assert reach(bed, "h2") == [False]
    # long.example.com is allowed and has the same address: the address is open, for
    # any name (felix: the dataplane sees addresses, not names).
    assert ask(bed, "long.example.com")["addresses"] == [ip("h2")]
    assert reach(bed, "h2") == [True]


def test_a_forged_answer_from_an_untrusted_server_opens_nothing(bed: Testbed) -> None:
    flush(bed)
    untrusted = dns_metric(bed, "dnsUntrusted")
    assert ask(bed, "api.example.com", server="h4")["addresses"] == [ip("h5")]
    assert reach(bed, "h5", "h2") == [False, False]
    # The table logs only the trusted server's packets: the forged one never reached
    # the agent at all.
    assert dns_metric(bed, "dnsUntrusted") == untrusted
    assert dns_metric(bed, "dnsCacheNames") == 0


def test_the_name_cache_survives_a_restart_and_can_be_flushed(bed: Testbed) -> None:
    flush(bed)
    assert ask(bed, "long.example.com")["addresses"] == [ip("h2")]
    assert reach(bed, "h2") == [True]
    cache = Path(bed.dir / "agent-h1" / "dns-cache.json")
    wait_for(lambda: cache.exists() and "long.example.com" in cache.read_text(),
             "the saved cache")
    # A restart replaces the table whole: the saved names fill its domain sets again.
    bed.stop_agent("h1")
    bed.lab.run("h1", ["nft", "delete", "table", "inet", "bulkhead"], check=True)
    bed.start_agent("h1")
    wait_for(lambda: ip("h2") in (bed.table("h1") or ""), "the cached element back")
    assert reach(bed, "h2") == [True]
    flush(bed)
    assert reach(bed, "h2") == [False]
    # Removed, or written again since (empty): the flushed names are gone from disk.
    assert not cache.exists() or "long.example.com" not in cache.read_text()
