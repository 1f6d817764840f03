"""DNS snooping in the agent: answers from the trusted resolvers fill the domain sets.

    read     the NFLOG group the table logs DNS to (`dns.nflogGroup`, whole packets,
             each sent by the kernel at once), on the event loop as it arrives
    pair     a query to a trusted server waits (10 s at most, 10,000 at most) for its
             answer: same ends, ID and question
    learn    an answer from a trusted server to a query seen: its records on the CNAME
             chain go into the name cache (`bulkhead.policy.names`); an answer no query
             asked teaches nothing (one forged from off the path must guess the client's
             port and the ID first)
    write    for each domain set of the applied table whose patterns match a name the
             answer touched, that name's addresses with their remaining lifetime as the
             element timeout, in one netlink batch, from one worker thread (in order);
             the kernel drops an element when its timeout runs out, no sweep needed
    reseed   a table replaced whole gets the cache's live elements in the same
             transaction (`NftApplier.timed`), and again right after (answers that came
             while it was being written)
    save     every `cacheSaveInterval` and at exit: the cache to STATE_DIR/dns-cache.json,
             read back at start, so a restart keeps what was learned
    flush    SIGUSR1 to the daemon, or `bulkhead-agent --flush-dns-cache` when it is
             stopped: the cache and the kernel's domain sets are emptied

Holding (`dns.mode: DelayDNSResponse`, the default; felix's mode of that name, without
NFQUEUE): while the agent renews the element of the table's `dns_hold` set, the table
logs each answer whole and drops it; the agent writes the elements, then sends the answer
on through a raw socket, marked so the table lets it through, so the client connects
after the address is in the kernel. The element times out 3 s after the agent stops
renewing it (stopped, hung), and answers then pass at once: DNS never waits for a dead
agent. `NoDelay` leaves answers alone; a client that connects at once then mostly loses
its first packet (docs/dns.md has both measured).
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkhead.agent.config import DnsSettings
from bulkhead.dataplane.nftables.netlink import Change, Element, NftNetlink, timed_elements
from bulkhead.dataplane.nftables.render import (
    HOLD_PREFIX,
    HOLD_SET,
    RELEASE_MARK,
    DnsSnooping,
)
from bulkhead.dataplane.nftables.ruleset import Ruleset, timeout_text
from bulkhead.netlink import NetlinkError, inside_netns
from bulkhead.observe.dns import DnsPacket, NotDns, parse_packet
from bulkhead.observe.nflog import LoggedPacket
from bulkhead.policy.names import NameCache
from bulkhead.policy.rules import domain_matches

log = logging.getLogger("bulkhead.agent.dns")

RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved: its stub listeners, and the file it writes its upstream servers to.
# Programs that resolve through nss-resolve (Varlink) send no DNS to the stub: the only
# answers on the wire are the upstream servers' to resolved itself.
RESOLVED_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
CACHE_FILE = "dns-cache.json"
# What glibc asks when resolv.conf names no server.
NO_NAMESERVER = ("127.0.0.1", "::1")
LATENCIES = 2048          # answer -> kernel samples kept for the percentiles
HOLD_TIMEOUT_MS = 3000    # the hold element's lifetime; renewed every HOLD_RENEW seconds
HOLD_RENEW = 1.0
NFLOG_MAX_COPY = 0xFFFF - 4
SO_MARK = 36
IPV6_HDRINCL = 36
HOLD_KEY = (53).to_bytes(2, "big")
UDP = 17
MAX_PENDING = 10_000      # queries waiting for their answers
MAX_PENDING_CLIENT = 1_000   # of them, from one client address
PENDING_SECONDS = 10.0    # how long a query waits (resolvers give up after 5 s or so)
DELAY_RESPONSE = "DelayDNSResponse"


def _nameservers(path: Path) -> list[str] | None:
    """The `nameserver` addresses of a resolv.conf (zone ids dropped); None if it
    cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
    return found


