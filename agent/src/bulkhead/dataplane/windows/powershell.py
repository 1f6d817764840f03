"""Windows Firewall rules as PowerShell: one generation applied, the group listed back.

The agent never edits a rule in place. Each apply adds a new generation of rules named
`bulkhead-<generation>-<n>` to the group `bulkhead` (New-NetFirewallRule) and then removes
every other rule of the group (Remove-NetFirewallRule by a listed name set), so a failed
apply is undone by removing what it added, and drift is found by listing the group.

The transient. Windows Firewall has no order: a packet matching any Block rule is
blocked, else any Allow rule allows it, else the profile's default action (Block, set
here) does. While two generations' rules coexist the host enforces the union of their
Blocks against the union of their Allows, so a packet passes only if one generation
allows it and neither blocks it. The script orders the four steps so that the union
never holds an Allow without the Blocks that carve it:

1. add the new Blocks     allowed = old allowed minus the new Blocks (only narrows)
2. add the new Allows     allowed = (old Allows + new Allows) minus both generations' Blocks
3. remove the old Allows  allowed = new Allows minus both generations' Blocks (narrower
                          than the new generation)
4. remove the old Blocks  the new generation exactly

So the window (between 2 and 3) fails closed for whatever either generation blocks with
a Block rule, and fails open only for a packet one generation allows and the other
denies by the profile's default action alone: that packet was allowed before the apply
or is allowed after it, never neither. The fully closed order (remove the old Allows
before adding the new ones) was not chosen: it blocks everything in between, failsafes
and the agent's own connection to its server included, for as long as adding the new
Allows takes (docs/windows/agent.md).

Nothing half-applied: steps 1-2 run in a try block with `$ErrorActionPreference =
'Stop'`; on any error the catch removes the new generation's rules (those that made it)
and rethrows, so the previous generation stands alone, as before. Steps 3-4 only remove
rules; if one fails the new generation is complete and the leftovers are rules of an
older generation, which the next apply (or repair) removes.

Every value is a single-quoted PowerShell string ('' for a quote inside); characters a
single-quoted string cannot hold plainly (control and format characters, line
separators, PowerShell's typographic single quotes) are refused, naming the rule and
field. So is every character outside printable ASCII: the scripts are pure ASCII, so they
mean the same in whatever ASCII-compatible code page PowerShell reads its standard input
(the console's OEM code page, the ANSI one without a console, UTF-8), whatever encoding
Python wrote them in. Else a value could close its string once re-read: U+0452 written
as UTF-8 (D1 92) and read as Windows-1252 is U+00D1 U+2019, a typographic quote; and
U+00E2 U+20AC U+2122 written as Windows-1252 (E2 80 99) and read as UTF-8 is U+2019. The
values the agent writes are ASCII anyway (policy, tier and interface names are checked as
such by the model); only an interface alias found on the host can be otherwise, and is
refused with the rule and field named.

The emitted subset is small on purpose: the whole script one script block (`& { ... }`,
see `_whole`), assignments, try/catch/throw, and commands whose arguments
are quoted strings or comma lists of them.

Remove-NetFirewallRule's -Name takes wildcards (Microsoft's documentation of the cmdlet:
"Wildcard characters are accepted"), so a listed rule whose name holds one (`*`, `?`,
`[`, `]`, or the escape character, a backtick) is never removed by name: a rule named
`*` put in the group would otherwise have the apply remove every rule on the host, the
new generation and Windows' own included. Such a rule is left in place; the listing
shows it as not the agent's (drift) until someone removes it by hand. New-NetFirewallRule's
-InterfaceAlias is a WildcardPattern[] too (its syntax in the same documentation): an
alias with a wildcard character would put the rule on other interfaces, so it is refused.

Shapes of what Get-NetFirewallRule and its filter cmdlets return (`parse_listing`)
follow Microsoft's documentation of the NetSecurity module; they were not captured on a
real Windows host.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bulkhead.dataplane.windows.rules import INBOUND, OUTBOUND, FirewallRule

GROUP = "bulkhead"
PROFILES = ("Domain", "Private", "Public")
ALLOW, BLOCK = "Allow", "Block"
# Bounds: a generation's rules, the values of one parameter, one string's length.
MAX_RULES = 50_000
MAX_VALUES = 10_000
MAX_TEXT = 4_096
# Names per Remove-NetFirewallRule command (keeps lines of a bounded length).
REMOVE_CHUNK = 200
APPLIED_MARK = "bulkhead-applied"
ADDED_MARK = "bulkhead-added"

PROTOCOL_NAMES = {6: "TCP", 17: "UDP", 1: "ICMPv4", 58: "ICMPv6"}
PROTOCOL_NUMBERS = {v.upper(): k for k, v in PROTOCOL_NAMES.items()}
PORT_PROTOCOLS = (6, 17)
ICMP_PROTOCOLS = (1, 58)
# PowerShell reads these as single quotes too (about_Quoting_Rules): refused, not escaped
# (as is any character outside printable ASCII, see the module's docstring).
TYPOGRAPHIC_QUOTES = "\u2018\u2019\u201a\u201b"
# What Remove-NetFirewallRule -Name reads as a wildcard pattern (see the docstring).
WILDCARDS = "*?[]`"
_GENERATION_NAME = re.compile(rf"^{GROUP}-(\d+)-(\d+)$")
_PORT = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_ICMP = re.compile(r"^(\d{1,3})(?::(\d{1,3}))?$")


class RenderError(ValueError):
    """A rule that cannot be written as PowerShell; names the rule and the field."""


class ListingError(ValueError):
    """The listing's JSON is not what the listing script prints."""


