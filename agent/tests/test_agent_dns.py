"""The agent's DNS snooper against a real kernel (a network namespace of the test's own):
answers fill the applied table's domain sets with per-element timeouts, over netlink; a
table replaced whole gets the live elements in the same transaction; a flush empties
them; the settings and resolv.conf are read as documented."""

from __future__ import annotations

import contextlib
import ipaddress
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
from bulkhead.observe.nflog import LoggedPacket
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import base, gnp, snap
from tests.observe.test_dns import packet, response

POLICY = gnp("egress", {"selector": "app == 'db'", "egress": [
    {"action": "Allow", "destination": {"domains": ["*.example.com"]}},
    {"action": "Allow", "destination": {"domains": ["www.example.org"]}}]})
SERVER = "198.18.0.53"


ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def exchange(answer: dns.message.Message) -> list[LoggedPacket]:
    """The query that asked for `answer` (same ID and question), then the answer."""
    query = dns.message.make_query(answer.question[0].name, answer.question[0].rdtype)
    query.id = answer.id
    return [packet(query, answer=False), packet(answer)]


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
        # An answer no query asked teaches nothing.
        assert snooper.packets([packet(answer)]) is None
        assert snooper.counters.unsolicited == 1 and len(snooper.cache) == 0
        future = snooper.packets(exchange(answer))
        assert future is not None
        future.result(timeout=10)
        # Both patterns take the address: www.example.org through its CNAME, and
        # *.example.com by the target's own name; each element times out with the TTL.
        for name in sets.values():
            got = elements(netns, name)
            assert list(got) == ["198.18.3.4"] and 38 <= got["198.18.3.4"] <= 41
        assert snooper.counters.answers == 2 and snooper.counters.elements_written == 2
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
                snooper.counters.malformed) == (2, 1, 1)
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
def test_a_long_ttl_survives_a_table_replaced_whole(netns: str, tmp_path: Path) -> None:
    """An answer's TTL of two days (172,800 s): a table replaced whole carries the element
    in its own transaction, its timeout in nft's text. Written as `172800000ms` nft refused
    it ("value too large") and with it the whole table."""
    snooper, applier, sets = setup(netns, tmp_path)
    try:
        answer = response("www.example.org.", ("www.example.org.", 172_800, "A",
                                                "198.18.3.5"))
        future = snooper.packets(exchange(answer))
        assert future is not None
        future.result(timeout=10)
        assert "198.18.3.5" in elements(netns, sets["www"])
        applier.repair()
        assert "198.18.3.5" in elements(netns, sets["www"])
        listed = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "set", "inet",
                                 "bulkhead", sets["www"]], capture_output=True, text=True,
                                check=True).stdout
        # The kernel holds what is left of the two days (1d23h59m...), not a cut timeout.
        assert "198.18.3.5 timeout 1d23h59m" in listed, listed
    finally:
        snooper.close()


@ROOT
def test_a_stopped_agents_cache_and_sets_are_flushed(netns: str, tmp_path: Path) -> None:
    snooper, _, sets = setup(netns, tmp_path)
    try:
        future = snooper.packets(exchange(response(
            "api.example.com.", ("api.example.com.", 600, "A", "198.18.3.5"))))
        assert future is not None
        future.result(timeout=10)
        snooper.save()
    finally:
        snooper.close()
    assert (tmp_path / "dns-cache.json").exists()
    assert flush_saved(tmp_path, netns=netns) == (1, 4)
    assert not (tmp_path / "dns-cache.json").exists()
    assert elements(netns, sets["wild"]) == {}


@ROOT
def test_without_a_raw_socket_answers_are_not_held(netns: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """No CAP_NET_RAW (no way to send held answers on): the snooper never turns holding
    on, so the table lets answers through at once, and it says why."""
    import asyncio

    import bulkhead.agent.dns as agent_dns

    def refused(family: int, netns: str = "") -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(agent_dns, "raw_socket", refused)
    settings = DnsSettings(trusted_servers=(SERVER,))
    snoop = snooping(settings)
    assert snoop.hold
    ruleset = render(calculate(snap(*base(), POLICY), "n1", {}, Failsafes()), dns=snoop)
    NftApplier(netns=netns).apply(ruleset)
    snooper = DnsSnooper(settings, snoop, tmp_path, netns=netns)

    async def briefly() -> None:
        stopping = False
        task = asyncio.create_task(snooper.run(lambda: stopping))
        await asyncio.sleep(1.5)
        stopping = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(briefly())
    finally:
        snooper.close()
    assert not snooper.hold and not snooper.holding
    assert "needs CAP_NET_RAW" in caplog.text
    hold = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "set", "inet",
                           "bulkhead", "dns_hold"], capture_output=True, text=True).stdout
    assert "elements" not in hold