def resolv_servers(path: Path = RESOLV_CONF,
                   upstream: Path = RESOLVED_UPSTREAM) -> tuple[str, ...]:
    """The `nameserver` addresses of a resolv.conf (zone ids dropped), or glibc's
    default when it names none or cannot be read. When it names systemd-resolved's stub,
    the servers resolved asks (`upstream`) too: a program that resolves through
    nss-resolve asks resolved over Varlink, and only resolved's own queries go out."""
    found = _nameservers(path) or []
    if RESOLVED_STUBS.intersection(found):
        found += _nameservers(upstream) or []
    return tuple(dict.fromkeys(found)) or NO_NAMESERVER


def resolv_files_seen(*paths: Path) -> tuple[tuple[int, int, int] | None, ...]:
    """(inode, size, mtime) of each file, None for one that is absent."""
    seen: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
            seen.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            seen.append(None)
    return tuple(seen)


def snooping(settings: DnsSettings, resolv_conf: Path = RESOLV_CONF,
             upstream: Path = RESOLVED_UPSTREAM) -> DnsSnooping:
    """What the table logs for the agent: DNS with the trusted servers (answers held
    for the agent in DelayDNSResponse mode)."""
    servers = settings.trusted_servers or resolv_servers(resolv_conf, upstream)
    return DnsSnooping(servers, settings.group, hold=settings.mode == DELAY_RESPONSE)


def exchange_key(message: DnsPacket) -> tuple[Any, ...]:
    """What pairs an answer with its query: both ends, the ID and the question."""
    return (message.client, message.client_port, message.server, message.server_port,
            message.id, message.qname, message.qtype)


