"""Replacing a whole table in three transactions, so that no packet meets a half-gone set.

A set's or map's elements are looked up in the kernel's *current* generation, while a
packet walks the rules of the generation it began in. A transaction that deletes a set
or map deactivates its elements at once, so a packet that began the old rules before
the commit and reaches the old set's lookup after it finds nothing and goes on to the
next rule: an `iifname vmap @ep_in` that misses ends the base chain, whose policy is
accept; a Deny by `ip saddr @s4_...` that misses goes on to a later Allow.
docs/dataplane.md, "The moment a table is replaced".

And a set made in the same transaction as the rules that use it can look empty to
packets for a moment after the commit: some set backends publish their elements after
the generation flip. So a full apply is three transactions:

1. The new sets and maps, with their elements (`early_sets`), and the new regular
   chains their elements jump to, empty (`early_chains`): no rule uses them yet. They
   have names of their own, the rendered names with a generation suffix (`_g0`, `_g1`,
   ...: `tagged`).
2. Switch: every chain the kernel holds is flushed, and the new table's counters (those
   it lacks), chains and rules created. A base chain the new table has with the same
   type, hook and priority is kept (flushed and given its new rules, one kernel
   object); only one whose hook changes is deleted and made again
   (`hook_key`). The old sets and maps, and the chains their elements jump to, stay
   in the kernel untouched: a packet still in the old rules
   finds the old sets whole, and the old chains it jumps to keep the old generation's
   rules (a chain's rules, unlike set elements, are read in the packet's own
   generation).
3. After an RCU grace period (every packet that began before the switch has left the
   hooks; `grace_period`): the old sets and maps, the chains only the old table had and
   its counters that the new one lacks are deleted.

A base chain is kept rather than made again because the kernel registers a new base
chain's hook when the batch is prepared, ahead of the old chain's at the same priority,
with no rules until the commit, and takes the old one off the hook only during the
commit, after the generation flip. A packet could pass the new chain before the flip
(no rules: its policy, accept) and the old one after it (its rules flushed in the new
generation: accept), and so meet no rule at all; that fits the one denied datagram of
50,000 a CI run once counted through a full apply. A kept chain has one list of rules
per generation, so a packet meets either the old rules or the new ones.
A chain's policy is not kept per generation: the commit sets it, and a packet still in
the old rules ends in the new policy. The renderer gives every base chain policy accept
and writes its drops as rules, so the policy never changes. A chain made again (its
hook changed) keeps the window above when its new priority is not above the old one.

Sets with timeouts keep their names (the DNS writer fills the domain sets and
`dns_hold` by name): they are deleted and made again in the switch, with their live
elements (the applier's `timed`). A packet that straddles the switch can miss one: a
domain set is only in egress Allow rules (a missed one drops an allowed packet), and a
missed `dns_hold` lets an answer pass unheld, as when the agent stops renewing it.
Chains are named by their content already.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bulkhead.dataplane.nftables.netlink import NFT_MSG_GETCHAIN, NFT_MSG_GETSET, NftNetlink
from bulkhead.dataplane.nftables.ruleset import Chain, NftSet, Ruleset
from bulkhead.netlink import NLM_F_CREATE
from bulkhead.netlink import attr as _attr
from bulkhead.netlink import string as _string

NFT_MSG_NEWTABLE = 0
NFT_MSG_DELCHAIN = 5
NFT_MSG_DELRULE = 8
NFT_MSG_DELSET = 11
NFT_MSG_GETOBJ = 19
NFT_MSG_DELOBJ = 20
NFT_SET_ANONYMOUS = 0x1
NFT_SET_MAP = 0x8
NFT_SET_OBJECT = 0x40
NFT_OBJECT_COUNTER = 1
TAG = re.compile(r"_g(\d+)$")
MOST_TAGS = 1000
# membarrier(MEMBARRIER_CMD_GLOBAL) returns after an RCU grace period (synchronize_rcu)
# on a machine with more than one CPU; its number by architecture.
MEMBARRIER = {"x86_64": 324, "aarch64": 283}
MEMBARRIER_CMD_GLOBAL = 1
# Without it (another architecture, nohz_full): a wait far longer than a packet's walk.
GRACE_FALLBACK = 0.05


@dataclass
class KernelTable:
    """The named objects of one table as the kernel holds them (no elements)."""

    chains: dict[str, bool] = field(default_factory=dict)     # name -> is a base chain
    sets: dict[str, bool] = field(default_factory=dict)       # name -> is a map
    counters: set[str] = field(default_factory=set)
    # A base chain's (type, hook, priority), for those the reader could tell.
    hooks: dict[str, tuple[str, str, int]] = field(default_factory=dict)


# inet hooks by number (NF_INET_*), and nft's named priorities for the inet family.
HOOKS = ("prerouting", "input", "forward", "output", "postrouting", "ingress")
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
              "srcnat": 100}
HOOK_TEXT = re.compile(r"^type\s+(\w+)\s+hook\s+(\w+)\s+priority\s+"
                       r"(-?\w+)(?:\s*([+-])\s*(\d+))?\s*;(?:\s*policy\s+\w+\s*;)?$")


def hook_key(hook: str) -> tuple[str, str, int] | None:
    """(type, hook, priority) of a rendered base chain's hook line ("type filter hook
    input priority filter; policy accept;"); None for what this does not read (a
    device, an unknown name), which the switch then makes again."""
    m = HOOK_TEXT.match(hook.strip())
    if m is None or m[2] not in HOOKS:
        return None
    base = m[3]
    if base in PRIORITIES:
        priority = PRIORITIES[base]
    elif re.fullmatch(r"-?\d+", base):
        priority = int(base)
    else:
        return None
    if m[4]:
        priority += int(m[5]) if m[4] == "+" else -int(m[5])
    return m[1], m[2], priority


def _attrs(payload: bytes) -> dict[int, bytes]:
    """A dumped object's attributes by type (values without headers)."""
    out: dict[int, bytes] = {}
    at = 4
    while at + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, at)
        if length < 4:
            break
        out[kind & 0x3FFF] = payload[at + 4:at + length]
        at += (length + 3) & ~3
    return out


