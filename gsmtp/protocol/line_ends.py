"""Line ends in message data: RFC 5321 §2.3.8 lets CR and LF appear only together, as
CRLF. DATA refuses a message with a bare one and the SMTP client repairs one before
sending, so both ask the same question of every byte of every message, and the answer
must be cheap: it is most of the per-byte work gsmtp does on a large message.
"""

from __future__ import annotations

_CRLF = b"\r\n"
# Data whose first SAMPLE bytes hold a line end every DENSE_LINE bytes or more often is
# checked with `translate`, whose cost does not depend on the lines; other data by
# rebuilding its line ends, whose cost grows with their number.
DENSE_LINE = 24
SAMPLE = 1024


def has_bare_line_end(data: bytes) -> bool:
    """True if `data` holds a CR or an LF that is not in a CRLF.

    In text, rebuilding the line ends tells: with every CR deleted and every LF made a
    CRLF, data comes back unchanged exactly when each of its LFs had a CR before it
    and it had no other CR. Both replaces are of a single byte, found with memchr;
    counting the pairs instead (`count(b"\r\n")`, a two-byte search) stepped through
    every line a few bytes at a time and cost more than the rest of the check (CPython
    3.11, 100 KiB of 78-byte lines: 46 µs rebuilt against 96 µs counting pairs, then
    deleting CRs and LFs; 1 against 35 µs for 64 KiB with no line end).

    But a replace pays for each match: on lines of a few bytes rebuilding costs up to
    twelve times more (64 KiB of empty lines: 580 µs). There each CR and LF is deleted
    in one `translate` pass and their number compared with the pairs' (48 µs): when the
    first SAMPLE bytes are that dense. Data dense only past its sample gets the
    rebuild's price, 9 µs a KiB at worst, paid a read at a time: half of what an
    ordinary large message costs gsmtp a KiB from its first byte to its Maildir file
    (each 64 KiB read of 1 KiB of text then empty lines, 8 MB in all: 85 ms in the DATA
    reader, against 28 ms counting pairs). End to end, the worst shape the red team
    found cost a third more a KiB than base64 mail (23.2 against 17.1 µs)."""
    if data.count(b"\n", 0, SAMPLE) * DENSE_LINE > min(len(data), SAMPLE):
        pairs = data.count(_CRLF)
        return len(data) - len(data.translate(None, _CRLF)) != 2 * pairs
    return data.replace(b"\r", b"").replace(b"\n", _CRLF) != data