# ------------------------------------------------------------------------------ quoting
def refused_character(text: str) -> str | None:
    """The first character `quote` refuses, or None: anything but printable ASCII (the
    other checks stay, should that ever be widened)."""
    for ch in text:
        if not " " <= ch <= "~" or ch in TYPOGRAPHIC_QUOTES or unicodedata.category(ch) in (
                "Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            return ch
    return None


def quote(text: str, what: str = "value") -> str:
    """`text` as a single-quoted PowerShell string. Raises RenderError for a character
    that has no plain place in one, or for text longer than MAX_TEXT."""
    if len(text) > MAX_TEXT:
        raise RenderError(f"{what}: longer than {MAX_TEXT} characters")
    bad = refused_character(text)
    if bad is not None:
        raise RenderError(f"{what}: character U+{ord(bad):04X} is not allowed")
    return "'" + text.replace("'", "''") + "'"


def unquote(literal: str) -> str:
    """The string a single-quoted PowerShell literal (as `quote` writes it) stands for."""
    if len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        raise ValueError(f"not a single-quoted string: {literal!r}")
    return literal[1:-1].replace("''", "'")


def _list(values: Iterable[str], what: str) -> str:
    return ", ".join(quote(v, what) for v in values)


# --------------------------------------------------------------------------- validation
def _address(text: str) -> str:
    """The canonical form of one rule address: `a`, `a/len` (the network's first
    address; a full-length prefix is the bare address) or `first-last`. ValueError if
    it is none of them. An IPv4 mask (`a/255.255.255.0`, as Windows lists it) is read
    as its prefix length."""
    if "-" in text:
        first, last = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"{text!r} is not a range of one family, first to last")
        return str(first) if first == last else f"{first}-{last}"
    if "/" in text:
        net = ipaddress.ip_network(text, strict=False)
        if net.network_address != ipaddress.ip_interface(text).ip:
            raise ValueError(f"{text!r} has host bits set")
        return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    return str(ipaddress.ip_address(text))


def _port(text: str) -> str:
    m = _PORT.match(text)
    if not m or any(int(p) > 65535 for p in m.groups() if p is not None) \
            or (m.group(2) is not None and int(m.group(1)) > int(m.group(2))):
        raise ValueError(f"{text!r} is not a port or a port range first-last")
    first, last = m.group(1), m.group(2)
    return str(int(first)) if last is None or int(last) == int(first) \
        else f"{int(first)}-{int(last)}"


def _icmp(text: str) -> str:
    m = _ICMP.match(text)
    if not m or any(int(p) > 255 for p in m.groups() if p is not None):
        raise ValueError(f"{text!r} is not an ICMP type or type:code")
    kind = str(int(m.group(1)))
    return kind if m.group(2) is None else f"{kind}:{int(m.group(2))}"