def _text(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0").decode(errors="replace")


def read_netlink(nl: NftNetlink, table: str) -> KernelTable:
    """`inet <table>`'s chains, named sets and maps and counters, from netlink dumps
    (empty when the table is absent)."""
    out = KernelTable()
    for payload in nl.dump(NFT_MSG_GETCHAIN):
        a = _attrs(payload)
        if _text(a.get(1)) == table:
            name = _text(a.get(3))
            out.chains[name] = 4 in a                     # NFTA_CHAIN_HOOK
            if 4 in a and (key := _hook_attrs(_attrs(bytes(4) + a[4]), a.get(7))):
                out.hooks[name] = key
    for payload in nl.dump(NFT_MSG_GETSET):
        a = _attrs(payload)
        if _text(a.get(1)) != table:
            continue
        flags = struct.unpack(">I", a[3])[0] if len(a.get(3, b"")) == 4 else 0
        if not flags & NFT_SET_ANONYMOUS:
            out.sets[_text(a.get(2))] = bool(flags & (NFT_SET_MAP | NFT_SET_OBJECT))
    for payload in nl.dump(NFT_MSG_GETOBJ):
        a = _attrs(payload)
        if _text(a.get(1)) == table and a.get(3) == struct.pack(">I", NFT_OBJECT_COUNTER):
            out.counters.add(_text(a.get(2)))
    return out


def _hook_attrs(hook: dict[int, bytes], kind: bytes | None
                ) -> tuple[str, str, int] | None:
    """(type, hook, priority) from a dumped NFTA_CHAIN_HOOK's attributes (HOOKNUM 1,
    PRIORITY 2, DEV 3, DEVS 4) and NFTA_CHAIN_TYPE; None with a device or what is not
    read."""
    num, prio = hook.get(1, b""), hook.get(2, b"")
    if 3 in hook or 4 in hook or len(num) != 4 or len(prio) != 4 or kind is None:
        return None
    number = struct.unpack(">I", num)[0]
    if number >= len(HOOKS):
        return None
    return _text(kind), HOOKS[number], struct.unpack(">i", prio)[0]


def read_json(listing: str) -> KernelTable:
    """The same from `nft -j -t list table inet <table>` output."""
    out = KernelTable()
    for item in json.loads(listing).get("nftables", []):
        if not isinstance(item, dict):
            continue
        if isinstance(c := item.get("chain"), dict):
            name = str(c.get("name"))
            out.chains[name] = "hook" in c
            if "hook" in c and "dev" not in c and "device" not in c and \
                    isinstance(c.get("prio"), int) and c.get("hook") in HOOKS:
                out.hooks[name] = (str(c.get("type")), str(c["hook"]), c["prio"])
        elif isinstance(s := item.get("set"), dict):
            out.sets[str(s.get("name"))] = "map" in s
        elif isinstance(m := item.get("map"), dict):
            out.sets[str(m.get("name"))] = True
        elif isinstance(k := item.get("counter"), dict):
            out.counters.add(str(k.get("name")))
    return out


def next_tag(kernel: KernelTable) -> int:
    """The smallest generation suffix no set of the kernel's table carries."""
    used = {int(m[1]) for name in kernel.sets if (m := TAG.search(name))}
    for tag in range(MOST_TAGS):
        if tag not in used:
            return tag
    raise ValueError(f"every map suffix up to _g{MOST_TAGS - 1} is taken")


def current_tag(kernel: KernelTable) -> int | None:
    """The suffix of the kernel's sets when they share one (None otherwise)."""
    tags = {m[1] for name in kernel.sets if (m := TAG.search(name))}
    return int(tags.pop()) if len(tags) == 1 else None


def kernel_name(name: str, tag: int) -> str:
    return f"{name}_g{tag}"


def tagged(ruleset: Ruleset, tag: int | None) -> Ruleset:
    """`ruleset` as it goes to the kernel: each set and map but those with timeouts
    named with suffix `tag` (None: as rendered), the rules naming them so. Elements are
    the same objects."""
    maps = {name: kernel_name(name, tag) for name, s in ruleset.sets.items()
            if "timeout" not in s.flags} if tag is not None else {}
    if not maps:
        return ruleset

    def rename(rule: str) -> str:
        if "@" not in rule:
            return rule
        return re.sub(r"@([A-Za-z0-9_./]+)", lambda m: "@" + maps.get(m[1], m[1]), rule)

    sets = {maps.get(name, name): NftSet(maps.get(name, name), s.type, s.flags, s.elements,
                                         s.map_to) for name, s in ruleset.sets.items()}
    chains = {name: Chain(c.name, tuple(map(rename, c.rules)), c.hook)
              for name, c in ruleset.chains.items()}
    return Ruleset(ruleset.table, sets=sets, chains=chains, warnings=ruleset.warnings,
                   decisions=ruleset.decisions, counters=ruleset.counters,
                   domain_sets=ruleset.domain_sets)


# ----------------------------------------------------------------------- the switch
def _table_attr(table: str) -> bytes:
    return _string(1, table)


def switch_messages(table: str, kernel: KernelTable, new: Ruleset
                    ) -> list[tuple[int, int, bytes]]:
    """The first messages of the switch (before the new table's objects): the table
    made if absent, every chain flushed, the base chains the new table has with another
    hook deleted, the sets whose names the new table uses (those with timeouts) deleted.
    Other sets, maps and chains stay for the cleanup."""
    t = _table_attr(table)
    parts: list[tuple[int, int, bytes]] = [(NFT_MSG_NEWTABLE, NLM_F_CREATE, t)]
    for chain in sorted(kernel.chains):
        parts.append((NFT_MSG_DELRULE, 0, t + _string(2, chain)))
    for chain in sorted(kernel.chains):
        if _recreated(chain, kernel, new):
            parts.append((NFT_MSG_DELCHAIN, 0, t + _string(3, chain)))
    for name in sorted(kernel.sets):
        if name in new.sets:
            parts.append((NFT_MSG_DELSET, 0, t + _string(2, name)))
    return parts


def _recreated(chain: str, kernel: KernelTable, new: Ruleset) -> bool:
    """A chain of the kernel's table deleted in the switch and made again: one whose
    name the new table has, a base chain in either, unless both are base chains with
    the same type, hook and priority (then it is kept: the module's docstring says
    why). The kept chain's rules are flushed; the switch's NEWCHAIN for it updates it
    (the kernel takes that when the hook is the same) and sets its policy at the commit
    (the renderer's base chains all have policy accept)."""
    ours = new.chains.get(chain)
    if ours is None:
        return False
    if kernel.chains[chain] and ours.hook is not None:     # a base chain in both
        key = hook_key(ours.hook)
        return key is None or kernel.hooks.get(chain) != key
    return kernel.chains[chain] or ours.hook is not None


def switch_script(kernel: KernelTable, new: Ruleset) -> str:
    """`switch_messages` as `nft -f` lines, before the new table's body."""
    t = new.family_table
    lines = [f"table {t}"]
    lines += [f"flush chain {t} {chain}" for chain in sorted(kernel.chains)]
    lines += [f"delete chain {t} {chain}" for chain in sorted(kernel.chains)
              if _recreated(chain, kernel, new)]
    lines += [f"delete {'map' if kernel.sets[name] else 'set'} {t} {name}"
              for name in sorted(kernel.sets) if name in new.sets]
    return "\n".join(lines) + "\n"


def early_sets(kernel: KernelTable, new: Ruleset) -> list[str]:
    """The new sets created, with their elements, in a transaction before the switch:
    all but those whose names the kernel's table has (sets with timeouts)."""
    return sorted(name for name in new.sets if name not in kernel.sets)


def early_chains(kernel: KernelTable, new: Ruleset) -> list[str]:
    """The new regular chains the kernel's table lacks: made empty before the switch,
    with the early sets, for the verdicts of map elements to jump to (their rules come
    with the switch)."""
    return sorted(name for name, chain in new.chains.items()
                  if chain.hook is None and name not in kernel.chains)


def switch_body(kernel: KernelTable, new: Ruleset, early: Sequence[str] = ()) -> Ruleset:
    """What the switch creates: `new` without the counters the kernel's table keeps and
    the sets made before it (`early`)."""
    made = set(early)
    return Ruleset(new.table, sets={n: s for n, s in new.sets.items() if n not in made},
                   chains=new.chains,
                   counters={k: v for k, v in new.counters.items()
                             if k not in kernel.counters})


# ----------------------------------------------------------------------- the cleanup
@dataclass(frozen=True)
class Leftovers:
    """What the second transaction deletes: the old sets and maps, the chains and
    counters the new table does not have."""

    sets: tuple[tuple[str, bool], ...]      # (name, is a map)
    chains: tuple[str, ...]
    counters: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.sets or self.chains or self.counters)


