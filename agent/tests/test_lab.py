"""bulkhead.lab against the kernel: build and remove labs, listeners, probes that tell
open from refused from blocked (IPv4 and IPv6), addresses, processes, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bulkhead.lab import (
    STATE_ROOT,
    Lab,
    LabError,
    ProbeSpec,
    forward,
    list_labs,
    remove_all,
    teardown,
)
from tests.labfixture import NEEDS_ROOT, LabFactory, unique_lab_name

root = pytest.mark.skipif(os.geteuid() != 0, reason=NEEDS_ROOT)
BIN = Path(sys.executable).parent
T = 0.3  # timeout of probes expected to be blocked


def leftovers(name: str) -> list[str]:
    """What the kernel and /run still hold of lab `name`, seen as a user sees it."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    found += [line.split()[0] for line in netns.splitlines()
              if line.startswith(f"bhl-{name}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    found += [f"link {n}" for n in names if n == f"bhl-{name}"]
    if (STATE_ROOT / name).exists():
        found.append(str(STATE_ROOT / name))
    return found


def nft(lab: Lab, host: str, ruleset: str) -> None:
    done = lab.run(host, ["nft", "-f", "-"], input=ruleset)
    assert done.returncode == 0, done.stderr


def drop_from(source: str, hook: str = "input") -> str:
    """A test-owned table that drops packets from (input) or to (output) `source`."""
    family = "ip6" if ":" in source else "ip"
    match = "saddr" if hook == "input" else "daddr"
    return (f"table inet bhltest {{\n chain c {{\n  type filter hook {hook} priority 0;\n"
            f"  {family} {match} {source} drop\n }}\n}}\n")


# -- without the kernel ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "toolongname", "Demo", "a-b", "a_b"])
def test_lab_names_are_short_and_plain(name: str) -> None:
    with pytest.raises(ValueError, match="lab name"):
        Lab(name)


def test_nets_and_hosts_are_checked() -> None:
    with pytest.raises(ValueError, match=r"not inside 198\.18\.0\.0/15"):
        Lab("x", net4="10.0.0.0/8")
    with pytest.raises(ValueError, match=r"not inside 2001:2::/48"):
        Lab("x", net6="2001:db8::/64")
    with pytest.raises(ValueError, match="host name"):
        Lab("x", ["sw"])
    with pytest.raises(ValueError, match="duplicate"):
        Lab("x", ["a", "a"])
    with pytest.raises(ValueError, match="do not fit"):
        Lab("x", 300, net4="198.18.0.0/24")


def test_addresses_are_numbered_from_ten() -> None:
    lab = Lab("x", ["web", "db"])
    assert lab.host("web").addresses == ("198.18.0.10", "2001:2::10")
    assert lab.host("db").addresses == ("198.18.0.11", "2001:2::11")
    assert lab.host("db").ns == "bhl-x-db"
    assert lab.switch_ns == "bhl-x-sw"
    assert lab.uplink_ifname == "bhl-x"
    assert lab.service_address == "198.19.255.254"
    assert lab.service_address6 == "2001:2::ffff:ffff:ffff:ffff"
    assert Lab("x", 1, net4="198.18.4.0/24").service_address == "198.18.4.254"


def test_probe_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="needs a port"):
        ProbeSpec("a", "b", "tcp").checked("198.18.0.10")
    with pytest.raises(ValueError, match="no port"):
        ProbeSpec("a", "b", "icmp", 7).checked("198.18.0.10")
    with pytest.raises(ValueError, match="unknown probe protocol"):
        ProbeSpec("a", "b", "sctp", 7).checked("198.18.0.10")
    with pytest.raises(ValueError, match="differ in family"):
        ProbeSpec("a", "b", "udp", 7, src_ip="2001:2::10").checked("198.18.0.10")
    assert ProbeSpec("a", "b", "ICMPv6").checked("2001:2::11").proto == "icmp"


# -- up and down ----------------------------------------------------------------------------

