"""An immutable mapping by name whose next version shares all it did not change.

The agent builds a snapshot per change. Copying a dict of 100,000 host endpoints to
replace one costs about 13 ms; a `Table` keeps its entries in shards (by the name's hash)
and a changed version copies only the list of shards and the shards it touches, so a
change of one entry costs some microseconds at any size. An old version is never
modified, so what still holds it (the flow aggregator's snapshot, a worker thread) reads
it safely while the next one is built.

Iteration goes shard by shard, each in the order its entries came in: code that needs an
order sorts (the plan sorts by name).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import TypeVar

V = TypeVar("V")


def _shard_count(size: int) -> int:
    """A power of two near the square root of `size` (a change copies a shard of about
    that many entries and a list of that many shards), at least 8."""
    count = 8
    while count * count < size and count < 4096:
        count *= 2
    return count


class _Values(ValuesView[V]):
    """The values, read shard by shard (not one lookup per key)."""

    def __init__(self, table: Table[V]) -> None:
        super().__init__(table)
        self._table = table

    def __iter__(self) -> Iterator[V]:
        for shard in self._table._shards:
            yield from shard.values()


class Table(Mapping[str, V]):
    """Entries by name in shards; `changed` makes the next version."""

    __slots__ = ("_len", "_mask", "_shards")

    def __init__(self, entries: Mapping[str, V] | None = None) -> None:
        entries = entries or {}
        count = _shard_count(len(entries))
        shards: list[dict[str, V]] = [{} for _ in range(count)]
        mask = count - 1
        for key, value in entries.items():
            shards[hash(key) & mask][key] = value
        self._shards = shards
        self._mask = mask
        self._len = len(entries)

    @classmethod
    def of(cls, entries: Mapping[str, V]) -> Table[V]:
        """`entries` as a Table (itself if it is one)."""
        return entries if isinstance(entries, Table) else cls(entries)

    def changed(self, put: Mapping[str, V], drop: Iterable[str] = ()) -> Table[V]:
        """A new version: `drop`'s names removed, then `put`'s entries set. This one is
        left as it is."""
        shards = list(self._shards)
        copied: set[int] = set()
        size = self._len

        def shard(key: str) -> dict[str, V]:
            at = hash(key) & self._mask
            if at not in copied:
                shards[at] = dict(shards[at])
                copied.add(at)
            return shards[at]

        for key in drop:
            if key in shards[hash(key) & self._mask]:
                del shard(key)[key]
                size -= 1
        for key, value in put.items():
            mine = shard(key)
            size += key not in mine
            mine[key] = value
        new = Table.__new__(Table)
        new._shards, new._mask, new._len = shards, self._mask, size
        if size > 4 * len(shards) * len(shards) and len(shards) < 4096:
            return Table(new)     # grown well past its shards: shard it again
        return new

    def __getitem__(self, key: str) -> V:
        return self._shards[hash(key) & self._mask][key]

    def get(self, key: str, default: V | None = None) -> V | None:  # type: ignore[override]
        return self._shards[hash(key) & self._mask].get(key, default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._shards[hash(key) & self._mask]

    def __iter__(self) -> Iterator[str]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len

    def values(self) -> ValuesView[V]:
        return _Values(self)

    def __repr__(self) -> str:
        return f"Table({dict(self.items())!r})"

    def __reduce__(self) -> tuple[type[Table[V]], tuple[dict[str, V]]]:
        # Sharded by this process's string hashes: another process shards anew.
        return (Table, (dict(self.items()),))