def _order(text: str) -> tuple[int, ...] | tuple[int, str]:
    digits = re.split(r"[-:]", text)
    if all(d.isdigit() for d in digits):
        return tuple(int(d) for d in digits)
    return (-1, text)


def canonical(rule: FirewallRule) -> FirewallRule:
    """The rule with its values in one spelling each (addresses and ports as `_address`
    and `_port` write them, every list sorted), so a rule listed back from Windows
    compares equal to the one applied. Raises RenderError naming the rule and field."""
    def each(values: Sequence[str], how: Callable[[str], str], what: str
             ) -> tuple[str, ...]:
        if len(values) > MAX_VALUES:
            raise RenderError(f"firewall rule {rule.name}: {what}: more than {MAX_VALUES} values")
        try:
            # Numbers first by value ("80" before "443"), then addresses as text.
            return tuple(sorted({how(v) for v in values}, key=_order))
        except ValueError as e:
            raise RenderError(f"firewall rule {rule.name}: {what}: {e}") from None

    if not 1 <= len(rule.name) <= 255 or refused_character(rule.name) is not None:
        raise RenderError(f"firewall rule {rule.name!r}: name: 1-255 characters, all of "
                          "them printable ASCII")
    if rule.direction not in (INBOUND, OUTBOUND):
        raise RenderError(f"firewall rule {rule.name}: direction: {rule.direction!r} is not "
                          f"{INBOUND} or {OUTBOUND}")
    if rule.action not in (ALLOW, BLOCK):
        raise RenderError(f"firewall rule {rule.name}: action: {rule.action!r} is not "
                          f"{ALLOW} or {BLOCK}")
    if rule.protocol is not None and not 0 <= rule.protocol <= 255:
        raise RenderError(f"firewall rule {rule.name}: protocol: {rule.protocol} is not 0-255")
    if (rule.local_ports or rule.remote_ports) and rule.protocol not in PORT_PROTOCOLS:
        raise RenderError(f"firewall rule {rule.name}: ports: only with TCP or UDP")
    if rule.icmp_types and rule.protocol not in ICMP_PROTOCOLS:
        raise RenderError(f"firewall rule {rule.name}: icmp types: only with ICMPv4 or ICMPv6")
    for what, text in (("display name", rule.display_name), ("description", rule.description),
                       ("interface alias", rule.interface_alias or "")):
        try:
            quote(text, what)
        except RenderError as e:
            raise RenderError(f"firewall rule {rule.name}: {e}") from None
    if rule.interface_alias and has_wildcard(rule.interface_alias):
        raise RenderError(f"firewall rule {rule.name}: interface alias: "
                          f"{rule.interface_alias!r} holds a wildcard character ({WILDCARDS}), "
                          "which New-NetFirewallRule would match against other interfaces")
    return replace(
        rule,
        local_addresses=each(rule.local_addresses, _address, "local addresses"),
        remote_addresses=each(rule.remote_addresses, _address, "remote addresses"),
        local_ports=each(rule.local_ports, _port, "local ports"),
        remote_ports=each(rule.remote_ports, _port, "remote ports"),
        icmp_types=each(rule.icmp_types, _icmp, "icmp types"))


def content(rule: FirewallRule) -> FirewallRule:
    """What a rule does and says, without its name (the generation's numbering)."""
    return replace(canonical(rule), name="")


# ------------------------------------------------------------------------------ scripts
def generation_name(generation: int, n: int) -> str:
    return f"{GROUP}-{generation}-{n}"


def generation_of(name: str) -> int | None:
    """The generation a rule name `bulkhead-<gen>-<n>` belongs to; None for other names."""
    m = _GENERATION_NAME.match(name)
    return int(m.group(1)) if m else None


def number(rules: Sequence[FirewallRule], generation: int) -> list[FirewallRule]:
    """The rules named for `generation` (`bulkhead-<generation>-<n>`, n from 1 in the
    given order); a rule's own name becomes its display name when it has none."""
    if generation < 1:
        raise RenderError(f"generation {generation}: must be at least 1")
    if len(rules) > MAX_RULES:
        raise RenderError(f"{len(rules)} firewall rules: more than {MAX_RULES} in one generation")
    return [replace(r, name=generation_name(generation, n),
                    display_name=r.display_name or r.name)
            for n, r in enumerate(rules, 1)]