@root
def test_up_down_leaves_nothing_behind(tmp_path: Path) -> None:
    name = unique_lab_name()
    lab = Lab(name, ["a", "b"])
    try:
        lab.up()
        assert sorted(leftovers(name)) == sorted(
            [f"bhl-{name}-a", f"bhl-{name}-b", f"bhl-{name}-sw", f"link bhl-{name}",
             str(STATE_ROOT / name)])
        # Nothing of the lab is routed into the root namespace but the uplink's /30.
        routes = subprocess.run(["ip", "-j", "route", "show", "dev", lab.uplink_ifname],
                                capture_output=True, text=True, check=True).stdout
        assert [r["dst"] for r in json.loads(routes)] == [str(lab.uplink)]
        sleeper = lab.spawn("a", ["sleep", "60"], tmp_path / "sleep.log")
        in_switch = lab.spawn("sw", ["sleep", "60"])
        # `ip netns exec` enters the namespace just after it starts: wait for that.
        deadline = time.monotonic() + 5
        while (not {sleeper.pid, in_switch.pid} <= set(pids := lab.pids())
               and time.monotonic() < deadline):
            time.sleep(0.02)
        assert sleeper.pid in pids and in_switch.pid in pids
        assert len(pids) == 4  # two host daemons and the two sleepers
        assert lab.up() is lab  # again: the old one goes first
        assert sleeper.poll() == -signal.SIGTERM
    finally:
        lab.down()
    assert leftovers(name) == []
    assert name not in list_labs()
    lab.down()  # twice is fine


@root
def test_down_from_a_fresh_process_with_the_state_file() -> None:
    name = unique_lab_name()
    lab = Lab(name, 2).up()
    try:
        hostd = lab.pids()
        assert len(hostd) == 2
        subprocess.run([sys.executable, "-c",
                        f"from bulkhead.lab import Lab; Lab.load({name!r}).down()"],
                       check=True, timeout=30)
        assert leftovers(name) == []
        assert all(not Path(f"/proc/{pid}").exists() or
                   Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
                   for pid in hostd)
    finally:
        lab.down()


