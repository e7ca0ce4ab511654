"""Queue control (issue 11 item 3): hold/release, flush of ids or a domain, filters, the
qshape summary, and the queue manager acting on what the CLI left for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gevent.event import Event

from gsmtp import metrics, queue_control
from gsmtp.message import AdminAction, Outcome
from gsmtp.queue_control import Filter
from gsmtp.spool import UNSCHEDULED, RecipientUpdate
from tests.unit.queue_harness import UNREACHABLE, FakeClock, QueueWorld, wait_until, world

HOUR = 3600.0


@pytest.fixture
def qw(tmp_path: Path) -> Iterator[QueueWorld]:
    with world(tmp_path) as queue_world:
        yield queue_world


def due_times(qw: QueueWorld, message_id: str) -> set[float]:
    return {
        row[0]
        for row in qw.rows(
            "SELECT next_attempt_at FROM recipients WHERE message_id = ?", message_id
        )
    }


def test_a_held_message_is_never_claimed_and_a_release_lets_it_go(qw: QueueWorld) -> None:
    held = qw.enqueue(["a@held.example", "b@held.example"])
    other = qw.enqueue(["c@go.example"])
    db = qw.admin._db
    assert queue_control.hold(db, now=qw.clock(), ids=[held]) == [held]
    assert queue_control.hold(db, now=qw.clock(), ids=[held]) == []  # already held
    manager = qw.manager()
    manager.start()
    wait_until(lambda: qw.messages_left() == 1, what="the other message delivered")
    assert [call[0] for call in qw.remote.calls] == [other]
    # Statuses kept; nothing due; flushing the whole queue leaves it held.
    assert qw.rows("SELECT status, held FROM recipients JOIN messages ON id = message_id") == [
        ("queued", 1),
        ("queued", 1),
    ]
    assert due_times(qw, held) == {UNSCHEDULED}
    assert queue_control.flush(db, qw.clock()) == 0
    assert qw.admin.stats()["held"] == 1
    assert queue_control.release(db, now=qw.clock(), ids=[held]) == [held]
    manager.admin_signalled()
    wait_until(lambda: qw.messages_left() == 0, what="the released message delivered")
    assert qw.remote.calls[-1] == (held, ("a@held.example", "b@held.example"))


def test_a_message_held_during_its_delivery_stays_unscheduled(qw: QueueWorld) -> None:
    """Its current attempt finishes; the deferral it records does not make it due."""
    message_id = qw.enqueue(["a@x.example", "b@x.example"])
    (claim,) = qw.spool.claim_due(qw.clock(), 10).claims
    db = qw.admin._db
    assert queue_control.hold(db, now=qw.clock(), ids=[message_id]) == [message_id]
    later = qw.clock() + HOUR
    qw.spool.record_results(
        [
            RecipientUpdate(message_id, r.address, Outcome.DEFERRED, "451 later", later)
            for r in claim.recipients
        ]
    )
    assert due_times(qw, message_id) == {UNSCHEDULED}
    listed = qw.admin.message(message_id)
    assert listed is not None and listed.held and listed.next_attempt_at is None
    queue_control.release(db, now=qw.clock() + 5, ids=[message_id])
    assert due_times(qw, message_id) == {qw.clock() + 5}


def test_filters_select_by_sender_recipient_domain_and_age(qw: QueueWorld) -> None:
    now = qw.clock()
    old = qw.enqueue(["x@a.example"], sender="alice@s.example", received_at=now - 3 * HOUR)
    new = qw.enqueue(["y@b.example", "z@A.example"], sender="bob@s.example", received_at=now)
    db = qw.admin._db

    def pick(**criteria: object) -> list[str]:
        return queue_control.matching(db, Filter(**criteria), now)  # type: ignore[arg-type]

    assert pick() == [old, new]
    assert pick(sender="ALICE") == [old]
    assert pick(recipient="y@b") == [new]
    assert pick(domain="a.example") == [old, new]  # any queued recipient, case folded
    assert pick(domain="b.example") == [new]
    assert pick(older_than=2 * HOUR) == [old]
    assert pick(older_than=2 * HOUR, sender="bob") == []
    assert queue_control.delete(db, Filter(domain="b.example"), now) == [new]
    assert qw.rows("SELECT id FROM messages") == [(old,)]
    assert queue_control.hold(db, Filter(older_than=HOUR), now) == [old]


def test_flush_of_ids_or_a_domain_makes_only_those_due_and_says_what(qw: QueueWorld) -> None:
    later = qw.clock() + HOUR
    first = qw.enqueue(["a@one.example", "b@two.example"])
    second = qw.enqueue(["c@one.example"])
    third = qw.enqueue(["d@two.example"])
    db = qw.admin._db
    db.execute("UPDATE recipients SET next_attempt_at = ?", (later,))
    qw.spool.take_admin_actions()
    assert queue_control.flush(db, 10.0, ids=[first]) == 2
    assert due_times(qw, first) == {10.0} and due_times(qw, second) == {later}
    assert queue_control.flush(db, 20.0, domain="TWO.example") == 2
    assert due_times(qw, third) == {20.0} and due_times(qw, second) == {later}
    assert qw.spool.take_admin_actions() == [
        AdminAction(10.0, "flush", first, "one.example", 1),
        AdminAction(10.0, "flush", first, "two.example", 1),
        AdminAction(20.0, "flush", None, "two.example", 2),
    ]


def test_summary_counts_messages_by_domain_and_age_like_qshape(qw: QueueWorld) -> None:
    now = qw.clock()
    qw.enqueue(["a@one.example", "b@one.example", "c@two.example"], received_at=now - 60)
    qw.enqueue(["d@one.example"], received_at=now - 7 * 60)
    qw.enqueue(["e@two.example"], received_at=now - 2000 * 60)
    held = qw.enqueue(["f@one.example"], received_at=now)
    queue_control.hold(qw.admin._db, now=now, ids=[held])
    summary = queue_control.summary(qw.admin._db, now)
    assert summary.buckets == (5, 10, 20, 40, 80, 160, 320, 640, 1280)
    assert summary.rows == {
        "one.example": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # one message each, not per recipient
        "two.example": [1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    }
    assert summary.total() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    merged = summary.merged(queue_control.Summary(rows={"three.example": [0] * 9 + [4]}))
    assert merged.total()[-1] == 5


def test_the_cli_signal_makes_a_domain_flush_act_at_once(tmp_path: Path) -> None:
    """With a poll of 60 s, only the wake-up (SIGUSR1 → admin_signalled) brings the flush:
    the flushed domain's dead-destination memory is forgotten and its mail delivered;
    another dead domain stays dead."""
    with world(tmp_path, FakeClock()) as qw:
        for domain in ("down.example", "other.example"):
            qw.remote.behaviours[domain] = UNREACHABLE
            qw.enqueue([f"u@{domain}"])
        manager = qw.manager(idle_poll=60.0, retry=(HOUR,))
        manager.start()
        wait_until(
            lambda: metrics.DEAD_DESTINATIONS._value.get() == 2, what="both destinations dead"
        )
        # A destination is declared dead when the backend answers, before the deferral is
        # recorded; a flush passes over recipients still owned (as Postfix's over mail in
        # its active queue), so the flush comes once both deferrals are recorded.
        wait_until(lambda: qw.owned() == 0, what="both deferrals recorded")
        del qw.remote.behaviours["down.example"]
        calls = len(qw.remote.calls)
        queue_control.flush(qw.admin._db, qw.clock(), domain="down.example")
        manager.admin_signalled()
        wait_until(lambda: qw.messages_left() == 1, timeout=5, what="down.example delivered")
        assert [c[1] for c in qw.remote.calls[calls:]] == [("u@down.example",)]
        assert metrics.DEAD_DESTINATIONS._value.get() == 1
        assert not qw.spool.admin_actions_waiting()  # taken (and logged)


def test_wake_server_signals_only_a_holder_of_the_lock(tmp_path: Path) -> None:
    from gsmtp import lockfile

    spool = str(tmp_path / "spool.sqlite")
    assert isinstance(queue_control.wake_server(spool), queue_control.NotWoken)
    lock = lockfile.acquire(lockfile.lock_path(spool))
    assert isinstance(lock, lockfile.InstanceLock)
    assert lockfile.holder(lockfile.lock_path(spool)) is not None
    lock.release()
    # The file still names this PID, but nobody holds the lock: not signalled.
    assert lockfile.holder(lockfile.lock_path(spool)) is None
    woken = queue_control.wake_server(spool)
    assert isinstance(woken, queue_control.NotWoken) and not woken.running


def test_a_claimed_message_held_before_its_delivery_starts_is_given_back(
    qw: QueueWorld,
) -> None:
    """One delivery at a time to slow.example: the second message waits in memory,
    claimed. Held then, it is given back unscheduled and never delivered."""
    gate = Event()
    qw.remote.hold["slow.example"] = gate
    first = qw.enqueue(["a@slow.example"])
    second = qw.enqueue(["b@slow.example"])
    manager = qw.manager(max_per_domain=1, initial_window=1, idle_poll=60.0)
    manager.start()
    wait_until(lambda: qw.owned("slow.example") == 2, what="both claimed, one running")
    queue_control.hold(qw.admin._db, now=qw.clock(), ids=[second])
    manager.admin_signalled()
    wait_until(lambda: qw.owned("slow.example") == 1, what="the waiting one given back")
    assert due_times(qw, second) == {UNSCHEDULED}
    gate.set()
    wait_until(lambda: qw.messages_left() == 1, what="the first delivered")
    assert [call[0] for call in qw.remote.calls] == [first]
    # The row goes with the result's commit; the manager's count once it has the answer.
    wait_until(lambda: manager.held == 0, what="nothing left in memory")


def test_claims_released_at_start_up_stay_unscheduled_when_held(qw: QueueWorld) -> None:
    message_id = qw.enqueue(["a@x.example"])
    other = qw.enqueue(["b@x.example"])
    assert len(qw.spool.claim_due(qw.clock(), 10).claims) == 2
    queue_control.hold(qw.admin._db, now=qw.clock(), ids=[message_id])
    assert qw.spool.release_leases() == 2
    assert due_times(qw, message_id) == {UNSCHEDULED}
    assert due_times(qw, other) == {qw.clock()}


def test_the_queue_gauges_count_a_held_message_as_held(qw: QueueWorld) -> None:
    """`gsmtp_queue_messages{state="held"}` reads `messages.held`: a held message is
    neither active nor deferred, whether it was deferred before or never tried."""
    fresh = qw.enqueue(["a@x.example"])
    tried = qw.enqueue(["b@y.example"])
    waiting = qw.enqueue(["c@z.example"])
    for claim in qw.spool.claim_due(qw.clock(), 10).claims:
        if claim.message_id != tried:
            continue
        qw.spool.record_results(
            [
                RecipientUpdate(tried, r.address, Outcome.DEFERRED, "451 later", qw.clock() + HOUR)
                for r in claim.recipients
            ]
        )
    db = qw.admin._db
    assert queue_control.hold(db, now=qw.clock(), ids=[fresh, tried]) == [fresh, tried]
    shape = qw.spool.queue_shape()
    assert shape.messages.get("held") == 2
    assert shape.size.get("held", 0) > 0
    assert shape.messages.get("deferred", 0) == 0
    assert waiting and shape.messages.get("active") == 1
