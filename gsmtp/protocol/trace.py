"""Trace header fields (RFC 5321 §4.4): the Received: header built from already-known
facts, and the removal of delivery fields a client planted.

No I/O: the date string, client address and message id come in as arguments. Text the
client chose (the EHLO name) is escaped and capped, so it cannot forge structure
(a `)` that closes the comment, a CR/LF that starts a new header).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from datetime import UTC, datetime
from email.utils import format_datetime

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;]")
# RFC 5322 §3.6.8 field name (ftext), with the obsolete white space before the colon.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*\Z")
# Written by final delivery (Maildir); a client's own copies would sit under ours and
# could mislead a reader or a filter about the envelope (RFC 5321 §4.4: "SMTP servers
# making final delivery MAY remove Return-path header fields before adding their own").
DELIVERY_FIELDS = frozenset({b"return-path", b"delivered-to"})


def rfc5322_date(timestamp: float) -> str:
    """`Mon, 30 Nov 2026 08:29:17 +0000` (RFC 5322 §3.3)."""
    return format_datetime(datetime.fromtimestamp(timestamp, tz=UTC))


def escape_helo(helo: str) -> str:
    cleaned = _UNSAFE.sub("?", helo)[:255]
    return cleaned or "unknown"


def received_header(
    *,
    helo: str,
    client_ip: str,
    client_name: str,
    hostname: str,
    protocol: str,
    message_id: str,
    recipient: str | None,
    date: str,
) -> bytes:
    """`Received: from <EHLO> (<rDNS or unknown> [<ip>]) by <host> (gsmtp) with <proto>
    id <id> [for <rcpt>]; <date>` folded over three lines, CRLF-terminated."""
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [
        f"Received: from {escape_helo(helo)} ({client_name} [{literal}])",
        f"\tby {hostname} (gsmtp) with {protocol} id {message_id}",
    ]
    tail = f"; {date}"
    if recipient is not None:
        lines.append(f"\tfor <{recipient}>{tail}")
    else:
        lines[-1] += tail
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def without_fields(content: bytes, names: Collection[bytes] = DELIVERY_FIELDS) -> bytes:
    """`content` (CRLF lines) without the header fields named in `names` (lower case),
    their folded continuation lines included. Only the header section is read: it ends
    at the first empty line, or at the first line that is neither a field nor a
    continuation (a message without headers); the body is never touched."""
    kept, rest = split_fields(content, names)
    return content if kept is None else kept + content[rest:]


def split_fields(
    content: bytes, names: Collection[bytes] = DELIVERY_FIELDS
) -> tuple[bytes | None, int]:
    """`without_fields` in two parts, so that a large message is never copied whole:
    (None, 0) when no field in `names` is there (`content` stands as it is), else the
    header lines kept and the offset where the untouched rest of `content` begins. Reads
    the header section only (the test for the names looks at it alone, never at a whole
    message that has no empty line)."""
    blank = content.find(b"\r\n\r\n")
    if blank >= 0 and not any(name in content[:blank].lower() for name in names):
        return None, 0
    kept: list[bytes] = []
    position, size = 0, len(content)
    dropping = seen_field = dropped = False
    while position < size:
        end = content.find(b"\n", position)
        end = size if end < 0 else end + 1
        if content[position : position + 1] in (b" ", b"\t") and seen_field:
            if not dropping:
                kept.append(content[position:end])
        else:
            # The name is in the first 1000 bytes of a field line (RFC 5322 §2.1.1):
            # a long body line is not copied to find out it is none.
            name, colon, _ = content[position : min(end, position + 1000)].partition(b":")
            field = _FIELD_NAME.match(name) if colon else None
            if field is None:
                break  # the empty line, or a body line: the header section is over
            seen_field = True
            dropping = field.group(1).lower() in names
            dropped = dropped or dropping
            if not dropping:
                kept.append(content[position:end])
        position = end
    if not dropped:
        return None, 0
    return b"".join(kept), position