def test_a_held_answer_is_sent_on_with_its_udp_checksum_made_anew() -> None:
    import socket
    import struct

    from bulkhead.agent.dns import with_udp_checksum

    def ones(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f">{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return total

    body = b"an answer of odd length"
    udp = struct.pack(">HHHH", 53, 40000, 8 + len(body), 0x1234) + body   # partial sum
    v4 = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("198.18.0.53"), socket.inet_aton("198.18.0.10")) + udp
    fixed = with_udp_checksum(v4, 4)
    pseudo = fixed[12:20] + struct.pack(">BBH", 0, 17, len(udp))
    assert fixed[:26] == v4[:26] and fixed[28:] == v4[28:]
    assert ones(pseudo + fixed[20:]) == 0xFFFF      # a valid checksum sums to all ones
    v6 = struct.pack(">IHBB", 0x60000000, len(udp), 17, 64) + \
        socket.inet_pton(socket.AF_INET6, "2001:2::53") + \
        socket.inet_pton(socket.AF_INET6, "2001:2::10") + udp
    fixed6 = with_udp_checksum(v6, 6)
    pseudo6 = fixed6[8:40] + struct.pack(">IxxxB", len(udp), 17)
    assert ones(pseudo6 + fixed6[40:]) == 0xFFFF
    tcp = v4[:9] + b"\x06" + v4[10:]
    assert with_udp_checksum(tcp, 4) == tcp      # not UDP: left as it is


def test_one_flooding_client_cannot_push_out_the_queries_of_others(tmp_path: Path) -> None:
    """Over a client address's share its oldest queries are let go: other addresses keep
    theirs, and another process of the flooding host (the same address) is answered."""
    from bulkhead.agent.dns import MAX_PENDING_CLIENT

    snooper = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)),
                         snooping(DnsSettings(trusted_servers=(SERVER,))), tmp_path)
    try:
        flood, asked = [], []
        for i in range(MAX_PENDING_CLIENT + 50):
            query = dns.message.make_query(f"q{i}.flood.example", "A")
            asked.append(query)
            flood.append(packet(query, answer=False))
        assert snooper.packets(flood) is None
        assert snooper.counters.queries_dropped == 50
        # Another client's query (another address) is still kept and answered.
        other = exchange(response("api.example.com.",
                                  ("api.example.com.", 60, "A", "198.18.3.7")))
        other = [p._replace(src=ipaddress.ip_address("198.18.0.20")) if p.dport == 53 else
                 p._replace(dst=ipaddress.ip_address("198.18.0.20")) for p in other]
        snooper.packets(other)
        assert snooper.counters.unsolicited == 0
        assert snooper.cache.names() == ["api.example.com"]
        # Another process of the flooding host (its address): its query is the newest,
        # so it is kept and its answer learned; the flood's oldest is let go for it.
        mine = exchange(response("www.example.org.",
                                 ("www.example.org.", 60, "A", "198.18.3.8")))
        snooper.packets(mine)
        assert snooper.counters.unsolicited == 0 and snooper.counters.queries_dropped == 51
        assert snooper.cache.names() == ["api.example.com", "www.example.org"]
        # The flood's newest query is still waiting for its answer; its oldest is not.
        for query, learned in ((asked[-1], True), (asked[0], False)):
            answer = dns.message.make_response(query)
            answer.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                     "198.18.3.9"))
            snooper.packets([packet(answer)])
            assert (query.question[0].name.to_text(omit_final_dot=True)
                    in snooper.cache.names()) == learned
        assert snooper.counters.unsolicited == 1
    finally:
        snooper.close()


def test_timed_elements_keep_their_family_and_a_positive_timeout() -> None:
    got = timed_elements(4, [("198.18.0.1", 5000), ("2001:2::1", 5000), ("198.18.0.2", 0)])
    assert [(e.key, e.timeout_ms) for e in got] == [(bytes([198, 18, 0, 1]), 5000)]


