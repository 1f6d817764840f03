"""DNS snooping in the agent: answers from the trusted resolvers fill the domain sets.

    read     the NFLOG group the table logs DNS to (`dns.nflogGroup`, whole packets,
             each sent by the kernel at once), on the event loop as it arrives
    learn    an answer from a trusted server: its records on the CNAME chain go into the
             name cache (`bulkhead.observe.dns`)
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

No delay: felix can hold the answer (or the first packet after it) until the set holds
the address, through NFQUEUE; this kernel has no NFQUEUE, so the answer reaches the
client while the agent writes the element. A client that connects faster than that has
its first packet judged without the address (dropped, then retransmitted and allowed).
`answerToKernel` in /metrics measures the window (docs/dns.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bulkhead.agent.config import DnsSettings
from bulkhead.dataplane.nftables.netlink import Change, NftNetlink, timed_elements
from bulkhead.dataplane.nftables.render import DnsSnooping
from bulkhead.dataplane.nftables.ruleset import Ruleset
from bulkhead.netlink import NetlinkError
from bulkhead.observe.dns import DnsPacket, NotDns, parse_packet
from bulkhead.observe.nflog import LoggedPacket
from bulkhead.policy.names import NameCache
from bulkhead.policy.rules import domain_matches

log = logging.getLogger("bulkhead.agent.dns")

RESOLV_CONF = Path("/etc/resolv.conf")
CACHE_FILE = "dns-cache.json"
# What glibc asks when resolv.conf names no server.
NO_NAMESERVER = ("127.0.0.1", "::1")
LATENCIES = 2048          # answer -> kernel samples kept for the percentiles


def resolv_servers(path: Path = RESOLV_CONF) -> tuple[str, ...]:
    """The `nameserver` addresses of a resolv.conf (zone ids dropped), or glibc's
    default when it names none or cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return NO_NAMESERVER
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                found.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
    return tuple(dict.fromkeys(found)) or NO_NAMESERVER


def snooping(settings: DnsSettings, resolv_conf: Path = RESOLV_CONF) -> DnsSnooping:
    """What the table logs for the agent: DNS with the trusted servers."""
    servers = settings.trusted_servers or resolv_servers(resolv_conf)
    return DnsSnooping(servers, settings.group)


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


class DnsSnooper:
    def __init__(self, settings: DnsSettings, snoop: DnsSnooping, state_dir: Path,
                 table: str = "bulkhead", netns: str = "") -> None:
        self.settings = settings
        self.trusted = frozenset(ipaddress.ip_address(a) for a in snoop.servers)
        self.snaplen = snoop.snaplen
        self.cache = NameCache(settings.extra_ttl, settings.max_names)
        self.path = state_dir / CACHE_FILE
        self.table = table
        self.netns = netns
        self.counters = DnsCounters()
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.domain_sets: dict[str, tuple[str, ...]] = {}   # of the applied table
        self.on_answer: Callable[[DnsPacket], None] | None = None   # for DNS logs, tests
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "bulkhead-dns")
        self._netlink: NftNetlink | None = None

    # -- the cache on disk --------------------------------------------------------------
    def load(self) -> None:
        try:
            count = self.cache.load(self.path, time.time())
        except (OSError, ValueError) as e:
            log.error("DNS name cache %s not read (starting empty): %s", self.path, e)
            return
        if count:
            log.info("DNS name cache loaded", extra={"fields": {"names": count}})

    def save(self) -> None:
        try:
            self.cache.save(self.path, time.time())
        except OSError as e:
            self.counters.save_failures += 1
            log.error("DNS name cache not saved to %s: %s", self.path, e.strerror or e)

    # -- the table ----------------------------------------------------------------------
    def timed(self, ruleset: Ruleset) -> dict[str, list[str]]:
        """The live elements of the ruleset's domain sets as nft text, for a table
        replaced whole (called from the enforcer's thread)."""
        now = time.time()
        out: dict[str, list[str]] = {}
        for name, addresses in self._elements(ruleset.domain_sets, now).items():
            out[name] = [f"{a} timeout {ms}ms" for a, ms in sorted(addresses)]
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
            items = [(a, int((expiry - now) * 1000) + 1)
                     for a, expiry in self.cache.addresses(patterns, now, pool).items()
                     if ipaddress.ip_address(a).version == family and expiry > now]
            if items:
                out[set_name] = items
        return out

    def applied(self, domain_sets: Mapping[str, tuple[str, ...]], full: bool) -> None:
        """A table is in the kernel: its domain sets from now on. Replaced whole, it
        gets every live element again (answers may have come while it was written)."""
        self.domain_sets = dict(domain_sets)
        if full and self.domain_sets:
            self._submit(self._elements(self.domain_sets, time.time()), None)

    def _submit(self, elements: Mapping[str, list[tuple[str, int]]],
                answered_at: float | None) -> concurrent.futures.Future[None] | None:
        changes = [Change(name, add=timed_elements(6 if name.startswith("d6_") else 4,
                                                   items))
                   for name, items in sorted(elements.items())]
        changes = [c for c in changes if c.add]
        if not changes:
            return None
        return self._writer.submit(self._write, changes, answered_at)

    def _write(self, changes: list[Change], answered_at: float | None) -> None:
        try:
            if self._netlink is None:
                self._netlink = NftNetlink(self.netns, timeout=10.0)
            self._netlink.apply(self.table, changes)
        except NetlinkError as e:
            self.counters.write_failures += 1
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None
            log.warning("domain set elements not written: %s", e)
            return
        self.counters.elements_written += sum(len(c.add) for c in changes)
        if answered_at is not None:
            self.latencies.append(max(0.0, time.time() - answered_at))

    # -- packets ------------------------------------------------------------------------
    def packets(self, packets: Iterable[LoggedPacket]
                ) -> concurrent.futures.Future[None] | None:
        """Learn from logged DNS packets; the future of the element write they caused."""
        now = time.time()
        touched: set[str] = set()
        answered_at: float | None = None
        for packet in packets:
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
                continue
            self.counters.answers += 1
            if message.records:
                touched |= self.cache.learn(message.records, now)
                answered_at = message.timestamp if answered_at is None \
                    else min(answered_at, message.timestamp)
            if self.on_answer is not None:
                self.on_answer(message)
        if not touched or not self.domain_sets:
            return None
        return self._submit(self._elements(self.domain_sets, now, touched), answered_at)

    def flush(self) -> int:
        """Forget every name, empty the kernel's domain sets, remove the saved cache."""
        count = self.cache.flush()
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
        return {
            "dnsAnswers": self.counters.answers, "dnsQueries": self.counters.queries,
            "dnsUntrusted": self.counters.untrusted, "dnsMalformed": self.counters.malformed,
            "dnsElementsWritten": self.counters.elements_written,
            "dnsWriteFailures": self.counters.write_failures,
            "dnsNflogOverruns": self.counters.overruns,
            "dnsCacheNames": len(self.cache), "dnsCacheEvicted": self.cache.evicted,
            "dnsCacheSaveFailures": self.counters.save_failures,
            "dnsFailures": self.counters.failures,
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

        loop.add_reader(nflog.fileno(), read)
        try:
            while not stopping():
                with contextlib.suppress(TimeoutError):
                    failure = await asyncio.wait_for(asyncio.shield(broken),
                                                     self.settings.save_interval)
                    raise RuntimeError(f"reading DNS packets failed: {failure!r}")
                self.cache.expire(time.time())
                await asyncio.to_thread(self.save)
        finally:
            loop.remove_reader(nflog.fileno())
            nflog.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.save)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None


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
