"""`order.py`: element changes cut so that no packet straddling them is accepted where
the old and the new elements both drop it. A small model of a table's chains (the rule
forms `order.uses` ranks: a set matched or not matched before a verdict, a verdict map,
jumps, gotos, returns) evaluates a packet as one that straddles a commit would: each
lookup on its way may see the state before the commit or the one after it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.nftables import Chain, NftSet, Ruleset, render, replace
from bulkhead.dataplane.nftables.order import LESS, UNKNOWN, order, uses
from bulkhead.dataplane.nftables.render import FlowLogging
from bulkhead.net import merge, parse_network
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import calculate
from tests.nftfixture import gnp, hep, snap
from tests.test_nftables_elements import both_sets, interface_moved, passed, verdict_moved

HOSTS = [f"198.18.0.{i}" for i in range(1, 9)]
BASE = "type filter hook input priority filter; policy accept;"


# ---------------------------------------------------------------------- the model
def _holds(elements: tuple[str, ...] | object, address: str) -> str | None:
    """The element text of `elements` that holds `address` (a map's whole text)."""
    value = parse_network(address)[1]
    for text in elements:   # type: ignore[attr-defined]
        key = text.partition(" : ")[0]
        first, _, last = key.partition("-")
        lo = parse_network(first)[1]
        hi = parse_network(last)[2] if last else parse_network(first)[2]
        if lo <= value <= hi:
            return str(text)
    return None


def outcomes(states: tuple[Ruleset, Ruleset], address: str) -> set[str]:
    """Every verdict a packet from `address` can get when each lookup it makes sees
    either state (its rules are the same in both)."""
    table = states[0]

    def lookups(name: str) -> Iterator[str | None]:
        for state in states:
            yield _holds(state.sets[name].elements, address)

    def walk(chain: str) -> Iterator[str]:
        """Each way the chain can end: accept, drop, or "continue" (fell off, returned)."""
        yield from rules(table.chains[chain].rules, 0)

    def rules(lines: tuple[str, ...], at: int) -> Iterator[str]:
        if at == len(lines):
            yield "continue"
            return
        words = lines[at].split()
        if words[:2] == ["ip", "saddr"] and words[2] == "vmap":
            seen = set()
            for found in lookups(words[3][1:]):
                verdict = None if found is None else found.partition(" : ")[2]
                if verdict in seen:
                    continue
                seen.add(verdict)
                yield from then(verdict.split() if verdict else [], lines, at)
            return
        if words[:2] == ["ip", "saddr"]:
            negated = words[2] == "!="
            name = words[3 if negated else 2][1:]
            rest = words[4 if negated else 3:]
            for hit in {(found is not None) != negated for found in lookups(name)}:
                yield from then(rest if hit else [], lines, at)
            return
        yield from then(words, lines, at)

    def then(verdict: list[str], lines: tuple[str, ...], at: int) -> Iterator[str]:
        if not verdict or verdict == ["log"]:
            yield from rules(lines, at + 1)
        elif verdict[0] in ("accept", "drop"):
            yield verdict[0]
        elif verdict[0] == "return":
            yield "continue"
        elif verdict[0] == "jump":
            for end in walk(verdict[1]):
                if end == "continue":
                    yield from rules(lines, at + 1)
                else:
                    yield end
        else:   # goto: the chain's end is this chain's end
            yield from walk(verdict[1])

    return {"accept" if end == "continue" else end for end in walk("input")}


# ------------------------------------------------------------------ random tables
VERDICTS = ["accept", "drop", "return", "log"]


@st.composite
def tables(draw: st.DrawFn) -> tuple[Ruleset, Ruleset]:
    """Two element states of one table: sets s0..s2 (some with intervals), verdict maps
    m0..m1, regular chains c0..c3 (c_i jumps only to c_j, j > i) and a base chain;
    about half the sets and maps change. Each set is matched (or not matched) before
    one verdict in all its rules, mostly accept or drop, so that most can be ranked."""
    uses_of = {f"s{i}": (draw(st.sampled_from(["", "!= "])), draw(st.sampled_from(
        ["accept", "drop", "accept", "drop", "log", "return", "jump c3"]))) for i in range(3)}
    # c3: one rule, no lookups (`uses` ranks a jump to it by its verdict, if it has one).
    chains: dict[str, Chain] = {"c3": Chain("c3", (draw(st.sampled_from(VERDICTS)),))}
    for i in (2, 1, 0):
        later = [f"c{j}" for j in range(i + 1, 3)]
        chains[f"c{i}"] = Chain(f"c{i}", tuple(draw(st.lists(
            rule(later, uses_of, i < 2), min_size=1, max_size=4))))
    chains["input"] = Chain("input", tuple(draw(st.lists(
        rule(["c0", "c1", "c2"], uses_of, True), min_size=1, max_size=5))), BASE)
    old: dict[str, NftSet] = {}
    new: dict[str, NftSet] = {}
    for i in range(3):
        interval = draw(st.booleans())
        flags = ("interval",) if interval else ()
        for out in (old, new):
            if out is new and draw(st.booleans()):   # unchanged (half the sets)
                new[f"s{i}"] = old[f"s{i}"]
                continue
            members = draw(st.sets(st.sampled_from(HOSTS), max_size=len(HOSTS)))
            out[f"s{i}"] = NftSet(f"s{i}", "ipv4_addr", flags, _texts(members, interval))
    # Maps are looked up in chains other than c2, and their elements jump only to c2.
    targets = ["accept", "drop", "accept", "drop", "return", "jump c2", "goto c2"]
    for i in range(2):
        interval = draw(st.booleans())
        for out in (old, new):
            if out is new and draw(st.booleans()):
                new[f"m{i}"] = old[f"m{i}"]
                continue
            members = draw(st.dictionaries(st.sampled_from(HOSTS), st.sampled_from(targets),
                                           max_size=6))
            out[f"m{i}"] = NftSet(f"m{i}", "ipv4_addr", ("interval",) if interval else (),
                                  _map_texts(members, interval), map_to="verdict")
    return Ruleset("t", dict(old), dict(chains)), Ruleset("t", dict(new), dict(chains))


def rule(jumps: list[str], uses_of: dict[str, tuple[str, str]], maps: bool
         ) -> st.SearchStrategy[str]:
    """A rule: a set matched (as `uses_of` says) before its verdict, a map lookup, or a
    verdict alone (a jump, a goto, a return, a log)."""
    verdict = st.sampled_from(VERDICTS + [f"jump {c}" for c in jumps]
                              + [f"goto {c}" for c in jumps])
    matched = st.sampled_from(sorted(uses_of)).map(
        lambda name: f"ip saddr {uses_of[name][0]}@{name} {uses_of[name][1]}")
    mapped = st.sampled_from(["m0", "m1"]).map(lambda m: f"ip saddr vmap @{m}")
    return st.one_of(matched, matched, mapped, verdict) if maps else \
        st.one_of(matched, matched, verdict)


def _map_texts(members: dict[str, str], interval: bool) -> tuple[str, ...]:
    """A map's elements; with intervals, neighbours of one verdict as one range."""
    if not interval:
        return tuple(sorted(f"{h} : {v}" for h, v in members.items()))
    runs: list[list[str]] = []
    for host in HOSTS:
        if host in members and runs and runs[-1][-1] == HOSTS[HOSTS.index(host) - 1] \
                and members[runs[-1][-1]] == members[host]:
            runs[-1].append(host)
        elif host in members:
            runs.append([host])
    return tuple(sorted((run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}")
                        + f" : {members[run[0]]}" for run in runs))


def _texts(members: set[str], interval: bool) -> tuple[str, ...]:
    if not interval:
        return tuple(sorted(members))
    out = []
    for lo, hi in merge((parse_network(h)[1], parse_network(h)[1]) for h in members):
        a, b = ipaddress.IPv4Address(lo), ipaddress.IPv4Address(hi)
        out.append(str(a) if lo == hi else f"{a}-{b}")
    return tuple(sorted(out))


@settings(max_examples=500, deadline=None)
@given(tables())
def test_no_straddling_packet_is_accepted_where_both_states_drop(pair: tuple[Ruleset, Ruleset]
                                                                  ) -> None:
    old, new = pair
    steps = order(old, new, uses(old))
    if steps is None:
        return    # the applier replaces the table whole (replace.py)
    assert steps[-1].same(new)
    for before, after in zip([old, *steps], steps, strict=False):
        for host in HOSTS:
            was, now = outcomes((old, old), host), outcomes((new, new), host)
            assert len(was) == len(now) == 1
            if was == now == {"drop"}:
                assert outcomes((before, after), host) == {"drop"}, (host, before, after)


@pytest.mark.parametrize("interval", [False, True])
def test_the_model_finds_the_straddle_one_commit_lets_through(interval: bool) -> None:
    """The check above can fail: sent in one commit, the both_sets shape (a Deny set,
    then an Allow map, a host joining both) accepts a straddling packet. Ordered, it
    does not, and with intervals the host joining its neighbours' range (the range cut
    again) takes nothing from the neighbours, whom both states accept."""
    chains = {"input": Chain("input", ("ip saddr @s0 drop", "ip saddr vmap @m0", "drop"),
                             BASE)}
    flags = ("interval",) if interval else ()
    was = ("198.18.0.2-198.18.0.3 : accept",) if interval else ()
    now = ("198.18.0.1-198.18.0.3 : accept",) if interval else ("198.18.0.1 : accept",)
    old = Ruleset("t", {"s0": NftSet("s0", "ipv4_addr", (), ()),
                        "m0": NftSet("m0", "ipv4_addr", flags, was, "verdict")}, chains)
    new = Ruleset("t", {"s0": NftSet("s0", "ipv4_addr", (), ("198.18.0.1",)),
                        "m0": NftSet("m0", "ipv4_addr", flags, now, "verdict")}, chains)
    host = "198.18.0.1"
    assert outcomes((old, old), host) == outcomes((new, new), host) == {"drop"}
    assert "accept" in outcomes((old, new), host)
    steps = order(old, new, uses(old))
    assert steps is not None and len(steps) == 2 and steps[-1].same(new)
    assert outcomes((old, steps[0]), host) == {"drop"}
    assert outcomes((steps[0], new), host) == {"drop"}
    if interval:
        for neighbour in ("198.18.0.2", "198.18.0.3"):
            assert outcomes((old, steps[0]), neighbour) == {"accept"}
            assert outcomes((steps[0], new), neighbour) == {"accept"}


# ------------------------------------------------------------- the renderer's tables
def test_the_renderers_sets_are_ranked_by_their_rules() -> None:
    table = both_sets(False)
    how = uses(table)
    deny = next(n for n in table.sets if n.startswith("s4_"))
    assert how.sets[deny] == LESS
    # ep_in on input, ep_out on output: one packet looks up one of them, once.
    assert how.once(["ep_in", "ep_out"]) and not how.once(["ep_in", deny])
    # One commit where one packet meets one changed set, two for both_sets (a Deny set
    # and an Allow map), three for passed (a Deny set, a cut range, returns).
    for build, count in ((both_sets, 2), (verdict_moved, 1), (interface_moved, 1),
                         (passed, 3)):
        a, b = build(False), build(True)
        for x, y in ((a, b), (b, a)):
            steps = order(x, y, uses(x))
            assert steps is not None and len(steps) == count and steps[-1].same(y)


def _passing(member: bool, allow_others: bool) -> Ruleset:
    """db passes everything from `p == 'yes'` to the next tier (`return`); with
    `allow_others`, it also allows all but TCP from everyone else, by the same set
    (`!= @s4_...`): one packet then looks the set up twice."""
    rules: list[dict[str, object]] = [{"action": "Pass", "source": {"selector": "p == 'yes'"}}]
    if allow_others:
        rules.append({"action": "Allow", "notProtocol": "TCP",
                      "source": {"notSelector": "p == 'yes'"}})
    return render(calculate(snap(
        hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
        hep("c", "n2", "198.18.7.1", {"p": "yes"} if member else {}),
        hep("o", "n3", "198.18.9.9", {"p": "yes"}),
        gnp("x", {"selector": "app == 'db'", "ingress": rules})), "n1", {}, Failsafes.off()))


def test_a_set_a_pass_uses_gets_a_commit_of_its_own_if_looked_up_once() -> None:
    """A selector set behind a Pass (`return`) cannot be ranked: its change goes in a
    commit of its own when one packet looks it up once, and is not ordered at all (the
    applier replaces the table) when one packet can look it up twice."""
    a, b = _passing(False, False), _passing(True, False)
    assert a.same_structure(b)
    how = uses(a)
    changed = [n for n in a.sets if a.sets[n].elements != b.sets[n].elements]
    assert changed and all(how.sets[n] == UNKNOWN and how.once([n]) for n in changed)
    steps = order(a, b, how)
    assert steps is not None and steps[-1].same(b)
    a, b = _passing(False, True), _passing(True, True)
    assert a.same_structure(b)
    how = uses(a)
    changed = [n for n in a.sets if a.sets[n].elements != b.sets[n].elements]
    assert changed and all(how.sets[n] == UNKNOWN and not how.once([n]) for n in changed)
    assert order(a, b, how) is None


def test_logged_verdict_chains_count_as_their_verdict_with_flow_logs() -> None:
    """With flow logs the renderer's verdicts go through `l_` chains (`log group ...
    snaplen 128 prefix ...` then the verdict): each is one plain verdict, so a map's
    `goto l_...` elements are ranked as accept or drop, as without flow logs, and
    both_sets is still two commits, not a middle one or a full replace."""
    def table(moved: bool) -> Ruleset:
        client = {"bad": "yes", "good": "yes"} if moved else {"role": "client"}
        return render(calculate(snap(
            hep("db", "n1", "198.18.7.2", {"app": "db"}, iface="v1"),
            hep("client", "n2", "198.18.7.1", client),
            hep("other", "n3", "198.18.9.9", {"bad": "yes", "good": "yes"}),
            gnp("deny", {"selector": "app == 'db'", "order": 1, "ingress": [
                {"action": "Deny", "protocol": "UDP", "source": {"selector": "bad == 'yes'"},
                 "destination": {"ports": [5002]}}, {"action": "Log", "protocol": "TCP"}]}),
            gnp("allow", {"selector": "app == 'db'", "order": 2, "ingress": [
                {"action": "Allow", "protocol": "UDP",
                 "source": {"selector": "good == 'yes'"}},
                {"action": "Allow", "protocol": "UDP", "destination": {"ports": [5001]}}]})),
            "n1", {}, Failsafes.off()), flow_logs=FlowLogging())
    a, b = table(False), table(True)
    logged = [c for c in a.chains.values() if c.name.startswith("l_")]
    assert logged and all("snaplen" in c.rules[0] for c in logged)
    how = uses(a)
    assert {c.name for c in logged} <= set(how.finals)
    steps = order(a, b, how)
    assert steps is not None and len(steps) == 2 and steps[-1].same(b)


@pytest.mark.parametrize(("cpus", "slept"), [(2, []), (1, [replace.GRACE_FALLBACK])])
def test_the_grace_period_waits_with_one_cpu_too(monkeypatch: pytest.MonkeyPatch, cpus: int,
                                                 slept: list[float]) -> None:
    """membarrier(MEMBARRIER_CMD_GLOBAL) returns at once with one CPU online, where a
    packet preempted in the output hook of a preemptible kernel could still be in the
    old rules: the grace period is then a wait, as where membarrier is missing."""
    waits: list[float] = []
    monkeypatch.setattr(replace, "_online_cpus", lambda: cpus)
    monkeypatch.setattr(replace.time, "sleep", waits.append)
    replace.grace_period()
    assert waits == slept
