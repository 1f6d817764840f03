"""The switch of a full apply (`replace.py`): which base chains it keeps and which it
makes again, read from the rendered hook line and from the kernel's own listing."""

from __future__ import annotations

import json
import struct

import pytest

from bulkhead.dataplane.nftables import Chain, Ruleset
from bulkhead.dataplane.nftables.netlink import NFT_MSG_GETCHAIN
from bulkhead.dataplane.nftables.replace import (
    NFT_MSG_DELCHAIN,
    KernelTable,
    _hook_attrs,
    hook_key,
    read_json,
    read_netlink,
    switch_messages,
    switch_script,
)
from bulkhead.netlink import NLA_F_NESTED
from bulkhead.netlink import attr as _attr
from bulkhead.netlink import string as _string

HOOK = "type filter hook input priority filter; policy accept;"


@pytest.mark.parametrize(("line", "key"), [
    (HOOK, ("filter", "input", 0)),
    ("type filter hook prerouting priority raw; policy accept;",
     ("filter", "prerouting", -300)),
    ("type filter hook output priority filter + 5; policy drop;", ("filter", "output", 5)),
    ("type filter hook forward priority -150;", ("filter", "forward", -150)),
    ("type nat hook postrouting priority srcnat - 10; policy accept;",
     ("nat", "postrouting", 90)),
    ("type filter hook ingress device eth0 priority 0;", None),     # a device: not read
    ("type filter hook input priority nosuch;", None),
    ("type filter hook sideways priority 0;", None),
])
def test_a_hook_line_is_read_as_type_hook_and_priority(line: str,
                                                        key: tuple[str, str, int] | None
                                                        ) -> None:
    assert hook_key(line) == key


def test_a_dumped_hook_is_read_as_type_hook_and_priority() -> None:
    hook = {1: struct.pack(">I", 1), 2: struct.pack(">i", -300)}
    assert _hook_attrs(hook, b"filter\0") == ("filter", "input", -300)
    assert _hook_attrs({**hook, 3: b"eth0\0"}, b"filter\0") is None    # a device
    assert _hook_attrs({**hook, 4: b""}, b"filter\0") is None           # devices
    assert _hook_attrs({**hook, 1: struct.pack(">I", 9)}, b"filter\0") is None
    assert _hook_attrs(hook, None) is None


class _Dumps:
    """What `read_netlink` asks of a socket: dumps by message type."""

    def __init__(self, dumps: dict[int, list[bytes]]) -> None:
        self.dumps = dumps

    def dump(self, kind: int) -> list[bytes]:
        return self.dumps.get(kind, [])


def _chain(table: str, name: str, hook: bytes | None = None) -> bytes:
    """A GETCHAIN dump's payload: nfgenmsg, table, name, and a base chain's nested
    NFTA_CHAIN_HOOK with NFTA_CHAIN_TYPE."""
    out = bytes(4) + _string(1, table) + _string(3, name)
    if hook is not None:
        out += _attr(4 | NLA_F_NESTED, hook) + _string(7, "filter")
    return out


def test_the_netlink_dump_gives_each_base_chains_hook() -> None:
    """Read from the nested hook attribute: the hook by number, the priority signed;
    chains of other tables and regular chains without a hook."""
    raw = _attr(1, struct.pack(">I", 0)) + _attr(2, struct.pack(">i", -300))
    kernel = read_netlink(_Dumps({NFT_MSG_GETCHAIN: [
        _chain("t", "pre", raw), _chain("t", "plain"),
        _chain("other", "in", _attr(1, struct.pack(">I", 1)) + _attr(2, bytes(4)))]}),
        "t")   # type: ignore[arg-type]
    assert kernel.chains == {"pre": True, "plain": False}
    assert kernel.hooks == {"pre": ("filter", "prerouting", -300)}


def test_the_listing_gives_each_base_chains_hook() -> None:
    listing = json.dumps({"nftables": [
        {"metainfo": {}},
        {"chain": {"family": "inet", "table": "t", "name": "in", "handle": 1,
                   "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "t", "name": "dev", "handle": 2,
                   "type": "filter", "hook": "ingress", "prio": 0, "dev": "eth0",
                   "policy": "accept"}},
        {"chain": {"family": "inet", "table": "t", "name": "plain", "handle": 3}}]})
    kernel = read_json(listing)
    assert kernel.chains == {"in": True, "dev": True, "plain": False}
    assert kernel.hooks == {"in": ("filter", "input", 0)}


def _deleted(parts: list[tuple[int, int, bytes]]) -> set[str]:
    """The chains the switch's messages delete."""
    out = set()
    for kind, _, body in parts:
        if kind == NFT_MSG_DELCHAIN:
            out.add(body[len(_string(1, "t")):][4:].rstrip(b"\0").decode())
    return out


def test_the_switch_keeps_a_base_chain_whose_hook_is_the_same() -> None:
    """Kept: the same type, hook and priority (the switch's NEWCHAIN sets its policy at
    the commit; the renderer's are all accept, `replace.py` says why). Made again:
    another priority, a hook the kernel's listing did not say, a base chain that becomes
    a regular one or the other way round."""
    kernel = KernelTable(chains={"in": True, "out": True, "odd": True, "was": True,
                                 "now": False, "gone": True},
                         hooks={"in": ("filter", "input", 0), "out": ("filter", "output", 0),
                                "was": ("filter", "forward", 0),
                                "gone": ("filter", "input", 10)})
    new = Ruleset("t", chains={
        "in": Chain("in", ("accept",), "type filter hook input priority filter; "
                                       "policy drop;"),
        "out": Chain("out", (), "type filter hook output priority filter + 1; "
                                "policy accept;"),
        "odd": Chain("odd", (), HOOK),
        "was": Chain("was", ()),
        "now": Chain("now", (), "type filter hook forward priority filter;")})
    deleted = _deleted(switch_messages("t", kernel, new))
    assert deleted == {"out", "odd", "was", "now"}
    script = switch_script(kernel, new)
    assert {line.split()[-1] for line in script.splitlines()
            if line.startswith("delete chain")} == deleted
    # Every chain of the kernel's table is flushed all the same, the kept one too.
    assert {line.split()[-1] for line in script.splitlines()
            if line.startswith("flush chain")} == set(kernel.chains)


def test_a_kernel_hook_not_read_makes_the_chain_again() -> None:
    kernel = KernelTable(chains={"in": True})     # no hook: a reader that could not tell
    new = Ruleset("t", chains={"in": Chain("in", (), HOOK)})
    assert _deleted(switch_messages("t", kernel, new)) == {"in"}
