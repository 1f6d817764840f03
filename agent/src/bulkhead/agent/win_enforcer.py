"""The Windows enforcer: calculate the node's plan, compile it to Windows Firewall rules,
apply them as one generation through PowerShell, and list the group back for drift.

The stages stay apart as on Linux: `bulkhead.policy.plan` calculates, a compile function
(by default `dataplane.windows.flatten` then `dataplane.windows.firewall`) turns the plan
into rules, `dataplane.windows.powershell` writes the scripts, and a runner, the only
part that touches Windows, runs them (`PowerShellRunner`: powershell.exe with the script
on standard input). Tests give a fake runner (tests/netsecurityfake.py).

A generation (`bulkhead-<gen>-<n>`) is added, then every other rule of the group
removed; a script that fails while adding removes what it added, so an EnforceError
leaves the previous generation enforced (powershell.py: the order and the transient).
"""

from __future__ import annotations

import difflib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import PureWindowsPath
from typing import IO

from bulkhead.agent.enforcer import EnforceError, EnforceReport
from bulkhead.dataplane.windows import firewall, powershell
from bulkhead.dataplane.windows.flat import Unsupported
from bulkhead.dataplane.windows.flatten import failsafe_flat, flatten
from bulkhead.dataplane.windows.powershell import (
    PROFILES,
    Listing,
    ListingError,
    RenderError,
    content,
)
from bulkhead.dataplane.windows.rules import FirewallRule
from bulkhead.model import EGRESS, ENFORCE, INGRESS, Snapshot
from bulkhead.policy import Failsafes
from bulkhead.policy.plan import NodePlan, calculate

Runner = Callable[[str], str]                  # a script in, its standard output back
Compile = Callable[[NodePlan], list[FirewallRule]]
Interfaces = Mapping[str, Sequence[str]]

RUN_TIMEOUT = 300.0     # seconds for one script (thousands of New-NetFirewallRule calls)
MAX_OUTPUT = 64 << 20   # bytes of a listing kept
MAX_STDERR = 1 << 20    # bytes of standard error kept (its tail is reported)
MAX_PROBLEM = 300       # characters of one drift problem (a rule may hold 10,000 addresses)
MAX_DRIFT = 4000        # characters of a drift report