@root
def test_down_of_a_half_built_lab_without_state() -> None:
    """What a crash in the middle of `up` leaves: namespaces, the uplink, a process in a
    namespace, no state file. `bulkhead lab down --name` in a new process removes it."""
    name = unique_lab_name()
    ns_sw, ns_a = f"bhl-{name}-sw", f"bhl-{name}-a"
    sleeper = None
    try:
        for cmd in (["ip", "netns", "add", ns_sw], ["ip", "netns", "add", ns_a],
                    ["ip", "link", "add", "name", f"bhl-{name}", "type", "veth", "peer",
                     "name", "up0", "netns", ns_sw]):
            subprocess.run(cmd, check=True)
        sleeper = subprocess.Popen(["ip", "netns", "exec", ns_a, "sleep", "60"])
        assert name in list_labs()
        done = subprocess.run([str(BIN / "bulkhead"), "lab", "down", "--name", name],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert leftovers(name) == []
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        if sleeper and sleeper.poll() is None:
            sleeper.kill()
        teardown(name)


@root
def test_failed_up_removes_what_it_built() -> None:
    name = unique_lab_name()
    lab = Lab(name, ["a"])
    lab.hosts["a"] = dataclasses.replace(lab.hosts["a"], socket="/nonexistent/dir/a.sock")
    with pytest.raises(LabError, match="host daemon of a"):
        lab.up()
    assert leftovers(name) == []


@root
def test_sweep_keeps_labs_of_live_sessions(make_lab: LabFactory) -> None:
    theirs, dead = make_lab(1), make_lab(1)
    for lab, pid in ((theirs, 1), (dead, 2 ** 22 + 1)):  # init lives; that pid cannot
        path = lab.state_dir / "state.json"
        state = json.loads(path.read_text())
        state["owner"] = {"pid": pid, "start": None}
        path.write_text(json.dumps(state))
    removed = remove_all(theirs.name[:1], include_live=False)
    assert dead.name in removed and theirs.name not in removed
    assert leftovers(dead.name) == [] and leftovers(theirs.name) != []


# -- probes ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(make_module_lab: LabFactory) -> Lab:
    lab = make_module_lab(["a", "b"])
    lab.listen("b", tcp=[8080], udp=[8081])
    return lab


@root
@pytest.mark.parametrize("family", [4, 6])
def test_open_refused_blocked(pair: Lab, family: int) -> None:
    fam = 6 if family == 6 else 4
    a, b = pair.address("a", fam), pair.address("b", fam)
    probes = [ProbeSpec("a", b, "tcp", 8080), ProbeSpec("a", b, "tcp", 8090),
              ProbeSpec("a", b, "udp", 8081), ProbeSpec("a", b, "udp", 8091),
              ProbeSpec("a", b, "icmp")]
    got = [r.outcome for r in pair.probe_many(probes)]
    assert got == ["open", "refused", "open", "refused", "open"]

    nft(pair, "b", drop_from(a))  # dropped on the receiver's way in
    try:
        slow = [ProbeSpec(p.src, p.dst, p.proto, p.port, T) for p in probes]
        started = time.monotonic()
        results = pair.probe_many(slow)
        assert [r.outcome for r in results] == ["blocked"] * 5
        assert time.monotonic() - started < T + 1.0  # run at once, not one after another
    finally:
        pair.run("b", ["nft", "delete", "table", "inet", "bhltest"], check=True)

    nft(pair, "a", drop_from(b, "output"))  # dropped by the sender's own egress rules
    try:
        slow = [ProbeSpec(p.src, p.dst, p.proto, p.port, T) for p in probes]
        assert [r.outcome for r in pair.probe_many(slow)] == ["blocked"] * 5
    finally:
        pair.run("a", ["nft", "delete", "table", "inet", "bhltest"], check=True)
    assert pair.probe("a", "b", "tcp", 8080, family=fam).open


@root
def test_many_probes_at_once(pair: Lab) -> None:
    """A burst of probes to closed ports stays "refused": ICMP errors are not rate
    limited in lab hosts."""
    probes = [ProbeSpec(src, dst, proto, port, family=fam)
              for src, dst in (("a", "b"), ("b", "a")) for fam in (4, 6)
              for proto in ("tcp", "udp") for port in range(9000, 9100)]
    results = pair.probe_many(probes)
    assert {r.outcome for r in results} == {"refused"}
    assert [r.spec.port for r in results] == [p.port for p in probes]


@root
def test_listen_replace_and_errors(pair: Lab) -> None:
    pair.listen("a", tcp=[7001, 7002], udp=[7003])
    assert pair.listening("a") == {"tcp": [7001, 7002], "udp": [7003]}
    pair.listen("a", tcp=[7002], replace=True)
    assert pair.listening("a") == {"tcp": [7002], "udp": []}
    assert pair.probe("b", "a", "tcp", 7001).outcome == "refused"
    assert pair.probe("b", "a", "tcp", 7002).open
    pair.listen("a", replace=True)
    with pytest.raises(LabError, match="no host"):
        pair.listen("nobody", tcp=[1])
    with pytest.raises(LabError, match="outside 1-65535"):
        pair.listen("a", tcp=[70000])
    with pytest.raises(LabError, match="cannot bind to source"):
        pair.probe("a", "b", "tcp", 8080, src_ip="198.18.9.9")


@root
def test_set_addresses_and_source_addresses(make_lab: LabFactory) -> None:
    lab = make_lab(["a", "b", "c"])
    lab.listen("c", tcp=[80], udp=[53])
    lab.listen("a", tcp=[80])
    # b learns a's MAC for 198.18.0.10; then the address moves from a to c.
    assert lab.probe("b", "198.18.0.10", "tcp", 80).open
    lab.set_addresses_many({"a": ["198.18.3.10", "2001:2::3:10"],
                            "c": ["198.18.0.10", "198.18.0.40", "2001:2::12"]})
    assert lab.host("a").addresses == ("198.18.3.10", "2001:2::3:10")
    assert lab.host("c").ipv4 == "198.18.0.10"
    assert lab.run("c", ["ip", "-br", "-4", "addr", "show", "eth0"]).stdout.split()[2:] == [
        "198.18.0.10/15", "198.18.0.40/15"]
    assert lab.probe("b", "198.18.0.10", "udp", 53).open  # c answers now, not a
    assert lab.probe("b", "198.18.0.40", "udp", 53).open  # echoed from the address asked
    assert lab.probe("b", "a", "tcp", 80).open
    assert lab.probe("b", "a", "icmp", family=6).open
    assert Lab.load(lab.name).host("c").addresses == lab.host("c").addresses

    # Probes from a chosen source address: b drops one of c's two addresses.
    lab.set_addresses("b", ["198.18.0.11"])
    nft(lab, "b", drop_from("198.18.0.40"))
    assert lab.probe("c", "b", "icmp", src_ip="198.18.0.10").open
    assert lab.probe("c", "b", "icmp", src_ip="198.18.0.40", timeout=T).outcome == "blocked"

    with pytest.raises(ValueError, match="outside the lab's net"):
        lab.set_addresses("a", ["10.1.2.3"])
    with pytest.raises(ValueError, match="service address"):
        lab.set_addresses("a", [lab.service_address])
    with pytest.raises(ValueError, match="both"):
        lab.set_addresses("a", ["198.18.0.40"])
    with pytest.raises(ValueError, match="kept for lab uplinks"):
        lab.set_addresses("a", ["198.19.254.9"])
    with pytest.raises(LabError, match="no IPv6 address"):
        lab.probe("c", "b", "icmp", family=6)


@root
def test_switch_namespace_serves_hosts_and_root(make_lab: LabFactory, tmp_path: Path) -> None:
    """A server in the switch namespace is reached from lab hosts at the service address
    and from the root namespace at the uplink address."""
    lab = make_lab(1)
    server = lab.spawn("sw", [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "7443"],
                       tmp_path / "server.log")
    deadline = time.monotonic() + 10
    while not lab.probe("h1", lab.service_address, "tcp", 7443).open:
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.05)
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                           f"http://{lab.uplink_address}:7443/"] if _has("curl") else
                          [sys.executable, "-c", "import urllib.request as u; "
                           f"print(u.urlopen('http://{lab.uplink_address}:7443/').status)"],
                          capture_output=True, text=True, timeout=10)
    assert done.stdout.strip() == "200", done.stderr
    assert lab.probe("h1", lab.service_address6, "tcp", 7443).outcome == "refused"
    assert lab.run("h1", ["ip", "route"]).stdout.split()[0] == "198.18.0.0/15"  # no default