def new_rule_command(rule: FirewallRule) -> str:
    """One New-NetFirewallRule command (the rule checked by `canonical` first)."""
    r = canonical(rule)
    return " ".join(["New-NetFirewallRule", "-Name", quote(r.name),
                     "-DisplayName", quote(r.display_name or r.name),
                     "-Group", quote(GROUP), *_parameters(r)]) + " | Out-Null"


def rule_text(rule: FirewallRule) -> str:
    """What a rule does as New-NetFirewallRule's parameters, without its names (for
    diffs between generations)."""
    return " ".join(_parameters(canonical(rule)))


def _parameters(r: FirewallRule) -> list[str]:
    parts = ["-Direction", quote(r.direction),
             "-Action", quote(r.action),
             "-Protocol", quote("Any" if r.protocol is None
                                else PROTOCOL_NAMES.get(r.protocol, str(r.protocol)))]
    for flag, values in (("-LocalAddress", r.local_addresses),
                         ("-RemoteAddress", r.remote_addresses),
                         ("-LocalPort", r.local_ports), ("-RemotePort", r.remote_ports),
                         ("-IcmpType", r.icmp_types)):
        if values:
            parts += [flag, _list(values, flag)]
    if r.interface_alias:
        parts += ["-InterfaceAlias", quote(r.interface_alias)]
    if r.description:
        parts += ["-Description", quote(r.description)]
    parts += ["-Enabled", quote("True"), "-Profile", quote("Any")]
    return parts


def _remove_commands(names: Sequence[str], indent: str = "", quiet: bool = False
                     ) -> list[str]:
    tail = " -ErrorAction " + quote("SilentlyContinue") if quiet else ""
    return [f"{indent}Remove-NetFirewallRule -Name {_list(names[i:i + REMOVE_CHUNK], 'name')}"
            f"{tail}" for i in range(0, len(names), REMOVE_CHUNK)]


def profile_command(profiles: Sequence[str] = PROFILES) -> str:
    """The profiles' defaults the generations rely on: the firewall on, and what no rule
    allows blocked both ways. Run only with a generation's rules in place: the failsafe
    Allows (the agent's server port among them) are rules of the plan, so a default
    outbound Block before them would cut the agent off its server."""
    return ("Set-NetFirewallProfile -Profile " + _list(profiles, "profile")
            + " -Enabled " + quote("True") + " -DefaultInboundAction " + quote(BLOCK)
            + " -DefaultOutboundAction " + quote(BLOCK))


def apply_script(rules: Sequence[FirewallRule], generation: int,
                 old: Sequence[FirewallRule] = (),
                 profiles: Sequence[str] | None = PROFILES) -> str:
    """The script that makes `rules` the group's only rules, as generation `generation`
    (the rules are renamed by `number`); `old`: the group's rules now (as listed), all
    removed after the new ones are in. `profiles`: the profiles whose defaults are set
    (`profile_command`) after the new rules are in; None leaves the profiles alone. The
    script prints `bulkhead-added <generation>` once the new rules are all in, and
    `bulkhead-applied <generation>` at its end."""
    for rule in rules:
        canonical(rule)          # errors name the compiler's rule, before renaming
    new = number(rules, generation)
    new_names = {r.name for r in new}
    clash = sorted(r.name for r in old if r.name in new_names)
    if clash:
        raise RenderError(f"generation {generation}: rules of that name exist already: "
                          f"{clash[:5]}")
    blocks = [r for r in new if r.action == BLOCK]
    allows = [r for r in new if r.action != BLOCK]
    lines = ["$ErrorActionPreference = " + quote("Stop"),
             "$ProgressPreference = " + quote("SilentlyContinue"),
             "try {"]
    lines += ["    " + new_rule_command(r) for r in blocks + allows]
    lines += ["} catch {"]
    lines += _remove_commands([r.name for r in new], "    ", quiet=True)
    lines += ["    throw", "}"]
    lines.append("Write-Output " + quote(f"{ADDED_MARK} {generation}"))
    removable = [r for r in old if not has_wildcard(r.name)]
    old_allows = [r.name for r in removable if r.action != BLOCK]
    old_blocks = [r.name for r in removable if r.action == BLOCK]
    lines += _remove_commands(old_allows) + _remove_commands(old_blocks)
    if profiles is not None:
        lines.append(profile_command(profiles))
    lines.append("Write-Output " + quote(f"{APPLIED_MARK} {generation}"))
    return _whole(lines, f"firewall rules of generation {generation} ({len(blocks)} Block, "
                         f"{len(allows)} Allow); {len(old)} rules of the group {GROUP} before")


