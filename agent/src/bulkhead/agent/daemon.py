"""The agent daemon: boot from the cache, follow the server, enforce, repair, report.

    boot     load STATE_DIR/snapshot.json and enforce it before any contact with the server
    sync     one streaming watch; a snapshot on first contact (or when the server's window
             no longer reaches our revision), then events; bursts coalesce (~50 ms) into
             one apply; a silent stream (no heartbeat) is dead; reconnect with backoff
    enforce  in a worker thread, one call at a time; on success write the cache; on
             EnforceError keep the previous state (the kernel still holds it) and report
    drift    every drift interval: enforcer.drift(), and repair() when it names a reason;
             a failed apply is retried then too, and while it keeps failing the drift
             check and repair go on against the last ruleset the kernel accepted
    status   after each apply and every status interval; best effort, never blocking
    flows    with flow logs on (`flowLogs.enabled`): the kernel's logs read, aggregated,
             spooled on disk and shipped to the server (agent/flowlogs.py)
    dns      with DNS snooping on (`dns`, the default with the nftables enforcer): answers
             from the trusted resolvers fill the domain sets (agent/dns.py)

Nothing here ever removes the ruleset: when the agent stops, or cannot reach the server,
the kernel keeps enforcing the last policy applied (fail static).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from bulkhead.agent import lock
from bulkhead.agent.cache import CacheError, cache_path, load_cache, save_cache
from bulkhead.agent.config import AgentConfig
from bulkhead.agent.enforcer import EnforceError, Enforcer, EnforceReport
from bulkhead.agent.flowlogs import FlowLogs
from bulkhead.agent.http import Disconnected, HttpError, Session, Timeout, TlsRefused
from bulkhead.agent.memory import SETTLE_EVERY, SETTLE_GAP, collector_paused, settle
from bulkhead.agent.metrics import MetricsServer, MetricsView
from bulkhead.agent.status import Counters, post_status, status_body
from bulkhead.agent.sync import (
    Backoff,
    ClientTls,
    DesiredState,
    Doc,
    LineQueue,
    SyncError,
    client_ssl_context,
    error_of,
    fetch_snapshot,
    open_session,
    watch_lines,
    watch_message,
)
from bulkhead.api import route
from bulkhead.client.certificates import certificate_problem

log = logging.getLogger("bulkhead.agent")
T = TypeVar("T")

# Errors that mean "the server cannot be reached or the stream broke": retry later.
# RecursionError: an answer nested deeper than the JSON decoder goes (a hostile server).
NETWORK_ERRORS = (HttpError, OSError, TimeoutError, SyncError, ValueError, RecursionError)


class AgentError(Exception):
    """A one-shot operation (--once, --dry-run) that could not be done."""


class RestartWatch(Exception):
    """Open the watch stream again, at once: the one open was made before the kernel
    tracked connections, and its packets may now be dropped as new ones."""


class Agent:
    def __init__(self, config: AgentConfig, enforcer: Enforcer, *, debounce: float = 0.05
                 ) -> None:
        self.config = config
        self.enforcer = enforcer
        self.debounce = debounce
        self.state = DesiredState()
        self.revision = -1              # how far we have read the server's history
        self.applied_revision = 0       # the revision the kernel holds (0: none yet)
        self.counters = Counters()
        self.connected = False
        self.object_errors: list[str] = []
        self.unenforced: list[str] = []   # the kernel's ruleset leaves these out
        self.apply_error: str | None = None
        self.repair_error: str | None = None
        self.cache_error: str | None = None
        self._applied: int | None = None   # the state's version at the last good apply
        self._render_again = False      # render even an unchanged state (DNS resolvers)
        self._in_sync = False           # the kernel holds exactly self.state
        self._since_settle = 0          # applies since the last memory.settle()
        self._settled = -SETTLE_GAP      # when it was (time.monotonic())
        self._settle_due = False        # an apply from scratch came since
        self._resume = False            # watch from self.revision (not on first start)
        self._backoff = Backoff()
        self._kernel = threading.Lock()  # one enforcer call at a time, even if abandoned
        self._apply_lock = asyncio.Lock()
        self._status_kick = asyncio.Event()
        self._stopping = False
        self._queue: LineQueue | None = None  # the open watch's lines
        self.tls: ClientTls | None = None  # the TLS context, renewed from disk (run())
        self.flow_retry = 5.0           # seconds before failed flow logs start again
        self.flow_logs = FlowLogs(config.flow_logs, config.node, config.failsafes,
                                  Path(config.state_dir), rule_hits=getattr(
                                      enforcer, "rule_hits", None),
                                  default_mode=config.enforcement) \
            if config.flow_logs else None
        self.dns: Any = None            # agent.dns.DnsSnooper, when the enforcer snoops
        snoop = getattr(enforcer, "dns", None)
        if config.dns is not None and snoop is not None:
            from bulkhead.agent.dns import DnsSnooper

            self.dns = DnsSnooper(config.dns, snoop, Path(config.state_dir),
                                  getattr(enforcer, "table", "bulkhead"))
            applier = getattr(enforcer, "applier", None)
            if applier is not None:
                applier.timed = self.dns.timed
        self.dns_logs: Any = None       # agent.dnslogs.DnsLogs: with snooping and flow logs
        if self.dns is not None and config.flow_logs is not None:
            from bulkhead.agent.dnslogs import DnsLogs

            self.dns_logs = DnsLogs(config.flow_logs, config.node, Path(config.state_dir))
            self.dns.on_answer = self.dns_logs.exchange
        if self.dns is not None and self.flow_logs is not None:
            cache, clock = self.dns.cache, self.dns.clock
            self.flow_logs.names = lambda ip: cache.names_for(str(ip), clock())

    # ---------------------------------------------------------------------- state
    @property
    def errors(self) -> list[str]:
        out = [e for e in (self.cache_error,) if e]
        out += self.object_errors
        out += self.unenforced
        out += [e for e in (self.apply_error, self.repair_error) if e]
        return out

    def status(self) -> dict[str, Any]:
        body = status_body(self.applied_revision, self.errors, self.counters)
        if self.flow_logs is not None:
            body["counters"].update(self.flow_logs.stats())
        if self.dns is not None:
            body["counters"].update(self.dns.stats())
        if self.dns_logs is not None:
            body["counters"].update(self.dns_logs.stats())
        return body

    def metrics_view(self) -> MetricsView:
        flows = self.flow_logs
        return MetricsView(self.config.node, self.applied_revision, self.revision,
                           self.connected, len(self.errors), self.counters,
                           flows.stats() if flows else {},
                           flows.hits() if flows else [],
                           {**(self.dns.stats() if self.dns else {}),
                            **(self.dns_logs.stats() if self.dns_logs else {})})

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an enforcer call in a worker thread, one at a time."""
        def locked() -> T:
            with self._kernel:
                return fn(*args)
        return await asyncio.to_thread(locked)

    # -------------------------------------------------------------------- enforce
    async def enforce_current(self, *, write_cache: bool = True) -> bool:
        """Enforce what `self.state` holds at `self.revision`; True if the kernel has it."""
        async with self._apply_lock:
            revision = self.revision
            version = self.state.version
            if self.apply_error is None and self._applied == version and \
                    not self._render_again:
                self.applied_revision = max(self.applied_revision, revision)
                self._in_sync = True
                return True
            # Built from the last snapshot and what changed since (see DesiredState).
            with collector_paused():
                snapshot, object_errors, changed = self.state.changes()
            if object_errors != self.object_errors:
                for message in object_errors:
                    log.error(message, extra={"fields": {"revision": revision}})
            self.object_errors = object_errors
            parts = self.state.cache_parts()
            # After a failed apply the kernel may hold anything older: tell it everything.
            told = changed if self._applied is not None and self.apply_error is None \
                and not self._render_again else None

            def apply() -> tuple[EnforceReport, str | None]:
                with collector_paused():   # what it makes due runs once the kernel has it
                    report = self.enforcer.enforce(snapshot, revision, told)
                self._since_settle += 1
                self._settle_due |= report.scratch
                self._settle_if_due()
                if not write_cache:
                    return report, None
                try:
                    save_cache(self.config.state_dir, self.config.node, revision,
                               parts=parts)
                except OSError as e:
                    return report, (f"cache {cache_path(self.config.state_dir)} not written: "
                                    f"{e.strerror or e}; a restart without the server "
                                    "would enforce an older policy")
                return report, None

            try:
                report, cache_problem = await self._call(apply)
            except Exception as e:
                self.counters.failures += 1
                kept = f"revision {self.applied_revision}" if self._applied is not None \
                    else "its previous ruleset"
                what = str(e) if isinstance(e, EnforceError) else f"internal error: {e!r}"
                self.apply_error = f"apply of revision {revision} failed: {what}; the " \
                                   f"kernel keeps {kept}"
                log.error(self.apply_error, exc_info=not isinstance(e, EnforceError),
                          extra={"fields": {"revision": revision}})
                self._status_kick.set()
                return False
            self.apply_error = None
            if self.flow_logs is not None:
                self.flow_logs.update(snapshot, report.decisions)
            if self.dns is not None:
                self.dns.applied(report.domain_sets, report.full)
                snoop = getattr(self.enforcer, "dns", None)
                if snoop is not None and snoop != self.dns.snoop:
                    self.dns.use(snoop)   # the resolvers the kernel's table now logs
            if self.dns_logs is not None:
                self.dns_logs.update(snapshot)
            self._applied = version
            self._render_again = False
            self.unenforced = list(report.unenforced)
            self._in_sync = self.state.version == version
            self.applied_revision = revision
            if write_cache:
                self.cache_error = cache_problem
            if cache_problem:
                log.error(cache_problem)
            self.counters.record(report)
            if report.created and self._queue is not None:
                self._queue.put_nowait(RestartWatch(
                    "the first ruleset turned connection tracking on; opening the watch "
                    "stream again, so its packets belong to a tracked connection"))
            for warning in report.warnings:
                log.warning(warning, extra={"fields": {"revision": revision}})
            log.info("applied", extra={"fields": {
                "revision": revision, "full": report.full, "changed": report.changed,
                "seconds": round(report.seconds, 4), "counts": report.counts,
                "invalid": len(self.object_errors)}})
            self._status_kick.set()
            return True

    async def boot_from_cache(self) -> bool:
        """Enforce the last-known-good policy from disk; False if there is none to use."""
        try:
            cached = load_cache(self.config.state_dir)
        except CacheError as e:
            self.cache_error = f"{e}; ignored"
            log.error(self.cache_error)
            return False
        if cached is None:
            log.warning("no cached policy yet: the kernel keeps what it has until the server "
                        "is reached", extra={"fields": {
                            "cache": str(cache_path(self.config.state_dir))}})
            return False
        self.state.replace(cached.items)
        self.revision = cached.revision
        log.info("enforcing the cached policy", extra={"fields": {
            "revision": cached.revision, "objects": len(cached.items)}})
        return await self.enforce_current(write_cache=False)

    # ----------------------------------------------------------------------- sync
    async def _sync_forever(self, session: Session) -> None:
        while not self._stopping:
            refused = False   # what a refused client certificate looks like
            try:
                await self._watch(session)
                reason = "the watch stream ended"
            except RestartWatch as e:
                log.info(str(e), extra={"fields": {"revision": self.revision}})
                self.connected = False
                self.counters.reconnects += 1
                continue
            except NETWORK_ERRORS as e:
                reason = str(e) or type(e).__name__
                refused = not self.connected and (isinstance(e, TlsRefused) or (
                    isinstance(e, Disconnected) and e.empty))
            if self.connected:
                self.connected = False
                self.counters.reconnects += 1
                log.warning("lost the server; enforcing revision %d until it is back",
                            self.applied_revision, extra={"fields": {"reason": reason}})
            delay = self._backoff.next()
            if self._backoff.attempt in (1, 2) or self._backoff.attempt % 10 == 0:
                fields = {"reason": reason, "attempt": self._backoff.attempt,
                          "retryIn": round(delay, 2), "server": self.config.server}
                # A server refuses a client certificate by closing the connection, which
                # says nothing of why: say what is wrong with this agent's own, if it is
                # (the one it presents, which the file on disk may no longer hold).
                problem = None
                if refused:
                    problem = self.tls.problem() if self.tls is not None else \
                        certificate_problem(self.config.cert, self.config.ca)
                if problem:
                    fields["certificate"] = problem
                log.warning("cannot reach the server; retrying", extra={"fields": fields})
            await asyncio.sleep(delay)

    async def _watch(self, session: Session) -> None:
        params = {"stream": "true", "timeout": str(self.config.heartbeat_interval)}
        if self._resume and self.revision >= 0:
            params["revision"] = str(self.revision)
        # No total or read timeout: the stream lives as long as it heartbeats, and
        # _consume ends it after a silent heartbeat_timeout; its answer must start by then.
        timeout = Timeout(total=None, connect=10, read=None)
        resp = await asyncio.wait_for(session.get(route("watch"), params=params,
                                                  timeout=timeout),
                                      self.config.heartbeat_timeout)
        async with resp:
            if resp.status != 200:
                raise SyncError(f"GET /v1/watch: {await error_of(resp)}")
            queue = LineQueue()
            reader = asyncio.create_task(watch_lines(resp, queue))
            self._queue = queue
            try:
                await self._consume(queue)
            finally:
                self._queue = None
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _consume(self, queue: LineQueue) -> None:
        loop = asyncio.get_running_loop()
        dirty_since: float | None = None
        last = 0.0
        while True:
            if dirty_since is None:
                wait = self.config.heartbeat_timeout
            else:  # coalesce a burst: apply after a quiet `debounce`, or 10 of them at most
                wait = max(0.0, min(last + self.debounce, dirty_since + 10 * self.debounce)
                           - loop.time())
            try:
                line = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if dirty_since is None:
                    raise SyncError(f"no heartbeat for {self.config.heartbeat_timeout:g} s; "
                                    "the stream is dead") from None
                dirty_since = None
                await self.enforce_current()
                continue
            try:
                changed = self._handle_line(line)
            except SyncError as e:
                line = e
            if isinstance(line, Exception):
                if dirty_since is not None:  # what arrived before the break is good
                    await self.enforce_current()
                raise line
            if changed:
                last = loop.time()
                if dirty_since is None:
                    dirty_since = last

    def _handle_line(self, line: bytes | Exception) -> bool:
        """Decode a line of the stream and fold it into the state; True if objects
        changed. (The decoded line lives only here: nothing of it is left when the
        apply it calls for runs.)"""
        if isinstance(line, Exception):
            return False
        message = watch_message(line)
        if not self.connected:
            self.connected = True
            self._backoff.reset()
            log.info("connected", extra={"fields": {"server": self.config.server}})
            self._status_kick.set()
        return self._handle(message)

    def _handle(self, message: Doc) -> bool:
        """Fold one line of the stream into the state; True if objects changed."""
        kind = message.get("type")
        revision = message.get("revision")
        if not isinstance(revision, int):
            raise SyncError(f"watch: a {kind} without a revision")
        if kind == "snapshot":
            items = message.get("items")
            if not isinstance(items, list):
                raise SyncError("watch: a snapshot without items")
            log.info("snapshot", extra={"fields": {"revision": revision,
                                                   "objects": len(items)}})
            self.state.replace(i for i in items if isinstance(i, dict))
            self.revision = revision
            self._resume = True
            self._in_sync = False
            return True
        if kind == "events":
            events = message.get("events")
            if not isinstance(events, list):
                raise SyncError("watch: events without a list of events")
            with collector_paused():
                self.state.apply(e for e in events if isinstance(e, dict))
            self.revision = max(self.revision, revision)
            self._in_sync = False
            return True
        if kind == "heartbeat":
            # Nothing of ours changed up to `revision` (other nodes' status reports move
            # the server's revision too): what the kernel holds is good up to there.
            if revision > self.revision:
                self.revision = revision
                if self._in_sync and self.apply_error is None:
                    self.applied_revision = revision
            return False
        log.debug("ignoring an unknown watch message", extra={"fields": {"type": kind}})
        return False

    # ---------------------------------------------------------------------- drift
    def _settle_if_due(self) -> None:
        """After an apply from scratch, at most every SETTLE_GAP seconds (one that came
        sooner is settled by the next apply or drift check), and every SETTLE_EVERY
        applies: see bulkhead.agent.memory. In the worker thread, under the kernel lock."""
        now = time.monotonic()
        if (self._settle_due and now - self._settled >= SETTLE_GAP) or \
                self._since_settle >= SETTLE_EVERY:
            settle()
            self._since_settle, self._settled, self._settle_due = 0, now, False

    async def _drift_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.drift_interval)
            await self.check_drift()
            if self._settle_due:
                await self._call(self._settle_if_due)

    async def check_drift(self) -> None:
        """Repair what drifted from the last ruleset the kernel accepted. While a newer
        apply fails, retry it first; if it fails again, the kernel is still judged (and
        repaired) against the last good one, which the enforcer keeps (a refused apply
        changes neither it nor the kernel)."""
        if await self._resolvers_changed():
            return
        if self.apply_error is not None:
            log.info("retrying the failed apply", extra={"fields": {"revision": self.revision}})
            if await self.enforce_current():
                return
        if self._applied is None:
            return  # nothing applied yet: nothing to compare with
        async with self._apply_lock:
            try:
                reason = await self._call(self.enforcer.drift)
            except Exception as e:
                log.error("drift check failed: %r", e, exc_info=True)
                return
            if reason is None:
                if self.repair_error is not None:
                    self.repair_error = None
                    self._status_kick.set()
                return
            log.warning("drift: the kernel does not hold what was applied; repairing",
                        extra={"fields": {"reason": reason,
                                          "revision": self.applied_revision}})
            try:
                report = await self._call(self.enforcer.repair)
            except Exception as e:
                self.counters.failures += 1
                self.repair_error = f"drift repair failed ({reason}): {e}"
                log.error(self.repair_error, exc_info=not isinstance(e, EnforceError))
            else:
                self.repair_error = None
                # A repair can plan again (the host's addresses changed): what it leaves
                # out is logged and reported, as an apply's is.
                self.unenforced = list(report.unenforced)
                for warning in report.warnings:
                    log.warning(warning, extra={"fields": {"revision": self.applied_revision}})
                if self.dns is not None:
                    self.dns.applied(report.domain_sets, report.full)
                self.counters.record(report, repair=True)
                log.info("repaired", extra={"fields": {"revision": self.applied_revision,
                                                       "seconds": round(report.seconds, 4),
                                                       "counts": report.counts}})
            self._status_kick.set()

    async def _resolvers_changed(self) -> bool:
        """resolv.conf names other resolvers (DNS snooping without trustedServers): the
        table is rendered again to log theirs, and their answers are trusted (the old ones'
        too until an apply puts the new ones in the kernel). True if that apply was made
        (whether it succeeded or not: a failure is retried like any other)."""
        use_dns = getattr(self.enforcer, "use_dns", None)
        if self.dns is None or use_dns is None:
            return False
        snoop = await asyncio.to_thread(self.dns.resolvers_changed)
        if snoop is None:
            return False
        log.warning("the trusted DNS resolvers changed (resolv.conf); rendering the table "
                    "again", extra={"fields": {"servers": list(snoop.servers)}})
        old = self.dns.snoop
        self.dns.use(dataclasses.replace(snoop, servers=tuple(
            dict.fromkeys([*old.servers, *snoop.servers]))))
        async with self._apply_lock:
            use_dns(snoop)
            self._render_again = True
        await self.enforce_current()
        return True

    # ---------------------------------------------------------------------- flows
    async def _forever(self, what: str, run: Callable[[], Any], counters: Any) -> None:
        """A side loop (flow logs, DNS snooping), started again after any failure (its
        `counters.failures` counts them): it never stops enforcement."""
        while not self._stopping:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                counters.failures += 1
                log.error("%s failed; starting again in %.0f s (enforcement goes on): %r",
                          what, self.flow_retry, e, exc_info=True)
                await asyncio.sleep(self.flow_retry)

    async def _flows_forever(self, session: Session) -> None:
        flows = self.flow_logs
        assert flows is not None
        await self._forever("flow logs", lambda: flows.run(session, lambda: self._stopping),
                            flows.counters)

    # ------------------------------------------------------------------------ dns
    async def _dns_forever(self) -> None:
        dns = self.dns
        assert dns is not None
        await self._forever("DNS snooping", lambda: dns.run(lambda: self._stopping),
                            dns.counters)

    async def flush_dns(self) -> int:
        """Forget the learned names and empty the kernel's domain sets (SIGUSR1)."""
        if self.dns is None:
            return 0
        return await asyncio.to_thread(self.dns.flush)

    # --------------------------------------------------------------------- status
    async def _status_forever(self, session: Session) -> None:
        failing = False
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_kick.wait(), self.config.status_interval)
            self._status_kick.clear()
            try:
                await post_status(session, self.config.node, self.status())
            except NETWORK_ERRORS as e:
                self.counters.status_failures += 1
                if not failing:
                    log.warning("status report failed; enforcement goes on", extra={
                        "fields": {"reason": str(e) or type(e).__name__}})
                failing = True
            else:
                if failing:
                    log.info("status reports resumed",
                             extra={"fields": {"appliedRevision": self.applied_revision}})
                failing = False

    # ------------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event) -> None:
        """The daemon, until `stop` is set. The ruleset stays in the kernel afterwards."""
        with self._locked():
            await self._run(stop)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Held: the running agent's mark (bulkhead.agent.lock). `--release` refuses while
        it is held, and so does a second agent on the same state directory (AgentError),
        which would otherwise put back its own ruleset at every drift check, and the first
        one its own. Without it, with a warning, if the lock file cannot be made."""
        held: IO[bytes] | None = None
        try:
            held = lock.take(self.config.state_dir)
        except lock.Held as e:
            raise AgentError(f"{e}: not starting a second agent on state directory "
                             f"{self.config.state_dir}; stop that one first") from None
        except OSError as e:
            log.warning("running without the agent's lock: %s", e)
        try:
            yield
        finally:
            if held is not None:
                held.close()

    async def _run(self, stop: asyncio.Event) -> None:
        if self.dns is not None:
            await asyncio.to_thread(self.dns.load)   # before the cached table is applied
        await self.boot_from_cache()
        self.tls = ClientTls(self.config)   # after the cache: a bad file still boots
        metrics = MetricsServer(self.metrics_view)
        address = self.config.metrics_address()
        if address is not None:
            try:
                await metrics.start(*address)
            except OSError as e:
                log.error("metrics not served: %s", e,
                          extra={"fields": {"listen": self.config.metrics_listen}})
        session = open_session(self.config, self.tls)   # renewed files: new connections
        tasks = [asyncio.create_task(self._sync_forever(session), name="sync"),
                 asyncio.create_task(self._drift_forever(), name="drift"),
                 asyncio.create_task(self._status_forever(session), name="status")]
        if self.flow_logs is not None:
            tasks.append(asyncio.create_task(self._flows_forever(session), name="flows"))
        if self.dns is not None:
            tasks.append(asyncio.create_task(self._dns_forever(), name="dns"))
        if self.dns_logs is not None:
            dns_logs = self.dns_logs
            tasks.append(asyncio.create_task(self._forever(
                "DNS logs", lambda: dns_logs.run(session, lambda: self._stopping),
                dns_logs.counters), name="dns-logs"))
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stopping, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # a loop that ended: re-raise what ended it
        finally:
            # Cancel until every loop has ended: in Python 3.11 `wait_for` can swallow a
            # cancellation that races with its inner call finishing; the loops also check
            # `_stopping`, so a second cancel always ends them.
            self._stopping = True
            pending: set[asyncio.Task[Any]] = {stopping, *tasks}
            while pending:
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=1.0)
            await session.close()
            await metrics.stop()
            if self.dns is not None:
                await asyncio.to_thread(self.dns.close)
            log.info("stopped; the ruleset stays in the kernel", extra={"fields": {
                "appliedRevision": self.applied_revision}})

    # ------------------------------------------------------------------- one-shot
    async def once(self) -> int:
        """Fetch the snapshot, enforce it, report status; the revision applied. Refused
        (AgentError) while an agent runs on the same state directory."""
        with self._locked():
            return await self._once()

    async def _once(self) -> int:
        ctx = client_ssl_context(self.config)
        async with open_session(self.config, ctx) as session:
            revision, items = await fetch_snapshot(session)
            self.state.replace(items)
            self.revision = revision
            ok = await self.enforce_current()
            try:
                await post_status(session, self.config.node, self.status())
            except NETWORK_ERRORS as e:
                if ok:
                    raise AgentError(f"applied revision {revision}, but the status report "
                                     f"failed: {e}") from None
            if not ok:
                raise AgentError(self.apply_error or "apply failed")
            return revision

    async def dry_run(self, offline: bool = False) -> tuple[int, str, str]:
        """(revision, ruleset text, diff against the kernel); changes nothing."""
        if offline:
            try:
                cached = load_cache(self.config.state_dir)
            except CacheError as e:
                raise AgentError(str(e)) from None
            if cached is None:
                raise AgentError(f"no cache at {cache_path(self.config.state_dir)} "
                                 "(--offline uses the last applied policy)")
            revision, items = cached.revision, cached.items
        else:
            ctx = client_ssl_context(self.config)
            async with open_session(self.config, ctx) as session:
                revision, items = await fetch_snapshot(session)
        self.state.replace(items)
        snapshot, self.object_errors = self.state.build()
        for message in self.object_errors:
            log.error(message)
        started = time.perf_counter()
        try:
            text, diff = await self._call(self.enforcer.dry_run, snapshot)
        except EnforceError as e:
            raise AgentError(f"dry run of revision {revision}: {e}") from None
        log.debug("dry run", extra={"fields": {
            "revision": revision, "seconds": round(time.perf_counter() - started, 4)}})
        return revision, text, diff