class RunnerError(Exception):
    """The script did not run to its end: PowerShell failed, timed out or is missing.
    `stdout`: what it printed before (the apply's marks tell how far it got)."""

    def __init__(self, message: str, stdout: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout


class PowerShellRunner:
    """Runs a script with Windows PowerShell: `powershell.exe -NoProfile -NonInteractive
    -Command -`, the script on standard input (no length limit, nothing written to
    disk). In that mode PowerShell runs each statement as it reads it, like a console;
    the scripts are therefore one statement each (`& { ... }`, no empty line inside)
    followed by an empty line (powershell.py). Not run here: there is no Windows host."""

    def __init__(self, command: Sequence[str] | None = None,
                 timeout: float = RUN_TIMEOUT, max_output: int = MAX_OUTPUT) -> None:
        self.command = list(command) if command is not None else default_command()
        self.timeout = timeout
        self.max_output = max_output

    def __call__(self, script: str) -> str:
        # The scripts are ASCII (powershell.py: so that no code page PowerShell may read
        # them in changes what they say); the output is read leniently, as PowerShell
        # writes it in the console's code page, which need not be Python's.
        if not script.isascii():
            raise RunnerError("the script is not ASCII; not run")
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise RunnerError(f"cannot run {self.command[0]}: {e}") from None
        # Each stream read by a thread of its own, kept up to max_output bytes and the
        # rest read and dropped (so the process never blocks on a full pipe, and memory
        # stays bounded whatever it prints).
        out, err = _Drain(proc.stdout, self.max_output), _Drain(proc.stderr, MAX_STDERR)
        feed = threading.Thread(target=_feed, args=(proc.stdin, script.encode("ascii")),
                                daemon=True)
        for t in (out, err, feed):
            t.start()
        try:
            returncode = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for t in (out, err, feed):
                t.join(1.0)
            raise RunnerError(f"PowerShell did not finish in {self.timeout:g} s",
                              _text(out.data())) from None
        for t in (out, err, feed):
            t.join()
        stdout, stderr = _text(out.data()), _text(err.data())
        if returncode != 0 or stderr.strip():
            tail = (stderr.strip() or stdout.strip())[-2000:]
            raise RunnerError(f"PowerShell exited with {returncode}: {tail}", stdout)
        if out.overflow:
            raise RunnerError(f"PowerShell printed more than {self.max_output} bytes")
        return stdout


class _Drain(threading.Thread):
    """Reads a stream to its end, keeping the first `limit` bytes."""

    def __init__(self, stream: IO[bytes] | None, limit: int) -> None:
        super().__init__(daemon=True)
        self.stream, self.limit = stream, limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.overflow = False

    def run(self) -> None:
        if self.stream is None:
            return
        with self.stream:
            while chunk := self.stream.read(65536):
                room = self.limit - self.kept
                if len(chunk) > room:
                    self.overflow = True
                    chunk = chunk[:max(room, 0)]
                if chunk:
                    self.chunks.append(chunk)
                    self.kept += len(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _feed(stream: IO[bytes] | None, data: bytes) -> None:
    if stream is None:
        return
    try:
        with stream:
            stream.write(data)
    except OSError:         # the process ended before reading it all: its exit says why
        pass


def default_command(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Windows PowerShell by its full path under %SystemRoot%, not by name: Windows
    looks a bare name up in the running program's directory and the current directory
    before System32, and a powershell.exe put in either would run as SYSTEM."""
    root = PureWindowsPath(environ.get("SystemRoot") or "C:\\Windows")
    if not root.is_absolute():
        root = PureWindowsPath("C:\\Windows")
    exe = root / "System32" / "WindowsPowerShell" / "v1.0" / "powershell.exe"
    return [str(exe), "-NoProfile", "-NonInteractive", "-Command", "-"]


def _text(output: bytes | str | None) -> str:
    """PowerShell's output as text: UTF-8 where it is, anything else replaced (not an
    error: a listing's text is checked by its parser, the marks are ASCII)."""
    if output is None:
        return ""
    if isinstance(output, str):
        return output
    return output.decode("utf-8", errors="replace").replace("\r\n", "\n")


def _bounded(problems: Sequence[str]) -> str:
    """The problems joined (duplicates once), each cut to MAX_PROBLEM characters and the
    whole to MAX_DRIFT, saying how many were left out: a drift report goes to the log
    and the server, and one rule's text may be hundreds of kilobytes."""
    out: list[str] = []
    size = 0
    unique = list(dict.fromkeys(problems))
    for n, problem in enumerate(unique):
        text = problem if len(problem) <= MAX_PROBLEM else problem[:MAX_PROBLEM] + "..."
        if size + len(text) > MAX_DRIFT:
            out.append(f"and {len(unique) - n} more")
            break
        out.append(text)
        size += len(text) + 2
    return "; ".join(out)


def compile_plan(plan: NodePlan) -> list[FirewallRule]:
    """The node's rules: each endpoint's flattened policy per direction, compiled for
    each of its interfaces (one rule set for all of them when it has `*`).

    An endpoint with `*` beside endpoints with interfaces of their own is refused: on
    Linux an interface's own endpoint alone decides its traffic and the `*` endpoint the
    other interfaces' (the nftables dispatch), but a Windows Firewall rule without an
    interface alias applies on every interface, Block beating Allow, so the `*`
    endpoint's Blocks would deny there what the interface's own endpoint allows."""
    star = [e for e in plan.endpoints if "*" in e.interfaces]
    named = [(e.name, i) for e in plan.endpoints if "*" not in e.interfaces
             for i in e.interfaces]
    if star and named:
        shown = ", ".join(f"{name} ({iface})" for name, iface in named[:3]) + (
            f" and {len(named) - 3} more" if len(named) > 3 else "")
        raise Unsupported(f"HostEndpoint {star[0].name}", "interfaceName",
                          f'"*" beside HostEndpoint {shown} on this node: a Windows '
                          "Firewall rule for every interface also applies on those "
                          "interfaces, where their own HostEndpoint alone decides (as "
                          "on Linux); name the interfaces the '*' endpoint is for")
    # The failsafe ports on every interface, endpoint or not: the profile defaults the
    # agent sets block every interface, and on Linux the failsafes are accepted before
    # any endpoint's chain. Allows only: what they leave out is the endpoints' to decide.
    rules: list[FirewallRule] = []
    for direction in (INGRESS, EGRESS):
        rules += firewall.compile(failsafe_flat(plan, direction), direction,
                                  f"failsafe-{direction.lower()}", blocks="none")
    for endpoint in plan.endpoints:
        aliases: list[str | None] = [None] if "*" in endpoint.interfaces \
            else list(endpoint.interfaces)
        for direction in (INGRESS, EGRESS):
            flat = flatten(plan, endpoint, direction)
            for alias in aliases:
                name = f"{endpoint.name}-{direction.lower()}" + (f"-{alias}" if alias else "")
                rules += firewall.compile(flat, direction, name, interface_alias=alias)
    return rules


class WindowsFirewallEnforcer:
    def __init__(self, node: str, failsafes: Failsafes, runner: Runner | None = None,
                 compile: Compile | None = None,
                 interfaces: Callable[[], Interfaces] | None = None,
                 profiles: Sequence[str] = PROFILES, default_mode: str = ENFORCE) -> None:
        self.node = node
        self.failsafes = failsafes
        self.runner: Runner = runner or PowerShellRunner()
        self.compile: Compile = compile or compile_plan
        self.interfaces = interfaces or self.local_interfaces
        self.profiles = tuple(profiles)
        self.default_mode = default_mode
        self.revision = 0
        self.generation = 0                      # the last one applied by this process
        self.applied: list[FirewallRule] | None = None   # its rules, named
        self._wanted: list[FirewallRule] | None = None   # what they were made from
        self.warnings: list[str] = []            # the last plan's
        self.notes: list[str] = []               # the last plan's, logged only

    def local_interfaces(self) -> dict[str, list[str]]:
        """The host's interfaces and addresses (Get-NetIPAddress), which endpoints
        without `interfaceName` are found by, through their expectedIPs."""
        out = self._run(powershell.interfaces_script(), "reading the host's interfaces")
        try:
            return powershell.parse_interfaces(out)
        except ListingError as e:
            raise EnforceError(f"reading the host's interfaces: {e}") from None

    # ---------------------------------------------------------------- the stages
    def rules(self, snapshot: Snapshot) -> list[FirewallRule]:
        """The node's rules for `snapshot` (named by the compiler, not yet numbered)."""
        # Only endpoints without interfaceName need the host's addresses (one more
        # PowerShell run): read them only then.
        by_address = any(h.node == self.node and not h.interface_name
                         for h in snapshot.host_endpoints.values())
        plan = calculate(snapshot, self.node, self.interfaces() if by_address else {},
                         self.failsafes, default_mode=self.default_mode)
        self.warnings = list(plan.warnings)
        self.notes = list(plan.notes)
        try:
            rules = self.compile(plan)
            for rule in rules:
                powershell.canonical(rule)
        except Unsupported as e:
            raise EnforceError(f"not enforceable by Windows Firewall: {e}") from None
        except RenderError as e:
            raise EnforceError(f"cannot write the rules as PowerShell: {e}") from None
        return rules

    def _run(self, script: str, what: str) -> str:
        try:
            return self.runner(script)
        except RunnerError as e:
            raise EnforceError(f"{what}: {e}") from None

    def listing(self) -> Listing:
        """The group `bulkhead` as Windows holds it now."""
        out = self._run(powershell.list_script(self.profiles), "listing the firewall rules")
        try:
            return powershell.parse_listing(out)
        except ListingError as e:
            raise EnforceError(f"listing the firewall rules: {e}") from None

    def _apply(self, wanted: list[FirewallRule], revision: int) -> EnforceReport:
        start = time.perf_counter()
        listed = self.listing()
        current = self._current(listed)
        if current is not None and self._problems(listed, current, wanted) == []:
            # Already enforced (by this process, or by one before a restart): adopted.
            self.generation, self.revision = max(listed.generations()), revision
            self._wanted, self.applied = wanted, list(current)
            return self._report(revision, False, start, wanted)
        generation = max([self.generation, *listed.generations()]) + 1
        try:
            script = powershell.apply_script(wanted, generation, listed.rules, self.profiles)
        except RenderError as e:
            raise EnforceError(f"cannot write the rules as PowerShell: {e}") from None
        try:
            out = self.runner(script)
        except RunnerError as e:
            if not powershell.added(e.stdout, generation):
                raise EnforceError(f"applying generation {generation} for revision "
                                   f"{revision} failed; the previous rules stay: {e}") from None
            # The new rules are all in; rules of an older generation may be left, which
            # drift finds and repair removes.
            self.generation, self.revision = generation, revision
            self._wanted, self.applied = wanted, powershell.number(wanted, generation)
            raise EnforceError(f"generation {generation} for revision {revision} is "
                               f"enforced, but removing the older rules failed: {e}") from None
        if not powershell.applied(out, generation):
            raise EnforceError(f"applying generation {generation} for revision {revision}: "
                               "the script did not report its end")
        self.generation, self.revision = generation, revision
        self._wanted, self.applied = wanted, powershell.number(wanted, generation)
        report = self._report(revision, True, start, wanted)
        report.created = not listed.rules
        return report

    def _report(self, revision: int, changed: bool, start: float,
                rules: Sequence[FirewallRule]) -> EnforceReport:
        blocks = sum(r.action == powershell.BLOCK for r in rules)
        return EnforceReport(revision, changed, changed, time.perf_counter() - start,
                             {"rules": len(rules), "allow": len(rules) - blocks,
                              "block": blocks, "generation": self.generation},
                             list(self.warnings) + self.notes, scratch=True,
                             unenforced=list(self.warnings))

    def _current(self, listed: Listing) -> list[FirewallRule] | None:
        """The listed rules of the newest generation, or None when there are none."""
        generations = listed.generations()
        if not generations:
            return None
        newest = max(generations)
        return [r for r in listed.rules if powershell.generation_of(r.name) == newest]

    def _problems(self, listed: Listing, current: Sequence[FirewallRule],
                  wanted: Sequence[FirewallRule]) -> list[str]:
        """Why the group does not enforce `wanted` (the compiler's rules): empty when
        it does."""
        out = [f"a rule that is not the agent's spelling: {u}" for u in listed.unreadable]
        names = {r.name for r in current}
        out += [f"rule {r.name} of an older generation is left"
                if powershell.generation_of(r.name) is not None
                else f"rule {r.name} in the group is not the agent's"
                + (" (its name is a wildcard pattern to Remove-NetFirewallRule: the agent "
                   "leaves it, remove it by hand)" if powershell.has_wildcard(r.name) else "")
                for r in listed.rules if r.name not in names]
        out += [f"rule {n} is disabled" for n in sorted(listed.disabled)]
        want = sorted(map(repr, map(content, powershell.number(wanted, 1))))
        have = sorted(map(repr, map(content, current)))
        if want != have:
            lost = [w for w in want if w not in have]
            extra = [h for h in have if h not in want]
            out += [f"missing: {w}" for w in lost[:5]] + [f"not wanted: {h}" for h in extra[:5]]
            if not lost and not extra:
                out.append("rules are there a different number of times")
        seen = {p.name: p for p in listed.profiles}
        for name in self.profiles:
            p = seen.get(name)
            if p is None:
                out.append(f"profile {name} was not listed")
            elif not p.enforcing:
                out.append(f"profile {name}: enabled {p.enabled}, default inbound "
                           f"{p.default_inbound}, default outbound {p.default_outbound} "
                           "(wanted True, Block, Block)")
        return out

    # ---------------------------------------------------------------- the protocol
    def enforce(self, snapshot: Snapshot, revision: int,
                changed: Iterable[tuple[str, str]] | None = None) -> EnforceReport:
        """Bring the firewall to `snapshot`. `changed` is not used: Windows rules are
        compiled whole (flattening makes every rule depend on the ones before it)."""
        return self._apply(self.rules(snapshot), revision)

    def drift(self) -> str | None:
        """None while the group holds the last generation applied, unchanged, and the
        profiles still block by default; else what differs (the first few)."""
        if self._wanted is None or self.applied is None:
            return None
        listed = self.listing()
        current = [r for r in listed.rules
                   if powershell.generation_of(r.name) == self.generation]
        problems = self._problems(listed, current, self._wanted)
        applied = {r.name: powershell.canonical(r) for r in self.applied}
        found = {r.name: r for r in current}
        problems += [f"rule {n} was removed" for n in sorted(set(applied) - set(found))]
        problems += [f"rule {n} was changed" for n in sorted(set(applied) & set(found))
                     if applied[n] != found[n]]
        return _bounded(problems) or None

    def repair(self) -> EnforceReport:
        """Apply the last rules again, as a new generation."""
        if self._wanted is None:
            return EnforceReport(self.revision, False, False, 0.0, {}, [])
        return self._apply(self._wanted, self.revision)

    def dry_run(self, snapshot: Snapshot) -> tuple[str, str]:
        """The script the next apply would run, and a diff of the rules (without their
        generation names) from what the group holds to what it would hold."""
        wanted = self.rules(snapshot)
        listed = self.listing()
        current = self._current(listed) or []
        generation = max([self.generation, *listed.generations()]) + 1
        try:
            script = powershell.apply_script(wanted, generation, listed.rules, self.profiles)
            new_lines = sorted(map(powershell.rule_text, wanted))
            old_lines = sorted(map(powershell.rule_text, current))
        except RenderError as e:
            raise EnforceError(f"cannot write the rules as PowerShell: {e}") from None
        diff = "".join(difflib.unified_diff(
            [line + "\n" for line in old_lines], [line + "\n" for line in new_lines],
            "firewall group bulkhead (now)", f"generation {generation}"))
        return script, diff
