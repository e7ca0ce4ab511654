"""Line ends in message data: RFC 5321 §2.3.8 lets CR and LF appear only together, as
CRLF. DATA refuses a message with a bare one and the SMTP client repairs one before
sending, so both ask the same question of every byte of every message, and the answer
must be cheap: it is most of the per-byte work gsmtp does on a large message.
"""

from __future__ import annotations

_CRLF = b"\r\n"
# Lines shorter than this on average (CRLF included) are counted with `translate`: below
# about 20 bytes a line, finding each CR and LF costs more than looking at every byte.
DENSE_LINE = 24


def has_bare_line_end(data: bytes) -> bool:
    """True if `data` holds a CR or an LF that is not in a CRLF: exactly when the CRs or
    the LFs are more than the CRLF pairs. How CR and LF are counted depends on how dense
    they are. In text (lines of DENSE_LINE bytes or more) each is deleted with `replace`,
    which finds a single byte with memchr, where `count` and `translate` look at every
    byte (CPython 3.11, 100 KiB of 76-byte lines: the whole check 220 against 335 µs).
    But `replace` pays per match: on short or empty lines it costs several times more
    (35 MB of empty lines: 1 s against 0.3 s, on the event loop; red-team finding), so
    there `translate` deletes both in one pass whose cost does not depend on them."""
    pairs = data.count(_CRLF)
    size = len(data)
    if pairs * DENSE_LINE > size:
        return size - len(data.translate(None, _CRLF)) != 2 * pairs
    return (
        size - len(data.replace(b"\r", b"")) != pairs
        or size - len(data.replace(b"\n", b"")) != pairs
    )
