"""Delivery status notifications: which are due (RFC 3461) and their bytes (RFC 3464).

No I/O. A notice is one `multipart/report; report-type=delivery-status` to the original
sender, from the null sender (the envelope is `<>`, the header From is
MAILER-DAEMON@<hostname>), of one kind: a failure (bounce), a delay warning, or a
success report (`delivered` here, or `relayed` to a peer that does not offer DSN). It has
a human-readable part, a `message/delivery-status` part with one block per recipient
(Original-Recipient when the client gave ORCPT, Final-Recipient, Action, Status,
Remote-MTA, Diagnostic-Code) and, after it, the original: the headers as
`text/rfc822-headers`, or for a failure the client asked RET=FULL for, the whole message
as `message/rfc822` up to MAX_RETURNED_MESSAGE (a larger one comes back as headers, and
the notice says so). Every value taken from outside (a remote reply, an address, ENVID,
ORCPT) is flattened to one printable line, so nothing can inject a header
(CVE-2024-6923, Haraka bounce_injection, Exim CVE-2020-28026). The caller never sends a
notice about a message from `<>` (RFC 5321 §6.1, RFC 3461 §6.2).
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from gsmtp.message import Outcome, QueuedMessage, RecipientResult
from gsmtp.protocol.client import crlf_line_ends
from gsmtp.protocol.dsnparams import DEFAULT_NOTIFY, Notify, Ret
from gsmtp.protocol.trace import rfc5322_date

MAX_ORIGINAL_HEADERS = 100 * 1024
# RET=FULL returns at most this much (reliability D-38: Exim's bounce_return_size_limit).
MAX_RETURNED_MESSAGE = 100 * 1024
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class Action(enum.Enum):
    """The RFC 3464 §2.3.3 action of one recipient in a notice."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"


class DeliveryEvent(enum.Enum):
    """What happened to a recipient, as far as notices are concerned."""

    FAILED = "failed"  # permanently, or expired
    DELAYED = "delayed"  # still queued when the delay warning is due
    DELIVERED = "delivered"  # into a mailbox here: final delivery
    RELAYED_TO_DSN_PEER = "relayed_to_dsn_peer"  # the peer took our RFC 3461 parameters
    RELAYED_TO_NON_DSN_PEER = "relayed_to_non_dsn_peer"


# RFC 3461 §4.1, §5.2.2, §6.2: which NOTIFY condition asks for a notice on each event.
# Relayed to a peer that offers DSN: the parameters went on with the message, and any
# later notice is that peer's to send, so none is due here whatever NOTIFY says.
_NOTICES: dict[DeliveryEvent, tuple[Notify, Action] | None] = {
    DeliveryEvent.FAILED: (Notify.FAILURE, Action.FAILED),
    DeliveryEvent.DELAYED: (Notify.DELAY, Action.DELAYED),
    DeliveryEvent.DELIVERED: (Notify.SUCCESS, Action.DELIVERED),
    DeliveryEvent.RELAYED_TO_NON_DSN_PEER: (Notify.SUCCESS, Action.RELAYED),
    DeliveryEvent.RELAYED_TO_DSN_PEER: None,
}


def notice_due(notify: frozenset[Notify] | None, event: DeliveryEvent | None) -> Action | None:
    """The action to report for this recipient, or None when no notice is due.

    `notify` is the recipient's NOTIFY: None when the client gave none (the RFC 3461
    §4.1 default, FAILURE and DELAY), the empty set for NEVER (never any notice).
    `event` None (a deferral, see `delivery_event`) is no notice either."""
    rule = None if event is None else _NOTICES[event]
    if rule is None:
        return None
    condition, action = rule
    return action if condition in (DEFAULT_NOTIFY if notify is None else notify) else None


def delivery_event(result: RecipientResult) -> DeliveryEvent | None:
    """The event a delivery result is: FAILED, or DELIVERED / RELAYED_TO_(NON_)DSN_PEER
    by its `peer_dsn`. None for a deferral: a delay warning is not a result but the queue
    manager's own timer, which passes DeliveryEvent.DELAYED itself."""
    if result.outcome is Outcome.FAILED:
        return DeliveryEvent.FAILED
    if result.outcome is Outcome.DEFERRED:
        return None
    if result.peer_dsn is None:
        return DeliveryEvent.DELIVERED
    if result.peer_dsn:
        return DeliveryEvent.RELAYED_TO_DSN_PEER
    return DeliveryEvent.RELAYED_TO_NON_DSN_PEER


@dataclass(frozen=True, slots=True)
class _Kind:
    """What differs between a failure, a delay and a success notice."""

    subject: str
    explanation: tuple[str, ...]
    original: str  # how the attached original is described
    status_classes: str  # the status classes that fit its actions ("45": 4.x.x or 5.x.x)
    default_status: str


_FAILURE = _Kind(
    "Undelivered Mail Returned to Sender",
    ("Your message could not be delivered to one or more recipients.", "It is attached below."),
    "Undelivered message",
    "45",
    "5.0.0",
)
_DELAY = _Kind(
    "Delayed Mail (still being retried)",
    (
        "Your message could not be delivered to one or more recipients yet.",
        "The mail system will keep trying; you do not need to send it again.",
    ),
    "Delayed message",
    "4",
    "4.0.0",
)
_SUCCESS = _Kind(
    "Successful Mail Delivery Report",
    (
        "Your message was delivered to the recipients below, as you asked to be told.",
        "A recipient marked 'relayed' was handed to a mail system that does not report",
        "deliveries: you will hear of it again only if it fails there.",
    ),
    "Delivered message",
    "2",
    "2.0.0",
)
_KINDS = {
    Action.FAILED: _FAILURE,
    Action.DELAYED: _DELAY,
    Action.DELIVERED: _SUCCESS,
    Action.RELAYED: _SUCCESS,
}


