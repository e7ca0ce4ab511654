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
    blank = content.find(b"\r\n\r\n")
    head = (content if blank < 0 else content[:blank]).lower()
    if not any(name in head for name in names):
        return content
    kept: list[bytes] = []
    position, size = 0, len(content)
    dropping = seen_field = False
    while position < size:
        end = content.find(b"\n", position)
        end = size if end < 0 else end + 1
        line = content[position:end]
        if line[:1] in (b" ", b"\t") and seen_field:
            if not dropping:
                kept.append(line)
        else:
            name, colon, _ = line.partition(b":")
            field = _FIELD_NAME.match(name) if colon else None
            if field is None:
                break  # the empty line, or a body line: the header section is over
            seen_field = True
            dropping = field.group(1).lower() in names
            if not dropping:
                kept.append(line)
        position = end
    return b"".join(kept) + content[position:]
