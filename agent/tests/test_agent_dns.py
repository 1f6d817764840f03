"""The agent's DNS snooper against a real kernel (a network namespace of the test's own):
answers fill the applied table's domain sets with per-element timeouts, over netlink; a
table replaced whole gets the live elements in the same transaction; a flush empties
them; the settings and resolv.conf are read as documented."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import dns.message
import dns.rrset
import pytest

from bulkhead.agent.config import ConfigError, DnsSettings, load_config
from bulkhead.agent.dns import DnsSnooper, flush_saved, resolv_servers, snooping
from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.apply import NftApplier
from bulkhead.dataplane.nftables.netlink import timed_elements
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import base, gnp, snap
from tests.observe.test_dns import packet, response

POLICY = gnp("egress", {"selector": "app == 'db'", "egress": [
    {"action": "Allow", "destination": {"domains": ["*.example.com"]}},
    {"action": "Allow", "destination": {"domains": ["www.example.org"]}}]})
SERVER = "198.18.0.53"


ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def elements(ns: str, set_name: str) -> dict[str, int]:
    """The set's addresses and their timeouts in seconds, as the kernel lists them."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet",
                          "bulkhead", set_name], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, int] = {}
    body = out.split("elements = {", 1)[1].split("}", 1)[0] if "elements" in out else ""
    for item in body.split(","):
        words = item.split()
        if words:
            found[words[0]] = int(words[2].rstrip("s")) if words[2].endswith("s") \
                and words[2][:-1].isdigit() else -1
    return found


def setup(ns: str, tmp_path: Path) -> tuple[DnsSnooper, NftApplier, dict[str, str]]:
    snoop = snooping(DnsSettings(trusted_servers=(SERVER,)))
    ruleset = render(calculate(snap(*base(), POLICY), "n1", {}, Failsafes()), dns=snoop)
    applier = NftApplier(netns=ns)
    snooper = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path, netns=ns)
    applier.timed = snooper.timed
    applier.apply(ruleset)
    snooper.applied(ruleset.domain_sets, full=True)
    by_patterns = {p: n for n, p in ruleset.domain_sets.items() if n.startswith("d4_")}
    return snooper, applier, {"wild": by_patterns[("*.example.com",)],
                              "www": by_patterns[("www.example.org",)]}


@ROOT
def test_answers_fill_the_matching_sets_with_their_ttls(netns: str, tmp_path: Path) -> None:
    snooper, applier, sets = setup(netns, tmp_path)
    try:
        answer = response("www.example.org.",
                          ("www.example.org.", 300, "CNAME", "api.example.com."),
                          ("api.example.com.", 40, "A", "198.18.3.4"))
        future = snooper.packets([packet(answer)])
        assert future is not None
        future.result(timeout=10)
        # Both patterns take the address: www.example.org through its CNAME, and
        # *.example.com by the target's own name; each element times out with the TTL.
        for name in sets.values():
            got = elements(netns, name)
            assert list(got) == ["198.18.3.4"] and 38 <= got["198.18.3.4"] <= 41
        assert snooper.counters.answers == 1 and snooper.counters.elements_written == 2
        assert len(snooper.latencies) == 1
        # A query is counted, an answer from another server ignored (the table would not
        # even log it), garbage counted as malformed.
        forged = packet(response("evil.example.com.", ("evil.example.com.", 600, "A",
                                                       "198.18.6.6")))
        forged = forged._replace(src=forged.dst.__class__("198.18.0.66"))
        assert snooper.packets([packet(dns.message.make_query("a.example.com", "A"),
                                       answer=False), forged,
                                packet(answer, raw=b"\x01\x02")]) is None
        assert (snooper.counters.queries, snooper.counters.untrusted,
                snooper.counters.malformed) == (1, 1, 1)
        assert "198.18.6.6" not in elements(netns, sets["wild"])
        # A table replaced whole keeps the live elements (same transaction).
        applier.repair()
        assert "198.18.3.4" in elements(netns, sets["wild"])
        # Flushed: the sets are empty and the cache too.
        assert snooper.flush() == 2
        assert elements(netns, sets["wild"]) == {} and elements(netns, sets["www"]) == {}
    finally:
        snooper.close()


@ROOT
def test_a_stopped_agents_cache_and_sets_are_flushed(netns: str, tmp_path: Path) -> None:
    snooper, _, sets = setup(netns, tmp_path)
    try:
        future = snooper.packets([packet(response(
            "api.example.com.", ("api.example.com.", 600, "A", "198.18.3.5")))])
        assert future is not None
        future.result(timeout=10)
        snooper.save()
    finally:
        snooper.close()
    assert (tmp_path / "dns-cache.json").exists()
    assert flush_saved(tmp_path, netns=netns) == (1, 4)
    assert not (tmp_path / "dns-cache.json").exists()
    assert elements(netns, sets["wild"]) == {}


def test_timed_elements_keep_their_family_and_a_positive_timeout() -> None:
    got = timed_elements(4, [("198.18.0.1", 5000), ("2001:2::1", 5000), ("198.18.0.2", 0)])
    assert [(e.key, e.timeout_ms) for e in got] == [(bytes([198, 18, 0, 1]), 5000)]


def test_resolv_conf_and_the_dns_settings(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-address\nsearch example.com\n")
    assert resolv_servers(conf) == ("127.0.0.53", "fe80::1")
    conf.write_text("search example.com\n")
    assert resolv_servers(conf) == ("127.0.0.1", "::1")
    assert resolv_servers(tmp_path / "absent") == ("127.0.0.1", "::1")
    assert snooping(DnsSettings(), conf).servers == ("127.0.0.1", "::1")
    config = tmp_path / "agent.yaml"
    config.write_text("dns: {trustedServers: [198.18.0.53, '2001:2::53'], extraTTL: 5, "
                      "nflogGroup: 7, maxNames: 1000, cacheSaveInterval: 10}\n")
    dns_settings = load_config(config).dns
    assert dns_settings == DnsSettings(("198.18.0.53", "2001:2::53"), 7, 5.0, 1000, 10.0)
    assert load_config(None).dns == DnsSettings()
    config.write_text("dns: {enabled: false}\n")
    assert load_config(config).dns is None
    for text, where in (("dns: {trustedServers: [dns.example]}", "dns.trustedServers[0]"),
                        ("dns: {trustedServers: []}", "dns.trustedServers"),
                        ("dns: {extraTTL: -1}", "dns.extraTTL"),
                        ("dns: {nflogGroup: 70000}", "dns.nflogGroup"),
                        ("dns: {ttl: 5}", "dns.ttl"),
                        ("dns: {nflogGroup: 1}\nflowLogs: {enabled: true}",
                         "dns.nflogGroup")):
        config.write_text(text + "\n")
        with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
            load_config(config)
