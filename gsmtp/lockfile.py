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

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ORPHAN_POLL = 0.1  # seconds between tries while an exited supervisor's workers finish
# Linux hands out PIDs below PID_MAX_LIMIT, 2^22 on 64-bit systems (less on 32-bit),
# whatever /proc/sys/kernel/pid_max says now.
PID_CEILING = 1 << 22


@dataclass(frozen=True, slots=True)
class HeldBy:
    """The lock is taken: by this PID (None if the file does not say yet), a process
    that started at `started` (clock ticks after boot, /proc/<pid>/stat's starttime, as
    the file's second line says; None in a file written before it had one). `backup`:
    the third line says the holder is `gsmtp spool backup` holding a target's lock while
    its copies are made, not a server."""

    path: str
    pid: int | None
    started: int | None = field(default=None, compare=False)
    backup: bool = field(default=False, compare=False)


class InstanceLock:
    """A held lock; `release()` (or the process's end) lets the next server in."""

    def __init__(self, path: str, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the only descriptor drops the flock
            self._descriptor = None


_BACKUP = "backup"  # the third line of a lock file a backup holds


def lock_path(spool_path: str) -> str:
    """The lock of the database file `spool_path` names, through any symlinks (the
    file need not exist yet)."""
    return os.path.realpath(spool_path) + ".lock"


def acquire(path: str, *, backup: bool = False) -> InstanceLock | HeldBy:
    """Take the lock without waiting. OSError if the file cannot be opened at all, or is
    not a regular file. The file names the holder: its PID, its start, and `backup` when
    it is a backup rather than a server (what a refused `serve` tells the operator)."""
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    descriptor = os.open(path, flags, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):  # a FIFO, a device put there
            raise OSError(errno.EINVAL, "not a regular file", path)
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(path, descriptor)
        os.close(descriptor)
        return holder
    except BaseException:
        os.close(descriptor)
        raise
    os.ftruncate(descriptor, 0)
    started = _stat_fields(os.getpid())
    start = started[19] if started is not None and len(started) > 19 else ""
    role = f"{_BACKUP}\n" if backup else ""
    os.pwrite(descriptor, f"{os.getpid()}\n{start}\n{role}".encode(), 0)
    return InstanceLock(path, descriptor)


def exited(held: HeldBy) -> bool:
    """Whether the lock is held although the PID its file names has exited (or is a
    zombie, or now names another process, started at another time than the one the file
    records: the PID reused): the holders are then workers of a supervisor that was
    killed (SIGKILL, which no handler sees). Worker 0 inherited the node lock with its
    descriptor; at the supervisor's death each worker got SIGTERM (PR_SET_PDEATHSIG) and
    is finishing its graceful stop, which its own deadline bounds."""
    if held.pid is None:
        return False
    fields = _stat_fields(held.pid)
    if fields is None:
        try:
            os.kill(held.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    if fields[:1] == ["Z"]:
        return True
    if held.started is None or len(fields) <= 19 or not _same_boottime(held.pid):
        return False
    return fields[19] != str(held.started)


def _same_boottime(pid: int) -> bool:
    """Whether this process reads start times on the clock `pid` wrote with: a process
    in another time namespace (`unshare -T`, a restored container) sees every start
    shifted by its boottime offset (red-team finding: a live server was taken for
    gone). Unknown counts as the same (no namespaces: one clock)."""
    try:
        return os.readlink("/proc/self/ns/time") == os.readlink(f"/proc/{pid}/ns/time")
    except OSError:
        return True


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, starttime at
    19); ["Z"] when the process is gone (it holds nothing, as a zombie), None when
    /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return ["Z"]  # gone: as a zombie, it holds nothing
    except OSError:
        return None


def acquire_after_exited_holder(
    path: str,
    wait: float,
    *,
    waiting: Callable[[HeldBy], None],
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> InstanceLock | HeldBy:
    """`acquire`, but when the holder's named PID has exited (`exited`), wait up to
    `wait` seconds for its orphaned workers to finish their stop, telling `waiting`
    once: a supervisor killed with SIGKILL must not turn the restart after it into a
    refusal (its workers' stop takes up to shutdown_grace). A live holder is refused at
    once, as by `acquire`, also one that took the lock during the wait (two servers
    started together: the one that lost is refused as soon as the other holds it)."""
    lock = acquire(path)
    if isinstance(lock, InstanceLock) or not exited(lock):
        return lock
    waiting(lock)
    deadline = clock() + wait
    while clock() < deadline:
        sleep(ORPHAN_POLL)
        lock = acquire(path)
        if isinstance(lock, InstanceLock):
            return lock
        if lock.pid is not None and not exited(lock):
            return lock  # None: a new holder between its truncate and its write
    return lock


def _read_holder(path: str, descriptor: int) -> HeldBy:
    """The PID the file names (its first line) and, when written, its start (the second).
    A first line that no process could have written (not a number, 0, at or beyond the
    kernel's PID ceiling: a file edited by hand) names nobody: the holder is then refused
    at once as "another process", not waited for as an exited supervisor's workers. The
    ceiling, not the current /proc/sys/kernel/pid_max: lowering that leaves running
    processes with higher PIDs (red-team finding: a server above it was taken for
    nobody, and the restart after a kill -9 of its supervisor was refused)."""
    lines = os.pread(descriptor, 64, 0).decode("ascii", "replace").split("\n")
    pid = lines[0].strip()
    started = lines[1].strip() if len(lines) > 1 else ""
    backup = len(lines) > 2 and lines[2].strip() == _BACKUP
    named = int(pid) if pid.isdigit() and 0 < int(pid) < PID_CEILING else None
    return HeldBy(path, named, int(started) if started.isdigit() else None, backup)


class HolderUnverified(Exception):
    """The lock is held, but neither /proc/locks nor the descriptors of the PID its file
    names can be read to confirm that PID holds it (a mount namespace hiding /proc/locks,
    another user's process): the number could be planted by whoever can write the file,
    so it is not to be signalled."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(f"cannot tell whether PID {pid} holds {path}")
        self.path = path
        self.pid = pid


def holder(path: str) -> int | None:
    """The PID of the server holding the lock at `path` (the PID its file names), or None
    when no process holds it, or the PID named is gone (`exited`) or does not hold it.
    Looked up without locking (a test lock of our own could make a server starting at
    that moment think the spool served): first among the named process's descriptors,
    one open on this very file (device and inode) with an flock on it
    (/proc/<pid>/fd and fdinfo); where those cannot be read (another user's process, or
    one with capabilities this one lacks), in /proc/locks (the inode only: overlay file
    systems list another device than stat gives); where neither can,
    HolderUnverified if the lock is held (a shared lock tried for an instant: it says
    that someone holds it, not who). Not a regular file (a directory, a FIFO put in its
    place): no server could have locked it, None. A lock a `gsmtp spool backup` holds
    on its target (the file says `backup`): no server, None, so that `gsmtp queue` never
    sends its wake-up signal to the backup (which has no handler: SIGUSR1 killed it;
    red-team finding)."""
    try:
        descriptor = os.open(
            path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        )
    except OSError:
        return None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None
        named = _read_holder(path, descriptor)
        pid = named.pid
        if pid is None or named.backup:
            return None
        if exited(named):
            # Gone, or the number reused by an unrelated process: no server to signal
            # (the workers of a killed supervisor, still stopping, may hold the lock).
            return None
        held = _held_per_descriptors(status, pid)
        if held is None:
            held = _held_per_proc(status.st_ino, pid)
        if held is None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HolderUnverified(path, pid) from None
            return None
        return pid if held else None
    finally:
        os.close(descriptor)


def _flock_owner(fields: list[str], inode: int) -> str | None:
    """The owner PID of a lock line (/proc/locks, or an fdinfo `lock:` line without its
    label: `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`) if it is an flock on a file
    with `inode`, else None. The device is left out of the comparison (overlay file
    systems report another one than stat)."""
    if len(fields) < 6 or fields[1] != "FLOCK":
        return None  # a POSIX lock, or a "->" line: a request waiting for the lock
    if fields[5].rsplit(":", 1)[-1] != str(inode):
        return None
    return fields[4]


def _held_per_proc(inode: int, pid: int) -> bool | None:
    """Whether /proc/locks lists an flock of `pid` on a file with `inode` (None: cannot
    tell)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as listing:
            lines = listing.readlines()
    except OSError:
        return None
    return any(_flock_owner(line.split(), inode) == str(pid) for line in lines)


def _held_per_descriptors(lock: os.stat_result, pid: int) -> bool | None:
    """Whether a descriptor of `pid` holds an flock on the file `lock` describes (None:
    cannot tell). Its /proc/<pid>/fdinfo entry shows a `lock:` line only for locks taken
    through that very open file; the lock line names the inode, and for such a
    descriptor only, a stat through /proc/<pid>/fd compares the device too (a file of
    another file system may have the same inode number). Procfs text first: a stat of
    every descriptor could hang on one of a dead NFS or FUSE mount. Any owner counts: a
    worker holds the node lock its supervisor took, through the descriptor it
    inherited."""
    directory = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return False  # gone since `exited` looked
    except OSError:
        return None
    for name in names:
        try:
            with open(f"{directory}/{name}", encoding="ascii", errors="replace") as info:
                lines = info.readlines()
            if not any(_locks(line, lock.st_ino) for line in lines):
                continue
            opened = os.stat(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
        except OSError:
            return None
        if (opened.st_dev, opened.st_ino) == (lock.st_dev, lock.st_ino):
            return True
    return False


def _locks(line: str, inode: int) -> bool:
    """Whether an fdinfo line is a `lock:` line of an flock on a file with `inode`."""
    label, _, rest = line.partition(":")
    return label == "lock" and _flock_owner(rest.split(), inode) is not None


def processes_holding(path: str) -> list[int]:
    """Every process seen to hold the flock on `path` through a descriptor of its own
    (their /proc/<pid>/fdinfo: the ones this process may read), in PID order: a killed
    supervisor's lock is held by its worker 0, which inherited the descriptor and whose
    PID no file names. One look at every process's descriptors: for messages, not for
    a path taken often."""
    try:
        lock = os.stat(path)
        entries = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    return [pid for pid in sorted(entries) if _held_per_descriptors(lock, pid)]


def _held_through(path: str) -> str:
    """ ", held by PID 1234" (or PIDs), naming the processes holding the lock now."""
    pids = processes_holding(path)
    if not pids:
        return ""
    return f", held by PID{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"


def already_served(spool: str, path: str, held: HeldBy) -> str:
    """What a second `serve` says before exiting: which process serves the spool (or,
    the named PID having exited, that its workers still do, and which they are)."""
    if exited(held):
        return (
            f"gsmtp: spool {spool} is still served by the workers of PID {held.pid},"
            f" {_how_it_exited(held)}; they did not finish their stop in time"
            f" (lock {path}{_held_through(path)})"
        )
    holder = f"PID {held.pid}" if held.pid is not None else "another process"
    if held.backup:
        return (
            f"gsmtp: spool {spool} is being written by `gsmtp spool backup` ({holder}),"
            f" which holds its lock until its copies are in place (lock {path});"
            " start the server once the backup has ended"
        )
    return f"gsmtp: spool {spool} is already served by {holder} (lock {path})"


def waiting_for_orphans(spool: str, path: str, held: HeldBy, wait: float) -> str:
    """What `serve` says while the workers of an exited supervisor finish (`exited`),
    naming the ones holding the lock."""
    return (
        f"gsmtp: spool {spool} is still served by the workers of PID {held.pid},"
        f" {_how_it_exited(held)}; waiting up to {wait:g} s for them to finish their stop"
        f" (lock {path}{_held_through(path)})"
    )


def _how_it_exited(held: HeldBy) -> str:
    """The words for a holder `exited` found gone: a PID that now names a live process
    (another start than the file records) is said to be reused, lest the operator look
    for the wrong process."""
    fields = _stat_fields(held.pid) if held.pid is not None else None
    if fields is not None and fields[:1] != ["Z"]:
        return "which has exited (that number now names another process)"
    return "which has exited"
