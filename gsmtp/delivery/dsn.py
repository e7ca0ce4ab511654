"""Bounces: RFC 3464 delivery status notifications to the original sender.

No I/O. One `multipart/report; report-type=delivery-status` per failed batch, from the
null sender (the envelope is `<>`, the header From is MAILER-DAEMON@<hostname>), with a
human-readable part, a `message/delivery-status` part with one block per recipient
(Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code) and the original headers
as `text/rfc822-headers`. Every value taken from outside (a remote reply, an address)
is flattened to one printable line, so nothing can inject a header (CVE-2024-6923,
Haraka bounce_injection). The caller never bounces a message from `<>` (RFC 5321 §6.1).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from gsmtp.message import QueuedMessage, RecipientResult
from gsmtp.protocol.trace import rfc5322_date

MAX_ORIGINAL_HEADERS = 100 * 1024
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_BARE_EOL = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def one_line(text: str, limit: int = 900) -> str:
    """Collapse CR, LF and other controls to a space, and cap the length."""
    flat = _UNPRINTABLE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[:limit] + "..."


def original_headers(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[: end + 2]
    headers = _BARE_EOL.sub(b"\r\n", headers[:MAX_ORIGINAL_HEADERS])
    return headers if headers.endswith(b"\r\n") else headers + b"\r\n"


def build_bounce(
    message: QueuedMessage,
    failed: Sequence[RecipientResult],
    *,
    hostname: str,
    bounce_id: str,
    now: float,
) -> bytes:
    """The complete bounce message, CRLF line endings, ready for the spool."""
    boundary = f"{bounce_id}/{secrets.token_hex(8)}/{hostname}"
    sender = one_line(message.sender, 512)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{bounce_id}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below.",
        "",
    ]
    for result in failed:
        lines.append(f"<{one_line(result.address, 512)}>: {one_line(result.reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Gsmtp-Queue-ID: {message.id}",
        f"Arrival-Date: {rfc5322_date(message.received_at)}",
    ]
    for result in failed:
        lines += [
            "",
            f"Final-Recipient: rfc822; {one_line(result.address, 512)}",
            "Action: failed",
            f"Status: {_status(result.status)}",
        ]
        if result.remote_mta:
            lines.append(f"Remote-MTA: dns; {one_line(result.remote_mta, 255)}")
        lines.append(f"Diagnostic-Code: smtp; {one_line(result.reply)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered message headers",
        "",
    ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + original_headers(message.body) + tail


def _status(status: str) -> str:
    return status if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status) else "5.0.0"
