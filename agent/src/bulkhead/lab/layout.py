"""A lab's addressing plan: its nets, its hosts and their addresses, the service and
uplink addresses. Pure: nothing here touches the kernel.

Hosts are numbered from 198.18.0.10 (IPv4) and 2001:2::10 (IPv6: the decimal host
number read as hex); the service address is the last usable address of each net;
198.19.254.0/24 is kept for uplinks, one /30 per lab.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from bulkhead.lab.kernel import LabError
from bulkhead.lab.names import (
    SWITCH,
    check_host_name,
    check_name,
    namespace,
    state_dir,
    uplink_ifname,
)

DEFAULT_NET4 = "198.18.0.0/15"
DEFAULT_NET6 = "2001:2::/64"
LAB_NET4 = ipaddress.IPv4Network("198.18.0.0/15")
LAB_NET6 = ipaddress.IPv6Network("2001:2::/48")
UPLINK_POOL = ipaddress.IPv4Network("198.19.254.0/24")
FIRST_HOST = 10
MAX_HOSTS = 1000

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class LabHost:
    """One lab host: its namespace, its port on the bridge, its addresses."""

    name: str
    index: int
    ns: str
    port: str
    interfaces: tuple[str, ...]  # "198.18.0.10/15", "2001:2::10/64"
    socket: str

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(i.split("/")[0] for i in self.interfaces)

    @property
    def ipv4(self) -> str | None:
        return next((a for a in self.addresses if ":" not in a), None)

    @property
    def ipv6(self) -> str | None:
        return next((a for a in self.addresses if ":" in a), None)


class Layout:
    """The plan of a lab of `hosts` (names, or a count: h1..hN) in `net4` and `net6`.
    `uplink` is the /30 the lab holds while it is up (None before)."""

    def __init__(self, name: str, hosts: Sequence[str] | int, *, net4: str = DEFAULT_NET4,
                 net6: str = DEFAULT_NET6) -> None:
        self.name = check_name(name)
        self.net4 = ipaddress.IPv4Network(net4)
        self.net6 = ipaddress.IPv6Network(net6)
        if not self.net4.subnet_of(LAB_NET4):
            raise ValueError(f"net4 {net4} is not inside {LAB_NET4}")
        if not self.net6.subnet_of(LAB_NET6):
            raise ValueError(f"net6 {net6} is not inside {LAB_NET6}")
        names = [f"h{i + 1}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= MAX_HOSTS:
            raise ValueError(f"a lab has 1-{MAX_HOSTS} hosts, not {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        if FIRST_HOST + len(names) >= self.net4.num_addresses - 2:
            raise ValueError(f"{len(names)} hosts do not fit in {self.net4}")
        self.hosts: dict[str, LabHost] = {}
        for index, host in enumerate(names):
            check_host_name(host)
            interfaces = (f"{self.net4[FIRST_HOST + index]}/{self.net4.prefixlen}",
                          f"{_auto_ip6(self.net6, index)}/{self.net6.prefixlen}")
            self.hosts[host] = LabHost(host, index, namespace(name, host), f"v{index}",
                                       interfaces, str(state_dir(name) / f"{host}.sock"))
        for info in self.hosts.values():
            self._check_interfaces(info.name, [ipaddress.ip_interface(i)
                                               for i in info.interfaces])
        self.uplink: ipaddress.IPv4Network | None = None

    @property
    def switch_ns(self) -> str:
        return namespace(self.name, SWITCH)

    @property
    def uplink_ifname(self) -> str:
        return uplink_ifname(self.name)

    @property
    def service_address(self) -> str:
        """IPv4 service address on the switch's bridge: the last usable address of net4.
        Lab hosts reach a server run in the switch namespace here."""
        return str(self.net4[-2])

    @property
    def service_address6(self) -> str:
        """IPv6 service address on the switch's bridge: the last address of net6."""
        return str(self.net6[-1])

    def _uplink(self) -> ipaddress.IPv4Network:
        if self.uplink is None:
            raise LabError(f"lab {self.name} is not up")
        return self.uplink

    @property
    def uplink_address(self) -> str:
        """The switch side of the uplink: where root-namespace tools reach a server run
        in the switch namespace."""
        return str(self._uplink()[2])

    @property
    def uplink_root_address(self) -> str:
        """The root-namespace side of the uplink."""
        return str(self._uplink()[1])

    def host(self, name: str) -> LabHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"lab {self.name} has no host {name!r} "
                           f"(hosts: {', '.join(self.hosts)})") from None

    def address(self, host: str, family: Literal[4, 6] = 4) -> str:
        """`host`'s first address of that family."""
        found = self.host(host).ipv4 if family == 4 else self.host(host).ipv6
        if found is None:
            raise LabError(f"lab host {host} has no IPv{family} address")
        return found

    def ns(self, where: str) -> str:
        """The namespace of a host, or of the switch for 'sw'."""
        return self.switch_ns if where == SWITCH else self.host(where).ns

    def resolve(self, dst: str, family: Literal[4, 6] | None = None) -> str:
        """An IP address as it is, or a lab host's address (IPv4 unless family=6)."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(dst))
        return self.address(dst, family or 4)

    def checked_addresses(self, addresses: Mapping[str, Sequence[str]]
                          ) -> dict[str, tuple[str, ...]]:
        """The interfaces ("ip/prefix") that would replace these hosts' addresses (plain
        IPs take the lab net's prefix length); ValueError if any is not allowed, or would
        be on two hosts."""
        new: dict[str, tuple[str, ...]] = {}
        for name, ips in addresses.items():
            self.host(name)
            parsed = [self._interface(ip_text) for ip_text in ips]
            self._check_interfaces(name, parsed)
            new[name] = tuple(str(i) for i in parsed)
        owners: dict[str, str] = {}
        for info in self.hosts.values():
            for ip_text in new.get(info.name, info.interfaces):
                addr = ip_text.split("/")[0]
                if addr in owners:
                    raise ValueError(f"address {addr} would be on both {owners[addr]} "
                                     f"and {info.name}")
                owners[addr] = info.name
        return new

    def _interface(self, text: str) -> IPInterface:
        try:
            if "/" in text:
                return ipaddress.ip_interface(text)
            addr = ipaddress.ip_address(text)
        except ValueError as e:
            raise ValueError(f"not an IP address: {text!r} ({e})") from None
        net = self.net4 if addr.version == 4 else self.net6
        return ipaddress.ip_interface(f"{addr}/{net.prefixlen}")

    def _check_interfaces(self, host: str, interfaces: Sequence[IPInterface]) -> None:
        reserved = {ipaddress.ip_address(self.service_address),
                    ipaddress.ip_address(self.service_address6)}
        for iface in interfaces:
            net = self.net4 if iface.version == 4 else self.net6
            if iface.ip not in net:
                raise ValueError(f"{host}: address {iface.ip} is outside the lab's net {net}")
            if iface.ip in reserved:
                raise ValueError(f"{host}: address {iface.ip} is the lab's service address")
            if iface.ip in UPLINK_POOL:
                raise ValueError(f"{host}: address {iface.ip} is in {UPLINK_POOL}, "
                                 "kept for lab uplinks")
            if iface.version == 4 and iface.ip in (iface.network.network_address,
                                                   iface.network.broadcast_address):
                raise ValueError(f"{host}: {iface.ip} is not a host address of "
                                 f"{iface.network}")

    # -- as the state file keeps it --------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "net4": str(self.net4), "net6": str(self.net6),
                "uplink": str(self.uplink) if self.uplink else None,
                "hosts": [{"name": h.name, "interfaces": list(h.interfaces)}
                          for h in self.hosts.values()]}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take the addresses and the uplink `dump` saved (of a layout of the same hosts)."""
        for h in saved["hosts"]:
            host = self.host(h["name"])
            self.hosts[host.name] = replace(host, interfaces=tuple(h["interfaces"]))
        uplink = saved.get("uplink")
        self.uplink = ipaddress.IPv4Network(uplink) if uplink else None


def _auto_ip6(net: ipaddress.IPv6Network, index: int) -> ipaddress.IPv6Address:
    # The decimal host number read as hex: 198.18.0.10 <-> 2001:2::10, .11 <-> ::11.
    return net[int(str(FIRST_HOST + index), 16)]