def has_wildcard(name: str) -> bool:
    """Whether Remove-NetFirewallRule -Name would read `name` as a pattern (such rules
    are never removed by name)."""
    return any(ch in WILDCARDS for ch in name)


def _whole(lines: Sequence[str], title: str) -> str:
    """The script as one statement, `& { ... }`, and an empty line after it. With the
    script on standard input (`-Command -`) PowerShell runs each statement as it is read,
    like a console: an error would end that statement only, and the next ones (the old
    generation's removal) would still run; and a statement spanning lines ends at an
    empty line (so none inside). One script block makes an error end the whole script."""
    assert all(line.strip() for line in lines), "no empty line inside the block"
    return "\n".join([f"# Bulkhead: {title}", "& {", *[f"    {line}" for line in lines],
                      "}", "", ""])


def applied(stdout: str, generation: int) -> bool:
    """Whether an apply script's output says it ran to its end."""
    return f"{APPLIED_MARK} {generation}" in stdout.splitlines()


def added(stdout: str, generation: int) -> bool:
    """Whether an apply script's output says the new generation is all in (the old
    one's removal may still have failed)."""
    return f"{ADDED_MARK} {generation}" in stdout.splitlines()


def list_script(profiles: Sequence[str] = PROFILES) -> str:
    """The group's rules with their filters, and the profiles' defaults, as one JSON
    object {"Rules": [...], "Profiles": [...]} (see `parse_listing`). An empty group is
    no error (Get-NetFirewallRule reports one: silenced)."""
    rules = ("$rules = @(Get-NetFirewallRule -Group " + quote(GROUP)
             + " -ErrorAction " + quote("SilentlyContinue") + ")")
    return _whole([
        "$ErrorActionPreference = " + quote("Stop"),
        "$ProgressPreference = " + quote("SilentlyContinue"),
        rules,
        "$listed = @(foreach ($r in $rules) {",
        "    $a = $r | Get-NetFirewallAddressFilter",
        "    $p = $r | Get-NetFirewallPortFilter",
        "    $i = $r | Get-NetFirewallInterfaceFilter",
        "    [pscustomobject]@{",
        "        Name = $r.Name; DisplayName = $r.DisplayName; Description = $r.Description",
        "        Direction = [string]$r.Direction; Action = [string]$r.Action",
        "        Enabled = [string]$r.Enabled; Protocol = [string]$p.Protocol",
        "        LocalAddress = @($a.LocalAddress); RemoteAddress = @($a.RemoteAddress)",
        "        LocalPort = @($p.LocalPort); RemotePort = @($p.RemotePort)",
        "        IcmpType = @($p.IcmpType); InterfaceAlias = @($i.InterfaceAlias)",
        "    }",
        "})",
        "$profiles = @(foreach ($f in @(Get-NetFirewallProfile -Name " + _list(profiles, "profile")
        + ")) {",
        "    [pscustomobject]@{",
        "        Name = $f.Name; Enabled = [string]$f.Enabled",
        "        DefaultInboundAction = [string]$f.DefaultInboundAction",
        "        DefaultOutboundAction = [string]$f.DefaultOutboundAction",
        "    }",
        "})",
        # @(...) around each foreach: no output is an empty list, not one $null
        "[pscustomobject]@{ Rules = $listed; Profiles = $profiles } | "
        "ConvertTo-Json -Depth 4 -Compress",
    ], f"the rules of the group {GROUP} and the profiles, as JSON")


