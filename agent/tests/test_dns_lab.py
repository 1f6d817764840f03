"""Domain policy end to end: a real DNS server in a lab host answers with TTLs the test
controls, a real agent snoops the answers, and probes on the wire see the domain sets at
work.

    h1  the client: an agent; egress allowed to api.example.com (TCP 8080), to the
        addresses of a network set's allowedEgressDomains (*.cdn.example), and nothing
        else but the failsafe ports (DNS among them)
    h2  a web server (api.example.com, and b.example.net on the same address)
    h3  the trusted resolver (`bulkhead.lab.dnsd`); the agent's only trusted server
    h4  an untrusted resolver that says api.example.com is h5 (and a forger of answers
        from h3's address)
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
    settings = {"dns": {"trustedServers": [ip("h3")], "cacheSaveInterval": 1},
                "flowLogs": {"enabled": True, "flushInterval": 1}}
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


FLUSHED = "DNS name cache flushed"   # bulkhead.agent.dns, DnsSnooper.flush


def flushes(bed: Testbed) -> int:
    """How many flushes the agent of h1 has logged (it logs one once the kernel's domain
    sets are empty too)."""
    log = bed.dir / "agent-h1.log"
    return log.read_text(errors="replace").count(FLUSHED) if log.exists() else 0


def flush(bed: Testbed) -> None:
    """SIGUSR1: the agent forgets every name and empties the domain sets. The cache is
    emptied first (its metric reads 0 at once), the sets a `nft flush set` later: the
    log line says both are done."""
    before = flushes(bed)
    os.kill(agent_pid(bed), signal.SIGUSR1)
    wait_for(lambda: flushes(bed) > before, "the flushed cache and domain sets")
    assert dns_metric(bed, "dnsCacheNames") == 0


def test_an_allowed_name_opens_after_its_answer_and_closes_when_its_ttl_ends(
        bed: Testbed) -> None:
    flush(bed)
    assert reach(bed, "h2", "h5") == [False, False]
    assert ask(bed, "api.example.com") == {"rcode": "NOERROR", "addresses": [ip("h2")],
                                           "chain": []}
    # The element's timeout is the TTL (3 s), read before the probes: they take a second
    # (h5's must time out), and on a loaded machine the 3 s could be over by then.
    table = bed.table("h1", timed=True) or ""
    assert f"{ip('h2')} timeout 3s" in table
    assert reach(bed, "h2", "h5") == [True, False]
    # After the TTL the address is closed again, with no user-space sweep.
    wait_for(lambda: ip("h2") not in (bed.table("h1", timed=True) or ""),
             "the element to expire")
    assert reach(bed, "h2") == [False]
    p99 = dns_metric(bed, "dnsAnswerToKernelP99Ms")
    assert 0 < p99 < 1000


# Resolve a name and connect to its address at once, as a client does; how long the
# connect took (a first SYN dropped for want of the element costs a 1 s retransmission).
RESOLVE_AND_CONNECT = r"""
import json, socket, sys, time
import dns.message, dns.query
r = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), sys.argv[2], timeout=2)
address = [rd.address for rr in r.answer for rd in rr][0]
start = time.monotonic()
s = socket.create_connection((address, int(sys.argv[3])), timeout=4)
print(json.dumps({"address": address, "connect_s": time.monotonic() - start}))
s.close()
"""


def test_held_answers_reach_the_client_after_the_element_so_the_first_syn_passes(
        bed: Testbed) -> None:
    bed.lab.listen("h2", tcp=[PORT], replace=True)
    for _ in range(5):
        flush(bed)
        done = bed.lab.run("h1", [sys.executable, "-c", RESOLVE_AND_CONNECT,
                                  "long.example.com", ip("h3"), str(PORT)], timeout=30)
        assert done.returncode == 0, done.stderr[-500:]
        result = json.loads(done.stdout)
        # No retransmission: the element was in the kernel before the answer arrived.
        assert result["address"] == ip("h2") and result["connect_s"] < 0.5, result
    assert dns_metric(bed, "dnsReleased") >= 5
    assert dns_metric(bed, "dnsReleaseFailures") == 0


def test_a_hung_agent_holds_no_answer_for_long(bed: Testbed) -> None:
    """The hold element times out when the agent stops renewing it: answers then pass
    straight to the client (no-delay), so a hung agent does not take DNS down."""
    flush(bed)
    os.kill(agent_pid(bed), signal.SIGSTOP)
    try:
        time.sleep(3.5)     # the hold element's 3 s timeout
        assert ask(bed, "long.example.com")["addresses"] == [ip("h2")]
    finally:
        os.kill(agent_pid(bed), signal.SIGCONT)
    # The answer was logged as well: the woken agent learns it and opens the address.
    wait_for(lambda: ip("h2") in (bed.table("h1", timed=True) or ""),
             "the element after waking up")


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


# Run in h4: an answer for api.example.com (-> h5) forged with the trusted resolver's
# address as its source, sent to h1 with no query behind it.
SPOOF = r"""
import socket, struct, sys
import dns.message, dns.rrset
src, dst, target = sys.argv[1], sys.argv[2], sys.argv[3]
answer = dns.message.make_response(dns.message.make_query("api.example.com", "A"))
answer.answer.append(dns.rrset.from_text("api.example.com.", 600, "IN", "A", target))
body = answer.to_wire()
udp = struct.pack(">HHHH", 53, 40000, 8 + len(body), 0) + body
ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 7, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + udp, (dst, 0))
"""


def test_an_answer_forged_with_the_trusted_servers_address_opens_nothing(
        bed: Testbed) -> None:
    flush(bed)
    unsolicited = dns_metric(bed, "dnsUnsolicited")
    done = bed.lab.run("h4", [sys.executable, "-c", SPOOF, ip("h3"), ip("h1"), ip("h5")],
                       timeout=30)
    assert done.returncode == 0, done.stderr[-500:]
    # A genuine lookup after it: once its answer is learned, the forged packet (sent
    # before, through the same NFLOG queue) has been dealt with too.
    assert ask(bed, "b.example.net")["addresses"] == [ip("h2")]
    wait_for(lambda: dns_metric(bed, "dnsCacheNames") == 1, "the genuine answer learned")
    # No conntrack entry behind it: the table neither logged nor held it, so nothing
    # was learned from it, and h5 stays closed.
    assert dns_metric(bed, "dnsUnsolicited") == unsolicited
    assert reach(bed, "h5") == [False]


def test_dns_logs_reach_the_server_with_question_answers_and_latency(bed: Testbed) -> None:
    from bulkhead.client.flows import dns_logs

    since = time.time() - 1
    assert ask(bed, "www.example.org")["addresses"] == [ip("h5")]
    assert ask(bed, "nothing.example") == {"rcode": "NXDOMAIN", "addresses": [],
                                           "chain": []}

    def logged() -> dict[str, dict[str, Any]]:
        answer = dns_logs(bed.connection(), since=since, node="h1")
        return {r["qname"]: r for r in answer["dns"]}

    wait_for(lambda: {"www.example.org", "nothing.example"} <= set(logged()),
             "the DNS records at the server", timeout=30)
    www, gone = logged()["www.example.org"], logged()["nothing.example"]
    assert (www["client_type"], www["client_name"]) == ("hep", "h1")
    assert (www["server_type"], www["server_name"]) == ("net", ip("h3"))
    assert (www["qtype"], www["rcode"]) == ("A", "NOERROR")
    assert www["answers"] == [f"edge.cdn.example A {ip('h5')}",
                              "www.example.org CNAME edge.cdn.example"]
    # The latency of the exchanges whose query the agent read before the answer came
    # (a busy agent reads both at once: unknown then, not counted).
    assert www["count"] >= 1 and 0 <= www["latency_count"] <= www["count"]
    if www["latency_count"]:
        assert 0 < www["latency_mean_ms"] <= www["latency_max_ms"] < 1000
    else:
        assert www["latency_mean_ms"] == www["latency_max_ms"] == 0
    assert (gone["rcode"], gone["answers"]) == ("NXDOMAIN", [])
    # A filter by the names under a domain.
    answer = dns_logs(bed.connection(), since=since, qname="*.example.org")
    assert {r["qname"] for r in answer["dns"]} == {"www.example.org"}


def test_flow_records_of_a_domain_rule_carry_the_same_staged_verdict(bed: Testbed) -> None:
    """The agent's reference evaluator sees the names the destination was resolved from
    (the same name cache), so a connection the kernel allowed by name is staged-allowed
    too: no false 'staged differs' in the rollout. The records carry the names, for the
    impact preview."""
    from bulkhead.client.flows import flows

    flush(bed)
    since = time.time() - 1
    assert ask(bed, "long.example.com")["addresses"] == [ip("h2")]
    assert reach(bed, "h2") == [True]

    def records() -> list[dict[str, Any]]:
        answer = flows(bed.connection(), since=since, node="h1", reporter="src")
        return [r for r in answer["flows"] if r["dst_port"] == PORT
                and r["dst_name"] == ip("h2")]

    wait_for(lambda: bool(records()), "h1's flow record to h2", timeout=30)
    for record in records():
        assert record["action"] == "allow"
        assert record["enforced_trace"] == ["default|client-egress|0|allow"]
        assert (record["staged_action"], record["staged_trace"]) == \
            (record["action"], record["enforced_trace"])
        assert "long.example.com" in record["dst_domains"], record


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
    wait_for(lambda: ip("h2") in (bed.table("h1", timed=True) or ""),
             "the cached element back")
    assert reach(bed, "h2") == [True]
    flush(bed)
    assert reach(bed, "h2") == [False]
    # Removed, or written again since (empty): the flushed names are gone from disk.
    assert not cache.exists() or "long.example.com" not in cache.read_text()
