"""PowerShell without Windows: a real parser for the scripts, and a fake of the
NetSecurity module that runs them.

The parser is tree-sitter with its PowerShell grammar (PyPI: tree-sitter,
tree-sitter-powershell), so a script the agent emits is checked by a grammar written
for PowerShell, not by the code that wrote it.

`FakeNetSecurity` is a FAKE, standing in for what cannot run here: Windows PowerShell
with the NetSecurity module and a Windows Firewall. It keeps the group's rules and the
profiles in memory and runs only the shapes `bulkhead.dataplane.windows.powershell`
emits, read from the tree-sitter tree: the whole script as `& { ... }`,
`$ErrorActionPreference = 'Stop'` (and `$ProgressPreference`), try/catch with `throw`,
and the commands New-NetFirewallRule, Remove-NetFirewallRule, Set-NetFirewallProfile,
Write-Output (each with quoted-string arguments), piped to
Out-Null or not; the listing script is recognized as a whole and answered with
`listing_json` (the documented shape, not one captured on Windows), and so is the
interface listing (from `addresses`). Anything else fails
the test. Errors follow PowerShell's rules as far as these scripts need: with the
preference 'Stop' a cmdlet error ends the script unless a try catches it;
`-ErrorAction 'SilentlyContinue'` drops it; the runner raises RunnerError (with the
output printed so far) when the script ended in an error, as powershell.exe's exit
status and standard error would make the real runner do.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import tree_sitter
import tree_sitter_powershell

from bulkhead.agent.win_enforcer import RunnerError
from bulkhead.dataplane.windows import powershell
from bulkhead.dataplane.windows.powershell import PROFILES, ProfileState
from bulkhead.dataplane.windows.rules import FirewallRule


@functools.cache
def parser() -> tree_sitter.Parser:
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language()))


def parse(script: str) -> tree_sitter.Tree:
    return parser().parse(script.encode())


def walk(node: tree_sitter.Node) -> Iterator[tree_sitter.Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def syntax_errors(script: str) -> list[str]:
    """Every ERROR and MISSING node of the script's tree, with its line and column."""
    return [f"{n.start_point[0] + 1}:{n.start_point[1] + 1}: "
            f"{'MISSING' if n.is_missing else 'ERROR'} {n.type} {text(n)[:60]!r}"
            for n in walk(parse(script).root_node) if n.is_error or n.is_missing]


def text(node: tree_sitter.Node) -> str:
    return (node.text or b"").decode()


def literals(node: tree_sitter.Node) -> list[str]:
    """The strings a command argument holds: one quoted string or a comma list of them.
    Any other shape is not one powershell.py emits."""
    found = [powershell.unquote(text(n)) if n.type == "string_literal" else text(n)
             for n in walk(node) if n.type in ("string_literal", "decimal_integer_literal")]
    kinds = {n.type for n in walk(node)} - {"array_literal_expression", "unary_expression",
                                             "string_literal", "verbatim_string_characters",
                                             "integer_literal", "decimal_integer_literal",
                                             ","}
    if kinds or not found:
        raise AssertionError(f"an argument of a shape powershell.py does not emit: {text(node)!r}")
    return found


def command_of(node: tree_sitter.Node) -> tuple[str, dict[str, list[str]]]:
    """A command's name and its parameters with their values."""
    name = text(node.child_by_field_name("command_name") or node.children[0])
    params: dict[str, list[str]] = {}
    current: str | None = None
    elements = node.child_by_field_name("command_elements")
    for child in elements.children if elements else []:
        if child.type == "command_argument_sep":
            continue
        if child.type == "command_parameter":
            current = text(child)
            params[current] = []
        elif current is not None and not params[current]:
            params[current] = literals(child)
        else:            # a positional argument (Write-Output's)
            params.setdefault("", []).extend(literals(child))
            current = None
    return name, params