def test_resolv_conf_and_the_dns_settings(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-address\nsearch example.com\n")
    assert resolv_servers(conf, tmp_path / "absent") == ("127.0.0.53", "fe80::1")
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
    config.write_text("dns: {mode: NoDelay}\n")
    no_delay = load_config(config).dns
    assert no_delay is not None and not snooping(no_delay, conf).hold
    assert snooping(DnsSettings(), conf).hold      # DelayDNSResponse by default
    for text, where in (("dns: {trustedServers: [dns.example]}", "dns.trustedServers[0]"),
                        ("dns: {trustedServers: []}", "dns.trustedServers"),
                        ("dns: {extraTTL: -1}", "dns.extraTTL"),
                        ("dns: {nflogGroup: 70000}", "dns.nflogGroup"),
                        ("dns: {ttl: 5}", "dns.ttl"),
                        ("dns: {mode: DelayDeniedPacket}", "dns.mode"),
                        ("dns: {nflogGroup: 1}\nflowLogs: {enabled: true}",
                         "dns.nflogGroup")):
        config.write_text(text + "\n")
        with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
            load_config(config)


def test_behind_systemd_resolveds_stub_its_upstream_servers_are_trusted_too(
        tmp_path: Path) -> None:
    """resolv.conf names resolved's stub (127.0.0.53): a program that resolves through
    nss-resolve asks resolved over Varlink, and the only answers on the wire are the
    upstream servers' (listed in /run/systemd/resolve/resolv.conf) to resolved. Trusting
    the stub alone, those answers opened nothing: a lookup by such a program never
    allowed its name. A DHCP renew changes only the upstream file: seen at the drift
    check."""
    conf, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    upstream.write_text("nameserver 198.18.0.12\nnameserver 2001:2::12\n")
    assert resolv_servers(conf, upstream) == ("127.0.0.53", "198.18.0.12", "2001:2::12")
    assert snooping(DnsSettings(), conf, upstream).servers == \
        ("127.0.0.53", "198.18.0.12", "2001:2::12")
    # No stub named: the upstream file is not read; no upstream file: the stub alone.
    plain = tmp_path / "plain.conf"
    plain.write_text("nameserver 198.18.0.53\n")
    assert resolv_servers(plain, upstream) == ("198.18.0.53",)
    assert resolv_servers(conf, tmp_path / "absent") == ("127.0.0.53",)
    snooper = DnsSnooper(DnsSettings(), snooping(DnsSettings(), conf, upstream), tmp_path)
    snooper.resolv_conf, snooper.resolved_upstream = conf, upstream
    try:
        assert snooper.resolvers_changed() is None      # what it trusts already
        upstream.write_text("# renewed\nnameserver 198.18.0.13\n")
        changed = snooper.resolvers_changed()
        assert changed is not None and changed.servers == ("127.0.0.53", "198.18.0.13")
        snooper.use(changed)
        assert snooper.resolvers_changed() is None
    finally:
        snooper.close()


def test_an_element_is_never_written_with_a_shorter_life_than_the_kernel_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two names share an address; the short-lived one's answer must not cut the element
    the long-lived one keeps (a write sets the timeout anew). The cache looks at 1,024 of
    an address's names: past them (here, none at all) the snooper's record of what it
    wrote keeps the longer life."""
    from bulkhead.policy import names as names_module
    from bulkhead.policy.names import Record

    snooper = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)),
                         snooping(DnsSettings(trusted_servers=(SERVER,))), tmp_path)
    try:
        sets = {"d4_wild": ("*.example.com",)}
        now = 1_800_000_000.0
        snooper.cache.learn([Record("a.example.com", "A", "198.18.1.4", 3600)], now)
        assert snooper._elements(sets, now) == {"d4_wild": [("198.18.1.4", 3_600_001)]}
        touched = snooper.cache.learn([Record("b.example.com", "A", "198.18.1.4", 60)],
                                      now + 1)
        assert touched == {"b.example.com"}
        monkeypatch.setattr(names_module, "MAX_FANOUT", 0)
        assert snooper.cache.addresses(("*.example.com",), now + 1, ["b.example.com"]) == \
            {"198.18.1.4": now + 61}                    # the cache alone would cut it
        assert snooper._elements(sets, now + 1, touched) == \
            {"d4_wild": [("198.18.1.4", 3_599_001)]}    # written: what a's answer gave
        snooper.flush()
        assert snooper._written == {}
    finally:
        snooper.close()
