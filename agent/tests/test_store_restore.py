"""A SQLite file restored from a backup hands out again revision numbers the agents
already hold for changes it no longer has: a watcher at such a revision was answered
from there (the undone change stayed in force on its host, the node counted converged).
`bulkhead-server --bump-revision N` raises the revision past every agent's and marks the
history compacted, so every agent takes a snapshot."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bulkhead.server.hub import Hub
from bulkhead.server.main import main
from bulkhead.store.sqlite import SQLiteStore
from tests.test_store_faults import put


async def answer_to(path: Path, after: int) -> tuple[list[str] | None, list[str]]:
    """What a watcher at `after` is answered by a server on the file (None: a
    snapshot), and the names the server holds."""
    store = SQLiteStore(path)
    hub = Hub(store)
    follower = asyncio.create_task(hub.run())
    try:
        async with asyncio.timeout(10):
            await hub.ready.wait()
        events, _ = await hub.wait(after, timeout=0.2)
        names = sorted(name for _, name in hub.objects)
        return (None if events is None else [e.name for e in events]), names
    finally:
        follower.cancel()
        await store.close()


def restore(backup: Path, path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(backup.read_bytes())


async def test_a_restored_file_bumped_gives_every_agent_a_snapshot(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, backup = tmp_path / "store.db", tmp_path / "backup.db"
    store = SQLiteStore(path)
    await store.transaction([put("good")])                   # revision 1
    with sqlite3.connect(path) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)                                      # the nightly backup
    src.close()
    dst.close()
    await store.transaction([put("bad")])                    # revision 2: agents take it
    await store.close()

    # Restored as it was: the fix takes revision 2 again, and an agent at 2 is told
    # nothing of it (nor that "bad" is gone).
    restore(backup, path)
    store = SQLiteStore(path)
    fixed = await store.transaction([put("fix")])
    await store.close()
    assert fixed.revision == 2
    assert await answer_to(path, 2) == ([], ["fix", "good"])

    # Restored and bumped: the agent at 2 takes a snapshot, without "bad", with the fix.
    restore(backup, path)
    assert await asyncio.to_thread(main, ["--datastore", f"sqlite://{path}",
                                          "--bump-revision", "100"]) == 0
    assert "revision 1 -> 101" in capsys.readouterr().out
    store = SQLiteStore(path)
    fixed = await store.transaction([put("fix")])
    await store.close()
    assert fixed.revision == 102
    assert await answer_to(path, 2) == (None, ["fix", "good"])
    assert await answer_to(path, 101) == (["fix"], ["fix", "good"])


def test_bump_revision_is_for_sqlite_and_a_positive_number(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="etcdutl snapshot restore --bump-revision"):
        main(["--datastore", "etcd://127.0.0.1:9", "--bump-revision", "5"])
    with pytest.raises(SystemExit, match="at least 1"):
        main(["--datastore", f"sqlite://{tmp_path}/s.db", "--bump-revision", "0"])
    with pytest.raises(SystemExit, match=r"s\.db: no such file"):
        main(["--datastore", f"sqlite://{tmp_path}/s.db", "--bump-revision", "10"])
    assert not (tmp_path / "s.db").exists()
