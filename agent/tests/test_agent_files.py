"""The agent's atomic file writes (bulkhead.agent.files): the cache and the HNS
enforcer's state file go through them, and the flow spool flushes its directory with
them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bulkhead.agent import files
from bulkhead.agent.cache import load_cache, save_cache


def test_a_file_is_replaced_whole_with_its_mode_and_nothing_left_beside(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    files.write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        files.write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_on_windows_the_directory_is_not_opened(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows refuses `os.open` on a directory (PermissionError): the cache must still
    be written without an error there (it used to raise after the rename, and every
    apply reported the cache as not written)."""
    real_open = os.open

    def windows_open(path: str | Path, flags: int, *args: int) -> int:
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", windows_open)
    with pytest.raises(PermissionError):         # as it is off Windows' path
        save_cache(tmp_path, "win1", 7, [{"kind": "Tier", "metadata": {"name": "t"}}])
    monkeypatch.setattr(files, "WINDOWS", True)
    save_cache(tmp_path, "win1", 8, [{"kind": "Tier", "metadata": {"name": "t"}}])
    cache = load_cache(tmp_path)
    assert cache is not None and cache.revision == 8
