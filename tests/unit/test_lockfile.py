"""The single-instance lock: flock on `<spool>.lock`, the holder's PID inside."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gsmtp import lockfile


def test_the_second_taker_learns_the_holders_pid(tmp_path: Path) -> None:
    path = lockfile.lock_path(str(tmp_path / "var" / "spool.sqlite"))
    first = lockfile.acquire(path)
    assert isinstance(first, lockfile.InstanceLock)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # flock belongs to the open file description: a second open conflicts even here.
    second = lockfile.acquire(path)
    assert second == lockfile.HeldBy(path, os.getpid())
    first.release()
    third = lockfile.acquire(path)
    assert isinstance(third, lockfile.InstanceLock)
    third.release()


def test_a_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite.lock")
    Path(path).write_text("999999\n")  # left by a server that was killed
    lock = lockfile.acquire(path)
    assert isinstance(lock, lockfile.InstanceLock)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    lock.release()


def test_the_lock_is_the_real_files_whatever_name_reaches_it(tmp_path: Path) -> None:
    """Red-team finding: keyed on the path string, a second server reaching the same
    database through a symlink (to the file, or to its directory) took a lock of its
    own and delivered the same recipients as the first."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "spool.sqlite").write_bytes(b"")
    (tmp_path / "linked-file.sqlite").symlink_to(real / "spool.sqlite")
    (tmp_path / "linked-dir").symlink_to(real)
    names = [
        str(real / "spool.sqlite"),
        str(tmp_path / "linked-file.sqlite"),
        str(tmp_path / "linked-dir" / "spool.sqlite"),
    ]
    paths = {lockfile.lock_path(name) for name in names}
    assert paths == {os.path.realpath(real / "spool.sqlite") + ".lock"}
    first = lockfile.acquire(lockfile.lock_path(names[0]))
    assert isinstance(first, lockfile.InstanceLock)
    for name in names[1:]:
        assert lockfile.acquire(lockfile.lock_path(name)) == lockfile.HeldBy(
            first.path, os.getpid()
        )
    first.release()
    # A spool not made yet, reached through a symlinked directory: the same rule.
    assert lockfile.lock_path(str(tmp_path / "linked-dir" / "new.sqlite")) == (
        os.path.realpath(real / "new.sqlite") + ".lock"
    )
