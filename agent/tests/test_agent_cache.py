"""bulkhead.agent.cache: the last-known-good policy on disk, enforced at boot while the
server is down; a corrupt cache is reported and ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bulkhead.agent.cache import CacheError, cache_path, load_cache, save_cache
from bulkhead.agent.daemon import Agent
from tests.agentfixture import (
    NODE,
    Recorder,
    config_for,
    gnp,
    make_pki,
    retries,
    running,
    until,
)
from tests.conftest import free_port


def test_the_cache_keeps_the_items_and_revision(tmp_path: Path) -> None:
    assert load_cache(tmp_path / "state") is None
    save_cache(tmp_path / "state", NODE, 5, [gnp("a")])
    save_cache(tmp_path / "state", NODE, 9, [gnp("a"), gnp("b")])
    cached = load_cache(tmp_path / "state")
    assert cached is not None and cached.revision == 9
    assert [i["metadata"]["name"] for i in cached.items] == ["a", "b"]
    # Items given as JSON text (as the agent keeps them) are written as they are.
    save_cache(tmp_path / "state", NODE, 10, [json.dumps(gnp("c")).encode(), gnp("d")])
    cached = load_cache(tmp_path / "state")
    assert cached is not None and cached.revision == 10 and cached.node == NODE
    assert cached.items == [gnp("c"), gnp("d")]
    cache_path(tmp_path / "state").write_text("[]")
    with pytest.raises(CacheError):
        load_cache(tmp_path / "state")


async def test_cache_is_enforced_at_boot_while_the_server_is_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    tier = {"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "ops"}, "spec": {"order": 100}}
    broken = {**gnp("broken"), "spec": {"ingress": [{"action": "Maybe"}]}}
    save_cache(state, NODE, 7, [tier, gnp("ops.ssh", tier="ops"), gnp("web"), broken])
    rec = Recorder()
    down = f"https://127.0.0.1:{free_port()}"
    agent = Agent(config_for(down, make_pki(tmp_path), state), rec)
    async with running(agent):
        await until(lambda: agent.applied_revision == 7, "the cached policy to be enforced")
        assert rec.calls == [(7, ["ops.ssh", "web"])]
        assert agent.applied_revision == 7
        assert [e for e in agent.errors if "GlobalNetworkPolicy broken" in e]
        # Retries against the dead server, with backoff, and a failed status report.
        await until(lambda: retries(caplog) >= 2 and agent.counters.status_failures >= 1,
                    "a second retry and a failed status report")
        assert not agent.connected
        assert rec.calls == [(7, ["ops.ssh", "web"])]  # never fails open or closed


async def test_a_corrupt_cache_is_reported_and_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cache_path(state).write_text('{"format": 1, "revision": 3, "items": [')
    rec = Recorder()
    agent = Agent(config_for(f"https://127.0.0.1:{free_port()}", make_pki(tmp_path), state),
                  rec)
    async with running(agent):
        await until(lambda: bool(agent.errors), "the cache error")
        assert "not JSON" in agent.errors[0] and "ignored" in agent.errors[0]
        # Boot is over once the agent retries the server: nothing came from the cache.
        await until(lambda: retries(caplog) >= 2, "a second retry")
        assert rec.calls == []

