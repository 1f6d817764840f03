"""free_port: below the kernel's ephemeral range, never twice in a process, and never a
port another pytest-xdist worker could pick."""

from __future__ import annotations

import socket

import pytest

from bulkhead.testbed import ports


@pytest.mark.parametrize(("worker", "count"), [("gw0", "2"), ("gw1", "2"), ("gw2", "3")])
def test_each_worker_picks_from_its_own_share(monkeypatch, worker, count):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    picked = [ports.free_port() for _ in range(50)]
    assert {p % int(count) for p in picked} == {int(worker[2:]) % int(count)}
    assert len(set(picked)) == 50
    assert all(p < ports._ephemeral_low() for p in picked)


@pytest.mark.parametrize("env", [{}, {"PYTEST_XDIST_WORKER": "master"},
                                 {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "x"}])
def test_outside_xdist_any_port_below_the_range(monkeypatch, env):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    picked = [ports.free_port() for _ in range(200)]
    assert len({p % 2 for p in picked}) == 2   # both halves: no share taken
    assert all(10_000 <= p < ports._ephemeral_low() for p in picked)


@pytest.mark.parametrize("worker", ["gw0", "gw1", "gw2"])
def test_a_share_stays_within_the_range(monkeypatch, worker):
    """The range 10,000 up to 10,007, not a multiple of three: each worker's ports in it."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 10_008)
    monkeypatch.setattr(ports, "_GIVEN", set())
    share = int(worker[2:])
    expected = {p for p in range(10_000, 10_008) if p % 3 == share}
    picked = set()
    for _ in range(len(expected)):
        picked.add(ports.free_port())
    assert picked == expected
    with pytest.raises(RuntimeError, match="no free port"):
        ports.free_port()   # every one of its share given


def test_a_port_in_use_is_not_picked(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken, real = iter([held.getsockname()[1]]), ports.random.randrange
        # the held port is drawn first, the range moved up to hold it: the bind refuses it
        monkeypatch.setattr(ports.random, "randrange", lambda a, b: next(taken, None) or real(a, b))
        monkeypatch.setattr(ports, "_ephemeral_low", lambda: 65_536)
        assert ports.free_port() != held.getsockname()[1]
        assert next(taken, None) is None   # it was drawn, and passed over
