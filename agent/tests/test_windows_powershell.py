"""The PowerShell the Windows agent runs: golden files (tests/golden/windows/), every
script parsed by a real PowerShell grammar (tree-sitter), quoting that survives any
string, and the listing's JSON read back into the rules that were applied.

Rewrite the golden files when a change is meant:

    BULKHEAD_UPDATE_GOLDEN=1 pytest tests/test_windows_powershell.py tests/test_windows_hns_json.py
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.dataplane.windows import hns_json, powershell
from bulkhead.dataplane.windows.powershell import (
    ListingError,
    ProfileState,
    RenderError,
    apply_script,
    canonical,
    list_script,
    number,
    parse_listing,
    quote,
)
from bulkhead.dataplane.windows.rules import INBOUND, FirewallRule
from tests.pwshfixture import command_of, parse, syntax_errors, walk
from tests.test_nftables_golden import check_golden
from tests.windowsplans import WEB, WEB_ACLS, WEB_NEXT

GOLDEN = Path(__file__).resolve().parent / "golden" / "windows"
# Written by hand in the shape Microsoft documents for the NetSecurity objects (not
# captured on a Windows host): read, never rewritten.
SAMPLE = GOLDEN / "listing-sample-windows.json"


def scripts() -> dict[str, str]:
    first = number(WEB, 1)
    return {
        "web-generation-1.ps1": apply_script(WEB, 1),
        "web-generation-2.ps1": apply_script(WEB_NEXT, 2, first),
        "web-generation-2-private-only.ps1": apply_script(WEB_NEXT, 2, first, ("Private",)),
        "listing.ps1": list_script(),
        "interfaces.ps1": powershell.interfaces_script(),
    }


def texts() -> dict[str, str]:
    return {**scripts(),
            "web-generation-1-listed.json": powershell.listing_json(
                number(WEB, 1), [ProfileState(p, "True", "Block", "Block")
                                 for p in powershell.PROFILES]) + "\n",
            "web-acls.json": hns_json.render(WEB_ACLS)}


@pytest.mark.parametrize("name", sorted(texts()))
def test_rendered_scripts_equal_the_golden_files(name: str) -> None:
    check_golden(GOLDEN / name, texts()[name])


def test_no_golden_file_is_left_over() -> None:
    assert {p.name for p in GOLDEN.iterdir()} == set(texts()) | {SAMPLE.name}


@pytest.mark.parametrize("name", sorted(scripts()))
def test_every_script_parses_as_powershell(name: str) -> None:
    script = scripts()[name]
    assert syntax_errors(script) == []
    # one statement for `powershell -Command -`: & { ... }, no empty line before its end
    assert script.splitlines()[1] == "& {" and script.endswith("\n}\n\n")
    assert "\n\n" not in script[:-2]
    # and the tree is the script's: one command per rule, the try's and the removals
    if name.startswith("web-generation"):
        commands = [command_of(n)[0] for n in walk(parse(script).root_node)
                    if n.type == "command"]
        rules = WEB if name.endswith("-1.ps1") else WEB_NEXT
        assert commands.count("New-NetFirewallRule") == len(rules)
        assert "Set-NetFirewallProfile" in commands


@pytest.mark.parametrize("broken", [
    "New-NetFirewallRule -Name 'a -Group 'bulkhead'\n",          # unterminated string
    "try {\n    New-NetFirewallRule -Name 'a'\n",                 # try without its end
    "Remove-NetFirewallRule -Name ('a', 'b'\n",                   # unclosed parenthesis
    "Set-NetFirewallProfile -Profile Domain, Private\n",          # bare words in a list
])
def test_the_syntax_check_finds_a_broken_script(broken: str) -> None:
    assert syntax_errors(broken)


def test_a_script_broken_at_one_rule_is_caught() -> None:
    lines = apply_script(WEB, 1).splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if "web-ingress-4" in line)
    lines[at] = lines[at].replace("'Inbound'", "'Inbound")
    errors = syntax_errors("".join(lines))
    assert errors


# Text a single-quoted string may hold: printable ASCII (quote() refuses the rest).
SAFE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1, max_size=40)
# An interface alias: no wildcard characters either (New-NetFirewallRule reads it as a
# pattern).
ALIAS = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e,
                              blacklist_characters=powershell.WILDCARDS), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(description=SAFE, display=SAFE, alias=ALIAS)
def test_strings_round_trip_through_the_powershell_parser(
        description: str, display: str, alias: str) -> None:
    rule = FirewallRule("x", INBOUND, "Allow", 6, local_ports=("80",), description=description,
                        display_name=display, interface_alias=alias)
    script = apply_script([rule], 3)
    assert syntax_errors(script) == []
    news = [command_of(n) for n in walk(parse(script).root_node)
            if n.type == "command" and command_of(n)[0] == "New-NetFirewallRule"]
    assert len(news) == 1
    params = news[0][1]
    assert params["-Description"] == [description]
    assert params["-DisplayName"] == [display]
    assert params["-InterfaceAlias"] == [alias]
    assert params["-Name"] == ["bulkhead-3-1"]


@pytest.mark.parametrize("bad", ["a\nb", "a\x00", "tab\there", "\u2019quoted", "rtl\u202e",
                                 "line\u2028sep", "caf\u00e9", "nel\u0085", "\u0452x"])
def test_strings_a_quote_cannot_hold_plainly_are_refused(bad: str) -> None:
    with pytest.raises(RenderError, match="description: character U"):
        quote(bad, "description")
    rule = FirewallRule("web-1", INBOUND, "Allow", description=bad)
    with pytest.raises(RenderError, match="firewall rule web-1: description"):
        apply_script([rule], 1)


# A value that is harmless as text but, once the script's bytes are read in another code
# page than they were written in, holds a typographic quote (which closes a single-quoted
# string in PowerShell) and then a command. Python writes the locale's encoding (ANSI,
# or UTF-8 in its UTF-8 mode); PowerShell reads standard input in the console's code page
# (OEM, ANSI without a console, or UTF-8): they need not agree.
@pytest.mark.parametrize(("value", "written", "read"), [
    ("\u0452; Remove-NetFirewallRule -All; \u0452", "utf-8", "cp1252"),   # D1 92: U+00D1, U+2019
    ("\u00e2\u20ac\u2122; Remove-NetFirewallRule -All; #", "cp1252", "utf-8"),  # E2 80 99: U+2019
])
@pytest.mark.parametrize("field", ["description", "display_name", "interface_alias"])
def test_no_value_changes_the_script_when_it_is_read_in_another_code_page(
        value: str, written: str, read: str, field: str) -> None:
    rule = replace(FirewallRule("web-1", INBOUND, "Allow"), **{field: value})
    try:
        script = apply_script([rule], 1)
    except RenderError as e:
        assert str(e).startswith("firewall rule web-1: ")
        return
    assert script.encode(written).decode(read, errors="replace") == script


@pytest.mark.parametrize("alias", ["Ethernet*", "Ethernet [1]", "Wi-Fi?", "a`b"])
def test_an_interface_alias_that_is_a_wildcard_pattern_is_refused(alias: str) -> None:
    # New-NetFirewallRule -InterfaceAlias <WildcardPattern[]>: "Ethernet*" would put the
    # rule on every Ethernet interface.
    rule = FirewallRule("web-1", INBOUND, "Allow", interface_alias=alias)
    with pytest.raises(RenderError, match=r"firewall rule web-1: interface alias: .*wildcard"):
        apply_script([rule], 1)


def test_every_script_is_ascii() -> None:
    assert all(text.isascii() for text in scripts().values())


def test_quotes_are_doubled() -> None:
    assert quote("o'brien") == "'o''brien'"
    assert powershell.unquote("'o''brien'") == "o'brien"


@pytest.mark.parametrize(("change", "message"), [
    ({"direction": "In"}, "direction: 'In' is not Inbound or Outbound"),
    ({"action": "Deny"}, "action: 'Deny' is not Allow or Block"),
    ({"protocol": 300}, "protocol: 300 is not 0-255"),
    ({"protocol": 1, "local_ports": ("80",)}, "ports: only with TCP or UDP"),
    ({"protocol": 6, "icmp_types": ("8",)}, "icmp types: only with ICMPv4 or ICMPv6"),
    ({"remote_addresses": ("198.18.0.1/24",)}, "remote addresses: .* host bits"),
    ({"remote_addresses": ("Any",)}, "remote addresses"),
    ({"local_addresses": ("198.18.0.9-198.18.0.1",)}, "local addresses: .* first to last"),
    ({"protocol": 6, "local_ports": ("70000",)}, "local ports: '70000' is not a port"),
    ({"protocol": 6, "remote_ports": ("90-80",)}, "remote ports: '90-80'"),
    ({"name": ""}, "name: 1-255 characters"),
])
def test_bad_rules_are_refused_naming_rule_and_field(change: dict[str, object],
                                                     message: str) -> None:
    rule = replace(FirewallRule("web-1", INBOUND, "Allow", 6), **change)  # type: ignore[arg-type]
    with pytest.raises(RenderError, match=message):
        apply_script([rule], 1)


def test_the_new_generation_goes_in_blocks_first_and_the_old_out_allows_first() -> None:
    script = apply_script(WEB_NEXT, 2, number(WEB, 1))
    commands = [command_of(n) for n in walk(parse(script).root_node) if n.type == "command"]
    steps = [(name, params.get("-Action", ["-"])[0]) for name, params in commands
             if name in ("New-NetFirewallRule",)]
    actions = [a for _, a in steps]
    assert actions == sorted(actions, key=lambda a: a != "Block")     # Blocks, then Allows
    removes = [params["-Name"] for name, params in commands
               if name == "Remove-NetFirewallRule" and "-ErrorAction" not in params]
    old = {r.name: r.action for r in number(WEB, 1)}
    removed = [old[n] for names in removes for n in names]
    assert sorted(removed) == sorted(old.values())
    assert removed == sorted(removed)                  # every Allow before any Block
    # the catch removes exactly the new generation
    catch = [params["-Name"] for name, params in commands
             if name == "Remove-NetFirewallRule" and "-ErrorAction" in params]
    assert catch == [[f"bulkhead-2-{n}" for n in range(1, len(WEB_NEXT) + 1)]]


def test_a_generation_may_not_reuse_a_listed_name() -> None:
    with pytest.raises(RenderError, match="exist already"):
        apply_script(WEB, 1, number(WEB, 1))


def test_the_listing_reads_back_what_was_applied() -> None:
    applied = number(WEB, 4)
    profiles = [ProfileState("Public", "True", "Block", "Allow")]
    listed = parse_listing(powershell.listing_json(applied, profiles, ["bulkhead-4-2"]))
    assert list(listed.rules) == sorted((canonical(r) for r in applied), key=lambda r: r.name)
    assert listed.disabled == {"bulkhead-4-2"}
    assert listed.generations() == {4}
    assert listed.profiles == tuple(profiles) and not listed.profiles[0].enforcing


def test_the_windows_shaped_sample_is_read() -> None:
    """A listing written by hand after the documented shapes: an IPv4 network as
    address/mask, `Any` filters, a single value as a string, a description of null, a
    protocol by number, a disabled rule and one with a keyword address."""
    listed = parse_listing(SAMPLE.read_text())
    by_name = {r.name: r for r in listed.rules}
    assert by_name["bulkhead-7-1"] == FirewallRule(
        "bulkhead-7-1", INBOUND, "Allow", 6, local_addresses=(),
        remote_addresses=("198.18.0.0/24", "198.18.3.4"), local_ports=("80", "443"),
        display_name="web-ingress-2", description="policy default.web ingress rule 0")
    assert by_name["bulkhead-7-2"].protocol == 47
    assert by_name["bulkhead-7-2"].remote_addresses == ("2001:2::/48",)
    assert by_name["bulkhead-7-2"].description == ""
    assert by_name["bulkhead-7-3"].icmp_types == ("8:0",)
    assert by_name["bulkhead-7-3"].interface_alias == "Ethernet 2"
    assert listed.disabled == {"bulkhead-7-3"}
    assert [u.split(":")[0] for u in listed.unreadable] == ["bulkhead-7-4"]
    assert [p.name for p in listed.profiles if not p.enforcing] == ["Public"]


@pytest.mark.parametrize("bad", ["not json", "[]", '{"Rules": {}}', '{"Rules": [{"x": 1}]}',
                                 '{"Rules": [], "Profiles": [{"Name": "Public"}]}',
                                 "[" * 100_000,             # nested too deep for json
                                 '{"Rules": [' + ",".join(["null"] * 100_001) + "]}"])
def test_a_listing_of_another_shape_is_an_error(bad: str) -> None:
    with pytest.raises(ListingError):
        parse_listing(bad)


def test_an_interface_listing_nested_too_deep_is_an_error() -> None:
    with pytest.raises(ListingError, match="not JSON"):
        powershell.parse_interfaces("[" * 100_000)


def test_the_sample_is_json_of_the_listings_shape() -> None:
    doc = json.loads(SAMPLE.read_text())
    assert set(doc) == {"Rules", "Profiles"}


def test_the_interface_listing_is_read() -> None:
    """Get-NetIPAddress's objects as ConvertTo-Json gives them (documented shape; an
    IPv6 link-local address with its zone), and a lone object instead of a list."""
    out = json.dumps([{"InterfaceAlias": "Ethernet", "IPAddress": "198.18.0.10"},
                      {"InterfaceAlias": "Ethernet", "IPAddress": "fe80::1%12"},
                      {"InterfaceAlias": "Loopback Pseudo-Interface 1",
                       "IPAddress": "127.0.0.1"}])
    assert powershell.parse_interfaces(out) == {
        "Ethernet": ["198.18.0.10", "fe80::1"], "Loopback Pseudo-Interface 1": ["127.0.0.1"]}
    one = json.dumps({"InterfaceAlias": "Ethernet 2", "IPAddress": "2001:2::10"})
    assert powershell.parse_interfaces(one) == {"Ethernet 2": ["2001:2::10"]}
    for bad in ("x", "3", '[{"InterfaceAlias": "e"}]',
                '[{"InterfaceAlias": "e", "IPAddress": "nope"}]'):
        with pytest.raises(ListingError):
            powershell.parse_interfaces(bad)