def interfaces_script() -> str:
    """The host's interfaces and their unicast addresses as JSON, a list of
    {"InterfaceAlias": ..., "IPAddress": ...} (see `parse_interfaces`)."""
    return _whole([
        "$ErrorActionPreference = " + quote("Stop"),
        "$ProgressPreference = " + quote("SilentlyContinue"),
        "$found = @(Get-NetIPAddress | ForEach-Object {",
        "    [pscustomobject]@{ InterfaceAlias = $_.InterfaceAlias; IPAddress = $_.IPAddress }",
        "})",
        "ConvertTo-Json -InputObject $found -Depth 2 -Compress",
    ], "the host's interfaces and addresses, as JSON")


def parse_interfaces(stdout: str) -> dict[str, list[str]]:
    """What `interfaces_script` printed: interface alias -> its addresses (an IPv6 zone
    such as `%12` dropped). Raises ListingError for another shape."""
    try:
        doc = json.loads(stdout)
    except (ValueError, RecursionError) as e:     # RecursionError: nested too deep
        raise ListingError(f"the interface listing is not JSON: {e}") from None
    if isinstance(doc, dict):           # one address: ConvertTo-Json of a 1-list in 5.1
        doc = [doc]
    if not isinstance(doc, list):
        raise ListingError("the interface listing is not a list")
    found: dict[str, list[str]] = {}
    for item in doc[:MAX_VALUES]:
        if not isinstance(item, dict) or not isinstance(item.get("InterfaceAlias"), str) \
                or not isinstance(item.get("IPAddress"), str):
            raise ListingError(f"an interface entry lacks InterfaceAlias or IPAddress: "
                               f"{item!r:.200}")
        address = item["IPAddress"].split("%", 1)[0]
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ListingError(f"interface {item['InterfaceAlias']}: {address!r} is not "
                               "an address") from None
        found.setdefault(item["InterfaceAlias"], []).append(address)
    return found


# ------------------------------------------------------------------------------ listing
@dataclass(frozen=True)
class ProfileState:
    name: str
    enabled: str
    default_inbound: str
    default_outbound: str

    @property
    def enforcing(self) -> bool:
        """On, and blocking what no rule allows, both ways (what the agent sets)."""
        return (self.enabled == "True" and self.default_inbound == BLOCK
                and self.default_outbound == BLOCK)


@dataclass(frozen=True)
class Listing:
    """The group as listed: its rules (canonical), the names of those not enabled, and
    the profiles' state."""

    rules: tuple[FirewallRule, ...] = ()
    disabled: frozenset[str] = frozenset()
    profiles: tuple[ProfileState, ...] = ()
    unreadable: tuple[str, ...] = field(default=())   # rules not parsed, and why

    def generations(self) -> set[int]:
        return {g for r in self.rules if (g := generation_of(r.name)) is not None}


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A listed filter value as strings, `Any` (unrestricted) as ()."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"{what}: expected strings, got {value!r}")
    return () if items in ([], ["Any"]) else tuple(items)


def _protocol(text: str) -> int | None:
    if text in ("", "Any"):
        return None
    if text.upper() in PROTOCOL_NUMBERS:
        return PROTOCOL_NUMBERS[text.upper()]
    if text.isdigit() and int(text) <= 255:
        return int(text)
    raise ValueError(f"protocol: {text!r} is not a protocol")


def _listed_rule(item: Mapping[str, Any]) -> FirewallRule:
    def text(key: str) -> str:
        value = item.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value

    aliases = _strings(item.get("InterfaceAlias"), "InterfaceAlias")
    if len(aliases) > 1:
        raise ValueError(f"InterfaceAlias: more than one ({list(aliases)}); the agent sets one")
    rule = FirewallRule(
        name=text("Name"), direction=text("Direction"), action=text("Action"),
        protocol=_protocol(text("Protocol")),
        local_addresses=_strings(item.get("LocalAddress"), "LocalAddress"),
        remote_addresses=_strings(item.get("RemoteAddress"), "RemoteAddress"),
        local_ports=_strings(item.get("LocalPort"), "LocalPort"),
        remote_ports=_strings(item.get("RemotePort"), "RemotePort"),
        icmp_types=_strings(item.get("IcmpType"), "IcmpType"),
        interface_alias=aliases[0] if aliases else None,
        description=text("Description"), display_name=text("DisplayName"))
    try:
        return canonical(rule)
    except RenderError as e:
        raise ValueError(str(e)) from None


