"""The bench's run directory is a top of a directory hierarchy for ext4's allocator, so
one cell's deleted files do not slow the next cell's file creations (bench/workdirs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import workdirs


def _supports_inode_flags(path: Path) -> bool:
    try:
        workdirs.inode_flags(path)
    except OSError:
        return False
    return True


def test_the_run_directory_is_marked_the_top_of_a_hierarchy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _supports_inode_flags(tmp_path):
        pytest.skip(f"{tmp_path}'s file system has no inode flags (lsattr): nothing to mark")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(workdirs, "_run", None)
    with workdirs.cell_directory("cell-") as cell:
        run = Path(cell).parent
        assert run.parent == tmp_path
        flags = workdirs.inode_flags(run)
        if not flags & workdirs.FS_TOPDIR_FL and not workdirs.mark_top_directory(run):
            pytest.skip(f"{tmp_path}'s file system does not keep FS_TOPDIR_FL (not ext4)")
        assert flags & workdirs.FS_TOPDIR_FL
    workdirs.remove_all()
    assert not run.exists()


def test_a_file_system_without_inode_flags_leaves_the_directory_unmarked(tmp_path: Path) -> None:
    assert workdirs.mark_top_directory(tmp_path / "missing") is False