def one_line(text: str, limit: int = 900) -> str:
    """Collapse CR, LF and other controls to a space, and cap the length."""
    flat = _UNPRINTABLE.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[:limit] + "..."


def original_headers(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[: end + 2]
    return _crlf(headers[:MAX_ORIGINAL_HEADERS])


def build_bounce(
    message: QueuedMessage,
    failed: Sequence[RecipientResult],
    *,
    hostname: str,
    bounce_id: str,
    now: float,
    recipient: str | None = None,
) -> bytes:
    """The failure notice for these recipients (every one of them reported failed); to
    the sender unless `recipient` says otherwise (a failed notice goes to postmaster)."""
    return build_notice(
        message,
        [(result, Action.FAILED) for result in failed],
        hostname=hostname,
        notice_id=bounce_id,
        now=now,
        to=recipient,
    )


def build_notice(
    message: QueuedMessage,
    entries: Sequence[tuple[RecipientResult, Action]],
    *,
    hostname: str,
    notice_id: str,
    now: float,
    retry_until: float | None = None,
    to: str | None = None,
) -> bytes:
    """The complete notice, CRLF line endings, ready for the spool.

    `entries`: each recipient reported with its action (from `notice_due`); all of one
    kind (failed; delayed; delivered or relayed), since each kind is its own notice.
    `retry_until`: for a delay warning, when the queue gives up (Will-Retry-Until).
    `to`: the notice's recipient when it is not the sender (postmaster, for a notice
    about a notice that failed)."""
    kinds = {_KINDS[action] for _, action in entries}
    if len(kinds) != 1:
        raise ValueError(f"a notice reports one kind of event, got {len(kinds)}")
    kind = kinds.pop()
    whole = kind is _FAILURE and message.ret is Ret.FULL
    too_big = whole and len(message.body) > MAX_RETURNED_MESSAGE
    boundary = f"{notice_id}/{secrets.token_hex(8)}/{hostname}"
    sender = one_line(message.sender if to is None else to, 512)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        f"Subject: {kind.subject}",
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
        *kind.explanation,
        "",
    ]
    for result, _ in entries:
        lines.append(f"<{one_line(result.address, 512)}>: {one_line(result.reply)}")
    if too_big:
        lines += [
            "",
            f"The message is larger than {MAX_RETURNED_MESSAGE} bytes: only its headers",
            "are returned.",
        ]
    lines += ["", f"--{boundary}", *_delivery_status(message, hostname)]
    for result, action in entries:
        lines += ["", *_recipient_block(message, result, action, kind, retry_until)]
    lines += ["", f"--{boundary}"]
    if whole and not too_big:
        original = _crlf(message.body)
        lines.append("Content-Type: message/rfc822")
        if not original.isascii():
            lines.append("Content-Transfer-Encoding: 8bit")  # RFC 2046 §5.2.1
        lines.append(f"Content-Description: {kind.original}")
    else:
        original = original_headers(message.body)
        lines += [
            "Content-Type: text/rfc822-headers",
            f"Content-Description: {kind.original} headers",
        ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + original + tail


def _delivery_status(message: QueuedMessage, hostname: str) -> list[str]:
    """The part's headers and the per-message fields (RFC 3464 §2.2)."""
    lines = [
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
    ]
    if message.envid is not None:
        lines.append(f"Original-Envelope-Id: {one_line(message.envid, 100)}")
    lines += [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Gsmtp-Queue-ID: {message.id}",
        f"Arrival-Date: {rfc5322_date(message.received_at)}",
    ]
    return lines


def _recipient_block(
    message: QueuedMessage,
    result: RecipientResult,
    action: Action,
    kind: _Kind,
    retry_until: float | None,
) -> list[str]:
    """One recipient's fields, in RFC 3464 §2.3's order."""
    lines = []
    orcpt = message.recipient_dsn(result.address).orcpt
    if orcpt is not None:
        lines.append(f"Original-Recipient: {one_line(orcpt, 500)}")
    lines += [
        f"Final-Recipient: rfc822; {one_line(result.address, 512)}",
        f"Action: {action.value}",
        f"Status: {_status(result.status, kind)}",
    ]
    if result.remote_mta:
        lines.append(f"Remote-MTA: dns; {one_line(result.remote_mta, 255)}")
    if action in (Action.FAILED, Action.DELAYED) or result.remote_mta:
        lines.append(f"Diagnostic-Code: smtp; {one_line(result.reply)}")
    if action is Action.DELAYED and retry_until is not None:
        lines.append(f"Will-Retry-Until: {rfc5322_date(retry_until)}")
    return lines


def _status(status: str, kind: _Kind) -> str:
    """The result's RFC 3463 status if well formed and of a class that fits the notice."""
    if _STATUS.fullmatch(status) and status[0] in kind.status_classes:
        return status
    return kind.default_status


def _crlf(data: bytes) -> bytes:
    data = crlf_line_ends(data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"
