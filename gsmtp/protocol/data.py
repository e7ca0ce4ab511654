"""The DATA phase: find the real end of data, undo dot-stuffing, enforce the size cap.

No I/O. Only `<CRLF>.<CRLF>` ends the data (RFC 5321 §4.1.1.4, §2.3.8): `<LF>.<LF>` and
every other mix of bare CR and LF are message content, and their presence makes the
message refused after the real end (SMTP smuggling, CVE-2023-51764 and kin). A message
over the size cap is read on, and discarded, up to the real end before 552 is answered,
so the rest of it is never run as commands.

Content is passed on as it arrives: each chunk is unstuffed up to its last complete line
(or, for a line longer than LINE_PIECE, up to a few bytes before its end) and kept as a
piece the caller may `take_content()` at any time, so a large message never has to be
held whole. What is not processed yet stays raw behind two bytes of context: the two
bytes before it, a CRLF at a line start (a virtual one before the first line). Every
check reads the raw bytes with that context in front, so no cut can hide anything:

- the end marker: a cut is made only after a CRLF (a marker that began before it begins
  with the kept CRLF), or in a long line with no CRLF left (the last bytes, which may
  begin a marker or a pair, stay);
- dot-stuffing: a leading dot is seen with the CRLF before it (the context);
- bare CR and LF: a cut never falls inside a CRLF, so each region counts whole pairs;
- the `Received:` hop count (RFC 5321 §6.3) reads only the header section, up to the
  first empty line, and a header line's start is never far from its region's start.

Memory stays bounded: what is not taken, plus less than one line piece of raw bytes;
once the message is doomed (too big, or a bare line ending) nothing is kept at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gsmtp.protocol.line_ends import has_bare_line_end

_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
_STUFFED = b"\r\n."  # RFC 5321 §4.5.2: a leading dot on a line was doubled by the sender
_EMPTY_LINE = b"\r\n\r\n"
# In the raw bytes, so a stuffed ".Received:" (the client doubled a leading dot that was
# never there: "..Received:" stays ".Received:") is read as it will be stored.
_RECEIVED = re.compile(rb"\n\.?received:", re.IGNORECASE)
_CONTEXT = 2  # bytes kept in front of the unprocessed ones
# A line longer than this is passed on in pieces (a body need not have lines at all).
LINE_PIECE = 8192
_KEEP = len(_END) - 1  # raw bytes kept back in a mid-line cut: the start of a marker
# The shortest line piece: a line's start and ".received:" always fit in its first one.
_MIN_LINE_PIECE = 32
_NO_DOTS = 1 << 62  # no stuffed line seen yet: `_process` need not look for them
DOT_TRIES = 16  # dots looked at one by one before a search for the whole pattern
STUFFED_ONE_BY_ONE = 16  # stuffed lines of a region cut out one by one, the rest by `replace`


def _find_line_start_dot(raw: bytearray, pattern: bytes, start: int) -> int:
    """`raw.find(pattern, start)` for a pattern that begins with CRLF and a dot (a
    stuffed line, the end marker). A search for a pattern of several bytes steps
    through the data a few bytes at a time, and the data of a large message is mostly
    lines with no dot (base64): the dots are found with memchr, and each is looked at
    with the CRLF before it. Where dots are frequent (text), after DOT_TRIES that
    begin no pattern the rest is searched for the pattern itself (CPython 3.11, 100 KiB
    of 78-byte lines with no dot but in the header: 1 against 67 µs; of text with two
    dots a line: 73 against 68 µs)."""
    at = start
    for _ in range(DOT_TRIES):
        dot = raw.find(b".", at + len(_CRLF))
        if dot < 0:
            return -1
        if raw.startswith(pattern, dot - len(_CRLF)):
            return dot - len(_CRLF)
        at = dot + 1  # no pattern begins at a dot, nor at the byte before it
    return raw.find(pattern, at)


@dataclass(frozen=True, slots=True)
class DataResult:
    """The message as received. `content` is unstuffed and ends with CRLF (or is
    empty); it is what `take_content()` had not taken before the end. `size` counts
    every unstuffed byte, taken or not; `received_headers` the `Received:` fields of
    the header section."""

    content: bytes
    too_big: bool
    bare_line_ending: bool
    received_headers: int = 0
    size: int = 0


class DataReader:
    """Takes DATA bytes until the end marker. Feed chunks; take content whenever wanted;
    get a result once."""

    __slots__ = (
        "_bare",
        "_dots_from",
        "_held",
        "_in_header",
        "_line_piece",
        "_max_size",
        "_pieces",
        "_raw",
        "_received",
        "_scanned",
        "_size",
        "_stuffed_size",
        "_too_big",
    )

    def __init__(self, max_size: int, *, line_piece: int = LINE_PIECE) -> None:
        # A virtual CRLF before the first line lets one search find ".\r\n" at the very
        # start (the empty message) and treat the first line's leading dot like any other.
        self._raw = bytearray(_CRLF)
        self._pieces: list[bytes] = []
        self._held = 0  # bytes in _pieces
        self._size = 0  # unstuffed content bytes so far, taken or not
        self._stuffed_size = 0  # as received: what the size cap counts
        self._max_size = max_size
        self._line_piece = max(line_piece, _MIN_LINE_PIECE)
        self._too_big = False
        self._bare = False
        self._in_header = True
        self._received = 0
        self._scanned = 0  # every "CRLF ." beginning before this in _raw was looked at
        self._dots_from = _NO_DOTS  # stuffed lines may begin from here in _raw on

    @property
    def buffered(self) -> int:
        """Bytes held: content not taken yet, and raw bytes not processed yet."""
        return self._held + len(self._raw)

    @property
    def doomed(self) -> bool:
        """The message will be refused at its end (over the size cap, or a bare CR or
        LF): nothing of it is kept from now on."""
        return self._too_big or self._bare

    def take_content(self) -> bytes:
        """The unstuffed content processed since the last take (possibly empty)."""
        pieces = self._pieces
        if not pieces:
            return b""
        content = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self._held = 0
        return content

    def feed(self, data: bytes) -> tuple[DataResult | None, bytes]:
        """Take a chunk; return the result when the end was found, plus the bytes after
        it (pipelined commands), which belong to the command stream again."""
        raw = self._raw
        raw += data
        end = self._find_end()
        if end < 0:
            last_line_end = raw.rfind(_CRLF, _CONTEXT)
            if last_line_end >= 0:
                self._process(last_line_end + len(_CRLF))
            if len(raw) - _CONTEXT > self._line_piece:
                # A long line: no CRLF is left past the context, so a cut here splits
                # no pair and no marker; the last bytes stay, as they may begin either.
                self._process(len(raw) - _KEEP)
            return None, b""
        leftover = bytes(memoryview(raw)[end + len(_END) :]) if len(raw) > end + len(_END) else b""
        self._process(end + len(_CRLF))  # the CRLF before the dot is content
        self._raw = bytearray()
        if self._too_big:
            return DataResult(b"", too_big=True, bare_line_ending=False), leftover
        pieces = self._pieces
        content = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self._held = 0
        return DataResult(content, False, self._bare, self._received, self._size), leftover

    def _find_end(self) -> int:
        """Where the end marker begins in the raw bytes, or -1. Most messages have no
        stuffed line, so one search serves both: each line start "CRLF ." not looked at
        yet is the end (a CRLF follows the dot) or a stuffed line. At the first stuffed
        line, `_process` is told to look for them itself from there on, and the rest is
        searched for the end marker alone. A line start too close to the last byte to
        tell is looked at again with the next chunk."""
        raw = self._raw
        size = len(raw)
        at = _find_line_start_dot(raw, _STUFFED, self._scanned)
        if at < 0:
            # A line start may begin in the last two bytes: the next search starts there.
            self._scanned = size - len(_CRLF)
            return -1
        if at + len(_END) > size:
            self._scanned = at
            return -1
        if raw.startswith(_CRLF, at + len(_STUFFED)):
            return at
        self._dots_from = min(self._dots_from, at)
        end = _find_line_start_dot(raw, _END, at + len(_STUFFED))
        self._scanned = max(at + len(_STUFFED), size - _KEEP)
        return end

    def _process(self, cut: int) -> None:
        """Pass on raw[_CONTEXT:cut] as content; keep raw[cut - _CONTEXT:]."""
        raw = self._raw
        self._stuffed_size += cut - _CONTEXT
        if not (self._too_big or self._bare):
            if self._stuffed_size > self._max_size:
                self._too_big = True
            else:
                stuffed = raw.find(_STUFFED, 0, cut) if self._dots_from < cut else -1
                piece = (
                    self._unstuff(cut, stuffed)
                    if stuffed >= 0
                    else bytes(memoryview(raw)[_CONTEXT:cut])
                )
                # Bare CR and LF (unstuffing removed dots only): every CR and LF is in
                # a CRLF.
                if has_bare_line_end(piece):
                    self._bare = True
                else:
                    if self._in_header:
                        self._count_received(cut)
                    if piece:
                        self._pieces.append(piece)
                        self._held += len(piece)
                        self._size += len(piece)
            if self._too_big or self._bare:
                self._pieces = []
                self._held = 0
        shift = cut - _CONTEXT
        del raw[:shift]
        self._scanned = max(self._scanned - shift, 0)
        if self._dots_from != _NO_DOTS:
            self._dots_from = max(self._dots_from - shift, 0)

    def _count_received(self, cut: int) -> None:
        """RFC 5321 §6.3: count the Received: fields of raw[:cut] up to the end of the
        header section (its first empty line), if that is in this region."""
        raw = self._raw
        empty_line = raw.find(_EMPTY_LINE, 0, cut)
        if empty_line >= 0:
            self._in_header = False
            self._received += len(_RECEIVED.findall(raw, 0, empty_line + 2))
        else:
            self._received += len(_RECEIVED.findall(raw, 0, cut))

    def _unstuff(self, cut: int, at: int) -> bytes:
        """raw[_CONTEXT:cut] with the first dot of each line dropped (the first at
        `at` + 2). The first STUFFED_ONE_BY_ONE stuffed lines are cut out one by one,
        into one copy; past them, the rest of the region is unstuffed by one `replace`
        in C, which drops the dot of every CRLF-dot left to right as the loop does. Line
        by line, a body of stuffed lines (".." lines, 4 bytes each) cost 92 µs a KiB of
        the event loop, five times what an ordinary large message costs gsmtp a KiB from
        its first byte to its Maildir file (red team)."""
        raw = self._raw
        view = memoryview(raw)
        segments: list[memoryview | bytes] = []
        start = _CONTEXT
        for _ in range(STUFFED_ONE_BY_ONE):
            if at < 0:
                break
            segments.append(view[start : at + len(_CRLF)])
            start = at + len(_STUFFED)
            # A plain search: between stuffed lines a dot-by-dot one would try up to
            # DOT_TRIES dots each, 256 steps a region of dotted text (red team).
            at = raw.find(_STUFFED, start, cut)
        if at < 0:
            segments.append(view[start:cut])
        else:
            segments.append(bytes(view[start:cut]).replace(_STUFFED, _CRLF))
        return b"".join(segments)
