"""bulkhead.model.checks: the field checks, here the port forms."""

from __future__ import annotations

import ipaddress

import netaddr
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.model import (
    GlobalNetworkPolicy,
    NamedPort,
    PortRange,
    parse_resource,
)
from bulkhead.model.checks import check_cidr, check_ip, check_rule_net
from bulkhead.model.errors import ValidationError
from bulkhead.model.reader import Reader
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
