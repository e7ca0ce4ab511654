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
