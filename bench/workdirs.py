"""Working directories of the bench's cells, all removed once, when the run ends.

Why not each at the end of its cell: on a file system without a journal (ext4 as this
machine mounts `/`: no jbd2), ext4's inode allocator skips every inode freed in the last
60 seconds (300 while its inode-table block is still dirty), looking each one up
(`recently_deleted` in fs/ext4/ialloc.c). A cell that removed its 30,000 Maildir or queue
files made the next cell's file creations cost 3.6 times the kernel CPU: the probe made
872 files/s right after `rm -rf` of 30,000 files and 2,006 without (bench/notes.md). So
one cell's cleanup was measured as part of the next cell, whichever peer that was.
The price: the run's files stay on disk until it ends (a --quick run makes some 190,000
files, about 1 GB by that count, in
$TMPDIR; a full run with repeats a few GB).

That leaves the files a peer deletes *during* its own cell: Postfix removes every queue
file once the message is delivered (30,000 in an end-to-end cell, more in its
acknowledgement cells). Each cell's directory used to sit in the same inode groups as
its siblings', so the next cell, whatever peer, created its files among those freed
inodes: gsmtp's local drain, run after a directory of 30,000 files had been removed
beside it, started at about 2,000 msg/s and climbed to 3,000 as the freed inodes aged
past the window, with a quarter of the machine's CPU in `recently_deleted`; with its
cell's directory in inode groups of its own it ran at 3,200–3,500 from the start
(bench/notes.md, 2026-12-02). So the run's directory is marked a top of a directory
hierarchy (`chattr +T`, FS_TOPDIR_FL), and ext4's Orlov allocator spreads the cells'
directories over the file system's groups as it does directories under `/`; a peer
then pays for the files it deletes itself, not for another's.
"""

from __future__ import annotations

import array
import atexit
import fcntl
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_run: Path | None = None

# linux/fs.h: the inode flags ioctls (an int, whatever their names say) and the
# Orlov top-of-hierarchy flag, `chattr +T`.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def inode_flags(path: Path) -> int:
    """The directory's inode flags (`lsattr -d`); OSError where the file system has none."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _flags(descriptor)
    finally:
        os.close(descriptor)


def mark_top_directory(path: Path) -> bool:
    """Set FS_TOPDIR_FL on `path` so its subdirectories are spread over the inode
    groups (see the module's docstring); False where the file system does not take it
    (tmpfs, or not ext2/3/4), and the cells then share groups as before."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        flags = array.array("i", [_flags(descriptor) | FS_TOPDIR_FL])
        fcntl.ioctl(descriptor, _FS_IOC_SETFLAGS, flags)
        return bool(_flags(descriptor) & FS_TOPDIR_FL)
    except OSError:
        return False
    finally:
        os.close(descriptor)


def _flags(descriptor: int) -> int:
    flags = array.array("i", [0])
    fcntl.ioctl(descriptor, _FS_IOC_GETFLAGS, flags, True)
    return flags[0]


@contextmanager
def cell_directory(prefix: str) -> Iterator[str]:
    """A new, empty directory for one cell (or one peer's cells), like
    tempfile.TemporaryDirectory but left in place when the cell ends: it goes with the
    rest at `remove_all` (also called at exit)."""
    global _run
    if _run is None:
        _run = Path(tempfile.mkdtemp(prefix="bench-run-"))
        _run.chmod(0o755)  # as /tmp: Postfix's daemons (user postfix) pass through it
        mark_top_directory(_run)
        atexit.register(remove_all)
    yield tempfile.mkdtemp(prefix=prefix, dir=_run)


def exit_on_sigterm() -> None:
    """For a bench command's main: SIGTERM (`timeout`, `kill`) exits through the cells'
    cleanups (peers stopped) and atexit (`remove_all`), as Ctrl-C does, instead of
    leaving gigabytes of cell files behind."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def remove_all() -> None:
    """Remove every cell's directory (after the last measurement)."""
    global _run
    if _run is not None:
        shutil.rmtree(_run, ignore_errors=True)
        _run = None
