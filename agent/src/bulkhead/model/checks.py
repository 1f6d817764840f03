"""Field checks shared by the resource kinds: names, labels, CIDRs, ports, protocols."""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass
from functools import partial

from bulkhead.model.errors import ValidationError
from bulkhead.model.reader import Reader, show
from bulkhead.net import BITS, Span, address_text, parse_network
from bulkhead.selector import Selector, SelectorError, parse

# DNS-1123 subdomain, as Calico and Kubernetes check resource names.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A tier name is used as a prefix `<tier>.<policy>`, so it is a single DNS label.
_TIER = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# IANA service names (Kubernetes' named ports): lowercase, digits and '-', one letter.
_PORT_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_IFACE = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
# A DNS subdomain (RFC 1123 labels, lowercase), as Calico Enterprise checks a domain once
# its one wildcard label is put aside (ValidateWildName); no length bound, as there.
_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

PROTOCOL_NAMES = {"TCP": 6, "UDP": 17, "ICMP": 1, "ICMPV6": 58, "SCTP": 132, "UDPLITE": 136}
CANONICAL_PROTOCOL = {"TCP": "TCP", "UDP": "UDP", "ICMP": "ICMP", "ICMPV6": "ICMPv6",
                      "SCTP": "SCTP", "UDPLITE": "UDPLite"}
PORT_PROTOCOLS = frozenset({6, 17, 132})  # protocols that carry ports in rules (Calico)


def check_name(r: Reader, value: str) -> None:
    if len(value) > 253 or not _NAME.match(value):
        raise r.fail(f"{show(value)} is not a valid name (lowercase letters, digits, '-' and "
                     "'.', starting and ending with a letter or digit, at most 253 characters)")


_POLICY_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_policy_name(r: Reader, value: str) -> None:
    """Calico's policy names: a DNS label, optionally prefixed by `<tier>.`."""
    if len(value) > 253 or not _POLICY_NAME.match(value):
        raise r.fail(f"{show(value)} is not a valid policy name (lowercase letters, digits "
                     "and '-', starting and ending with a letter or digit, optionally "
                     "prefixed by '<tier>.')")


def check_tier_name(r: Reader, value: str) -> None:
    if len(value) > 63 or not _TIER.match(value):
        raise r.fail(f"{show(value)} is not a valid tier name (lowercase letters, digits and "
                     "'-', starting and ending with a letter or digit, at most 63 characters)")


