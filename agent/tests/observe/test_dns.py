"""DNS snooping's core without a kernel: DNS messages parsed from logged packets (made
with dnspython, as a resolver would send them), the chain rule, the name cache's expiry
semantics, its bounds and its file."""

from __future__ import annotations

import ipaddress
import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.observe.dns import NotDns, parse_packet
from bulkhead.observe.nflog import LoggedPacket
from bulkhead.policy.names import MAX_ADDRESSES, MAX_NAMES_FOR, MIN_TTL, NameCache, Record

NOW = 1_800_000_000.0
CLIENT, SERVER = ipaddress.ip_address("198.18.0.10"), ipaddress.ip_address("198.18.0.53")


def packet(message: dns.message.Message, answer: bool = True, proto: int = 17,
           raw: bytes | None = None) -> LoggedPacket:
    body = message.to_wire() if raw is None else raw
    sport, dport = (53, 40000) if answer else (40000, 53)
    udp = struct.pack(">HHHH", sport, dport, 8 + len(body), 0) + body
    src, dst = (SERVER, CLIENT) if answer else (CLIENT, SERVER)
    return LoggedPacket(3, "", 4, proto, src, dst, sport, dport, None, None,
                        28 + len(body), NOW, udp)


def response(qname: str, *records: tuple[str, int, str, str],
             additional: tuple[tuple[str, int, str, str], ...] = ()) -> dns.message.Message:
    query = dns.message.make_query(qname, "A")
    out = dns.message.make_response(query)
    for name, ttl, kind, value in records:
        out.answer.append(dns.rrset.from_text(name, ttl, "IN", kind, value))
    for name, ttl, kind, value in additional:
        out.additional.append(dns.rrset.from_text(name, ttl, "IN", kind, value))
    return out


def test_an_answer_gives_its_chain_of_records_and_a_query_its_question() -> None:
    msg = response("WWW.Example.ORG.",
                   ("www.example.org.", 30, "CNAME", "edge.cdn.example."),
                   ("edge.cdn.example.", 5, "A", "198.18.0.14"),
                   ("edge.cdn.example.", 5, "A", "198.18.0.15"),
                   ("unrelated.example.", 300, "A", "198.18.0.99"),
                   additional=(("edge.cdn.example.", 5, "AAAA", "2001:2::14"),
                               ("glue.example.", 300, "A", "198.18.0.98")))
    got = parse_packet(packet(msg))
    assert (got.answer, got.qname, got.qtype, got.rcode) == (True, "www.example.org", "A",
                                                             "NOERROR")
    assert (got.client, got.client_port, got.server, got.server_port) == \
        (CLIENT, 40000, SERVER, 53)
    assert got.chain == ("www.example.org", "edge.cdn.example")
    assert sorted(got.addresses) == ["198.18.0.14", "198.18.0.15", "2001:2::14"]
    # Records off the chain (another name in the answer, glue) are not taken.
    assert all(r.name in got.chain for r in got.records)
    query = parse_packet(packet(dns.message.make_query("api.example.com", "AAAA"), False))
    assert (query.answer, query.qname, query.qtype, query.records) == \
        (False, "api.example.com", "AAAA", ())


def test_an_nxdomain_teaches_nothing_and_non_dns_is_refused() -> None:
    msg = response("gone.example.", ("gone.example.", 30, "A", "198.18.0.1"))
    msg.set_rcode(3)
    got = parse_packet(packet(msg))
    assert got.rcode == "NXDOMAIN" and got.records == ()
    with pytest.raises(NotDns):
        parse_packet(packet(msg, raw=b"\x00\x01garbage"))
    with pytest.raises(NotDns):
        parse_packet(packet(msg, proto=6))
    # A query sent from port 53 (or a response to it) is not what it claims.
    with pytest.raises(NotDns):
        parse_packet(packet(dns.message.make_query("a.example", "A"), answer=True))


def test_a_query_from_port_53_to_port_53_is_told_from_its_answer_by_the_qr_bit() -> None:
    """A forwarding server may query from its own port 53 (BIND's query-source port 53,
    Windows DNS): felix tells query from answer by the QR bit, whatever the ports. Both
    were taken as answers here, the query refused as malformed, and its answer then
    unsolicited: the name opened nothing."""
    query = dns.message.make_query("api.example.com", "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text("api.example.com.", 30, "IN", "A",
                                             "198.18.0.11"))

    def on_53(message: dns.message.Message, src: Any, dst: Any) -> LoggedPacket:
        body = message.to_wire()
        udp = struct.pack(">HHHH", 53, 53, 8 + len(body), 0) + body
        return LoggedPacket(3, "", 4, 17, src, dst, 53, 53, None, None, 28 + len(body),
                            NOW, udp)

    asked = parse_packet(on_53(query, CLIENT, SERVER))
    got = parse_packet(on_53(answer, SERVER, CLIENT))
    assert (asked.answer, asked.client, asked.server, asked.client_port) == \
        (False, CLIENT, SERVER, 53)
    assert (got.answer, got.client, got.server, got.addresses) == \
        (True, CLIENT, SERVER, ("198.18.0.11",))


