"""A whole table put in the kernel as one netlink transaction, with its big maps'
elements encoded here: what `nft -f` of the rendered script does, without `nft` reading
a million elements.

With 1,000,000 elements in a verdict map, `nft -f` of the rendered script costs 10-15 s,
about two thirds of it in `nft` itself (parsing and evaluating each element); the
kernel's part is the rest. So the applier loads a table in three steps:

1. `nft -f` compiles the table's structure into a staging table, `inet <table>_load`, in
   the same namespace: the big sets declared empty, each base chain declared with its
   hook but without rules and with policy accept (its rules go to a regular chain
   beside it), so packets pass the staging table untouched. (The agent's service may
   not make namespaces, RestrictNamespaces=yes; a scratch namespace is not an option.)
2. The staging table is read back over netlink (objects, chains, sets and their
   elements, rules) and turned into the messages that create the real table: its name
   put in, the base chains given their rules and policy back, and the attributes the
   kernel gave the copy (handles, use counts, positions, element counts) left out.
3. The new sets and maps the kernel's table lacks, with their elements, and the empty
   chains their elements jump to, in one batch; then one batch that deletes the
   staging table and switches the real one (`replace.switch_messages`: its chains
   flushed, its base chains made again, the old sets left for later) and creates the
   rest from those messages, as `nft` orders them. The kernel applies each batch as
   one transaction; `replace.py` says why the new sets come first and the old ones go
   last. (Called without `switch`, one batch deletes the table and makes it again.)

Anything this does not cover (an attribute it does not know, a set type the element
encoder does not take, a hook it cannot make harmless, a batch over MAX_BATCH) raises
`Unsupported`, the kernel refusing the batch raises `NetlinkError`, `nft` refusing the
staging script raises `StagingError`; the staging table is deleted, and the applier
loads the whole script with `nft -f` as before. Nothing of a failed attempt is in force.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import re
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from functools import partial

from bulkhead.dataplane.nftables.netlink import (
    DUMP_TRIES,
    FIELD_BYTES,
    MESSAGE_BYTES,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_GETSET,
    NFT_MSG_NEWSETELEM,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_FLAGS,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    Element,
    NftNetlink,
    Unsupported,
    _element_attr,
    _value,
    _verdict,
)
from bulkhead.dataplane.nftables.ruleset import Chain, Elements, NftSet, Ruleset
from bulkhead.netlink import NLA_F_NESTED, NLM_F_CREATE, NetlinkError
from bulkhead.netlink import attr as _attr
from bulkhead.netlink import nested as _nested
from bulkhead.netlink import string as _string

# A set with at least this many elements has them encoded here (if its type allows);
# smaller sets go through `nft` (the staging table) with the rest of the table.
BIG_SET = 1_000
# No batch larger than this (bytes) is sent; `nft -f` loads such a table instead.
MAX_BATCH = 256 << 20

NFT_MSG_NEWTABLE = 0
NFT_MSG_DELTABLE = 2
NFT_MSG_NEWCHAIN = 3
NFT_MSG_NEWRULE = 6
NFT_MSG_NEWSET = 9
NFT_MSG_GETSETELEM = 13
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NLM_F_APPEND = 0x800
NFTA_TABLE_NAME = 1
NFTA_SET_ID = 10
NFTA_CHAIN_NAME = 3
NFTA_CHAIN_POLICY = 5
NFTA_RULE_CHAIN = 2
# What the table's name becomes for the staging table; a base chain's rules go to a
# regular chain named after it with RULES appended.
STAGING = "_load"
RULES = "__load"
POLICIES = {"accept": 1, "drop": 0}

# The attributes of each kind of object that create it again. Left out: handles, use
# counts, a rule's position (its predecessor's handle), a set's backend and element
# count (dumped by newer kernels), padding. An attribute not named here or in SKIPPED
# is unknown: the table is not copied (Unsupported).
KEPT = {
    NFT_MSG_NEWOBJ: {1, 2, 3, 4, 8},                  # table name type data userdata
    NFT_MSG_NEWCHAIN: {1, 3, 4, 5, 7, 8, 10, 12},     # table name hook policy type
                                                      # counters flags userdata
    NFT_MSG_NEWSET: {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 17, 18},
    NFT_MSG_NEWRULE: {1, 2, 4, 5, 7},                 # table chain expressions compat
                                                      # userdata
}
SKIPPED = {
    NFT_MSG_NEWOBJ: {5, 6, 7},                        # use handle pad
    NFT_MSG_NEWCHAIN: {2, 6, 9, 11},                  # handle use pad id
    NFT_MSG_NEWSET: {10, 14, 16, 19, 20},             # id pad handle type count
    NFT_MSG_NEWRULE: {3, 6, 8, 9, 10, 11},            # handle position pad ids
}
# Attributes of a dumped set element that are copied: key, data, flags, userdata,
# object reference, key end. Timeouts, expirations and per-element expressions are not.
ELEMENT_KEPT = {1, 2, 3, 6, 9, 10}


class StagingError(Exception):
    """`nft` refused the staging script (or could not run)."""


# ----------------------------------------------------------------------- elements
def element_attrs(nft_set: NftSet) -> list[bytes]:
    """The NFTA_LIST_ELEM attributes of every element of `nft_set`, as the netlink
    encoder (`netlink._element_attr`) writes them, joined into pieces of whole elements
    of at most MESSAGE_BYTES each (one message's worth). For sets without intervals
    whose last field is an address (`ipv4_addr`, `inet_proto . inet_service .
    ipv4_addr : verdict`...); Unsupported for others and for any text that is not a
    plain element of the set's type.

    A million elements cost seconds one by one in Python, so the texts are taken in
    runs that share everything but the address (the fields before it and the verdict):
    a sorted list holds each run together, found by bisection (an unsorted one is
    sorted first). A run's addresses are cut out of its joined text
    with `str.replace`, packed by `inet_pton` (strict: four dotted decimals, or an IPv6
    text) and joined with the bytes that stand between two elements' addresses, all
    in C."""
    if not encodes(nft_set):
        raise Unsupported(f"set {nft_set.name} ({nft_set.type}, flags {nft_set.flags}) "
                          "is not encoded whole")
    types = [t.strip() for t in nft_set.type.split(" . ")]
    family = socket.AF_INET if types[-1] == "ipv4_addr" else socket.AF_INET6
    size = FIELD_BYTES[types[-1]]
    elements = nft_set.elements
    texts: Sequence[str] = elements.texts() if isinstance(elements, Elements) \
        else tuple(elements)
    pieces: list[bytes] = []
    i = 0
    resorted = False
    while i < len(texts):
        key, sep, data = texts[i].partition(" : ")
        if bool(sep) != (nft_set.map_to is not None):
            raise Unsupported(f"element {texts[i]!r} does not fit {nft_set.name}")
        fields = key.split(" . ")
        if len(fields) != len(types):
            raise Unsupported(f"element {texts[i]!r} does not fit the type {nft_set.type}")
        prefix = key[:len(key) - len(fields[-1])]     # "6 . 6000 . ", "" for one field
        if prefix:
            end = max(i + 1, bisect.bisect_left(texts, prefix + "\U0010ffff", i))
            if ("\n" + "\n".join(texts[i:end])).count("\n" + prefix) != end - i:
                if not resorted:
                    # Not sorted after all (a caller's list): what is left is sorted
                    # once (a set has no order), so that every run is found by
                    # bisection; trying each text's run as a slice up to where the
                    # bisection of an unsorted list lands would cost quadratic time.
                    texts, i, resorted = sorted(texts[i:]), 0, True
                    continue
                # Still not (a text with a line break): the run is what begins with
                # the prefix from here on, found one by one.
                end = i + 1
                while end < len(texts) and texts[end].startswith(prefix):
                    end += 1
        else:
            end = len(texts)
        head = b"".join(_padded(_value(t, f.strip()))
                        for t, f in zip(types[:-1], fields[:-1], strict=True))
        for verdict, addresses in _by_verdict(texts[i:end], prefix, sep + data):
            if verdict is not None:
                verdict_pair = _verdict(verdict)
            elif nft_set.map_to is None:
                verdict_pair = None
            else:
                raise Unsupported(f"an element of {nft_set.name} without a verdict")
            try:
                packed = list(map(partial(socket.inet_pton, family), addresses))
            except OSError:
                raise Unsupported(f"set {nft_set.name}: an element is not an address "
                                  f"of its type") from None
            # One element's attribute, cut around its address: what comes before and
            # after it is the same for every element of the run.
            sample = _element_attr(Element(head + bytes(size), verdict=verdict_pair))
            at = 12 + len(head)   # LIST_ELEM, KEY and DATA_VALUE headers, earlier fields
            before, after = sample[:at], sample[at + size:]
            joined = before + (after + before).join(packed) + after
            pieces += _cut(joined, len(sample))
        i = end
    return _merged(pieces)


def _padded(raw: bytes) -> bytes:
    return raw.ljust((len(raw) + 3) // 4 * 4, b"\0")


def _by_verdict(run: Sequence[str], prefix: str, suffix: str
                ) -> Iterator[tuple[str | None, list[str]]]:
    """The address texts of `run` (texts that begin with `prefix`, or should), by
    verdict (None in a set). If every text ends in `suffix` (" : accept"), the run is
    cut in C; otherwise each text is split here. A text that does not begin with
    `prefix` keeps it, and the address check refuses it."""
    body = "\n".join(run) + "\n"
    if prefix:
        body = ("\n" + body).replace("\n" + prefix, "\n")[1:]
    if not suffix:
        yield None, body[:-1].split("\n")
        return
    if body.count(suffix + "\n") == len(run):
        yield suffix.partition(" : ")[2], body.replace(suffix + "\n", "\n")[:-1].split("\n")
        return
    groups: dict[str | None, list[str]] = {}
    for line in body[:-1].split("\n"):
        address, sep, verdict = line.partition(" : ")
        groups.setdefault(verdict if sep else None, []).append(address)
    yield from groups.items()


def _cut(joined: bytes, size: int) -> list[bytes]:
    """`joined` (elements of `size` bytes each) in pieces of at most MESSAGE_BYTES."""
    step = max(1, MESSAGE_BYTES // size) * size
    return [joined[at:at + step] for at in range(0, len(joined), step)]


def _merged(pieces: list[bytes]) -> list[bytes]:
    """Neighbouring pieces joined while they stay within MESSAGE_BYTES."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for piece in pieces:
        if group and size + len(piece) > MESSAGE_BYTES:
            out.append(b"".join(group))
            group, size = [], 0
        group.append(piece)
        size += len(piece)
    if group:
        out.append(b"".join(group))
    return out


def encodes(nft_set: NftSet) -> bool:
    """Whether `element_attrs` takes sets of this declaration (its texts aside)."""
    types = [t.strip() for t in nft_set.type.split(" . ")]
    return not nft_set.flags and nft_set.map_to in (None, "verdict") and \
        types[-1] in ("ipv4_addr", "ipv6_addr") and all(t in FIELD_BYTES for t in types)


def big_sets(ruleset: Ruleset, at_least: int = BIG_SET) -> dict[str, list[bytes]]:
    """The sets of `ruleset` with at least `at_least` elements whose elements
    `element_attrs` encodes, with their encoded elements."""
    out: dict[str, list[bytes]] = {}
    for name, s in ruleset.sets.items():
        if len(s.elements) >= at_least:
            try:
                out[name] = element_attrs(s)
            except Unsupported:
                continue          # nft writes this one's elements
    return out


# ----------------------------------------------------------------------- the staging copy
def staging(ruleset: Ruleset, empty: frozenset[str]) -> tuple[Ruleset, dict[str, int]]:
    """The staging table for `ruleset` (`inet <table>_load`), the sets in `empty`
    declared without elements; and each base chain's policy (NF_ACCEPT 1, NF_DROP 0)."""
    chains: dict[str, Chain] = {}
    policies: dict[str, int] = {}
    for chain in ruleset.chains.values():
        if chain.hook is None:
            chains[chain.name] = chain
            continue
        found = re.findall(r"\bpolicy\s+(\w+)\s*;", chain.hook)
        if len(found) > 1 or (found and found[0] not in POLICIES):
            raise Unsupported(f"chain {chain.name}: hook {chain.hook!r}")
        policies[chain.name] = POLICIES[found[0] if found else "accept"]
        hook = re.sub(r"\bpolicy\s+\w+\s*;", "", chain.hook).strip()
        rules = chain.name + RULES
        if rules in ruleset.chains:
            raise Unsupported(f"a chain is named {rules}")
        chains[chain.name] = Chain(chain.name, (), f"{hook} policy accept;")
        chains[rules] = Chain(rules, chain.rules)
    sets = {name: dataclasses.replace(s, elements=()) if name in empty else s
            for name, s in ruleset.sets.items()}
    return Ruleset(ruleset.table + STAGING, sets=sets, chains=chains,
                   counters=dict(ruleset.counters)), policies


def _attributes(data: bytes, at: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type without flags, the attribute's bytes with header and padding)."""
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            raise Unsupported("a malformed netlink attribute")
        padded = (length + 3) & ~3
        yield kind & 0x3FFF, data[at:at + padded]
        at += padded


def _table_name(payload: bytes) -> str | None:
    for kind, raw in _attributes(payload, 4):
        if kind == 1:                     # every object's first attribute: its table
            length = struct.unpack_from("=H", raw)[0]
            return raw[4:length].rstrip(b"\0").decode(errors="replace")
    return None


def _recreate(kind: int, payload: bytes, table: str,
              replace: dict[int, bytes] | None = None) -> bytes:
    """The body of a NEW* message that creates the dumped object `payload` again, in
    `table`, with the attributes in `replace` (type -> attribute) instead of its own.
    Unsupported if the object lacks one of those: a base chain dumped without its
    policy would otherwise be made with the kernel's default, accept."""
    out = []
    replaced = set()
    for attr, raw in _attributes(payload, 4):
        if attr == 1:                           # every object's table
            out.append(_string(1, table))
        elif replace and attr in replace:
            out.append(replace[attr])
            replaced.add(attr)
        elif attr in KEPT[kind]:
            out.append(raw)
        elif attr not in SKIPPED[kind]:
            raise Unsupported(f"nf_tables message {kind}: attribute {attr} is not copied")
    if replace and replaced != set(replace):
        raise Unsupported(f"nf_tables message {kind}: attributes "
                          f"{sorted(set(replace) - replaced)} missing from the dump")
    return b"".join(out)


def _name(payload: bytes, kind: int) -> str:
    """The string attribute `kind` of a dumped object (a set's or chain's name, a rule's
    chain)."""
    for attr, raw in _attributes(payload, 4):
        if attr == kind:
            length = struct.unpack_from("=H", raw)[0]
            return raw[4:length].rstrip(b"\0").decode()
    raise Unsupported(f"a dumped object without attribute {kind}")


def _element_order(raw: bytes) -> tuple[bytes, int]:
    """Ascending key, an end element before a start of the same key (`in_kernel_order`):
    the order `nft` sends an interval set's elements in."""
    key, flags = b"", 0
    for attr, sub in _attributes(raw, 4):
        if attr == NFTA_SET_ELEM_KEY:
            key = sub
        elif attr == NFTA_SET_ELEM_FLAGS:
            flags = struct.unpack_from(">I", sub, 4)[0]
    return key, -flags


def _dumped_elements(nl: NftNetlink, table: str, set_name: str) -> list[bytes]:
    """The set's elements as NFTA_LIST_ELEM attributes that create them again, in the
    order `nft` sends them."""
    request = _string(NFTA_SET_ELEM_LIST_TABLE, table) + _string(NFTA_SET_ELEM_LIST_SET,
                                                                  set_name)
    out: list[bytes] = []
    for payload in nl.dump(NFT_MSG_GETSETELEM, request):
        for attr, raw in _attributes(payload, 4):
            if attr != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for inner, element in _attributes(raw, 4):
                if inner != NFTA_LIST_ELEM:
                    continue
                kept = []
                for sub, value in _attributes(element, 4):
                    if sub not in ELEMENT_KEPT:
                        raise Unsupported(f"set {set_name}: element attribute {sub} "
                                          "is not copied")
                    kept.append(value)
                out.append(_nested(NFTA_LIST_ELEM, *kept))
    out.sort(key=_element_order)
    return out


def _element_messages(table: str, set_name: str, attrs: Sequence[bytes]
                      ) -> Iterator[tuple[int, int, bytes]]:
    head = _string(NFTA_SET_ELEM_LIST_TABLE, table) + _string(NFTA_SET_ELEM_LIST_SET,
                                                               set_name)
    for piece in _merged(list(attrs)):
        # A nested attribute's length is 16 bits: each piece stays under MESSAGE_BYTES.
        header = struct.pack("=HH", 4 + len(piece), NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED)
        yield NFT_MSG_NEWSETELEM, NLM_F_CREATE, head + header + piece


def copied_table(nl: NftNetlink, source: str, table: str, elements: dict[str, list[bytes]],
                 policies: dict[str, int], kept: frozenset[str] = frozenset(),
                 early: frozenset[tuple[int, str]] = frozenset(),
                 first: list[tuple[int, int, bytes]] | None = None
                 ) -> list[tuple[int, int, bytes]]:
    """The messages that create `inet <table>` as `inet <source>` (a staging table from
    `staging`) stands in the namespace of `nl`, in the order `nft` sends them (objects,
    chains, sets each with its elements, rules): the base chains (`policies`) get their
    policy and the rules of their RULES chain, and the sets named in `elements` (set
    name -> encoded pieces) get those elements instead of the ones they hold.
    Objects (counters) named in `kept` are not created: the table keeps its own. The
    sets and chains in `early` ((NFT_MSG_NEWSET or NFT_MSG_NEWCHAIN, name)) go to `first`
    instead, sets with their elements, chains without their rules.
    Unsupported if the source table is missing or holds what is not copied."""
    parts: list[tuple[int, int, bytes]] = []
    rules: list[tuple[int, int, bytes]] = []
    found = False
    sets = 0
    for get, new in ((NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ), (NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN),
                     (NFT_MSG_GETSET, NFT_MSG_NEWSET), (NFT_MSG_GETRULE, NFT_MSG_NEWRULE)):
        for payload in list(nl.dump(get)):
            if _table_name(payload) != source:
                continue
            found = True
            if new == NFT_MSG_NEWOBJ and _name(payload, 2) in kept:
                continue
            replace: dict[int, bytes] = {}
            if new == NFT_MSG_NEWRULE:
                chain = _name(payload, NFTA_RULE_CHAIN)
                if chain.endswith(RULES) and chain[:-len(RULES)] in policies:
                    replace[NFTA_RULE_CHAIN] = _string(NFTA_RULE_CHAIN, chain[:-len(RULES)])
                elif chain in policies:
                    raise Unsupported(f"a rule in the staged base chain {chain}")
                rules.append((new, NLM_F_CREATE | NLM_F_APPEND,
                              _recreate(new, payload, table, replace)))
                continue
            if new == NFT_MSG_NEWCHAIN:
                chain = _name(payload, NFTA_CHAIN_NAME)
                if chain.endswith(RULES) and chain[:-len(RULES)] in policies:
                    continue                     # its rules go to the base chain
                if chain in policies:
                    replace[NFTA_CHAIN_POLICY] = _attr(NFTA_CHAIN_POLICY,
                                                       struct.pack(">I", policies[chain]))
            body = _recreate(new, payload, table, replace)
            if new == NFT_MSG_NEWSET:
                # The kernel wants an ID for a new set (a rule of the same batch may
                # name it by that); rules here name sets by name.
                sets += 1
                body += _attr(NFTA_SET_ID, struct.pack(">I", sets))
            # NFTA_SET_NAME, NFTA_CHAIN_NAME
            name = _name(payload, 2) if new == NFT_MSG_NEWSET else \
                _name(payload, NFTA_CHAIN_NAME) if new == NFT_MSG_NEWCHAIN else ""
            into = first if first is not None and name and (new, name) in early else parts
            into.append((new, NLM_F_CREATE, body))
            if new == NFT_MSG_NEWSET:
                attrs = elements[name] if name in elements else \
                    _dumped_elements(nl, source, name)
                into += _element_messages(table, name, attrs)
    if not found:
        raise Unsupported(f"table inet {source} is missing")
    return parts + rules


def load(nl: NftNetlink, ruleset: Ruleset, nft: Sequence[str] = ("nft",),
         at_least: int = BIG_SET, switch: Sequence[tuple[int, int, bytes]] | None = None,
         kept: frozenset[str] = frozenset(), early: Sequence[str] = (),
         early_chains: Sequence[str] = ()) -> int:
    """Replace `inet <table>` in the namespace of `nl` with `ruleset`, in one
    transaction (see the module's docstring); the sets with at least `at_least`
    elements that `element_attrs` encodes get their elements from here. `nft`: the
    command that runs `nft` in that namespace. `switch`: the messages that clear the
    way in place of deleting the table (`replace.switch_messages`: the old sets stay),
    `kept` the counters the table keeps, `early` the sets created (with their
    elements) in a transaction of their own before that one, so that they are whole in
    the kernel before any rule uses them, with the regular chains `early_chains` (empty;
    their rules come with the rest). Returns the number of messages sent.
    Raises Unsupported (nothing sent), StagingError (`nft` refused the staging script)
    or NetlinkError (the kernel refused the batch: nothing of it applied); the staging
    table is gone in every case."""
    elements = big_sets(ruleset, at_least)
    if not elements:
        raise Unsupported(f"no set of {at_least} elements or more that is encoded here")
    staged, policies = staging(ruleset, frozenset(elements))
    table, source = _string(NFTA_TABLE_NAME, ruleset.table), _string(NFTA_TABLE_NAME,
                                                                    staged.table)
    try:
        try:
            done = subprocess.run([*nft, "-f", "-"], input=staged.script(), text=True,
                                  capture_output=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StagingError(f"nft could not run: {e}") from None
        if done.returncode != 0:
            raise StagingError(done.stderr.strip() or "nft -f of the staging table failed")
        for attempt in range(DUMP_TRIES):
            try:
                first: list[tuple[int, int, bytes]] = []
                body = copied_table(nl, staged.table, ruleset.table, elements, policies,
                                    kept, frozenset(
                                        [(NFT_MSG_NEWSET, n) for n in early]
                                        + [(NFT_MSG_NEWCHAIN, n) for n in early_chains]),
                                    first)
                break
            except NetlinkError as e:
                # A commit (anyone's, in any table) interrupted a dump: read it again.
                if e.code != errno.EINTR or attempt == DUMP_TRIES - 1:
                    raise
        del elements        # copied into the messages: a million elements are 40 MB
        clear = list(switch) if switch is not None else [
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, table), (NFT_MSG_DELTABLE, 0, table),
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, table)]
        parts = [(NFT_MSG_DELTABLE, 0, source), *clear, *body]
        if sum(len(p[2]) + 20 for p in parts) > MAX_BATCH or \
                sum(len(p[2]) + 20 for p in first) > MAX_BATCH:
            raise Unsupported(f"a batch over {MAX_BATCH} bytes")
        sent = 0
        if first:
            sent = nl.transaction([(NFT_MSG_NEWTABLE, NLM_F_CREATE, table), *first])
        return sent + nl.transaction(parts)
    except BaseException:
        # Whatever was staged goes (it was harmless: empty hooks, policy accept).
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run([*nft, "-f", "-"], input=f"table inet {staged.table}\n"
                           f"delete table inet {staged.table}\n", text=True,
                           capture_output=True, timeout=60, check=False)
        raise
