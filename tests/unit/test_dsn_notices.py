"""Which notices are due (RFC 3461) and their bytes (RFC 3464), read back with the
standard library's email parser."""

from __future__ import annotations

import email
from email.message import Message
from typing import cast

import pytest

from gsmtp.acceptance import Acceptor
from gsmtp.delivery import dsn
from gsmtp.delivery.dsn import Action, DeliveryEvent
from gsmtp.message import (
    MessageId,
    Notify,
    Outcome,
    QueuedMessage,
    RecipientDsn,
    RecipientResult,
    Ret,
)
from gsmtp.protocol.dsnparams import NEVER

# -- the decision: every NOTIFY against every event ---------------------------------------

# RFC 3461 §4.1 (default FAILURE,DELAY; NEVER alone), §5.2.2 (relayed to a peer without
# DSN: "relayed" on SUCCESS; to a DSN peer: the parameters went on, nothing here).
_TABLE = """
notify                  failed   delayed  delivered  relayed-to-non-dsn  relayed-to-dsn
-                       failed   delayed  -          -                   -
NEVER                   -        -        -          -                   -
SUCCESS                 -        -        delivered  relayed             -
FAILURE                 failed   -        -          -                   -
DELAY                   -        delayed  -          -                   -
SUCCESS,FAILURE         failed   -        delivered  relayed             -
SUCCESS,DELAY           -        delayed  delivered  relayed             -
FAILURE,DELAY           failed   delayed  -          -                   -
SUCCESS,FAILURE,DELAY   failed   delayed  delivered  relayed             -
"""
_EVENTS = [
    DeliveryEvent.FAILED,
    DeliveryEvent.DELAYED,
    DeliveryEvent.DELIVERED,
    DeliveryEvent.RELAYED_TO_NON_DSN_PEER,
    DeliveryEvent.RELAYED_TO_DSN_PEER,
]


def _cases() -> list[tuple[frozenset[Notify] | None, DeliveryEvent, Action | None]]:
    cases = []
    for row in _TABLE.strip().splitlines()[1:]:
        notify_text, *cells = row.split()
        notify: frozenset[Notify] | None
        if notify_text == "-":
            notify = None
        elif notify_text == "NEVER":
            notify = NEVER
        else:
            notify = frozenset(Notify[word] for word in notify_text.split(","))
        for event, cell in zip(_EVENTS, cells, strict=True):
            cases.append((notify, event, None if cell == "-" else Action(cell)))
    return cases


CASES = _cases()


def test_the_table_covers_every_notify_and_every_event() -> None:
    assert set(_EVENTS) == set(DeliveryEvent)
    assert len(CASES) == 9 * 5  # None, NEVER and the 7 non-empty subsets


@pytest.mark.parametrize("notify", sorted({c[0] for c in CASES}, key=str))
def test_no_event_no_notice(notify: frozenset[Notify] | None) -> None:
    """A deferral is no event (the delay warning is the queue manager's timer)."""
    assert dsn.notice_due(notify, None) is None


@pytest.mark.parametrize(("notify", "event", "expected"), CASES)
def test_notice_due(
    notify: frozenset[Notify] | None, event: DeliveryEvent, expected: Action | None
) -> None:
    assert dsn.notice_due(notify, event) is expected


def _result(outcome: Outcome, peer_dsn: bool | None = None) -> RecipientResult:
    return RecipientResult("r@x.example", outcome, "2.0.0", "250 ok", "", peer_dsn=peer_dsn)


@pytest.mark.parametrize(
    ("result", "event"),
    [
        (_result(Outcome.FAILED), DeliveryEvent.FAILED),
        (_result(Outcome.DEFERRED), None),
        (_result(Outcome.DELIVERED), DeliveryEvent.DELIVERED),
        (_result(Outcome.DELIVERED, peer_dsn=True), DeliveryEvent.RELAYED_TO_DSN_PEER),
        (_result(Outcome.DELIVERED, peer_dsn=False), DeliveryEvent.RELAYED_TO_NON_DSN_PEER),
    ],
)
def test_delivery_event_of_a_result(result: RecipientResult, event: DeliveryEvent | None) -> None:
    assert dsn.delivery_event(result) is event