def test_a_cname_loop_and_a_long_chain_are_bounded() -> None:
    loop = response("a.example.", ("a.example.", 30, "CNAME", "b.example."),
                    ("b.example.", 30, "CNAME", "a.example."))
    assert parse_packet(packet(loop)).chain == ("a.example", "b.example")
    links = [(f"n{i}.example.", 30, "CNAME", f"n{i + 1}.example.") for i in range(40)]
    long = parse_packet(packet(response("n0.example.", *links)))
    assert len(long.chain) <= 17


def rec(name: str, kind: str, value: str, ttl: int = 30) -> Record:
    return Record(name, kind, value, ttl)


def test_an_address_lives_as_long_as_its_longest_lived_path() -> None:
    cache = NameCache()
    touched = cache.learn([rec("www.example.org", "CNAME", "edge.cdn.example", 100),
                           rec("edge.cdn.example", "A", "198.18.0.14", 5)], NOW)
    assert touched == {"www.example.org", "edge.cdn.example"}
    how = cache.resolve("www.example.org", NOW)["198.18.0.14"]
    # The path is as long as its shortest link (the A record's 5 s).
    assert (how.expiry, how.via) == (NOW + 5, ("edge.cdn.example",))
    # A later answer for the target alone refreshes the alias's address too.
    assert cache.learn([rec("edge.cdn.example", "A", "198.18.0.14", 50)], NOW + 1) == \
        {"edge.cdn.example", "www.example.org"}
    assert cache.resolve("www.example.org", NOW + 1)["198.18.0.14"].expiry == NOW + 51
    # The same record known for longer already: nothing moves.
    assert cache.learn([rec("edge.cdn.example", "A", "198.18.0.14", 10)], NOW + 2) == set()
    assert cache.resolve("www.example.org", NOW + 60) == {}


def test_ttl_gets_the_extra_and_at_least_two_seconds() -> None:
    cache = NameCache(extra_ttl=10)
    cache.learn([rec("a.example", "A", "198.18.0.1", 0), rec("b.example", "A",
                                                            "198.18.0.2", 30)], NOW)
    assert cache.resolve("a.example", NOW)["198.18.0.1"].expiry == NOW + 10
    assert cache.resolve("b.example", NOW)["198.18.0.2"].expiry == NOW + 40
    plain = NameCache()
    plain.learn([rec("a.example", "A", "198.18.0.1", 0)], NOW)
    assert plain.resolve("a.example", NOW)["198.18.0.1"].expiry == NOW + MIN_TTL


def test_domain_patterns_pick_names_and_reasons_name_the_chain() -> None:
    cache = NameCache()
    cache.learn([rec("api.example.com", "A", "198.18.0.11", 30),
                 rec("x.y.example.com", "A", "198.18.0.12", 30),
                 rec("example.com", "A", "198.18.0.13", 30),
                 rec("www.example.org", "CNAME", "edge.cdn.example", 30),
                 rec("edge.cdn.example", "A", "198.18.0.11", 60)], NOW)
    assert cache.addresses(["*.example.com"], NOW) == {"198.18.0.11": NOW + 30,
                                                       "198.18.0.12": NOW + 30}
    assert cache.addresses(["www.example.org"], NOW) == {"198.18.0.11": NOW + 30}
    assert cache.addresses(["*.cdn.example"], NOW) == {"198.18.0.11": NOW + 60}
    reasons = cache.reasons("198.18.0.11", NOW)
    assert [(r.name, r.expiry, r.via) for r in reasons] == [
        ("edge.cdn.example", NOW + 60, ()), ("api.example.com", NOW + 30, ()),
        ("www.example.org", NOW + 30, ("edge.cdn.example",))]


def test_the_cache_is_bounded_in_names_and_addresses_per_name() -> None:
    cache = NameCache(max_names=100)
    cache.learn([rec(f"n{i}.example", "A", "198.18.1.1", 10 + i) for i in range(150)], NOW)
    assert len(cache) == 100 and cache.evicted == 50
    # The soonest to expire went first.
    assert "n0.example" not in cache.names() and "n149.example" in cache.names()
    wide = NameCache()
    wide.learn([rec("wide.example", "A", str(ipaddress.ip_address("198.18.2.0") + i),
                    10 + i) for i in range(MAX_ADDRESSES + 20)], NOW)
    assert len(wide.resolve("wide.example", NOW)) == MAX_ADDRESSES


