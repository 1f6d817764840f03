"""bulkhead.model.checks: the field checks, here the port forms."""

from __future__ import annotations

import ipaddress

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.model import (
    GlobalNetworkPolicy,
    NamedPort,
    PortRange,
    parse_resource,
)
from bulkhead.model.checks import check_cidr, check_ip, check_rule_net, read_cidrs
from bulkhead.model.errors import ValidationError
from bulkhead.model.reader import Reader
from bulkhead.net import parse_spans
from tests.modelfixture import gnp


def test_port_forms() -> None:
    policy = parse_resource(gnp({"ingress": [{"action": "Allow", "protocol": "TCP",
                                              "destination": {"ports": ["22", 1, "1:65535"]}}]}))
    assert isinstance(policy, GlobalNetworkPolicy)
    rule = policy.spec.ingress[0]
    assert rule.protocol == "TCP"
    assert rule.destination.ports == (PortRange(22, 22), PortRange(1, 1), PortRange(1, 65535))
    named = parse_resource(gnp({"ingress": [{"action": "Allow", "destination": {
        "ports": ["http"]}}]}))   # named ports need no protocol (Calico)
    assert isinstance(named, GlobalNetworkPolicy)
    assert named.spec.ingress[0].destination.ports == (NamedPort("http"),)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
                 st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v))),
                 st.sampled_from(["1.2.3", "01.2.3.4", "1.2.3.4.5", "::g", "x", "", "1.2.3.4/",
                                  "1.2.3.4/33", "::/129", "1.2.3.4/a", "1.2.3.4/-1"])),
       st.sampled_from(["", "/0", "/8", "/24", "/32", "/48", "/64", "/127", "/128", "/08"]))
def test_cidrs_are_read_and_written_as_netaddr_does(address: str, prefix: str) -> None:
    """check_cidr (inet_pton and inet_ntop, fast) answers what netaddr with INET_PTON did."""
    value = address + prefix
    try:
        ip = netaddr.IPAddress(address, flags=netaddr.INET_PTON)
        width = 32 if ip.version == 4 else 128
        plen = prefix[1:] if prefix else str(width)
        if not plen.isdigit() or int(plen) > width:
            raise ValueError
        want: str | None = str(netaddr.IPNetwork(f"{ip}/{int(plen)}").cidr)
    except (netaddr.AddrFormatError, ValueError):
        want = None
    reader = Reader("GlobalNetworkSet", "s", "spec.nets[0]", value)
    try:
        got: str | None = check_cidr(reader, value)
    except ValidationError:
        got = None
    assert got == want, value


ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
    st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v))),
    st.integers(0, 2**32 - 1).map(lambda v: f"::ffff:{ipaddress.IPv4Address(v)}"),
    st.integers(0, 2**16 - 1).map(lambda v: f"2001:2:0:0:0:0:0:{v:X}"),
    st.sampled_from(["1.2.3", "01.2.3.4", "1.2.3.4.5", "::g", "x", "", "1.2.3.4/32",
                     " 1.2.3.4", "1.2.3.4 ", "fe80::1%eth0", "::", "0.0.0.0"]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(ADDRESSES)
def test_addresses_are_read_and_written_as_netaddr_does(value: str) -> None:
    """check_ip (inet_pton and inet_ntop) answers what netaddr with INET_PTON did."""
    try:
        want: str | None = str(netaddr.IPAddress(value, flags=netaddr.INET_PTON))
    except (netaddr.AddrFormatError, ValueError, TypeError):
        want = None
    try:
        got: str | None = check_ip(Reader("HostEndpoint", "h", "spec.expectedIPs[0]", value),
                                   value)
    except ValidationError:
        got = None
    assert got == want, value


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(ADDRESSES, st.sampled_from(["", "/0", "/8", "/24", "/32", "/64", "/128"]))
def test_rule_nets_refuse_host_bits_as_netaddr_finds_them(address: str, prefix: str) -> None:
    value = address + prefix
    reader = Reader("GlobalNetworkPolicy", "p", "spec.ingress[0].source.nets[0]", value)
    try:
        canonical = check_cidr(reader, value)
    except ValidationError:
        return
    try:
        got: str | None = check_rule_net(reader, value)
    except ValidationError:
        got = None
    host_bits = netaddr.IPAddress(value.partition("/")[0]) != \
        netaddr.IPNetwork(canonical).network
    assert got == (None if "/" not in value or host_bits else canonical), value


# Network sets' nets: bare IPv4 addresses (read in bulk), with the forms inet_pton refuses
# or that look like one (leading zeros, short forms, spaces, other digits, NUL), CIDRs of
# both families and prefix forms check_cidr takes or refuses.
NETS = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
    st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
    st.tuples(ADDRESSES, st.sampled_from(["/0", "/8", "/24", "/32", "/64", "/128", "/024",
                                          "/33", "/", "/ 8", "/\u0668"])).map("".join),
    st.sampled_from(["01.2.3.4", "1.2.3.04", "1.2.3", "1.2.3.4.", "256.1.1.1", "1.2.3.\u0664",
                     "1.2.3.4\x00", "\x001.2.3.4", "1..2.3", "", " 1.2.3.4", "0.0.0.0",
                     "255.255.255.255"]))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(NETS, max_size=6), st.booleans())