# -- the bytes -----------------------------------------------------------------------------

BODY = b"Received: from x\r\nSubject: the original\r\nMessage-Id: <o@x>\r\n\r\nsecret body\r\n"


def original(**dsn_fields: object) -> QueuedMessage:
    return QueuedMessage(MessageId("M1"), "alice@local.example", BODY, 0.0, False, **dsn_fields)  # type: ignore[arg-type]


def build(
    message: QueuedMessage, entries: list[tuple[RecipientResult, Action]], **kwargs: float
) -> tuple[bytes, Message]:
    raw = dsn.build_notice(
        message, entries, hostname="mx.local.example", notice_id="N1", now=0.0, **kwargs
    )
    return raw, email.message_from_bytes(raw)


def status_blocks(notice: Message) -> list[Message]:
    (report,) = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return cast(list[Message], blocks)


def returned(notice: Message) -> Message:
    parts = cast(list[Message], notice.get_payload())
    assert isinstance(parts, list) and len(parts) == 3
    assert [p.get_content_type() for p in parts[:2]] == ["text/plain", "message/delivery-status"]
    return parts[2]


FAILED = RecipientResult(
    "bob@remote.example", Outcome.FAILED, "5.1.1", "550 5.1.1 no such user", "mx.remote.example"
)


def test_envid_and_orcpt_are_quoted_in_their_fields() -> None:
    message = original(
        envid="QQ+1=2",
        dsn={"bob@remote.example": RecipientDsn(frozenset({Notify.FAILURE}), "rfc822;Bob@Remote")},
    )
    other = RecipientResult("eve@remote.example", Outcome.FAILED, "5.0.0", "550 no")
    raw, notice = build(message, [(FAILED, Action.FAILED), (other, Action.FAILED)])
    per_message, bob, eve = status_blocks(notice)
    assert per_message["Original-Envelope-Id"] == "QQ+1=2"
    assert list(per_message.keys())[:2] == ["Original-Envelope-Id", "Reporting-MTA"]
    assert bob["Original-Recipient"] == "rfc822;Bob@Remote"
    assert list(bob.keys())[:2] == ["Original-Recipient", "Final-Recipient"]
    assert eve["Original-Recipient"] is None
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_without_envid_there_is_no_original_envelope_id() -> None:
    _, notice = build(original(), [(FAILED, Action.FAILED)])
    assert status_blocks(notice)[0]["Original-Envelope-Id"] is None


@pytest.mark.parametrize("ret", [None, Ret.HDRS])
def test_failure_without_ret_full_returns_the_headers(ret: Ret | None) -> None:
    raw, notice = build(original(ret=ret), [(FAILED, Action.FAILED)])
    assert notice["Subject"] == "Undelivered Mail Returned to Sender"
    part = returned(notice)
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_payload(decode=True) == BODY[: BODY.index(b"\r\n\r\n") + 2]
    assert b"secret body" not in raw


def test_failure_with_ret_full_returns_the_whole_message() -> None:
    _, notice = build(original(ret=Ret.FULL), [(FAILED, Action.FAILED)])
    part = returned(notice)
    assert part.get_content_type() == "message/rfc822"
    (inner,) = cast(list[Message], part.get_payload())
    assert inner["Subject"] == "the original"
    assert inner.get_payload() == "secret body\r\n"


def test_ret_full_of_a_message_past_the_cap_returns_headers_and_says_so() -> None:
    big = BODY + b"x" * dsn.MAX_RETURNED_MESSAGE
    message = QueuedMessage(MessageId("M1"), "alice@local.example", big, 0.0, False, ret=Ret.FULL)
    raw, notice = build(message, [(FAILED, Action.FAILED)])
    assert returned(notice).get_content_type() == "text/rfc822-headers"
    assert b"x" * 100 not in raw
    text = cast(list[Message], notice.get_payload())[0].get_payload()
    assert f"larger than {dsn.MAX_RETURNED_MESSAGE} bytes" in text


