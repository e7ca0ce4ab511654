"""The free-space reserve: refuse new mail (452 4.3.1) before the spool's disk is full.

A full disk is worse than a refusal. A message fails only after its whole body has
arrived; worse, a WAL that cannot be checkpointed (the database file cannot grow) never
restarts, so even the small writes delivery needs fail and the space never comes back.
A refusal at MAIL costs the client nothing and lets mail already queued leave. Postfix
refuses MAIL below 1.5 × message_size_limit free (smtpd_check_queue); gsmtp keeps
`spool.min_free` (default 2 × max_message_size) free on the spool's file system, and
also refuses a MAIL whose SIZE= would eat into that reserve.

What counts as free: what statvfs says an unprivileged process may use, less the WAL
file (its frames are copied into the database file at the next checkpoint, so until
then a message takes its room twice), less twice what the server stored since the last
measurement. Measured at most once per CACHE_SECONDS: it is asked on every MAIL.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

CACHE_SECONDS = 1.0


def spool_free_space(path: str) -> int:
    """Bytes the spool at `path` can still grow by (see the module docstring)."""
    stat = os.statvfs(Path(path).parent)
    try:
        wal = os.stat(path + "-wal").st_size
    except FileNotFoundError:
        wal = 0
    return int(stat.f_bavail) * int(stat.f_frsize) - wal


class SpaceReserve:
    """`has_room(size)`: is there room for a message of `size` (None: not announced)
    and the reserve on top? A reserve of 0 turns the check off."""

    def __init__(
        self,
        path: str,
        reserve: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        measure: Callable[[str], int] = spool_free_space,
    ) -> None:
        self._path = path
        self.reserve = reserve
        self._clock = clock
        self._measure = measure
        self._free: int | None = None
        self._spent = 0  # bytes stored since the last measurement
        self._measured_at = float("-inf")
        self._refused_at = float("-inf")  # when has_room last said no

    def has_room(self, size: int | None) -> bool:
        if self.reserve <= 0:
            return True
        free = self.free_bytes()
        if free is None:
            return True  # cannot tell: the spool itself will say if it cannot store
        if free >= self.reserve + (size or 0):
            return True
        self._refused_at = self._clock()
        return False

    def refused_within(self, seconds: float) -> bool:
        """Whether `has_room` said no in the last `seconds`: the disk was short for some
        mail (a MAIL whose SIZE= would eat into the reserve, while MAIL without SIZE=
        is still accepted), so space that can be given back is needed now."""
        return self._clock() - self._refused_at <= seconds

    def spend(self, size: int) -> None:
        """The server stored a message of `size` bytes: in the WAL now, in the database
        file after the next checkpoint."""
        if self.reserve > 0:
            self._spent += 2 * size

    def free_bytes(self) -> int | None:
        now = self._clock()
        if now - self._measured_at >= CACHE_SECONDS:
            self._measured_at = now
            self._spent = 0
            try:
                self._free = self._measure(self._path)
            except OSError:
                self._free = None
        return None if self._free is None else self._free - self._spent


BALLAST_BYTES = 1024 * 1024


class Ballast:
    """A file of `size` bytes beside the spool (`<spool>.reserve`), kept so that a full
    disk can be recovered from. When the WAL has filled the disk, removing what was
    written (the parts of a refused message) takes new WAL frames, and a checkpoint
    needs the database file to grow: without a little room neither can happen, and
    the space never comes back. `release()` gives that room; `restore()` takes it
    again once the disk has space to spare. Used only from the event loop."""

    def __init__(self, spool_path: str, size: int = BALLAST_BYTES) -> None:
        self.path = Path(spool_path + ".reserve")
        self.size = size
        self.released = True  # no file yet: `restore()` makes it
        # Given up for a full disk (not merely absent, as when a start found too little
        # room to make it): the spool is recovering until it is made again.
        self.given_up = False

    def release(self) -> bool:
        """Remove the file; True if that gave room back (it was there)."""
        if self.released:
            return False
        self.released = self.given_up = True
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def restore(self) -> OSError | None:
        """(Re)create the file, with its blocks written, if there is room for it and as
        much again to spare; the error (ENOSPC…) otherwise, the file left absent."""
        if not self.released:
            return None
        try:
            stat = os.statvfs(self.path.parent)
            if int(stat.f_bavail) * int(stat.f_frsize) < 2 * self.size:
                return OSError(errno.ENOSPC, "not enough free space for the ballast file")
            with open(self.path, "wb") as file:
                file.write(bytes(self.size))  # real blocks, unlike a sparse truncate()
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            return error
        self.released = self.given_up = False
        return None


class FreePages:
    """How many free spool pages to give back to the file system (incremental vacuum)
    this round: those that stayed free for the last `window` seconds.

    Pages freed by mail that left are what the next mail is written into. Giving them
    back at once and growing the file again a moment later is costly: the vacuum moves
    the pages at the end of the file (the youngest messages, still queued) into the
    free slots, writing each again, and the file grows back page by page. Under a
    steady 100 KiB load, giving back every second what exceeded a few MB rewrote 16 MB
    a second. So a round gives back only the lowest free count seen over the window,
    less `slack` pages kept for new mail, at most `step`, and nothing below `minimum`:
    after a burst the space comes back `window` seconds after the queue drained. When
    the disk is short (`urgent`: mail is refused, or the spool is recovering from a full
    disk) every free page past the slack goes back at once, as that is what the
    recovery needs. Used by one greenlet, once a round."""

    def __init__(
        self,
        *,
        window: float,
        minimum: int,
        slack: int,
        step: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window
        self._minimum = minimum
        self._slack = slack
        self._step = step
        self._clock = clock
        self._seen: deque[tuple[float, int]] = deque()  # (when, free pages), oldest first
        self._since = clock()  # observed since: nothing stayed free longer than that

    def to_give_back(self, free: int, *, urgent: bool = False) -> int:
        """`free` pages are free now: how many to give back."""
        now = self._clock()
        self._seen.append((now, free))
        while self._seen[0][0] < now - self._window:
            self._seen.popleft()
        if urgent:
            lowest = free
        elif now - self._since < self._window:
            return 0  # not watched for a whole window yet
        else:
            lowest = min(pages for _, pages in self._seen)
        if lowest < self._minimum:
            return 0
        return max(min(lowest - self._slack, self._step), 0)

    def given_back(self, pages: int) -> None:
        """`pages` went back to the file system: no longer free at any time seen."""
        self._seen = deque((when, max(free - pages, 0)) for when, free in self._seen)
