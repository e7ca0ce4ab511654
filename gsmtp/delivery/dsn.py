"""Notices: RFC 3464 delivery status notifications to the original sender.

No I/O. A bounce (`Action: failed`) or a delay warning (`Action: delayed`), each one
`multipart/report; report-type=delivery-status` per message and occasion, from the
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
from dataclasses import dataclass

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
    recipient: str | None = None,
) -> bytes:
    """The complete bounce message, CRLF line endings, ready for the spool. It goes to
    the sender unless `recipient` says otherwise (a failed notice goes to postmaster)."""
    return _report(
        message,
        failed,
        _Notice(
            subject="Undelivered Mail Returned to Sender",
            text=(
                "Your message could not be delivered to one or more recipients.",
                "It is attached below.",
            ),
            action="failed",
            status_class="54",
            headers_description="Undelivered message headers",
        ),
        hostname=hostname,
        notice_id=bounce_id,
        now=now,
        to=message.sender if recipient is None else recipient,
    )


def build_delay_warning(
    message: QueuedMessage,
    delayed: Sequence[RecipientResult],
    *,
    hostname: str,
    notice_id: str,
    now: float,
    retry_until: float,
) -> bytes:
    """RFC 3464 `Action: delayed` for recipients still queued: a warning, not a failure;
    nothing needs to be resent (Postfix's delay_warning_time, Sendmail's queuewarn)."""
    hours = max(0.0, now - message.received_at) / 3600
    return _report(
        message,
        delayed,
        _Notice(
            subject="Delayed Mail (still being retried)",
            text=(
                "THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE.",
                "",
                f"Your message could not be delivered for {hours:.1f} hour(s).",
                f"It will be retried until {rfc5322_date(retry_until)}.",
            ),
            action="delayed",
            status_class="4",
            headers_description="Headers of the delayed message",
            retry_until=retry_until,
        ),
        hostname=hostname,
        notice_id=notice_id,
        now=now,
        to=message.sender,
    )


@dataclass(frozen=True, slots=True)
class _Notice:
    """What differs between a bounce and a delay warning."""

    subject: str
    text: tuple[str, ...]
    action: str  # RFC 3464 §2.3.3
    status_class: str  # the classes a Status may have here; else "<first>.0.0"
    headers_description: str
    retry_until: float | None = None


def _report(
    message: QueuedMessage,
    results: Sequence[RecipientResult],
    notice: _Notice,
    *,
    hostname: str,
    notice_id: str,
    now: float,
    to: str,
) -> bytes:
    boundary = f"{notice_id}/{secrets.token_hex(8)}/{hostname}"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{one_line(to, 512)}>",
        f"Subject: {notice.subject}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{notice_id}@{hostname}>",
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
        *notice.text,
        "",
    ]
    for result in results:
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
    for result in results:
        lines += [
            "",
            f"Final-Recipient: rfc822; {one_line(result.address, 512)}",
            f"Action: {notice.action}",
            f"Status: {_status(result.status, notice.status_class)}",
        ]
        if result.remote_mta:
            lines.append(f"Remote-MTA: dns; {one_line(result.remote_mta, 255)}")
        lines.append(f"Diagnostic-Code: smtp; {one_line(result.reply)}")
        if notice.retry_until is not None:
            lines.append(f"Will-Retry-Until: {rfc5322_date(notice.retry_until)}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        f"Content-Description: {notice.headers_description}",
        "",
    ]
    head = ("\r\n".join(lines) + "\r\n").encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + original_headers(message.body) + tail


def _status(status: str, classes: str) -> str:
    """An RFC 3463 code of one of `classes`, else the generic code of the first."""
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", status) and status[0] in classes:
        return status
    return f"{classes[0]}.0.0"
