"""Is stderr the journal? (systemd's JOURNAL_STREAM), and the err priority for the
plain-text lines written to stderr there. Standard library only: the CLI installs the
prefix first thing, before `gsmtp serve` monkey-patches gevent (gsmtp.log imports
structlog, which imports ssl and threading)."""

from __future__ import annotations

import os
import sys
from typing import Any


def under_journald(stream: Any = None) -> bool:
    """True when `stream` (stderr) is the stream systemd connected to the journal:
    JOURNAL_STREAM is "device:inode" of it. A child that inherited the variable but
    writes elsewhere (a file, a pipe) is not under journald."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        status = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


class _ErrorPriorityStream:
    """stderr's text side with `<3>` (err) before each line: the plain-text lines written
    there (`gsmtp: cannot listen …`, a traceback) are errors, and under journald a line
    without a priority is filed at the stream's default, info. The JSON log lines are
    written to the binary `buffer` underneath, with their own priority: untouched."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        if not text:
            return 0
        lines = text.split("\n")
        out = []
        for index, piece in enumerate(lines):
            if piece and (self._line_start or index > 0):
                piece = "<3>" + piece
            out.append(piece)
        self._line_start = text.endswith("\n")
        self._stream.write("\n".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def prefix_stderr_under_journald() -> None:
    """Under journald, give the plain-text lines written to sys.stderr (the CLI's and
    the supervisor's `gsmtp: …` errors) the err priority, so `journalctl -p err` shows
    them. Called once, first thing, by the CLI; nothing changes elsewhere."""
    if under_journald() and not isinstance(sys.stderr, _ErrorPriorityStream):
        sys.stderr = _ErrorPriorityStream(sys.stderr)
