"""One `gsmtp serve` per spool: an flock on `<spool>.lock`, held for the life of the server.

The lock file sits beside the real database file: `<spool.path>.lock` with every
symlink in spool.path resolved (`os.path.realpath`), so a second server reaching the
same file through another name (a symlinked file or directory) meets the same lock.
(A hard link is not seen through; SQLite itself does not support them: its -wal and
-shm files are named after the path.)

Two servers on one spool would each release the other's leases at start-up and deliver
the same recipients twice; so the lock is taken before the spool is opened, and a
second server exits naming the holder's PID (written into the lock file). flock, not
fcntl: it belongs to the open file description, so SQLite's POSIX locks and the closing
of other descriptors never touch it, and the kernel drops it when the process ends,
however it ends (kill -9 included): a lock file left behind never blocks a restart.
The file is never removed: removing it would let a third server lock a new file while
the first still holds the old one. Commands other than `serve` do not take the lock.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class HeldBy:
    """The lock is taken: by this PID (None if the file does not say yet)."""

    path: str
    pid: int | None


class InstanceLock:
    """A held lock; `release()` (or the process's end) lets the next server in."""

    def __init__(self, path: str, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor drops the flock
            self._descriptor = None


def lock_path(spool_path: str) -> str:
    """The lock of the database file `spool_path` names, through any symlinks (the
    file need not exist yet)."""
    return os.path.realpath(spool_path) + ".lock"


def acquire(path: str) -> InstanceLock | HeldBy:
    """Take the lock without waiting. OSError if the file cannot be opened at all."""
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(descriptor)
        os.close(descriptor)
        return HeldBy(path, holder)
    except BaseException:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return InstanceLock(path, descriptor)


def _read_pid(descriptor: int) -> int | None:
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