def _wildcard_match(pattern: str, name: str) -> bool:
    """PowerShell's wildcards as far as rule names need: `*`, `?`, `[...]`, a backtick
    escaping the next character; case-insensitive."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "`" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append("[" + re.escape(pattern[i + 1:end]).replace("\\-", "-") + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return re.fullmatch("".join(out), name, re.IGNORECASE | re.DOTALL) is not None


class CmdletError(Exception):
    pass


class Throw(Exception):
    pass


@dataclass
class FakeNetSecurity:
    """The fake NetSecurity module and firewall (see the module's docstring). `fail_new`:
    the New-NetFirewallRule call (counted from 1 over the fake's life) that fails;
    `fail_remove`: the Remove-NetFirewallRule call that fails."""

    rules: dict[str, FirewallRule] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    profiles: dict[str, ProfileState] = field(default_factory=lambda: {
        # Windows' own defaults: inbound blocked, outbound allowed.
        p: ProfileState(p, "True", "Block", "Allow") for p in PROFILES})
    # the host's interfaces and addresses (Get-NetIPAddress)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    fail_new: int | None = None
    fail_remove: int | None = None
    scripts: list[str] = field(default_factory=list)
    news: int = 0
    removes: int = 0
    stop: bool = False                 # $ErrorActionPreference is 'Stop'
    states: list[frozenset[str]] = field(default_factory=list)   # names after each command
    last_error: str = ""
    output: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ the runner
    def __call__(self, script: str) -> str:
        self.scripts.append(script)
        errors = syntax_errors(script)
        assert not errors, f"the script does not parse: {errors}"
        if script == powershell.list_script(tuple(self.profiles)):
            return self.listing()
        if script == powershell.interfaces_script():
            return json.dumps([{"InterfaceAlias": alias, "IPAddress": address}
                               for alias, addresses in self.addresses.items()
                               for address in addresses])
        self.stop = False
        self.output: list[str] = []
        try:
            self.block(parse(script).root_node)
        except (CmdletError, Throw) as e:
            raise RunnerError(f"fake PowerShell: {e}", "\n".join(self.output)) from None
        return "\n".join(self.output) + "\n"

    def listing(self) -> str:
        ours = [self.rules[n] for n in sorted(self.rules) if self.groups[n] == powershell.GROUP]
        return powershell.listing_json(ours, self.profiles.values(), self.disabled)

    # ---------------------------------------------------------------- the language
    def block(self, node: tree_sitter.Node) -> None:
        for child in node.children:
            if child.type in ("program", "statement_list", "statement_block",
                              "script_block_body"):
                self.block(child)
            elif child.type in ("{", "}", "comment"):
                continue
            elif child.type == "try_statement":
                self.try_statement(child)
            elif child.type == "flow_control_statement" and text(child) == "throw":
                raise Throw(self.last_error)
            elif child.type == "pipeline":
                self.pipeline(child)
            else:
                raise AssertionError(f"a statement powershell.py does not emit: {text(child)!r}")

    def try_statement(self, node: tree_sitter.Node) -> None:
        body = next(c for c in node.children if c.type == "statement_block")
        clauses = [c for c in walk(node) if c.type == "catch_clause"]
        assert len(clauses) == 1, "one catch clause expected"
        try:
            self.block(body)
        except CmdletError as e:
            self.last_error = str(e)
            self.block(next(c for c in clauses[0].children if c.type == "statement_block"))

    def pipeline(self, node: tree_sitter.Node) -> None:
        assignment = next((c for c in node.children if c.type == "assignment_expression"), None)
        if assignment is not None:
            left = text(assignment.children[0])
            values = [powershell.unquote(text(n)) for n in walk(assignment.children[-1])
                      if n.type == "string_literal"]
            if left == "$ErrorActionPreference":
                self.stop = values == ["Stop"]
            else:
                assert left == "$ProgressPreference", text(assignment)
            return
        chain = node.children[0]
        commands = [c for c in chain.children if c.type == "command"]
        invoked = [c for c in commands if c.children[0].type == "command_invokation_operator"]
        if invoked:          # & { ... }: the script as one statement
            assert len(commands) == 1, text(node)
            body = next(n for n in walk(invoked[0]) if n.type == "script_block_body")
            self.block(body)
            return
        names = [command_of(c)[0] for c in commands]
        assert len(commands) == 1 or names[1:] == ["Out-Null"], f"pipeline {text(node)!r}"
        name, params = command_of(commands[0])
        quiet = params.pop("-ErrorAction", ["Stop"]) == ["SilentlyContinue"]
        try:
            out = self.command(name, params)
        except CmdletError as e:
            if quiet:
                self.states.append(frozenset(self.rules))
                return
            # Without 'Stop' the error would not end the script (PowerShell's default,
            # Continue): the scripts always set it first.
            assert self.stop, f"{e}: without $ErrorActionPreference = 'Stop'"
            raise
        self.states.append(frozenset(self.rules))
        if len(commands) == 1:
            self.output += out

    # ---------------------------------------------------------------- the cmdlets
    def command(self, name: str, params: dict[str, list[str]]) -> list[str]:
        if name == "New-NetFirewallRule":
            self.new_rule(params)
            return []
        if name == "Remove-NetFirewallRule":
            self.removes += 1
            if self.removes == self.fail_remove:
                raise CmdletError("Remove-NetFirewallRule: injected failure")
            # -Name is a wildcard pattern (Microsoft's documentation of the cmdlet),
            # of any rule on the host, whatever its group.
            matched = {n: [r for r in self.rules if _wildcard_match(n, r)]
                       for n in params["-Name"]}
            missing = [n for n, found in matched.items() if not found]
            for found in matched.values():
                for n in found:
                    self.rules.pop(n, None)
                    self.groups.pop(n, None)
                    self.disabled.discard(n)
            if missing:
                raise CmdletError(f"Remove-NetFirewallRule: no rule named {missing[0]}")
            return []
        if name == "Set-NetFirewallProfile":
            for p in params["-Profile"]:
                self.profiles[p] = ProfileState(p, params["-Enabled"][0],
                                                params["-DefaultInboundAction"][0],
                                                params["-DefaultOutboundAction"][0])
            return []
        if name == "Write-Output" and set(params) == {""}:
            return params[""]
        raise AssertionError(f"a command powershell.py does not emit: {name} {params}")

    def new_rule(self, params: dict[str, list[str]]) -> None:
        self.news += 1
        if self.news == self.fail_new:
            raise CmdletError("New-NetFirewallRule: injected failure")

        def one(key: str, default: str | None = None) -> str | None:
            values = params.get(key)
            if values is None:
                return default
            assert len(values) == 1, f"{key}: {values}"
            return values[0]

        name = one("-Name") or ""
        if name in self.rules:
            raise CmdletError(f"New-NetFirewallRule: a rule named {name} exists")
        assert one("-Enabled") == "True" and one("-Profile") == "Any", params
        protocol_text = one("-Protocol", "Any") or "Any"
        protocol = None if protocol_text == "Any" else \
            powershell.PROTOCOL_NUMBERS.get(protocol_text.upper(), None)
        if protocol is None and protocol_text != "Any":
            protocol = int(protocol_text)
        if (params.get("-LocalPort") or params.get("-RemotePort")) and protocol not in (6, 17):
            raise CmdletError("New-NetFirewallRule: ports need protocol TCP or UDP")
        self.rules[name] = FirewallRule(
            name=name, direction=one("-Direction") or "", action=one("-Action") or "",
            protocol=protocol,
            local_addresses=tuple(params.get("-LocalAddress", ())),
            remote_addresses=tuple(params.get("-RemoteAddress", ())),
            local_ports=tuple(params.get("-LocalPort", ())),
            remote_ports=tuple(params.get("-RemotePort", ())),
            icmp_types=tuple(params.get("-IcmpType", ())),
            interface_alias=one("-InterfaceAlias"),
            description=one("-Description", "") or "",
            display_name=one("-DisplayName", "") or "")
        self.groups[name] = one("-Group") or ""