def test_nets_read_in_bulk_are_what_check_cidr_reads_one_by_one(
        values: list[object], other: bool) -> None:
    """read_cidrs answers check_cidr's text for each value and the spans of those texts,
    or None exactly when check_cidr refuses one of them (or one is no string)."""
    if other:
        values = [*values, 1234]
    got = read_cidrs(values)
    try:
        want = tuple(check_cidr(Reader("GlobalNetworkSet", "s", "spec.nets[0]", v), v)
                     for v in values)  # type: ignore[arg-type]
    except (ValidationError, TypeError, AttributeError):
        assert got is None, values
        return
    assert got is not None, values
    v4, v6 = parse_spans(want)
    assert got == (want, (tuple(v4), tuple(v6))), values


def test_numbers_beyond_any_range_are_validation_errors_naming_the_field() -> None:
    """Strings of thousands of digits (int() refuses them) and integers beyond a float's
    range (float() overflows) are refused by field, with the value shortened."""
    cases = [
        ({"ingress": [{"action": "Allow", "protocol": "1" * 5000}]},
         r"spec.ingress\[0\].protocol: \"1{64}\.\.\.\" \(5,000 characters\) is not a "
         r"protocol number"),
        ({"ingress": [{"action": "Allow", "protocol": "TCP",
                       "destination": {"ports": ["9" * 5000]}}]},
         r"ports\[0\]: \"9{64}\.\.\.\" \(5,000 characters\) is out of range 1-65535"),
        ({"ingress": [{"action": "Allow", "protocol": "TCP",
                       "destination": {"ports": ["1:" + "9" * 5000]}}]},
         r"ports\[0\]: .*: ports are 1-65535"),
        ({"order": 10 ** 400}, r"spec.order: must be a finite number, not an integer of 401 "
         r"digits"),
    ]
    for spec, problem in cases:
        with pytest.raises(ValidationError, match=problem):
            parse_resource(gnp(spec))
    # Leading zeros count to int()'s limit of 4,300 digits too.
    zeros = "0" * 4400
    for spec, problem in [
            ({"ingress": [{"action": "Allow", "protocol": zeros + "6"}]}, None),
            ({"ingress": [{"action": "Allow", "protocol": "TCP",
                           "destination": {"ports": [zeros + "80", f"{zeros}80:{zeros}443"]}}]},
             None),
            ({"ingress": [{"action": "Allow", "protocol": zeros + "6000"}]},
             "is not a protocol number")]:
        if problem is None:
            parse_resource(gnp(spec))
        else:
            with pytest.raises(ValidationError, match=problem):
                parse_resource(gnp(spec))
    policy = parse_resource(gnp({"ingress": [{"action": "Allow", "protocol": "0006",
                                              "destination": {"ports": ["000080:0000443"]}}]}))
    assert isinstance(policy, GlobalNetworkPolicy)   # leading zeros still read
    assert policy.spec.ingress[0].destination.ports == (PortRange(80, 443),)