def test_an_answer_over_the_bound_per_name_keeps_its_first_addresses() -> None:
    """An answer with more addresses than a name holds: the first MAX_ADDRESSES stay,
    those a client tries first (felix keeps them all). Each record past the bound pushed
    out the answer's first one, so the address a client connected to was refused while
    the last ones were allowed. A later answer's records still push out earlier ones,
    which expire sooner."""
    first = ipaddress.ip_address("198.18.3.0")
    cache = NameCache()
    cache.learn([rec("many.example", "A", str(first + i), 60)
                 for i in range(MAX_ADDRESSES + 6)], NOW)
    kept = cache.resolve("many.example", NOW)
    assert sorted(kept, key=ipaddress.ip_address) == \
        [str(first + i) for i in range(MAX_ADDRESSES)]
    later = ipaddress.ip_address("198.18.4.0")
    cache.learn([rec("many.example", "A", str(later + i), 60) for i in range(3)], NOW + 5)
    kept = cache.resolve("many.example", NOW + 5)
    assert str(first) not in kept and all(str(later + i) in kept for i in range(3))


def test_the_file_round_trips_live_entries_and_refuses_a_bad_one(tmp_path: Path) -> None:
    cache = NameCache()
    cache.learn([rec("www.example.org", "CNAME", "edge.cdn.example", 100),
                 rec("edge.cdn.example", "A", "198.18.0.14", 50),
                 rec("old.example", "A", "198.18.0.15", 1)], NOW)
    path = tmp_path / "dns-cache.json"
    cache.save(path, NOW + 10)     # old.example has expired by then
    again = NameCache()
    assert again.load(path, NOW + 10) == 2
    assert again.resolve("www.example.org", NOW + 10)["198.18.0.14"].expiry == NOW + 50
    assert again.load(tmp_path / "absent.json", NOW) == 0
    for bad in ({"version": 9}, {"version": 1, "addresses": {"a": {"not-an-ip": NOW}}},
                {"version": 1, "aliases": {"a": {"b": "soon"}}}, [1, 2]):
        path.write_text(json.dumps(bad))
        fresh = NameCache()
        with pytest.raises(ValueError):
            fresh.load(path, NOW)
        assert len(fresh) == 0
    assert cache.flush() == 2 and len(cache) == 0   # the save dropped the expired name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a.x", "b.x", "c.x", "d.x"]),
                          st.sampled_from(["A", "CNAME"]),
                          st.sampled_from(["198.18.0.1", "198.18.0.2", "a.x", "b.x", "c.x"]),
                          st.integers(0, 100), st.integers(0, 50)), max_size=12),
       st.integers(0, 160))
def test_resolution_agrees_with_a_walk_over_every_path(
        answers: list[tuple[str, str, str, int, int]], later: int) -> None:
    """The cache's expiry of each address equals the best over every acyclic CNAME path
    (each path as long as its shortest link), computed here by brute force."""
    cache = NameCache()
    links: dict[tuple[str, str, str], float] = {}
    for name, kind, value, ttl, at in answers:
        if (kind == "A") != value[0].isdigit():
            continue
        cache.learn([Record(name, kind, value, ttl)], NOW + at)
        key = (name, kind, value)
        links[key] = max(links.get(key, 0.0), NOW + at + max(ttl, MIN_TTL))
    now = NOW + later

    def walk(name: str, until: float, seen: tuple[str, ...]) -> dict[str, float]:
        out: dict[str, float] = {}
        for (owner, kind, value), expiry in links.items():
            if owner != name:
                continue
            live = min(until, expiry)
            if kind == "A":
                if live > now:
                    out[value] = max(out.get(value, 0.0), live)
            elif value not in seen and live > now:
                for address, e in walk(value, live, (*seen, value)).items():
                    out[address] = max(out.get(address, 0.0), e)
        return out

    for name in ("a.x", "b.x", "c.x", "d.x"):
        got = {a: how.expiry for a, how in cache.resolve(name, now).items()}
        assert got == walk(name, float("inf"), (name,)), name
    # The reverse lookup (through the cache's indexes) agrees with resolving every name.
    for address in ("198.18.0.1", "198.18.0.2"):
        expected = {n for n in ("a.x", "b.x", "c.x", "d.x")
                    if address in walk(n, float("inf"), (n,))}
        assert cache.names_for(address, now) == expected, address
    cache.expire(now)
    for address in ("198.18.0.1", "198.18.0.2"):
        assert cache.names_for(address, now) == {
            n for n in ("a.x", "b.x", "c.x", "d.x") if address in walk(n, float("inf"), (n,))}