def _connect(address: str, port: int) -> str:
    """"open" or the error a TCP connect from this namespace meets (1 s at most)."""
    import socket
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return type(e).__name__


def test_forward_specs_are_checked() -> None:
    assert forward.parse("7443=srv1") == forward.Forward(7443, "srv1", 7443)
    assert forward.parse("8443=srv1:7443") == forward.Forward(8443, "srv1", 7443)
    for bad, why in (("7443", "PORT=HOST"), ("x=h1", "PORT=HOST"), ("0=h1", "port 0"),
                     ("80=h1:70000", "host port 70000"), ("80=-h", "PORT=HOST")):
        with pytest.raises(LabError, match=why):
            forward.parse(bad)
    with pytest.raises(LabError, match="has no host nohost"):
        Lab("x", 2, forwards=[forward.parse("80=nohost")])
    with pytest.raises(LabError, match="uplink port 80 forwarded twice"):
        Lab("x", 2, forwards=[forward.parse("80=h1"), forward.parse("80=h2")])


@root
def test_forward_from_the_root_namespace(make_lab: LabFactory) -> None:
    """Forwarded ports of the uplink address reach lab hosts; nothing else crosses the
    uplink; forwards follow address moves, change whole, and go with the lab."""
    lab = make_lab(["srv", "b"], forwards=[forward.parse("7443=srv"),
                                          forward.parse("8443=b:80")])
    lab.listen("srv", tcp=[7443, 22])
    lab.listen("b", tcp=[80])
    up = lab.uplink_address
    assert _connect(up, 7443) == "open"
    assert _connect(up, 8443) == "open"
    assert _connect(up, 22) == "refused"         # not forwarded: the switch itself refuses
    # (No lab host answers ARP for the uplink's root address: the answers come back only
    # because the switch gives the connections its service address as their source.)
    # Routing is on in the switch, but only forwarded connections cross the uplink.
    sw = lab.switch_ns
    assert subprocess.run(["ip", "netns", "exec", sw, "sysctl", "-n", "net.ipv4.ip_forward"],
                          capture_output=True, text=True, check=True).stdout.strip() == "1"
    lab.run("srv", ["ip", "route", "add", f"{lab.uplink_root_address}/32", "via",
                    lab.service_address], check=True)
    assert lab.probe("srv", lab.uplink_root_address, "icmp", timeout=T).outcome == "blocked"
    chain = json.loads(subprocess.run(
        ["ip", "netns", "exec", sw, "nft", "-j", "list", "chain", "ip", forward.TABLE,
         "crossing"], capture_output=True, text=True, check=True).stdout)["nftables"]
    dropped = [r["rule"]["expr"] for r in chain if "rule" in r and
               {"drop": None} in r["rule"]["expr"] and "oifname" in json.dumps(r)]
    assert next(e for e in dropped[0] if "counter" in e)["counter"]["packets"] >= 1
    assert Lab.load(lab.name).forwards == lab.forwards
    assert lab.status()["forwards"] == [{"port": 7443, "host": "srv", "host_port": 7443},
                                        {"port": 8443, "host": "b", "host_port": 80}]

    lab.set_addresses("srv", ["198.18.0.77"])    # the forward follows the address
    assert _connect(up, 7443) == "open"

    lab.forward([forward.parse("9000=srv:22")])  # replaces every forward
    assert (_connect(up, 9000), _connect(up, 7443)) == ("open", "refused")
    lab.forward([])
    assert _connect(up, 9000) == "refused"
    assert subprocess.run(["ip", "netns", "exec", sw, "nft", "list", "tables"],
                          capture_output=True, text=True, check=True).stdout == ""