def parse_listing(stdout: str) -> Listing:
    """What `list_script` printed, as a Listing. A rule whose values the agent never
    writes (a keyword address such as LocalSubnet, a port keyword such as RPC) is kept
    out of `rules` and named in `unreadable`: the caller treats it as drift. Raises
    ListingError when the JSON is not of the listing's shape."""
    try:
        doc = json.loads(stdout)
    except (ValueError, RecursionError) as e:     # RecursionError: nested too deep
        raise ListingError(f"the listing is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Rules", []), list) \
            or not isinstance(doc.get("Profiles", []), list):
        raise ListingError("the listing is not an object with lists Rules and Profiles")
    rules: list[FirewallRule] = []
    disabled: set[str] = set()
    unreadable: list[str] = []
    if len(doc.get("Rules") or []) > 2 * MAX_RULES:
        raise ListingError(f"the listing has more than {2 * MAX_RULES} rules in the group "
                           f"{GROUP} (two generations at most are the agent's)")
    for item in doc.get("Rules") or []:
        if item is None:         # @($null) of an older listing: nothing
            continue
        if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
            raise ListingError(f"a listed rule is not an object with a Name: {item!r:.200}")
        try:
            rules.append(_listed_rule(item))
        except ValueError as e:
            unreadable.append(f"{item['Name']}: {e}")
            continue
        if item.get("Enabled") != "True":
            disabled.add(item["Name"])
    profiles = []
    for item in doc.get("Profiles") or []:
        if not isinstance(item, dict) or not all(
                isinstance(item.get(k), str) for k in
                ("Name", "Enabled", "DefaultInboundAction", "DefaultOutboundAction")):
            raise ListingError(f"a listed profile lacks its fields: {item!r:.200}")
        profiles.append(ProfileState(item["Name"], item["Enabled"],
                                     item["DefaultInboundAction"], item["DefaultOutboundAction"]))
    return Listing(tuple(sorted(rules, key=lambda r: r.name)), frozenset(disabled),
                   tuple(profiles), tuple(unreadable))


def listing_json(rules: Iterable[FirewallRule], profiles: Iterable[ProfileState] = (),
                 disabled: Iterable[str] = ()) -> str:
    """The JSON `list_script` prints on Windows for these rules, shaped as the
    NetSecurity documentation describes the objects (an IPv4 network as
    address/mask, `Any` for an unrestricted filter, enums as their names): for the fake
    NetSecurity and tests. Not captured on a real host."""
    def any_or(values: Sequence[str]) -> list[str]:
        return list(values) or ["Any"]

    def windows_address(text: str) -> str:
        if "/" in text and ":" not in text:
            net = ipaddress.IPv4Network(text)
            return f"{net.network_address}/{net.netmask}"
        return text

    off = set(disabled)
    out: list[dict[str, Any]] = []
    for r in rules:
        out.append({
            "Name": r.name, "DisplayName": r.display_name or r.name,
            "Description": r.description or None,
            "Direction": r.direction, "Action": r.action,
            "Enabled": "False" if r.name in off else "True",
            "Protocol": "Any" if r.protocol is None
            else PROTOCOL_NAMES.get(r.protocol, str(r.protocol)),
            "LocalAddress": any_or([windows_address(a) for a in r.local_addresses]),
            "RemoteAddress": any_or([windows_address(a) for a in r.remote_addresses]),
            "LocalPort": any_or(r.local_ports), "RemotePort": any_or(r.remote_ports),
            "IcmpType": any_or(r.icmp_types),
            "InterfaceAlias": [r.interface_alias] if r.interface_alias else ["Any"],
        })
    return json.dumps({"Rules": out, "Profiles": [
        {"Name": p.name, "Enabled": p.enabled, "DefaultInboundAction": p.default_inbound,
         "DefaultOutboundAction": p.default_outbound} for p in profiles]},
        separators=(",", ":"))