def leftovers(kernel: KernelTable, new: Ruleset) -> Leftovers:
    return Leftovers(tuple((name, is_map) for name, is_map in sorted(kernel.sets.items())
                           if name not in new.sets),
                     tuple(c for c in sorted(kernel.chains) if c not in new.chains),
                     tuple(c for c in sorted(kernel.counters) if c not in new.counters))


def cleanup_messages(table: str, gone: Leftovers) -> list[tuple[int, int, bytes]]:
    """The second transaction: sets and maps first (map elements hold the chains),
    then the chains (flushed by the switch), then the counters."""
    t = _table_attr(table)
    parts = [(NFT_MSG_DELSET, 0, t + _string(2, name)) for name, _ in gone.sets]
    parts += [(NFT_MSG_DELCHAIN, 0, t + _string(3, name)) for name in gone.chains]
    parts += [(NFT_MSG_DELOBJ, 0, t + _string(2, name)
               + _attr(3, struct.pack(">I", NFT_OBJECT_COUNTER))) for name in gone.counters]
    return parts


def cleanup_script(family_table: str, gone: Leftovers) -> str:
    lines = [f"delete {'map' if is_map else 'set'} {family_table} {name}"
             for name, is_map in gone.sets]
    lines += [f"delete chain {family_table} {name}" for name in gone.chains]
    lines += [f"delete counter {family_table} {name}" for name in gone.counters]
    return "\n".join(lines) + ("\n" if lines else "")


def grace_period() -> None:
    """Return after an RCU grace period: every packet that was inside a netfilter hook
    when this was called has left it (membarrier(MEMBARRIER_CMD_GLOBAL) is
    synchronize_rcu with more than one CPU online). Where that call is not available,
    and with one CPU online (membarrier then returns at once, and on a preemptible
    kernel a packet preempted in the output hook could still be in the old rules), a
    wait of GRACE_FALLBACK seconds, far longer than a packet's walk of the rules."""
    number = MEMBARRIER.get(platform.machine())
    if number is not None and _online_cpus() > 1:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syscall(number, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
                return
        except (OSError, AttributeError):
            pass
    time.sleep(GRACE_FALLBACK)


def _online_cpus() -> int:
    """CPUs online now (1 when it cannot be told: the careful answer here)."""
    try:
        return max(1, os.sysconf("SC_NPROCESSORS_ONLN"))
    except (ValueError, OSError):
        return 1
