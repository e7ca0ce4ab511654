"""Notices: one bounce per message, later failures on their own, a delay warning once,
never to the null sender, a failed notice to the postmaster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gevent.event import Event

from gsmtp.message import MessageId, Outcome, QueuedMessage
from gsmtp.queue.notices import NoticeSettings, decide
from gsmtp.spool import NoticeState, RecipientState
from tests.unit.queue_harness import (
    DEFAULTS,
    HOSTNAME,
    QueueWorld,
    reply,
    report_blocks,
    wait_until,
    world,
)

SENDER = "sender@local.example"
POSTMASTER = f"postmaster@{HOSTNAME}"


@pytest.fixture
def qw(tmp_path: Path) -> Iterator[QueueWorld]:
    with world(tmp_path) as queue_world:
        yield queue_world


def listed(notice: object) -> list[tuple[str, str]]:
    return [(b["Final-Recipient"], b["Action"]) for b in report_blocks(notice)]  # type: ignore[arg-type]


def test_failures_due_together_give_one_bounce_listing_both(qw: QueueWorld) -> None:
    """Two of three destinations fail, at different times: one bounce, written when
    nothing of the message is in flight any more (Postfix: per message, not per
    destination)."""
    qw.remote.behaviours["one.example"] = reply(Outcome.FAILED)
    qw.remote.behaviours["two.example"] = reply(Outcome.FAILED)
    qw.remote.hold["two.example"] = Event()
    qw.enqueue(["a@one.example", "b@two.example", "c@three.example"])
    manager = qw.manager()
    manager.start()
    wait_until(
        lambda: qw.rows("SELECT status FROM recipients WHERE address LIKE 'a@%'") == [("failed",)]
    )
    qw.remote.hold["two.example"].set()
    wait_until(lambda: qw.messages_left() == 0 and qw.notices_to(SENDER))
    (bounce,) = qw.notices_to(SENDER)
    assert sorted(listed(bounce)) == [
        ("rfc822; a@one.example", "failed"),
        ("rfc822; b@two.example", "failed"),
    ]


def test_a_failure_after_retries_gets_a_notice_of_its_own(qw: QueueWorld) -> None:
    qw.remote.behaviours["one.example"] = reply(Outcome.FAILED)
    qw.remote.behaviours["two.example"] = reply(Outcome.DEFERRED)
    qw.enqueue(["a@one.example", "b@two.example"])
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.notices_to(SENDER))
    qw.remote.behaviours["two.example"] = reply(Outcome.FAILED)
    qw.clock.now += DEFAULTS.retry[0] + 1
    manager.wake()
    wait_until(lambda: len(qw.notices_to(SENDER)) == 2 and qw.messages_left() == 0)
    first, second = qw.notices_to(SENDER)
    assert listed(first) == [("rfc822; a@one.example", "failed")]
    assert listed(second) == [("rfc822; b@two.example", "failed")]


def test_a_delay_warning_is_sent_once_after_delay_warning(qw: QueueWorld) -> None:
    qw.remote.behaviours["slow.example"] = reply(Outcome.DEFERRED)
    qw.enqueue(["a@slow.example"])
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.rows("SELECT attempts FROM recipients") == [(1,)])
    assert qw.notices_to(SENDER) == []
    for attempt in range(2, 5):  # three retries past the 4 h mark
        qw.clock.now += DEFAULTS.delay_warning + 1  # type: ignore[operator]
        manager.wake()
        wait_until(
            lambda attempt=attempt: (
                qw.rows(  # type: ignore[misc]
                    "SELECT attempts FROM recipients WHERE address = 'a@slow.example'"
                )
                == [(attempt,)]
            )
        )
    wait_until(lambda: qw.notices_to(SENDER))
    (warning,) = qw.notices_to(SENDER)
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    (block,) = report_blocks(warning)
    assert block["Action"] == "delayed" and block["Status"] == "4.3.0"
    assert block["Will-Retry-Until"]
    assert qw.rows("SELECT delay_warned_at IS NOT NULL FROM messages WHERE id = 'M00001'") == [(1,)]


def test_no_delay_warning_when_turned_off(qw: QueueWorld) -> None:
    qw.remote.behaviours["slow.example"] = reply(Outcome.DEFERRED)
    qw.enqueue(["a@slow.example"], received_at=qw.clock() - 86400)
    manager = qw.manager(delay_warning=None)
    manager.start()
    wait_until(lambda: qw.rows("SELECT attempts FROM recipients") == [(1,)])
    qw.clock.now += DEFAULTS.retry[0] + 1
    manager.wake()
    wait_until(lambda: qw.rows("SELECT attempts FROM recipients") == [(2,)])
    manager.stop(1.0)  # any notice step of the second attempt has run
    assert qw.rows("SELECT delay_warned_at FROM messages") == [(None,)]
    assert qw.rows("SELECT COUNT(*) FROM messages") == [(1,)]  # no notice was queued
    assert qw.notices_to(SENDER) == []


def test_the_null_sender_never_gets_a_notice(qw: QueueWorld) -> None:
    qw.remote.behaviours["one.example"] = reply(Outcome.FAILED)
    qw.enqueue(["a@one.example"], sender="", received_at=qw.clock() - 86400)
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.messages_left() == 0)  # nothing pending keeps it either
    assert len(qw.remote.calls) == 1 and qw.local.calls == []


def test_a_bounce_that_cannot_be_delivered_goes_to_the_postmaster(qw: QueueWorld) -> None:
    """A failed notice goes to postmaster@<hostname>; a failed postmaster notice is
    dropped, so nothing loops."""
    qw.remote.behaviours["one.example"] = reply(Outcome.FAILED)
    qw.remote.behaviours["gone.example"] = reply(Outcome.FAILED)  # the sender's domain
    qw.local.behaviours[HOSTNAME] = reply(Outcome.FAILED)  # even the postmaster fails
    qw.enqueue(["a@one.example"], sender="someone@gone.example")
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.notices_to(POSTMASTER) and qw.messages_left() == 0)
    (bounce,) = qw.notices_to("someone@gone.example")
    (to_postmaster,) = qw.notices_to(POSTMASTER)
    assert listed(to_postmaster) == [("rfc822; someone@gone.example", "failed")]
    assert to_postmaster["To"] == f"<{POSTMASTER}>"
    assert b"Undelivered Mail Returned to Sender" in to_postmaster.as_bytes()
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert len(qw.remote.calls) + len(qw.local.calls) == 3  # and no more


def test_a_notice_left_pending_by_a_crash_is_written_at_start(qw: QueueWorld) -> None:
    message_id = qw.enqueue(["a@one.example"])
    qw.rows(
        "UPDATE recipients SET status = 'failed', notice_pending = 1,"
        " last_error = '550 5.1.1 gone', last_status = '5.1.1' WHERE message_id = ?",
        message_id,
    )
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.notices_to(SENDER) and qw.messages_left() == 0)


def state(*recipients: RecipientState, sender: str = SENDER, kind: str = "") -> NoticeState:
    message = QueuedMessage(MessageId("M1"), sender, b"Subject: x\r\n\r\n", 0.0, False)
    return NoticeState(message, kind, False, recipients)


def row(address: str, status: str, *, pending: bool = False, in_flight: bool = False,
        due: float = 0.0) -> RecipientState:  # fmt: skip
    return RecipientState(address, status, pending, in_flight, due, "x", "", "")


SETTINGS = NoticeSettings(POSTMASTER, 4 * 3600.0, 5 * 86400.0)


def test_decide_waits_while_anything_is_in_flight_or_due() -> None:
    failed = row("a@x", "failed", pending=True)
    assert (
        decide(state(failed, row("b@y", "queued", in_flight=True, due=9e9)), 10.0, SETTINGS) is None
    )
    assert decide(state(failed, row("b@y", "queued", due=5.0)), 10.0, SETTINGS) is None
    decision = decide(state(failed, row("b@y", "queued", due=60.0)), 10.0, SETTINGS)
    assert decision is not None and [r.address for r in decision.failed] == ["a@x"]


def test_decide_never_notifies_the_null_sender_and_sends_our_failed_notices_to_postmaster() -> None:
    failed = row("a@x", "failed", pending=True)
    silent = decide(state(failed, sender=""), 10.0, SETTINGS)
    assert silent is not None and silent.failed == () and silent.reported == {"a@x"}
    redirected = decide(state(failed, sender="", kind="bounce"), 10.0, SETTINGS)
    assert redirected is not None and redirected.failure_to == POSTMASTER
    dropped = decide(state(failed, sender="", kind="postmaster"), 10.0, SETTINGS)
    assert dropped is not None and dropped.failed == ()