def test_an_address_keeps_its_longest_life_when_another_name_moves() -> None:
    """Two names share an address: a short-lived answer for one must not cut the element
    the other keeps alive (an element written again takes the new timeout)."""
    cache = NameCache()
    cache.learn([rec("a.example.com", "A", "198.18.1.4", 3600)], NOW)
    touched = cache.learn([rec("b.example.com", "A", "198.18.1.4", 60)], NOW + 1)
    assert touched == {"b.example.com"}
    assert cache.addresses(["*.example.com"], NOW + 1, touched) == {"198.18.1.4": NOW + 3600}
    # A pattern only the short-lived name matches gets the short life.
    assert cache.addresses(["b.example.com"], NOW + 1, touched) == {"198.18.1.4": NOW + 61}


def test_many_cname_paths_resolve_in_rounds_not_one_walk_each() -> None:
    """Sixteen layers of four names, each pointing to all four of the next: 4**16 paths,
    which a walk of every path would never finish; the widest one is found."""
    cache = NameCache()
    layers = [[f"n{layer}-{i}.example" for i in range(4)] for layer in range(17)]
    records = [rec(name, "CNAME", target, 100 + layer)
               for layer in range(16) for name in layers[layer] for target in layers[layer + 1]]
    cache.learn([*records, rec(layers[16][0], "A", "198.18.1.9", 500)], NOW)
    found = cache.resolve(layers[0][0], NOW)["198.18.1.9"]
    assert found.expiry == NOW + 100 and len(found.via) == 16


def test_a_hostile_ttl_or_a_tampered_cache_file_is_bounded(tmp_path: Path) -> None:
    cache = NameCache()
    cache.learn([rec("a.example", "A", "198.18.1.1", 2**32 - 1)], NOW)   # top bit set: 0
    assert cache.resolve("a.example", NOW)["198.18.1.1"].expiry == NOW + MIN_TTL
    path = tmp_path / "dns-cache.json"
    path.write_text('{"version": 1, "addresses": {"a.example": {"198.18.1.1": Infinity}}}')
    with pytest.raises(ValueError):
        NameCache().load(path, NOW)


def test_names_for_an_address_are_bounded_and_kept_until_the_cache_changes() -> None:
    """A CDN address answered for thousands of names: a flow to it costs a lookup, not a
    walk of every name (the answer is kept, one object, until the cache changes or one of
    its names lapses), and carries at most MAX_NAMES_FOR names."""
    cache = NameCache(max_names=10_000)
    cache.learn([rec(f"n{i}.cdn.example", "A", "198.18.1.7", 100) for i in range(3000)],
                NOW)
    first = cache.names_for("198.18.1.7", NOW)
    assert len(first) == MAX_NAMES_FOR and first <= {f"n{i}.cdn.example"
                                                     for i in range(3000)}
    assert cache.names_for("198.18.1.7", NOW + 1) is first          # kept
    cache.learn([rec("other.example", "A", "198.18.1.8", 5)], NOW + 2)
    again = cache.names_for("198.18.1.7", NOW + 2)                 # the cache changed
    assert again == first and again is not first
    # One name with a short life: the kept answer ends when it lapses.
    small = NameCache()
    small.learn([rec("long.example", "A", "198.18.1.9", 100),
                 rec("short.example", "A", "198.18.1.9", 10)], NOW)
    assert small.names_for("198.18.1.9", NOW + 1) == {"long.example", "short.example"}
    assert small.names_for("198.18.1.9", NOW + 11) == {"long.example"}
    assert small.names_for("198.18.1.10", NOW) == frozenset()


def test_one_answer_looks_at_a_bounded_number_of_names() -> None:
    """Names that all alias one target (x1.evil.test ... CNAME one name): an answer that
    touches the target returns its own names and at most MAX_FANOUT of the names leading
    to it, nearest first; and the names one address's element is timed by are looked at
    MAX_FANOUT at most. Unbounded, each answer cost every earlier one (112 s of CPU for
    10,000 answers)."""
    from bulkhead.policy import names as names_module
    from bulkhead.policy.names import MAX_FANOUT, NameCache, Record

    cache = NameCache()
    for i in range(3 * MAX_FANOUT):
        cache.learn([Record(f"x{i}.evil.test", "CNAME", "edge.evil.test", 300)], NOW)
    cache.learn([Record("near.example.com", "CNAME", "edge.evil.test", 300)], NOW)
    touched = cache.learn([Record("api.example.com", "A", "198.18.3.4", 300),
                           Record("edge.evil.test", "A", "198.18.3.4", 300)], NOW + 1)
    assert {"api.example.com", "edge.evil.test"} <= touched
    assert len(touched) == MAX_FANOUT
    resolved = Counter[str]()
    real = NameCache._resolve

    def counted(self: NameCache, name: str, now: float) -> Any:
        resolved[name] += 1
        return real(self, name, now)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(names_module.NameCache, "_resolve", counted)
        got = cache.addresses(("*.evil.test", "api.example.com"), NOW + 2,
                              ["api.example.com"])
    assert got == {"198.18.3.4": pytest.approx(NOW + 301)}
    assert sum(resolved.values()) <= MAX_FANOUT + 1
