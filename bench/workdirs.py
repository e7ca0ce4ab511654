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
"""

from __future__ import annotations

import atexit
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_run: Path | None = None


@contextmanager
def cell_directory(prefix: str) -> Iterator[str]:
    """A new, empty directory for one cell (or one peer's cells), like
    tempfile.TemporaryDirectory but left in place when the cell ends: it goes with the
    rest at `remove_all` (also called at exit)."""
    global _run
    if _run is None:
        _run = Path(tempfile.mkdtemp(prefix="bench-run-"))
        _run.chmod(0o755)  # as /tmp: Postfix's daemons (user postfix) pass through it
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
