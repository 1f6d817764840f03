"""bulkhead.agent.sync: the snapshot and deltas from a real bulkhead-server reach the
enforcer with their revisions; the desired state leaves invalid objects out."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bulkhead.agent.cache import load_cache
from bulkhead.agent.sync import Backoff, DesiredState
from tests.agentfixture import create, gnp, started_after_a, until, wait_status
from tests.conftest import Server


async def test_snapshot_then_deltas_reach_enforce_with_their_revisions(
        server: Server, tmp_path: Path) -> None:
    async with started_after_a(server, tmp_path) as (admin, viewer, rec, _, rev_a):
        await until(lambda: rec.applied is not None, "the snapshot to be enforced")
        assert rec.calls == [(rev_a, ["a"])]          # the snapshot, first contact
        rev_b = await create(admin, gnp("b"))
        await until(lambda: rec.calls[-1][1] == ["a", "b"], "the event for b")
        assert len(rec.calls) == 2 and rec.calls[-1][0] >= rev_b
        await wait_status(viewer, lambda s: s["appliedRevision"] >= rev_b,
                          f"appliedRevision >= {rev_b}")

        # A burst of writes coalesces into fewer applies than writes.
        before = len(rec.calls)
        burst = [f"c{i}" for i in range(5)]
        revs = await asyncio.gather(*(create(admin, gnp(n)) for n in burst))
        await until(lambda: rec.calls[-1][1] == sorted(["a", "b", *burst]), "the burst")
        assert len(rec.calls) - before < len(burst)
        assert rec.calls[-1][0] >= max(revs)

        async with admin.delete("/v1/resources/GlobalNetworkPolicy/a") as r:
            assert r.status == 200
        await until(lambda: rec.calls[-1][1] == sorted(["b", *burst]), "the delete")
        revisions = [rev for rev, _ in rec.calls]
        assert revisions == sorted(revisions)

        status = await wait_status(viewer, lambda s: s["appliedRevision"]
                                   >= rec.calls[-1][0], "the last apply")
        assert status["errors"] == []
        assert status["counters"]["applies"] == len(rec.calls)
        assert status["counters"]["rules"] == 2 * (len(burst) + 1)

    # The cache holds what was enforced last, at its revision.
    cached = load_cache(tmp_path / "state")
    assert cached is not None and cached.revision == rec.calls[-1][0]
    assert sorted(i["metadata"]["name"] for i in cached.items) == sorted(["b", *burst])


def test_invalid_objects_are_left_out_and_reported() -> None:
    state = DesiredState()
    state.replace([gnp("ok"), gnp("lost", tier="nowhere"),
                   {**gnp("bad"), "spec": {"selector": "app = 'x'"}},
                   {"kind": "Mystery", "metadata": {"name": "m"}}])
    snapshot, errors = state.build()
    assert sorted(snapshot.policies) == ["ok"]
    assert len(errors) == 3
    assert any('tier "nowhere" does not exist' in e for e in errors)
    assert any("GlobalNetworkPolicy bad: spec.selector" in e for e in errors)
    assert any("Mystery" in e for e in errors)



def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(base=0.2, cap=1.0)
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next() <= ceiling
    assert backoff.attempt == len(ceilings)
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next() <= 0.2
