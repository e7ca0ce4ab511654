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


def holder(path: str) -> int | None:
    """The PID of the server holding the lock at `path` (the PID its file names), or None
    when no process holds it. Read from /proc/locks, which looks without locking: a test
    lock of our own could make a server starting at that moment think the spool served.
    Where /proc/locks cannot be read, a shared lock is tried for an instant instead."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pid = _read_pid(descriptor)
        if pid is None:
            return None
        held = _held_per_proc(os.fstat(descriptor).st_ino, pid)
        if held is None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held = True
            else:
                held = False
        return pid if held else None
    finally:
        os.close(descriptor)


def _held_per_proc(inode: int, pid: int) -> bool | None:
    """Whether /proc/locks lists an flock of `pid` on a file with `inode` (None: cannot
    tell). Lines look like `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`; the device
    is left out of the comparison (overlay file systems report another one than stat)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as listing:
            lines = listing.readlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK":
            continue
        owner, file_id = fields[4], fields[5]
        if owner == str(pid) and file_id.rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def already_served(spool: str, path: str, held: HeldBy) -> str:
    """What a second `serve` says before exiting: which process serves the spool."""
    holder = f"PID {held.pid}" if held.pid is not None else "another process"
    return f"gsmtp: spool {spool} is already served by {holder} (lock {path})"