def percentile(values: Iterable[float], fraction: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class DnsCounters:
    answers: int = 0              # answers from trusted servers read
    queries: int = 0
    untrusted: int = 0            # DNS from a server not trusted (ignored)
    malformed: int = 0            # logged packets that were not DNS
    elements_written: int = 0     # domain-set elements sent to the kernel
    write_failures: int = 0       # element batches the kernel refused
    overruns: int = 0             # times the kernel dropped logged packets (full buffer)
    save_failures: int = 0
    failures: int = 0             # times snooping failed and was started again
    unsolicited: int = 0          # answers to no query seen (learned from: nothing)
    unanswered: int = 0           # queries that got no answer in PENDING_SECONDS
    queries_dropped: int = 0      # queries not kept (a client over its share, a full table)
    released: int = 0             # held answers sent on
    release_failures: int = 0     # held answers that could not be sent on (lost)


class SteadyClock:
    """Unix seconds that move with the monotonic clock: the wall clock's reading when
    made, then never stepped (NTP, `date -s`). The name cache's expiries, and the
    kernel's element timeouts taken from them, are in it: a step of the wall clock back
    would keep names in the kernel past their TTL by the step, one forward would drop
    them all at once. Like the kernel's timeouts (jiffies), it does not count time
    suspended, so the cache and the sets agree after a sleep. The cache on disk is in
    wall-clock time (`wall_shift`), as `bulkhead explain` and the next start read it."""

    def __init__(self) -> None:
        self._offset = time.time() - time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() + self._offset

    def wall_shift(self) -> float:
        """What to add to one of its times for the wall clock's."""
        return time.time() - self()


class DnsSnooper:
    def __init__(self, settings: DnsSettings, snoop: DnsSnooping, state_dir: Path,
                 table: str = "bulkhead", netns: str = "") -> None:
        self.settings = settings
        self.snoop = snoop
        self.trusted: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] = frozenset()
        self.use(snoop)
        # Without trustedServers, the resolvers are /etc/resolv.conf's: read again at each
        # drift check when its (inode, size, mtime) moved (`resolvers_changed`).
        self.resolv_conf = RESOLV_CONF
        self.resolved_upstream = RESOLVED_UPSTREAM   # read when resolv.conf names the stub
        self._resolv_seen: tuple[tuple[int, int, int] | None, ...] | None = None
        self.hold = snoop.hold
        self.snaplen = NFLOG_MAX_COPY if snoop.hold else snoop.snaplen
        self.cache = NameCache(settings.extra_ttl, settings.max_names)
        self.clock = SteadyClock()   # the cache's time: never stepped
        self.path = state_dir / CACHE_FILE
        self.table = table
        self.netns = netns
        self.counters = DnsCounters()
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.held: deque[float] = deque(maxlen=LATENCIES)   # answer -> sent on, seconds
        self.holding = False          # the hold element is being renewed
        self._raw: dict[int, socket.socket] = {}
        self.domain_sets: dict[str, tuple[str, ...]] = {}   # of the applied table
        # For DNS logs: each answer, with its query (None: unsolicited).
        self.on_answer: Callable[[DnsPacket, DnsPacket | None], None] | None = None
        self._pending: OrderedDict[tuple[Any, ...], DnsPacket] = OrderedDict()
        # Each client address's pending queries, oldest first (keys of `_pending`).
        self._pending_by_client: dict[Any, OrderedDict[tuple[Any, ...], None]] = {}
        self._retry: set[str] = set()
        self._retry_lock = threading.Lock()
        # What each domain set's elements were last written with (set -> address ->
        # expiry): a write for some names never gives an element a shorter life than the
        # kernel holds (another name may keep it alive: the cache looks at 1,024 of them).
        self._written: dict[str, dict[str, float]] = {}
        self._written_pruned: dict[str, int] = {}
        self._written_lock = threading.Lock()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "bulkhead-dns")
        self._netlink: NftNetlink | None = None

    # -- the trusted resolvers ----------------------------------------------------------
    def resolvers_changed(self) -> DnsSnooping | None:
        """With no `trustedServers` set: what the table should log now that resolv.conf
        names other servers (a DHCP renew, a VPN, resolvconf), or None if it names the
        same (or is unchanged since the last look: two stats). Called at each drift check;
        `use` takes it once applied."""
        if self.settings.trusted_servers:
            return None
        # Both files: behind resolved's stub, a DHCP renew changes only the upstream's.
        seen = resolv_files_seen(self.resolv_conf, self.resolved_upstream)
        if seen[0] is not None and seen == self._resolv_seen:
            return None
        self._resolv_seen = seen
        servers = resolv_servers(self.resolv_conf, self.resolved_upstream)
        if set(map(ipaddress.ip_address, servers)) == self.trusted:
            return None
        return dataclasses.replace(self.snoop, servers=servers)

    def use(self, snoop: DnsSnooping) -> None:
        """Trust the answers of `snoop`'s servers (the table now logs theirs)."""
        self.snoop = snoop
        self.trusted = frozenset(ipaddress.ip_address(a) for a in snoop.servers)

    # -- the cache on disk --------------------------------------------------------------
    def load(self) -> None:
        try:
            count = self.cache.load(self.path, self.clock(), -self.clock.wall_shift(),
                                    refuse_future=True)
        except (OSError, ValueError) as e:
            log.error("DNS name cache %s not read (starting empty): %s", self.path, e)
            return
        if count:
            log.info("DNS name cache loaded", extra={"fields": {"names": count}})

    def save(self) -> None:
        try:
            self.cache.save(self.path, self.clock(), self.clock.wall_shift())
        except OSError as e:
            self.counters.save_failures += 1
            log.error("DNS name cache not saved to %s: %s", self.path, e.strerror or e)

    # -- the table ----------------------------------------------------------------------
    def timed(self, ruleset: Ruleset) -> dict[str, list[str]]:
        """The live elements of the ruleset's domain sets as nft text, for a table
        replaced whole (called from the enforcer's thread)."""
        now = self.clock()
        out: dict[str, list[str]] = {}
        for name, addresses in self._elements(ruleset.domain_sets, now).items():
            out[name] = [f"{a} timeout {timeout_text(ms)}" for a, ms in sorted(addresses)]
        if self.holding and HOLD_SET in ruleset.sets:
            out[HOLD_SET] = [f"53 timeout {timeout_text(HOLD_TIMEOUT_MS)}"]
        return out

    def _elements(self, domain_sets: Mapping[str, tuple[str, ...]], now: float,
                  names: Iterable[str] | None = None) -> dict[str, list[tuple[str, int]]]:
        """Set name -> (address, timeout ms) for the sets' patterns, from every cached
        name or only `names`."""
        pool = None if names is None else list(names)
        out: dict[str, list[tuple[str, int]]] = {}
        for set_name, patterns in domain_sets.items():
            if pool is not None and not any(domain_matches(patterns, frozenset((n,)))
                                            for n in pool):
                continue
            family = 6 if set_name.startswith("d6_") else 4
            found = {a: expiry for a, expiry in self.cache.addresses(patterns, now, pool).items()
                     if ipaddress.ip_address(a).version == family and expiry > now}
            found = self._never_shorter(set_name, found, now, whole=pool is None)
            items = [(a, int((expiry - now) * 1000) + 1) for a, expiry in found.items()]
            if items:
                out[set_name] = items
        return out

    def _never_shorter(self, set_name: str, found: dict[str, float], now: float,
                       whole: bool) -> dict[str, float]:
        """`found` (address -> expiry) with each expiry at least the one last written to
        the set for the address; what is written is remembered. `whole`: every cached
        name was looked at (a table written whole): `found` is the set's content."""
        with self._written_lock:
            if whole:
                self._written[set_name] = dict(found)
                self._written_pruned[set_name] = len(found)
                return found
            written = self._written.setdefault(set_name, {})
            for address, expiry in found.items():
                kept = written.get(address, 0.0)
                if kept > expiry:
                    found[address] = kept
                else:
                    written[address] = expiry
            if len(written) > 2 * self._written_pruned.get(set_name, 0) + 1024:
                for address in [a for a, expiry in written.items() if expiry <= now]:
                    del written[address]
                self._written_pruned[set_name] = len(written)
            return found

    def applied(self, domain_sets: Mapping[str, tuple[str, ...]], full: bool) -> None:
        """A table is in the kernel: its domain sets from now on. Replaced whole, it
        gets every live element again (answers may have come while it was written)."""
        self.domain_sets = dict(domain_sets)
        with self._written_lock:
            for name in [n for n in self._written if n not in self.domain_sets]:
                del self._written[name]
        if full and self.domain_sets:
            self._submit(self._elements(self.domain_sets, self.clock()), None)

    def _submit(self, elements: Mapping[str, list[tuple[str, int]]],
                answered_at: float | None, release: Sequence[LoggedPacket] = (),
                names: frozenset[str] = frozenset()
                ) -> concurrent.futures.Future[None] | None:
        changes = [Change(name, add=timed_elements(6 if name.startswith("d6_") else 4,
                                                   items))
                   for name, items in sorted(elements.items())]
        changes = [c for c in changes if c.add]
        if not changes and not release:
            return None
        return self._writer.submit(self._write, changes, answered_at, list(release), names)

    def _send(self, changes: list[Change], quiet: bool = False) -> bool:
        try:
            if self._netlink is None:
                self._netlink = NftNetlink(self.netns, timeout=10.0)
            self._netlink.apply(self.table, changes)
        except Exception as e:   # NetlinkError, OSError (a socket), struct.error: never raise
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None
            (log.debug if quiet else log.warning)("DNS set elements not written: %s", e)
            return False
        return True

    def _write(self, changes: list[Change], answered_at: float | None,
               release: list[LoggedPacket], names: frozenset[str] = frozenset()) -> None:
        """In the writer thread: the elements, then the held answers that wait for them
        (sent on even if the write failed: an answer lost would cost the client a retry,
        a missing element only the first packet). A failed write's names are written
        again at the next tick (a caching resolver's next answer may teach nothing new)."""
        try:
            if changes:
                if self._send(changes):
                    self.counters.elements_written += sum(len(c.add) for c in changes)
                    if answered_at is not None:
                        self.latencies.append(max(0.0, time.time() - answered_at))
                else:
                    self.counters.write_failures += 1
                    with self._retry_lock:
                        self._retry |= names
        finally:
            for packet in release:
                self._release(packet)

    def _release(self, packet: LoggedPacket) -> None:
        """Send a held answer on, as it came (its own bytes), marked so the table lets
        it through; it goes out and back in over loopback to the client's socket."""
        try:
            sock = self._raw.get(packet.family)
            if sock is None:
                sock = self._raw[packet.family] = raw_socket(packet.family, self.netns)
            data = with_udp_checksum(packet.packet, packet.family)
            if packet.family == 4:
                sock.sendto(data, (str(packet.dst), 0))
            else:
                sock.sendto(data, (str(packet.dst), 0, 0, 0))
        except OSError as e:
            self.counters.release_failures += 1
            if self.hold:   # never hold what cannot be sent on: stop renewing
                self.hold = False
                log.error("a held DNS answer could not be sent on (%s); answers pass at "
                          "once from now on (NoDelay)", e.strerror or e)
            return
        self.counters.released += 1
        self.held.append(max(0.0, time.time() - packet.timestamp))

    def renew_hold(self) -> None:
        """In the writer thread: keep holding answers for HOLD_TIMEOUT_MS more."""
        # Quiet: before the first table (or with one that does not hold) this fails.
        self.holding = self._send(
            [Change(HOLD_SET, add=(Element(HOLD_KEY, timeout_ms=HOLD_TIMEOUT_MS),))],
            quiet=True)

    def stop_holding(self) -> None:
        """In the writer thread: answers pass at once from now on (no agent to send
        them on)."""
        self.holding = False
        self._send([Change(HOLD_SET, delete=(Element(HOLD_KEY),))], quiet=True)

    # -- packets ------------------------------------------------------------------------
    def packets(self, packets: Iterable[LoggedPacket]
                ) -> concurrent.futures.Future[None] | None:
        """Learn from logged DNS packets; the future of the element write they caused."""
        now = self.clock()
        touched: set[str] = set()
        answered_at: float | None = None
        release: list[LoggedPacket] = []
        for packet in packets:
            if packet.prefix == HOLD_PREFIX:
                # Held by the table until sent on: whatever it holds, it goes on.
                if len(packet.packet) < packet.length:
                    self.counters.release_failures += 1   # cut short: cannot be sent
                else:
                    release.append(packet)
            try:
                message = parse_packet(packet)
            except NotDns:
                self.counters.malformed += 1
                continue
            if message.server not in self.trusted:
                self.counters.untrusted += 1
                continue
            if not message.answer:
                self.counters.queries += 1
                self._asked(message, time.time())   # packets' timestamps are the wall's
                continue
            self.counters.answers += 1
            query = self._pending.pop(exchange_key(message), None)
            if query is not None:
                self._forget(query)
            if query is None:
                # No query from this host asked it (or none we saw): learn nothing. An
                # answer forged from off the path must guess the port and the ID first.
                self.counters.unsolicited += 1
            elif message.records:
                touched |= self.cache.learn(message.records, now)
                answered_at = message.timestamp if answered_at is None \
                    else min(answered_at, message.timestamp)
            if self.on_answer is not None:
                self.on_answer(message, query)
        elements = self._elements(self.domain_sets, now, touched) \
            if touched and self.domain_sets else {}
        return self._submit(elements, answered_at, release, frozenset(touched))

    def retry(self) -> concurrent.futures.Future[None] | None:
        """Write again the elements of names whose write failed."""
        with self._retry_lock:
            names, self._retry = self._retry, set()
        if not names or not self.domain_sets:
            return None
        return self._submit(self._elements(self.domain_sets, self.clock(), names), None,
                            names=frozenset(names))

    def _asked(self, query: DnsPacket, now: float) -> None:
        """Keep a query for its answer, PENDING_SECONDS at most: MAX_PENDING in all and
        MAX_PENDING_CLIENT per client address. A client over its share has its oldest
        query let go for the new one, and a full table leaves the new one out (both
        counted): one flooding client address never pushes out the queries of the others,
        and a process that leaves a thousand queries unanswered (names under a slow zone)
        does not shut out the other processes of its host, which share its address: their
        queries are the newest."""
        pending = self._pending
        while pending and next(iter(pending.values())).timestamp < now - PENDING_SECONDS:
            self._forget(pending.popitem(last=False)[1])
            self.counters.unanswered += 1
        key = exchange_key(query)
        if key in pending:
            return
        held = self._pending_by_client.setdefault(query.client, OrderedDict())
        if len(held) >= MAX_PENDING_CLIENT:
            oldest, _ = held.popitem(last=False)
            pending.pop(oldest, None)
            self.counters.queries_dropped += 1
        elif len(pending) >= MAX_PENDING:
            self.counters.queries_dropped += 1
            if not held:
                del self._pending_by_client[query.client]
            return
        pending[key] = query
        held[key] = None

    def _forget(self, query: DnsPacket) -> None:
        held = self._pending_by_client.get(query.client)
        if held is not None:
            held.pop(exchange_key(query), None)
            if not held:
                del self._pending_by_client[query.client]

    def flush(self) -> int:
        """Forget every name, empty the kernel's domain sets, remove the saved cache."""
        count = self.cache.flush()
        with self._written_lock:
            self._written.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        future = self._writer.submit(self._flush_sets, list(self.domain_sets))
        future.result(timeout=30)
        log.info("DNS name cache flushed", extra={"fields": {"names": count}})
        return count

    def _flush_sets(self, names: list[str]) -> None:
        flush_domain_sets(self.table, names, self.netns)

    def stats(self) -> dict[str, float]:
        p50, p99 = percentile(self.latencies, 0.5), percentile(self.latencies, 0.99)
        held = percentile(self.held, 0.99)
        return {
            "dnsAnswers": self.counters.answers, "dnsQueries": self.counters.queries,
            "dnsUntrusted": self.counters.untrusted, "dnsMalformed": self.counters.malformed,
            "dnsElementsWritten": self.counters.elements_written,
            "dnsWriteFailures": self.counters.write_failures,
            "dnsNflogOverruns": self.counters.overruns,
            "dnsCacheNames": len(self.cache), "dnsCacheEvicted": self.cache.evicted,
            "dnsCacheSaveFailures": self.counters.save_failures,
            "dnsFailures": self.counters.failures,
            "dnsUnsolicited": self.counters.unsolicited,
            "dnsUnanswered": self.counters.unanswered,
            "dnsQueriesDropped": self.counters.queries_dropped,
            "dnsReleased": self.counters.released,
            "dnsReleaseFailures": self.counters.release_failures,
            **({"dnsHeldP99Ms": round(held * 1000, 3)} if held is not None else {}),
            **({"dnsAnswerToKernelP50Ms": round(p50 * 1000, 3)} if p50 is not None else {}),
            **({"dnsAnswerToKernelP99Ms": round(p99 * 1000, 3)} if p99 is not None else {}),
        }

    # -- running ------------------------------------------------------------------------
    async def run(self, stopping: Callable[[], bool]) -> None:
        """Read DNS packets and save the cache until cancelled (or `stopping()`)."""
        from bulkhead.observe.nflog import NflogSocket

        loop = asyncio.get_running_loop()
        nflog = NflogSocket([self.settings.group], self.netns, copy_bytes=self.snaplen,
                            qthresh=1, keep_payload=True)
        broken: asyncio.Future[BaseException] = loop.create_future()

        def read() -> None:
            try:
                got = nflog.read(1000)
                self.counters.overruns = nflog.overruns
                if got:
                    self.packets(got)
            except Exception as e:
                if not broken.done():
                    broken.set_result(e)

        if self.hold:
            try:   # the raw sockets answers are sent on with, made before any is held
                for family in (4, 6):
                    if family not in self._raw:
                        self._raw[family] = raw_socket(family, self.netns)
            except OSError as e:
                self.hold = False
                log.error("DNS answers cannot be held (DelayDNSResponse): no raw socket to "
                          "send them on (%s; the agent needs CAP_NET_RAW); they pass at once "
                          "(NoDelay)", e.strerror or e)
        loop.add_reader(nflog.fileno(), read)
        writer = asyncio.wrap_future
        next_save = time.monotonic() + self.settings.save_interval
        try:
            while not stopping():
                # Answers are held only while this loop runs, and only while the table
                # has domain sets (without them there is nothing to wait for).
                if self.hold and self.domain_sets:
                    await writer(self._writer.submit(self.renew_hold))
                elif self.holding:   # holding given up, or nothing to hold for
                    await writer(self._writer.submit(self.stop_holding))
                retried = self.retry()
                if retried is not None:
                    await writer(retried)
                wait = HOLD_RENEW
                with contextlib.suppress(TimeoutError):
                    failure = await asyncio.wait_for(asyncio.shield(broken), wait)
                    raise RuntimeError(f"reading DNS packets failed: {failure!r}")
                if time.monotonic() >= next_save:
                    next_save = time.monotonic() + self.settings.save_interval
                    self.cache.expire(self.clock())
                    await asyncio.to_thread(self.save)
        finally:
            if self.hold or self.holding:
                with contextlib.suppress(Exception):
                    await writer(self._writer.submit(self.stop_holding))
            # Held answers still queued in the kernel's socket buffer are sent on.
            with contextlib.suppress(Exception):
                read()
            loop.remove_reader(nflog.fileno())
            nflog.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.save)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
        for sock in self._raw.values():
            sock.close()
        self._raw.clear()


