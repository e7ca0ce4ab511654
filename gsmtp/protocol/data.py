"""The DATA phase: find the real end of data, undo dot-stuffing, enforce the size cap.

No I/O. Only `<CRLF>.<CRLF>` ends the data (RFC 5321 §4.1.1.4, §2.3.8): `<LF>.<LF>` and
every other mix of bare CR and LF are message content, and their presence makes the
message refused after the real end (SMTP smuggling, CVE-2023-51764 and kin). A message
over the size cap is read on, and discarded, up to the real end before 552 is answered,
so the rest of it is never run as commands. Memory stays bounded by the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

_END = b"\r\n.\r\n"


@dataclass(frozen=True, slots=True)
class DataResult:
    """The message as received: `content` is unstuffed and ends with CRLF (or is empty)."""

    content: bytes
    too_big: bool
    bare_line_ending: bool


class DataReader:
    """Accumulates DATA bytes until the end marker. Feed chunks; get a result once."""

    __slots__ = ("_buffer", "_max_size", "_scan_from", "_too_big")

    def __init__(self, max_size: int) -> None:
        # A virtual CRLF before the first line lets one search find ".\r\n" at the very
        # start (the empty message) and treat the first line's leading dot like any other.
        self._buffer = bytearray(b"\r\n")
        self._max_size = max_size
        self._scan_from = 0
        self._too_big = False

    def feed(self, data: bytes) -> tuple[DataResult | None, bytes]:
        """Take a chunk; return the result when the end was found, plus the bytes after
        it (pipelined commands), which belong to the command stream again."""
        buffer = self._buffer
        buffer += data
        end = buffer.find(_END, self._scan_from)
        if end < 0:
            self._scan_from = max(0, len(buffer) - len(_END) + 1)
            if len(buffer) - 2 > self._max_size:
                # Keep only a tail long enough to see an end marker split across chunks.
                self._too_big = True
                del buffer[: len(buffer) - len(_END)]
                self._scan_from = 0
            return None, b""
        leftover = bytes(buffer[end + len(_END) :])
        raw = bytes(buffer[: end + 2])
        if self._too_big or len(raw) - 2 > self._max_size:
            return DataResult(b"", too_big=True, bare_line_ending=False), leftover
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\n") != crlf or raw.count(b"\r") != crlf
        # RFC 5321 §4.5.2: a leading dot on a line was doubled by the sender; drop one.
        content = raw.replace(b"\r\n.", b"\r\n")[2:]
        return DataResult(content, too_big=False, bare_line_ending=bare), leftover