def test_ret_full_8bit_message_is_marked_8bit() -> None:
    message = QueuedMessage(
        MessageId("M1"), "a@b", b"Subject: x\r\n\r\n\xc3\xa9t\xc3\xa9\r\n", 0.0, False, ret=Ret.FULL
    )
    _, notice = build(message, [(FAILED, Action.FAILED)])
    assert returned(notice)["Content-Transfer-Encoding"] == "8bit"


def test_success_notice_for_a_local_delivery() -> None:
    delivered = RecipientResult(
        "jones@local.example", Outcome.DELIVERED, "2.0.0", "250 2.0.0 Delivered to Maildir"
    )
    raw, notice = build(original(ret=Ret.FULL), [(delivered, Action.DELIVERED)])
    assert notice["Subject"] == "Successful Mail Delivery Report"
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mx.local.example>"
    assert notice["To"] == "<alice@local.example>"
    (block,) = status_blocks(notice)[1:]
    assert block["Final-Recipient"] == "rfc822; jones@local.example"
    assert block["Action"] == "delivered"
    assert block["Status"] == "2.0.0"
    assert block["Remote-MTA"] is None and block["Diagnostic-Code"] is None
    # RFC 3461 §4.3: RET=FULL is about failures; a success notice returns headers only.
    assert returned(notice).get_content_type() == "text/rfc822-headers"
    assert b"secret body" not in raw


def test_relayed_notice_names_the_peer() -> None:
    relayed = RecipientResult(
        "bob@remote.example", Outcome.DELIVERED, "2.6.0", "250 2.6.0 Queued", "mx.remote.example"
    )
    odd = RecipientResult("eve@remote.example", Outcome.DELIVERED, "5.0.0", "250 ok", "mx.r")
    _, notice = build(original(), [(relayed, Action.RELAYED), (odd, Action.RELAYED)])
    bob, eve = status_blocks(notice)[1:]
    assert bob["Action"] == "relayed"
    assert bob["Status"] == "2.6.0"
    assert bob["Remote-MTA"] == "dns; mx.remote.example"
    assert bob["Diagnostic-Code"] == "smtp; 250 2.6.0 Queued"
    assert eve["Status"] == "2.0.0"  # a status that does not fit a success is replaced


def test_delay_warning_says_until_when() -> None:
    deferred = RecipientResult("bob@remote.example", Outcome.DEFERRED, "4.4.1", "451 4.4.1 down")
    _, notice = build(original(ret=Ret.FULL), [(deferred, Action.DELAYED)], retry_until=86400.0)
    assert notice["Subject"] == "Delayed Mail (still being retried)"
    (block,) = status_blocks(notice)[1:]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"] == "Fri, 02 Jan 1970 00:00:00 +0000"
    assert returned(notice).get_content_type() == "text/rfc822-headers"


def test_one_notice_reports_one_kind() -> None:
    delivered = RecipientResult("a@b", Outcome.DELIVERED, "2.0.0", "250 ok")
    with pytest.raises(ValueError):
        build(original(), [(FAILED, Action.FAILED), (delivered, Action.DELIVERED)])


def test_values_from_outside_stay_on_one_line() -> None:
    """S-13: an ENVID or ORCPT that reached the spool with a line break (the parser
    refuses them; the builder does not rely on it) cannot add a header."""
    message = original(
        envid="x\r\nX-Injected: yes",
        dsn={"bob@remote.example": RecipientDsn(None, "rfc822;b\r\nX-Injected: yes")},
    )
    raw, notice = build(message, [(FAILED, Action.FAILED)])
    for line in raw.split(b"\r\n"):
        assert not line.startswith(b"X-Injected:")
    assert status_blocks(notice)[0]["Original-Envelope-Id"] == "x X-Injected: yes"


def test_the_acceptor_stores_a_notice_from_the_null_sender() -> None:
    delivered = RecipientResult("jones@local.example", Outcome.DELIVERED, "2.0.0", "250 ok")
    notice = Acceptor("mx.local.example").notice(
        original(), [(delivered, Action.DELIVERED)], now=10.0
    )
    assert notice.sender == "" and notice.recipients == ("alice@local.example",)
    parsed = email.message_from_bytes(notice.body)
    assert parsed["Message-ID"] == f"<{notice.id}@mx.local.example>"
    assert status_blocks(parsed)[1]["Action"] == "delivered"
