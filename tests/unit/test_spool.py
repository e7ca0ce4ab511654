"""The spool on a real SQLite file: durability settings, group commit, leases, results."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from gsmtp import db
from gsmtp.message import MessageId, NewMessage, Outcome, new_message_id
from gsmtp.spool import RecipientUpdate, Spool, SpoolAdmin
from gsmtp.writer import GroupCommitter, ThreadReader


@pytest.fixture
def spool_path(tmp_path: Path) -> str:
    return str(tmp_path / "spool" / "spool.sqlite")


@pytest.fixture
def spool(spool_path: str) -> Iterator[Spool]:
    writer = GroupCommitter(spool_path)
    yield Spool(writer, db.connect(spool_path))
    writer.stop()


def message(
    index: int = 0, recipients: tuple[str, ...] = ("a@x.example",), now: float = 1000.0
) -> NewMessage:
    return NewMessage(
        id=MessageId(f"M{index:05d}"),
        sender="s@remote.example",
        recipients=recipients,
        body=b"Subject: %d\r\n\r\nbody\r\n" % index,
        received_at=now,
        client="192.0.2.1",
        helo="c.example",
    )


def test_pragmas_are_durable(spool_path: str) -> None:
    """D-02: WAL, synchronous=FULL, a busy timeout; files 0600 in a 0700 directory."""
    connection = db.connect(spool_path)
    assert connection.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    assert connection.execute("PRAGMA synchronous").fetchall()[0][0] == 2
    assert connection.execute("PRAGMA busy_timeout").fetchall()[0][0] > 0
    assert stat.S_IMODE(os.stat(spool_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(spool_path)).st_mode) == 0o700
    assert db.check_integrity(connection) == "ok"


def test_migrations_are_recorded_and_idempotent(spool_path: str) -> None:
    first = db.connect(spool_path)
    version = first.execute("PRAGMA user_version").fetchall()[0][0]
    second = db.connect(spool_path)
    assert version >= 1
    assert second.execute("PRAGMA user_version").fetchall()[0][0] == version


def test_concurrent_enqueues_share_commits(spool: Spool, spool_path: str) -> None:
    """Group commit: 200 greenlets enqueueing at once take far fewer transactions."""
    writer = spool._writer
    before = writer.commits
    jobs = [gevent.spawn(spool.enqueue, message(i)) for i in range(200)]
    gevent.joinall(jobs, raise_error=True)
    assert SpoolAdmin(db.connect(spool_path)).stats()["messages"] == 200
    assert writer.commits - before < 100


def test_a_failing_unit_does_not_spoil_its_batch(spool: Spool, spool_path: str) -> None:
    """Three enqueues committed as one transaction, one of them a duplicate id: it fails
    alone, the other two are stored. The writer is held busy until all three wait, so
    they are certainly one batch (one commit)."""
    from gevent.monkey import get_original

    thread_event = get_original("threading", "Event")
    spool.enqueue(message(1))
    writer = spool._writer
    started, release = thread_event(), thread_event()

    def hold(connection: Any) -> None:  # runs on the writer thread
        started.set()
        release.wait(10)

    holder = gevent.spawn(writer.submit, hold)
    gevent.sleep(0)
    assert started.wait(10)
    before = writer.commits
    jobs = [gevent.spawn(spool.enqueue, message(i)) for i in (1, 2, 3)]  # 1 is a duplicate id
    gevent.sleep(0)  # all three are submitted and waiting behind the held unit
    release.set()
    gevent.joinall([holder, *jobs])
    assert writer.commits - before == 2  # the held unit, then the three together
    assert jobs[0].exception is not None
    assert jobs[1].successful() and jobs[2].successful()
    assert SpoolAdmin(db.connect(spool_path)).stats()["messages"] == 3


def test_claim_leases_and_results(spool: Spool, spool_path: str) -> None:
    spool.enqueue(message(1, ("a@x.example", "b@x.example"), now=100.0))
    spool.enqueue(message(2, ("c@y.example",), now=200.0))
    claims = spool.claim_due(now=150.0, limit=10)
    assert [(c.message.id, c.recipients) for c in claims] == [
        ("M00001", ("a@x.example", "b@x.example"))
    ]
    assert spool.claim_due(now=150.0, limit=10) == []  # leased: nobody else gets them
    spool.record_results(
        [
            RecipientUpdate(MessageId("M00001"), "a@x.example", Outcome.DELIVERED, "250 ok", 150.0),
            RecipientUpdate(
                MessageId("M00001"), "b@x.example", Outcome.DEFERRED, "451 later", 400.0
            ),
        ]
    )
    admin = SpoolAdmin(db.connect(spool_path))
    row = admin.message("M00001")
    assert row is not None
    by_address = {r.address: r for r in row.recipients}
    assert by_address["a@x.example"].status == "delivered"
    assert by_address["b@x.example"].last_error == "451 later"
    assert by_address["b@x.example"].attempts == 1
    assert spool.next_due_at() == 200.0
    spool.record_results(
        [RecipientUpdate(MessageId("M00001"), "b@x.example", Outcome.FAILED, "550 no", 500.0)]
    )
    assert admin.message("M00001") is None  # nothing left queued: the message is gone
    assert admin.stats() == {
        "messages": 1,
        "recipients": 1,
        "queued": 1,
        "delivered": 0,
        "failed": 0,
    }


def test_release_leases_frees_what_a_dead_process_held(spool: Spool) -> None:
    spool.enqueue(message(1))
    assert len(spool.claim_due(now=2000.0, limit=10)) == 1
    assert spool.release_leases() == 1
    assert len(spool.claim_due(now=2000.0, limit=10)) == 1


def test_message_ids_are_unique_and_ordered() -> None:
    """Ids made in the same microsecond differ (the sequence part); ids from later
    times sort later (the time part comes first)."""
    same_time = [new_message_id(1000.0) for _ in range(1000)]
    assert len(set(same_time)) == 1000
    assert {i[:13] for i in same_time} == {same_time[0][:13]}
    later = [new_message_id(1000.0 + i / 1000) for i in range(1000)]
    assert [i[:13] for i in later] == sorted(i[:13] for i in later)
    assert len({i[:13] for i in later}) == 1000


def test_writer_stops_after_finishing_what_was_submitted(spool_path: str) -> None:
    """Stop while units are pending: they are committed, and stop() returns."""
    writer = GroupCommitter(spool_path)
    store = Spool(writer, db.connect(spool_path))
    jobs = [gevent.spawn(store.enqueue, message(i)) for i in range(20)]
    gevent.sleep(0)  # all twenty are submitted and waiting
    with gevent.Timeout(10):
        writer.stop()
        gevent.joinall(jobs, raise_error=True)
    assert SpoolAdmin(db.connect(spool_path)).stats()["messages"] == 20


def test_body_reader_sees_messages_committed_after_a_checkpoint(spool_path: str) -> None:
    """A checkpoint must not pin the body reader's snapshot: a claim whose body could
    not be read would hold its recipients for the whole lease."""
    writer = GroupCommitter(spool_path)
    bodies = ThreadReader(spool_path)
    store = Spool(writer, db.connect(spool_path), bodies)
    try:
        for index in range(1, 4):
            store.enqueue(message(index, now=10.0))
            bodies.checkpoint()
        claims = store.claim_due(now=20.0, limit=10)
        assert sorted(c.message.id for c in claims) == ["M00001", "M00002", "M00003"]
    finally:
        writer.stop()
        bodies.close()


def test_a_claim_whose_body_cannot_be_read_is_released_not_held(spool_path: str) -> None:
    """If the body reader's snapshot predates a message (as an open statement on its
    connection once caused under load), the claim must not keep the recipient leased."""
    writer = GroupCommitter(spool_path)
    bodies = ThreadReader(spool_path)
    store = Spool(writer, db.connect(spool_path), bodies)
    try:
        store.enqueue(message(1, now=10.0))

        def pin_snapshot(connection: Any) -> None:
            connection.execute("BEGIN")
            connection.execute("SELECT COUNT(*) FROM messages").fetchall()

        bodies.run(pin_snapshot)
        store.enqueue(message(2, now=10.0))
        first = store.claim_due(now=20.0, limit=10)
        assert [c.message.id for c in first] == ["M00001"]  # M00002 is invisible to it
        bodies.run(lambda connection: connection.execute("COMMIT"))
        second = store.claim_due(now=20.0, limit=10)
        assert [c.message.id for c in second] == ["M00002"]  # released, not leased for 1 h
    finally:
        writer.stop()
        bodies.close()