def _has(tool: str) -> bool:
    return any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":"))


@root
def test_flush_conntrack(pair: Lab) -> None:
    nft(pair, "b", "table inet bhltest {\n chain c {\n  type filter hook input priority 0;\n"
                   "  ct state established,related accept\n }\n}\n")
    try:
        assert pair.probe("a", "b", "udp", 8081).open
        listed = pair.run("b", ["conntrack", "-L"], check=True).stdout
        assert "dport=8081" in listed
        pair.flush_conntrack("b")
        assert "dport=8081" not in pair.run("b", ["conntrack", "-L"], check=True).stdout
        pair.flush_conntrack()
    finally:
        pair.run("b", ["nft", "delete", "table", "inet", "bhltest"], check=True)


@root
def test_two_labs_at_once(make_lab: LabFactory) -> None:
    one, two = make_lab(2), make_lab(2)
    assert one.uplink != two.uplink
    for lab in (one, two):
        lab.listen("h2", tcp=[80])
        assert lab.probe("h1", "h2", "tcp", 80).open
    one.down()
    assert two.probe("h1", "h2", "tcp", 80).open
    assert leftovers(one.name) == []


# -- the CLI --------------------------------------------------------------------------------

@root
def test_cli_up_probe_down() -> None:
    name = unique_lab_name()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BULKHEAD_LAB_OWNER": str(os.getpid())}  # ours, for sweeps
        return subprocess.run([str(BIN / "bulkhead"), "lab", *args], capture_output=True,
                              text=True, timeout=60, env=env)

    try:
        up = cli("up", "--hosts", "3", "--name", name)
        assert up.returncode == 0, up.stderr
        assert f"h3  bhl-{name}-h3  198.18.0.12 2001:2::12" in up.stdout
        assert cli("listen", "--name", name, "h2", "--tcp", "22", "--udp", "53").returncode == 0
        for args, outcome, code in (
                (["h1", "h2", "--port", "22"], "open", 0),
                (["h1", "198.18.0.11", "--port", "23"], "refused", 1),
                (["h3", "h2", "--proto", "udp", "--port", "53", "-6"], "open", 0),
                (["h1", "198.18.7.7", "--proto", "icmp", "--timeout", "0.2"], "blocked", 1)):
            done = cli("probe", "--name", name, *args)
            assert (done.stdout.strip(), done.returncode) == (outcome, code), done.stderr
        status = json.loads(cli("status", "--name", name, "--json").stdout)
        assert status[name]["hosts"]["h2"]["hostd"] is True
        ran = cli("exec", "--name", name, "h2", "--", "ip", "-br", "-4", "addr", "show", "eth0")
        assert "198.18.0.11/15" in ran.stdout
        bad = cli("probe", "--name", name, "h1", "nowhere", "--port", "1")
        assert bad.returncode == 2 and "no host 'nowhere'" in bad.stderr
        down = cli("down", "--name", name)
        assert down.returncode == 0 and leftovers(name) == []
        assert cli("status", "--name", name).returncode == 2
    finally:
        teardown(name)
