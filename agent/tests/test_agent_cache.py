"""bulkhead.agent.cache: the last-known-good policy on disk, enforced at boot while the
server is down; a corrupt cache is reported and ignored."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.agent.cache import CacheError, Texts, cache_path, load_cache, save_cache
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


def test_the_cache_is_gzip_of_json_lines_and_the_format_before_is_read(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    save_cache(state, NODE, 4, [gnp("a")])
    lines = gzip.decompress(cache_path(state).read_bytes()).split(b"\n")
    assert json.loads(lines[0]) == {"format": 2, "node": NODE, "revision": 4}
    assert [json.loads(line) for line in lines[1:]] == [gnp("a")]
    save_cache(state, NODE, 5, [json.dumps(gnp("a"), indent=1).encode()])   # one line each
    cached = load_cache(state)
    assert cached is not None and cached.items == [gnp("a")]
    # What an agent of format 1 wrote (one JSON document) boots this one.
    cache_path(state).write_text(json.dumps({"format": 1, "node": NODE, "revision": 3,
                                             "items": [gnp("b")]}))
    cached = load_cache(state)
    assert cached is not None and cached.revision == 3 and cached.items == [gnp("b")]
    for broken, why in ((b"\x1f\x8b\x08\x00 not gzip", "not gzip"),
                        (gzip.compress(b'{"format":2,"node":"n","revision":1}\n{"kind"'),
                         "not JSON lines"),
                        (gzip.compress(b'{"format":3}\n'), "not a bulkhead-agent cache"),
                        (b'{"format":2,"revision":1,"items":[]}', "not a bulkhead-agent")):
        cache_path(state).write_bytes(broken)
        with pytest.raises(CacheError, match=why):
            load_cache(state)


def test_a_cache_that_inflates_past_the_bound_or_is_cut_short_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is decompressed member by member up to MAX_INFLATED and no further (a
    file of zeros that inflates a thousand times is refused, not read into memory)."""
    from bulkhead.agent import cache

    state = tmp_path / "state"
    save_cache(state, NODE, 4, [gnp("a"), gnp("b")])
    whole = cache_path(state).read_bytes()
    size = len(gzip.decompress(whole))
    monkeypatch.setattr(cache, "MAX_INFLATED", size)
    cached = load_cache(state)                       # exactly at the bound: read
    assert cached is not None and cached.items == [gnp("a"), gnp("b")]
    monkeypatch.setattr(cache, "MAX_INFLATED", size - 1)
    with pytest.raises(CacheError, match="more than"):
        load_cache(state)
    monkeypatch.setattr(cache, "MAX_INFLATED", 1 << 20)
    cache_path(state).write_bytes(gzip.compress(b"\n" * (4 << 20)))
    with pytest.raises(CacheError, match="more than 1048576 bytes once decompressed"):
        load_cache(state)
    cache_path(state).write_bytes(whole[:-5])        # the last member cut short
    with pytest.raises(CacheError, match=r"not gzip \(a gzip member is cut short"):
        load_cache(state)


Op = tuple[str, str, int]      # ("put" | "drop", name, version)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(["put", "drop"]),
                                   st.sampled_from([f"o{i}" for i in range(12)]),
                                   st.integers(0, 3)), max_size=8), max_size=6),
       st.integers(1, 5))
def test_texts_kept_compressed_write_the_cache_of_a_dict_kept_plain(
        batches: list[list[Op]], shards: int) -> None:
    """`Texts` against a plain dict of the texts: after each batch of changes its texts,
    and the cache written from its parts, are the dict's."""
    def doc(name: str, version: int) -> dict[str, Any]:
        return {**gnp(name), "spec": {**gnp(name)["spec"], "order": version}}

    def text(name: str, version: int) -> bytes:
        return json.dumps(doc(name, version), separators=(",", ":")).encode()

    texts = Texts(shards)
    plain: dict[tuple[str, str], bytes] = {}
    start = {("GlobalNetworkPolicy", "o0"): text("o0", 9), ("Tier", "o1"): text("o1", 9)}
    texts.reset(start)
    plain.update(start)
    with tempfile.TemporaryDirectory() as tmp:
        for i, batch in enumerate(batches):
            for op, name, version in batch:
                key = ("GlobalNetworkPolicy", name)
                if op == "put":
                    texts.put(key, text(name, version))
                    plain[key] = text(name, version)
                else:
                    texts.drop(key)
                    plain.pop(key, None)
            assert texts.texts() == [plain[k] for k in sorted(plain)]
            save_cache(tmp, NODE, i, [gnp("extra")], parts=texts.parts())
            cached = load_cache(tmp)
            assert cached is not None and cached.revision == i
            assert sorted(json.dumps(d, sort_keys=True) for d in cached.items) == sorted(
                json.dumps(d, sort_keys=True) for d in
                [*(json.loads(t) for t in plain.values()), gnp("extra")])


def test_a_text_of_more_than_one_line_is_refused() -> None:
    texts = Texts()
    with pytest.raises(ValueError, match="not one line"):
        texts.put(("Tier", "t"), b'{"a":\n1}')
    with pytest.raises(ValueError, match="not one line"):
        texts.reset({("Tier", "t"): b'{"a":\n1}'})


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

