"""The DNS name cache: which addresses a name stands for right now, learned from answers
(A, AAAA and CNAME records with their TTLs), shared by the agent (it fills the domain sets
from it, `bulkhead.agent.dns`) and the reference evaluator (`bulkhead explain --dns-cache`
reads an agent's saved cache: the names a destination address was resolved from).

    learn    each record goes in with its expiry: now + max(TTL + extra, MIN_TTL) seconds
             (felix: DNSExtraTTL, and at least 2 s)
    resolve  a name's addresses: its own A/AAAA records and those of the names its
             CNAMEs lead to; an address lives as long as the longest-lived path to it
             (each path as long as its shortest-lived link)

What felix does and this follows: the cache is the node's (any client's lookup opens the
address for every endpoint whose policy allows the name); an address two names share is
allowed for both, whichever resolved it. It is bounded (MAX_NAMES names, MAX_ENTRIES
addresses and CNAME targets in all, MAX_ADDRESSES per name): a flood of answers evicts
the names closest to expiry, a tenth at a time, counted, and never grows memory without
bound.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.policy.rules import domain_matches

MAX_CHAIN = 16              # CNAME links followed from a name
MIN_TTL = 2.0               # seconds an answer's address is kept at least (felix)
MAX_NAMES = 50_000          # names the cache holds
MAX_ENTRIES = 100_000       # addresses and CNAME targets of all names together
MAX_ADDRESSES = 64          # addresses (or CNAME targets) kept per name
# Names looked at for one address in `names_for` (a CDN address may be the answer of
# thousands of names): a flow carries at most these, whatever the cache holds.
MAX_NAMES_FOR = 256
# Names looked at per answer for the domain sets: the answer's own and those whose CNAMEs
# lead to them, nearest first. Without a bound, names that all alias one target (a
# local process resolving x1.evil.test ... x20000.evil.test, each a CNAME of one name)
# made each answer cost every earlier one: 112 s of CPU for 10,000 answers, on the
# agent's event loop. A name left out is looked at when its own answer comes (a client
# resolves a name before it connects to its address).
MAX_FANOUT = 1_024
MAX_MEMO = 10_000           # addresses whose names `names_for` keeps computed
EVICT_SHARE = 0.1           # over a bound, this share of the names goes at once
FUTURE_SLACK = 60.0         # seconds a saved cache may seem to come from the future
MAX_TTL = 2**31 - 1         # RFC 2181 section 8: a TTL with the top bit set means 0
CACHE_VERSION = 1
A, AAAA, CNAME = "A", "AAAA", "CNAME"


@dataclass(frozen=True)
class Record:
    """One A, AAAA or CNAME record of an answer: `value` is an address or a name."""

    name: str
    kind: str
    value: str
    ttl: int



@dataclass(frozen=True)
class Resolution:
    """Why an address is allowed for a name: the name asked, the chain to the address,
    and when the last link expires (seconds since the epoch)."""

    name: str
    address: str
    expiry: float
    via: tuple[str, ...] = ()    # CNAME targets between `name` and the address


class NameCache:
    """Names -> addresses and CNAME targets, each with its expiry (wall-clock seconds,
    so a saved cache means the same after a restart). Thread-safe: the agent's loop
    learns, the enforcer's thread reads when it replaces the table."""

    def __init__(self, extra_ttl: float = 0.0, max_names: int = MAX_NAMES,
                 max_entries: int | None = None) -> None:
        self.extra_ttl = extra_ttl
        self.max_names = max_names
        self.max_entries = max_entries if max_entries is not None else 2 * max_names
        self._entries = 0
        self.evicted = 0
        self._lock = threading.Lock()
        # name -> {address text: expiry}; name -> {CNAME target: expiry}
        self._addresses: dict[str, dict[str, float]] = {}
        self._aliases: dict[str, dict[str, float]] = {}
        self._referrers: dict[str, set[str]] = {}     # CNAME target -> names pointing to it
        self._owners: dict[str, set[str]] = {}        # address -> names with a record of it
        # Raised by every change of the cache: `names_for`'s answers hold while it stays.
        self._version = 0
        self._memo: dict[str, tuple[int, float, frozenset[str]]] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._addresses.keys() | self._aliases.keys())

    def expiry_of(self, ttl: float, now: float) -> float:
        ttl = 0 if not 0 <= ttl <= MAX_TTL else ttl
        return now + max(ttl + self.extra_ttl, MIN_TTL)

    # -- learning ---------------------------------------------------------------------
    def learn(self, records: Iterable[Record], now: float) -> set[str]:
        """Add an answer's records; the names whose addresses may have changed (each
        record's owner and every name whose CNAMEs lead to it)."""
        touched: set[str] = set()
        with self._lock:
            for r in records:
                table = self._aliases if r.kind == CNAME else self._addresses
                entries = table.setdefault(r.name, {})
                expiry = self.expiry_of(r.ttl, now)
                known = entries.get(r.value)
                if known is not None and known >= expiry:
                    continue    # already known for as long: nothing moves
                if known is None:
                    self._entries += 1
                entries[r.value] = expiry
                if r.kind == CNAME:
                    self._referrers.setdefault(r.value, set()).add(r.name)
                else:
                    self._owners.setdefault(r.value, set()).add(r.name)
                if len(entries) > MAX_ADDRESSES:
                    # The one that expires first goes; of those that expire together
                    # (one answer's), the newcomer: an answer keeps its first records,
                    # the addresses a client tries first.
                    oldest = min(entries, key=lambda v: (entries[v], v != r.value))
                    del entries[oldest]
                    self._entries -= 1
                    self._unlink(r.name, oldest, r.kind == CNAME)
                    self.evicted += 1
                touched.add(r.name)
            if touched:
                self._version += 1
            self._bound(now)
            return self._with_referrers(touched, MAX_FANOUT)

    def _with_referrers(self, names: Iterable[str], limit: int | None = None) -> set[str]:
        """`names` and the names whose CNAMEs lead to them, nearest first (`names`
        themselves, then their referrers, then theirs...): `limit` of them at most."""
        most = self.max_names if limit is None else limit
        out: set[str] = set()
        frontier: list[str] = []
        for name in names:
            if len(out) >= most:
                return out
            if name not in out:
                out.add(name)
                frontier.append(name)
        while frontier:
            nearer, frontier = frontier, []
            for name in nearer:
                for referrer in self._referrers.get(name, ()):
                    if referrer not in out:
                        if len(out) >= most:
                            return out
                        out.add(referrer)
                        frontier.append(referrer)
        return out

    def _unlink(self, name: str, value: str, alias: bool) -> None:
        """Forget that `name` points to `value` in the reverse indexes."""
        index = self._referrers if alias else self._owners
        linked = index.get(value)
        if linked is not None:
            linked.discard(name)
            if not linked:
                del index[value]

    def _bound(self, now: float) -> None:
        """Over a bound (names, or entries of all names): drop the expired entries, then,
        if still over, the tenth of the names that expire first (at once: a full cache
        sorts its names once per tenth, not once per answer)."""
        if len(self._addresses) + len(self._aliases) <= self.max_names \
                and self._entries <= self.max_entries:
            return      # cheap upper bounds: no union of the names on every answer
        self._expire(now)
        names = self._addresses.keys() | self._aliases.keys()
        if len(names) <= self.max_names and self._entries <= self.max_entries:
            return

        def last(name: str) -> float:
            return max([*self._addresses.get(name, {}).values(),
                        *self._aliases.get(name, {}).values()], default=0.0)

        ordered = sorted(names, key=last)
        cut = max(len(names) - self.max_names, int(len(names) * EVICT_SHARE), 1)
        for name in ordered[:cut]:
            self._drop(name)
            self.evicted += 1
        for name in ordered[cut:]:
            if self._entries <= self.max_entries:
                break
            self._drop(name)
            self.evicted += 1

    def _drop(self, name: str) -> None:
        self._version += 1
        for address in self._addresses.pop(name, {}):
            self._entries -= 1
            self._unlink(name, address, False)
        for target in self._aliases.pop(name, {}):
            self._entries -= 1
            self._unlink(name, target, True)

    def _expire(self, now: float) -> None:
        for table in (self._addresses, self._aliases):
            for name in list(table):
                entries = table[name]
                for value in [v for v, e in entries.items() if e <= now]:
                    self._version += 1
                    del entries[value]
                    self._entries -= 1
                    self._unlink(name, value, table is self._aliases)
                if not entries:
                    del table[name]

    def expire(self, now: float) -> None:
        with self._lock:
            self._expire(now)

    def flush(self) -> int:
        """Forget everything; the number of names forgotten."""
        with self._lock:
            count = len(self._addresses.keys() | self._aliases.keys())
            self._addresses.clear()
            self._aliases.clear()
            self._referrers.clear()
            self._owners.clear()
            self._entries = 0
            self._version += 1
            return count

    # -- reading ----------------------------------------------------------------------
    def resolve(self, name: str, now: float) -> dict[str, Resolution]:
        """The live addresses of `name` (address text -> how), through its CNAMEs."""
        with self._lock:
            return self._resolve(name, now)

    def _resolve(self, name: str, now: float) -> dict[str, Resolution]:
        """The widest path to each address (the one whose shortest-lived link lives
        longest), at most MAX_CHAIN CNAME links: one relaxation round per link, so a
        name with many CNAME targets costs rounds x links, never one walk per path."""
        reach: dict[str, tuple[float, tuple[str, ...]]] = {name: (float("inf"), ())}
        frontier = {name}
        for _ in range(MAX_CHAIN):
            changed: set[str] = set()
            for node in frontier:
                until, via = reach[node]
                for target, expiry in self._aliases.get(node, {}).items():
                    live = min(until, expiry)
                    if live <= now or target == name or target in via:
                        continue
                    if live > reach.get(target, (0.0, ()))[0]:
                        reach[target] = (live, (*via, target))
                        changed.add(target)
            if not changed:
                break
            frontier = changed
        best: dict[str, Resolution] = {}
        for node, (until, via) in reach.items():
            for address, expiry in self._addresses.get(node, {}).items():
                live = min(until, expiry)
                if live > now and (address not in best or best[address].expiry < live):
                    best[address] = Resolution(name, address, live, via)
        return best

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._addresses.keys() | self._aliases.keys())

    def addresses(self, patterns: Sequence[str], now: float,
                  names: Iterable[str] | None = None) -> dict[str, float]:
        """Address text -> expiry for every cached name (or only `names`) that matches
        one of `patterns`: what a domain set holds."""
        with self._lock:
            pool = self._addresses.keys() | self._aliases.keys() if names is None \
                else set(names)
            out: dict[str, float] = {}
            for name in pool:
                if not domain_matches(patterns, frozenset((name,))):
                    continue
                for address, how in self._resolve(name, now).items():
                    if out.get(address, 0.0) < how.expiry:
                        out[address] = how.expiry
            if names is not None:
                # Only some names moved; an address lives as long as any matching name
                # keeps it (an element written anew takes this timeout, even a shorter
                # one: another name's shorter TTL must not cut it). MAX_FANOUT of the
                # names that hold the address are looked at; past that (an address a
                # thousand names share) the agent's record of what it wrote keeps the
                # longer life (DnsSnooper._never_shorter).
                for address in out:
                    for owner in self._with_referrers(self._owners.get(address, ()),
                                                      MAX_FANOUT):
                        if domain_matches(patterns, frozenset((owner,))):
                            found = self._resolve(owner, now).get(address)
                            if found is not None and found.expiry > out[address]:
                                out[address] = found.expiry
            return out

    def reasons(self, address: str, now: float) -> list[Resolution]:
        """The cached names that resolve to `address` now, longest-lived first."""
        with self._lock:
            names = self._with_referrers(self._owners.get(address, ()))
            found = [how for n in names
                     if (how := self._resolve(n, now).get(address)) is not None]
        return sorted(found, key=lambda r: (-r.expiry, r.name))

    def names_for(self, address: str, now: float) -> frozenset[str]:
        """The names `address` was resolved from (and is still live for): what a flow to
        it carries as its destination's names for the reference evaluator. At most
        MAX_NAMES_FOR names are looked at; the answer is kept (one object, shared by the
        flows to the address) until the cache changes or one of the names lapses, so a
        first packet costs a lookup."""
        memo = self._memo.get(address)      # read without the lock: a stale read is redone
        if memo is not None and memo[0] == self._version and now < memo[1]:
            return memo[2]
        if address not in self._owners:     # the common case, without the lock
            return frozenset()
        with self._lock:
            owners = self._owners.get(address, set())
            names = self._with_referrers(itertools.islice(owners, MAX_NAMES_FOR),
                                         MAX_NAMES_FOR)
            found = [how for n in names
                     if (how := self._resolve(n, now).get(address)) is not None]
            result = frozenset(r.name for r in found)
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[address] = (self._version, min((r.expiry for r in found),
                                                      default=now + 1.0), result)
            return result

    # -- persistence ------------------------------------------------------------------
    def to_json(self, now: float, shift: float = 0.0) -> dict[str, Any]:
        """The live entries, their expiries plus `shift` (to the wall clock from the
        clock `now` is of)."""
        with self._lock:
            self._expire(now)
            return {"version": CACHE_VERSION, "saved": now + shift,
                    "addresses": {n: {v: x + shift for v, x in e.items()}
                                  for n, e in sorted(self._addresses.items())},
                    "aliases": {n: {v: x + shift for v, x in e.items()}
                                for n, e in sorted(self._aliases.items())}}

    def load_json(self, data: Mapping[str, Any], now: float, shift: float = 0.0,
                  refuse_future: bool = False) -> int:
        """Take a saved cache's live entries (a malformed one raises ValueError, and
        nothing is taken), their expiries plus `shift`; the number of names taken.
        `refuse_future`: a cache saved after this clock's now is refused (the agent's
        own, at start); a reader elsewhere (`explain`) takes it."""
        if not isinstance(data, Mapping) or data.get("version") != CACHE_VERSION:
            raise ValueError(f"not a version {CACHE_VERSION} name cache")
        saved = data.get("saved")
        if refuse_future and isinstance(saved, int | float) and \
                not isinstance(saved, bool) and saved > now - shift + FUTURE_SLACK:
            # Written later than this clock's now: the clock is behind (a host without a
            # battery-backed clock, before NTP). Its entries would live that much longer.
            raise ValueError(f"written {saved - (now - shift):.0f} s after this clock's "
                             "now (is the clock behind?); its entries would outlive "
                             "their TTL by as much")
        records: list[tuple[str, str, str, float]] = []
        for key, kind in (("addresses", A), ("aliases", CNAME)):
            table = data.get(key, {})
            if not isinstance(table, Mapping):
                raise ValueError(f"{key}: not a mapping")
            for name, entries in table.items():
                if not isinstance(name, str) or not isinstance(entries, Mapping):
                    raise ValueError(f"{key}: {name!r} is not a name with entries")
                for value, expiry in entries.items():
                    if not isinstance(value, str) or isinstance(expiry, bool) \
                            or not isinstance(expiry, int | float) \
                            or not math.isfinite(expiry):
                        raise ValueError(f"{key}.{name}: {value!r} -> {expiry!r}")
                    if kind == A:
                        ipaddress.ip_address(value)    # ValueError if not an address
                    records.append((name, kind, value, float(expiry) + shift))
        with self._lock:
            for name, kind, value, expiry in records:
                if expiry <= now:
                    continue
                table = self._aliases if kind == CNAME else self._addresses
                entries = table.setdefault(name, {})
                if value not in entries:
                    self._entries += 1
                entries[value] = min(expiry, now + MAX_TTL)
                index = self._referrers if kind == CNAME else self._owners
                index.setdefault(value, set()).add(name)
            self._bound(now)
            return len(self._addresses.keys() | self._aliases.keys())

    def save(self, path: Path, now: float, shift: float = 0.0) -> None:
        """Write the cache to `path` atomically (a temporary file renamed over it), its
        expiries plus `shift` (see `to_json`)."""
        text = json.dumps(self.to_json(now, shift), separators=(",", ":"))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    def load(self, path: Path, now: float, shift: float = 0.0,
             refuse_future: bool = False) -> int:
        """Read a cache written by `save` (its expiries plus `shift`); 0 if there is none.
        Raises ValueError for a file that is not one (nothing is taken from it)."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
        return self.load_json(data, now, shift, refuse_future)