def _ones_complement(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(array.array("H", data))   # native order; the sum is order-symmetric
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def with_udp_checksum(packet: bytes, family: int) -> bytes:
    """The IP packet with its UDP checksum computed anew. An answer that came over a veth
    may carry a partial one (the sender left it to offload, which never happened), and
    sent on over loopback it would be refused (UdpInCsumErrors). Packets that are not
    plain UDP (IPv6 extension headers) are returned as they are."""
    if family == 4:
        start = (packet[0] & 0x0F) * 4
        if len(packet) < start + 8 or packet[9] != UDP:
            return packet
        pseudo = packet[12:20] + struct.pack(">BBH", 0, UDP, len(packet) - start)
    else:
        start = 40
        if len(packet) < start + 8 or packet[6] != UDP:
            return packet
        pseudo = packet[8:40] + struct.pack(">IxxxB", len(packet) - start, UDP)
    segment = bytearray(packet[start:])
    segment[6:8] = b"\0\0"
    folded = _ones_complement(pseudo + bytes(segment))
    checksum = ~(socket.ntohs(folded) if sys.byteorder == "little" else folded) & 0xFFFF
    segment[6:8] = struct.pack(">H", checksum or 0xFFFF)
    return packet[:start] + bytes(segment)


def raw_socket(family: int, netns: str = "") -> socket.socket:
    """A socket that sends whole IP packets (the header included) of `family`, marked
    RELEASE_MARK, made in the namespace `netns` (CAP_NET_RAW)."""
    with inside_netns(netns):
        if family == 4:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        else:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, RELEASE_MARK)
    except OSError:
        sock.close()
        raise
    return sock


