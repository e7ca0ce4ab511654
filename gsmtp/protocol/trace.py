"""The Received: trace header (RFC 5321 §4.4), built from already-known facts.

No I/O: the date string, client address and message id come in as arguments. Text the
client chose (the EHLO name) is escaped and capped, so it cannot forge structure
(a `)` that closes the comment, a CR/LF that starts a new header).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;]")


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
