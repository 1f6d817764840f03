"""The agent's DNS name cache keeps time by a clock that is never stepped
(`bulkhead.agent.dns.SteadyClock`): when the wall clock steps (NTP, `date -s`, a VM
resumed) the kernel's element timeouts stay the answers' TTLs. Before, a step back of an
hour kept every learned address in the domain sets an hour past its TTL (the policy's
`domains` allowed it that long), and a step forward dropped them all at once. The cache
written to disk stays in wall-clock time, as `bulkhead explain` and the next start read
it."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from bulkhead.agent.config import DnsSettings
from bulkhead.agent.dns import CACHE_FILE, DnsSnooper, snooping
from bulkhead.dataplane.nftables import render
from bulkhead.dataplane.nftables.render import Ruleset
from bulkhead.policy import Failsafes
from bulkhead.policy.names import A, Record
from bulkhead.policy.plan import calculate
from tests.nftfixture import base, gnp, snap

POLICY = gnp("egress", {"selector": "app == 'db'", "egress": [
    {"action": "Allow", "destination": {"domains": ["*.example.com"]}}]})
SERVER = "198.18.0.53"
TTL = 60


def seconds(text: str) -> float:
    """An nft timeout (`1m0s1ms`) in seconds."""
    units = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|d|h|m|s)", text))


def timeouts(snooper: DnsSnooper, ruleset: Ruleset) -> dict[str, float]:
    """Address -> seconds, as a table written whole would give the kernel."""
    found: dict[str, float] = {}
    for elements in snooper.timed(ruleset).values():
        for text in elements:
            address, _, timeout = text.split()
            found[address] = seconds(timeout)
    return found


def test_a_step_of_the_wall_clock_leaves_the_kernels_timeouts_the_ttl(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snoop = snooping(DnsSettings(trusted_servers=(SERVER,)))
    ruleset = render(calculate(snap(*base(), POLICY), "n1", {}, Failsafes()), dns=snoop)
    snooper = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path)
    snooper.domain_sets = dict(ruleset.domain_sets)
    snooper.cache.learn([Record("api.example.com", A, "198.18.3.4", TTL)], snooper.clock())
    assert TTL - 2 < timeouts(snooper, ruleset)["198.18.3.4"] <= TTL + 1

    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)   # an hour back
    assert TTL - 2 < timeouts(snooper, ruleset)["198.18.3.4"] <= TTL + 1
    # On disk in the wall clock's time, as it reads now.
    snooper.save()
    saved = json.loads((tmp_path / CACHE_FILE).read_text())
    expiry = saved["addresses"]["api.example.com"]["198.18.3.4"]
    assert time.time() + TTL - 2 < expiry <= time.time() + TTL + 1

    monkeypatch.setattr(time, "time", lambda: real() + 3600)   # an hour ahead
    assert TTL - 2 < timeouts(snooper, ruleset)["198.18.3.4"] <= TTL + 1

    def restarted() -> dict[str, float]:
        again = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path)
        again.load()
        return timeouts(again, ruleset)

    # The file is read in the wall clock's time: under the clock it was written by (an
    # hour behind), the address has its TTL left; an hour later it has ended.
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert TTL - 3 < restarted()["198.18.3.4"] <= TTL + 1
    monkeypatch.setattr(time, "time", real)
    assert "198.18.3.4" not in restarted()


def test_a_cache_written_after_this_clocks_now_is_not_read(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A host without a battery-backed clock starts a day behind, before NTP: the cache it
    saved yesterday would keep its entries a day past their TTL once the clock is set, so
    it is not read (reported; the cache starts empty)."""
    snoop = snooping(DnsSettings(trusted_servers=(SERVER,)))
    snooper = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path)
    snooper.cache.learn([Record("api.example.com", A, "198.18.3.4", 300)], snooper.clock())
    snooper.save()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 86_400)
    behind = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path)
    with pytest.raises(ValueError, match="is the clock behind"):
        behind.cache.load(behind.path, behind.clock(), -behind.clock.wall_shift(),
                          refuse_future=True)
    behind.load()   # the agent's own: reported, and nothing taken
    assert behind.cache.to_json(behind.clock())["addresses"] == {}
    monkeypatch.setattr(time, "time", real)
    again = DnsSnooper(DnsSettings(trusted_servers=(SERVER,)), snoop, tmp_path)
    again.load()
    assert list(again.cache.to_json(again.clock())["addresses"]) == ["api.example.com"]
