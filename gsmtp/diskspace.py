"""The free-space reserve: refuse new mail (452 4.3.1) before the spool's disk is full.

A full disk fails a message only after its whole body has arrived, and takes delivery
bookkeeping down with it; a refusal at MAIL costs the client nothing and lets mail
already queued leave, which gives the space back. Postfix refuses MAIL below
1.5 × message_size_limit free (smtpd_check_queue); gsmtp keeps `spool.min_free`
(default 2 × max_message_size) free on the spool's file system, and also refuses a
MAIL whose SIZE= would eat into that reserve. Free space is measured with statvfs (what
an unprivileged process may use) at most once per CACHE_SECONDS: it is asked on every
MAIL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_SECONDS = 1.0


class SpaceReserve:
    """`has_room(size)`: is there room for a message of `size` (None: not announced)
    and the reserve on top? A reserve of 0 turns the check off."""

    def __init__(
        self,
        path: str,
        reserve: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        statvfs: Callable[[str], Any] = os.statvfs,
    ) -> None:
        self._directory = str(Path(path).parent)
        self.reserve = reserve
        self._clock = clock
        self._statvfs = statvfs
        self._free: int | None = None
        self._measured_at = float("-inf")

    def has_room(self, size: int | None) -> bool:
        if self.reserve <= 0:
            return True
        free = self.free_bytes()
        if free is None:
            return True  # cannot tell: the spool itself will say if it cannot store
        return free >= self.reserve + (size or 0)

    def free_bytes(self) -> int | None:
        now = self._clock()
        if now - self._measured_at >= CACHE_SECONDS:
            self._measured_at = now
            try:
                stat = self._statvfs(self._directory)
            except OSError:
                self._free = None
            else:
                self._free = int(stat.f_bavail) * int(stat.f_frsize)
        return self._free