def check_label_key(r: Reader, key: str) -> None:
    """Kubernetes' qualified name (Calico's validateObjectMetaLabels: IsQualifiedName)."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _NAME.match(prefix)):
        raise r.fail(f"label key {show(key)}: prefix {show(prefix)} is not a DNS subdomain")
    if len(name) > 63 or not _LABEL_NAME.match(name):
        raise r.fail(f"label key {show(key)} is not valid (letters, digits, '-', '_' and '.', "
                     "starting and ending with a letter or digit, at most 63 characters, "
                     "with an optional DNS-subdomain prefix and '/')")


MAX_ANNOTATIONS_SIZE = 256 * 1024  # keys and values together (Calico, as Kubernetes)


def _utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, as Go's len() counts a string (a lone surrogate, which
    strict JSON may carry, as three)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def check_annotations(r: Reader, annotations: dict[str, str]) -> None:
    """Calico's validateObjectMetaAnnotations: each key a qualified name once lowercased
    (so `ProjectCalico.org/Label` is fine), and at most 256 KiB of keys and values."""
    total = 0
    for key, value in annotations.items():
        try:
            check_label_key(r, key.lower())
        except ValidationError:
            raise r.fail(f"annotation key {show(key)} is not valid (letters, digits, '-', '_' "
                         "and '.', starting and ending with a letter or digit, at most 63 "
                         "characters, with an optional DNS-subdomain prefix and '/')") from None
        total += _utf8_size(key) + _utf8_size(value)
    if total > MAX_ANNOTATIONS_SIZE:
        raise r.fail(f"annotations hold {total:,} bytes; at most {MAX_ANNOTATIONS_SIZE:,} "
                     "(keys and values together)")


def check_labels(r: Reader, labels: dict[str, str]) -> None:
    for key, value in labels.items():
        check_label_key(r, key)
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise r.fail(f"label {key}={show(value)}: value is not valid (letters, digits, '-', "
                         "'_' and '.', starting and ending with a letter or digit, at most 63 "
                         "characters, or empty)")


def check_interface(r: Reader, value: str) -> None:
    if value != "*" and not _IFACE.match(value):
        raise r.fail(f"{show(value)} is not an interface name or \"*\"")


MAX_SELECTOR_LENGTH = 1024  # Calico's CRD: MaxLength=1024 on every selector field


def check_selector(r: Reader, value: str, global_allowed: bool = True) -> Selector:
    """A selector as Calico takes it. Where Calico's CEL rule forbids `global()` (a policy's
    `selector`, a rule's `source`/`destination` `selector`), `global_allowed` is False: Calico
    tests the text for `global(`, so that is what is tested here too."""
    if len(value) > MAX_SELECTOR_LENGTH:
        raise r.fail(f"selector is {len(value):,} characters long; at most "
                     f"{MAX_SELECTOR_LENGTH:,}")
    if not global_allowed and "global(" in value:
        raise r.fail(f"{show(value)}: global() can only be used in an EntityRule "
                     "namespaceSelector (Calico); every host endpoint and network set is "
                     "global, so write all() or leave the selector out")
    try:
        return parse(value)
    except SelectorError as e:
        raise r.fail(f"{show(value)} is not a valid selector: at position {e.position}: "
                     f"expected {e.expected}") from None


def check_ip(r: Reader, value: str) -> str:
    """An address, returned in canonical form (read by `inet_pton`, written by
    `inet_ntop`)."""
    try:
        family, first, last = parse_network(value) if isinstance(value, str) else (0, 0, 1)
    except (ValueError, TypeError):
        raise r.fail(f"{show(value)} is not an IP address") from None
    if "/" in value or first != last:
        raise r.fail(f"{show(value)} is not an IP address")
    return address_text(first, family)


def _cidr(r: Reader, value: str) -> tuple[int, int, int, int]:
    """(family, address, prefix length, network) of a CIDR or a bare address."""
    try:
        return _cidr_parts(value)
    except (ValueError, TypeError):
        raise r.fail(f"{show(value)} is not a CIDR (e.g. 198.18.0.0/24 or 2001:2::/48)") from None


def _cidr_parts(value: str) -> tuple[int, int, int, int]:
    """`_cidr` without a Reader: ValueError or TypeError for what is not a CIDR."""
    addr, slash, plen = value.partition("/")
    family, first, _ = parse_network(addr)
    width = BITS[family]
    if slash and (not (plen.isascii() and plen.isdigit()) or int(plen) > width):
        raise ValueError(plen)
    length = int(plen) if slash else width
    return family, first, length, first & ~((1 << (width - length)) - 1)


def check_cidr(r: Reader, value: str) -> str:
    """A CIDR or a bare address (a /32 or /128), returned in canonical masked form. (The
    address is read by `inet_pton`, as netaddr's INET_PTON reads it, and written by
    `inet_ntop`: a network set of 100,000 nets is read in a fraction of netaddr's time.)"""
    family, _, length, network = _cidr(r, value)
    return f"{address_text(network, family)}/{length}"


_PTON4 = partial(socket.inet_pton, socket.AF_INET)


def read_cidrs(values: object
               ) -> tuple[tuple[str, ...], tuple[tuple[Span, ...], tuple[Span, ...]]] | None:
    """`check_cidr` of each value of a list, and the IPv4 and the IPv6 spans of the CIDRs
    (first and last address, in the order given), read without a `Reader` per value: a
    GlobalNetworkSet holds up to millions of nets. None when `values` is not a list or any
    value is not a string `check_cidr` takes: the caller then reads the list value by
    value, for the error and where it is."""
    if not isinstance(values, list):
        return None
    try:
        joined = "".join(values)
    except TypeError:                # a value that is not a string
        return None
    if "/" not in joined and ":" not in joined:
        # Bare IPv4 addresses (or not addresses at all), read by inet_pton in one pass.
        # What it takes is four decimal numbers up to 255 without leading zeros, joined
        # by dots: the text `address_text` writes, so the canonical form is the value
        # with /32 (a test holds this against `check_cidr`).
        try:
            packed = b"".join(map(_PTON4, values))
        except (OSError, ValueError):
            return None
        firsts = struct.unpack(f">{len(values)}I", packed)
        v4 = tuple(zip(firsts, firsts, strict=True))
        return tuple([value + "/32" for value in values]), (v4, ())
    texts: list[str] = []
    spans: tuple[list[Span], list[Span]] = ([], [])
    for value in values:
        try:
            family, _, length, network = _cidr_parts(value)
        except (ValueError, TypeError):
            return None
        texts.append(f"{address_text(network, family)}/{length}")
        spans[family == 6].append((network, network | (1 << (BITS[family] - length)) - 1))
    return tuple(texts), (tuple(spans[0]), tuple(spans[1]))


def check_rule_net(r: Reader, value: str) -> str:
    """A rule's `nets`/`notNets` entry, as Calico's validateRule takes it: a CIDR with a
    prefix length (it parses with ParseCIDR, so a bare address is refused) and no host bits
    set (the `net` tag: `10.0.0.1/8` is refused, not silently widened to 10.0.0.0/8)."""
    family, address, length, network = _cidr(r, value)
    canonical = f"{address_text(network, family)}/{length}"
    if "/" not in value:
        raise r.fail(f"{show(value)} has no prefix length; write {show(canonical)} "
                     "(rule nets are CIDRs in Calico)")
    if address != network:
        raise r.fail(f"{show(value)} has host bits set; write {show(canonical)}")
    return canonical


def check_domain(r: Reader, value: str) -> str:
    """A domain name or pattern, as Calico Enterprise takes it (lowercased): DNS labels of
    letters, digits and '-', and at most one '*', a whole label standing for one or more
    labels, first (*.x.y) or in the middle (x.*.y), never last."""
    name = value.lower()
    probe = name
    if probe.startswith("*."):
        probe = "x." + probe[2:]
    elif ".*." in probe:
        probe = probe.replace(".*.", ".x.", 1)
    if name.endswith(".*") or not _DOMAIN.match(probe):
        raise r.fail(f"{show(value)} is not a domain name: labels of letters, digits and "
                     "'-', optionally with one wildcard label at the beginning (*.x.y) or in "
                     "the middle (x.*.y)")
    return name


def protocol_number(value: str | int) -> int:
    return value if isinstance(value, int) else PROTOCOL_NAMES[value.upper()]


def _small_number(digits: str, most: int) -> int | None:
    """ASCII `digits` as a number, None when it has more than `most` digits (leading zeros
    aside): int() of thousands of digits refuses, and counts the zeros too."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= most else None


def check_protocol(r: Reader, value: object) -> str | int:
    if isinstance(value, bool):
        raise r.fail(f"{show(value)} is not a protocol")
    if isinstance(value, int):
        if not 1 <= value <= 255:
            raise r.fail(f"{show(value)} is not a protocol number (1-255)")
        return value
    if isinstance(value, str):
        if value.isascii() and value.isdigit():
            number = _small_number(value, 3)
            if number is None:
                raise r.fail(f"{show(value)} is not a protocol number (1-255)")
            return check_protocol(r, number)
        if value in CANONICAL_PROTOCOL.values():
            return value
        if value.upper() in CANONICAL_PROTOCOL:
            raise r.fail(f"{show(value)}: protocol names are case-sensitive; write "
                         f"{CANONICAL_PROTOCOL[value.upper()]}")
    raise r.fail(f"{show(value)} is not a protocol (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite "
                 "or a number 1-255)")


@dataclass(frozen=True)
class PortRange:
    """A port or an inclusive range of ports."""

    first: int
    last: int

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def dump(self) -> int | str:
        return self.first if self.first == self.last else f"{self.first}:{self.last}"

    def __str__(self) -> str:
        return str(self.dump())


@dataclass(frozen=True)
class NamedPort:
    """A port named in the destination (or source) endpoint's `spec.ports`."""

    name: str

    def dump(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


Port = PortRange | NamedPort


def valid_port_name(text: str) -> bool:
    """Kubernetes' IsValidPortName, which Calico applies to rule and endpoint port names: at
    most 15 of a-z, 0-9 and '-', a letter among them, no '-' at either end nor '--'."""
    return (len(text) <= 15 and bool(_PORT_NAME.match(text)) and bool(re.search("[a-z]", text))
            and "--" not in text)

_PORT_ERROR = 'is not a port, a range "a:b" or a port name'


def check_port(r: Reader, value: object) -> Port:
    if isinstance(value, bool):
        raise r.fail(f"{show(value)} {_PORT_ERROR}")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise r.fail(f"{show(value)} is out of range 1-65535")
        return PortRange(value, value)
    if isinstance(value, str):
        text = value
        if text.isascii() and text.isdigit():
            number = _small_number(text, 5)
            if number is None:
                raise r.fail(f"{show(value)} is out of range 1-65535")
            return check_port(r, number)
        first, sep, last = text.partition(":")
        if sep:
            if not (text.isascii() and first.isdigit() and last.isdigit()):
                raise r.fail(f"{show(value)} {_PORT_ERROR}")
            lo, hi = _small_number(first, 5), _small_number(last, 5)
            if lo is None or hi is None or lo < 1 or hi > 65535:
                raise r.fail(f"{show(value)}: ports are 1-65535")
            if lo > hi:
                raise r.fail(f"{show(value)}: the range's first port is above its last")
            return PortRange(lo, hi)
        if valid_port_name(text):
            return NamedPort(text)
    raise r.fail(f"{show(value)} {_PORT_ERROR}")