def flush_domain_sets(table: str, set_names: Iterable[str], netns: str = "") -> None:
    """Empty the named domain sets of `inet <table>` (with `nft flush set`)."""
    import subprocess

    names = sorted(set_names)
    if not names:
        return
    script = "".join(f"flush set inet {table} {n}\n" for n in names)
    argv = [*(["ip", "netns", "exec", netns] if netns else []), "nft", "-f", "-"]
    done = subprocess.run(argv, input=script, text=True, capture_output=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise NetlinkError(f"nft flush set: {done.stderr.strip()[:500]}", 0)


def flush_saved(state_dir: Path, table: str = "bulkhead", netns: str = ""
                ) -> tuple[int, int]:
    """For a stopped agent: remove the saved cache and empty the table's domain sets.
    (names forgotten, sets emptied)."""
    import json
    import subprocess

    path = state_dir / CACHE_FILE
    names = 0
    cache = NameCache()
    with contextlib.suppress(FileNotFoundError, ValueError):
        names = cache.load(path, time.time())
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    argv = [*(["ip", "netns", "exec", netns] if netns else []), "nft", "-j", "list", "sets",
            "table", "inet", table]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        return names, 0     # no table: nothing in the kernel to empty
    sets = [item["set"]["name"] for item in json.loads(done.stdout).get("nftables", [])
            if isinstance(item, dict) and isinstance(item.get("set"), dict)
            and str(item["set"].get("name", "")).startswith(("d4_", "d6_"))]
    flush_domain_sets(table, sets, netns)
    return names, len(sets)
