"""`Table` against a dict: every version reads as the dict it stands for, and making a
new version leaves the old one as it was (what still holds it reads it unchanged)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bulkhead.model.table import Table

NAMES = st.text(alphabet="abcdefgh-0123", min_size=1, max_size=4)
CHANGES = st.lists(st.tuples(st.dictionaries(NAMES, st.integers(0, 9), max_size=30),
                             st.lists(NAMES, max_size=10)), max_size=12)


@settings(max_examples=300, deadline=None, database=None)
@given(st.dictionaries(NAMES, st.integers(0, 9), max_size=200), CHANGES)
def test_each_version_is_its_dict_and_old_versions_stay(
        start: dict[str, int], changes: list[tuple[dict[str, int], list[str]]]) -> None:
    versions = [(Table(start), dict(start))]
    for put, drop in changes:
        table, model = versions[-1]
        model = {k: v for k, v in model.items() if k not in drop} | put
        versions.append((table.changed(put, drop), model))
    for table, model in versions:
        assert len(table) == len(model)
        assert dict(table.items()) == model
        assert sorted(table) == sorted(model)
        assert sorted(table.values()) == sorted(model.values())
        assert table == model
        for key in [*model, "zz", ""]:
            assert (key in table) == (key in model)
            assert table.get(key) == model.get(key)


def test_a_change_copies_only_the_shards_it_touches() -> None:
    big = Table({f"h{i}": i for i in range(10_000)})
    new = big.changed({"h5": -5}, ["h7"])
    shared = sum(a is b for a, b in zip(big._shards, new._shards, strict=True))
    assert shared >= len(big._shards) - 2
    assert big["h5"] == 5 and "h7" in big
    assert new["h5"] == -5 and "h7" not in new and len(new) == 9_999


def test_a_table_that_grew_is_sharded_again() -> None:
    table = Table({"a": 1})
    for i in range(20):
        table = table.changed({f"k{i}-{j}": j for j in range(100)})
    assert len(table) == 2_001
    assert len(table._shards) * len(table._shards) >= 2_001 // 4
    assert Table.of(table) is table


def test_a_table_pickled_into_another_process_is_sharded_there() -> None:
    """Shards follow this process's string hashes; a pickle carries the entries."""
    import pickle
    import subprocess
    import sys

    table = Table({f"h{i}": i for i in range(500)}).changed({"h5": -5}, ["h7"])
    probe = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); "
             "assert t['h5'] == -5 and 'h7' not in t and len(t) == 499; "
             "assert t == {f'h{i}': i for i in range(500) if i != 7} | {'h5': -5}")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", probe], input=pickle.dumps(table),
                       env={"PYTHONHASHSEED": seed, "PYTHONPATH": ":".join(sys.path)},
                       check=True, timeout=60)
