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
from gsmtp.message import (
    AdminAction,
    MessageId,
    NewMessage,
    Outcome,
    QueuedMessage,
    new_message_id,
)
from gsmtp.spool import (
    UNSCHEDULED,
    ClaimedRecipient,
    DomainFilter,
    RecipientUpdate,
    Spool,
    Unreadable,
)
from gsmtp.spool_admin import SpoolAdmin
from gsmtp.writer import GroupCommitter, ThreadReader
from tests.integration.harness import open_files


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


def test_claim_owns_and_results_release(spool: Spool, spool_path: str) -> None:
    spool.enqueue(message(1, ("a@x.example", "b@x.example"), now=100.0))
    spool.enqueue(message(2, ("c@y.example",), now=200.0))
    claims = spool.claim_due(now=150.0, limit=10).claims
    assert [(c.message_id, [r.address for r in c.recipients]) for c in claims] == [
        ("M00001", ["a@x.example", "b@x.example"])
    ]
    assert claims[0].received_at == 100.0 and claims[0].size == len(message(1).body)
    # Owned: nobody else gets them, however long the delivery takes (no lease to lapse).
    assert spool.claim_due(now=150.0 + 86400 * 30, limit=10).claims[0].message_id == "M00002"
    assert spool.claim_due(now=150.0 + 86400 * 30, limit=10).claims == []
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
    assert spool.next_due_at() == 400.0  # M00002 is owned, not due
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
        "corrupt": 0,
        "held": 0,
    }


def outside(spool_path: str) -> Any:
    """A connection like the `sqlite3` shell's: foreign keys off, anything goes."""
    connection = db.connect(spool_path)
    connection.execute("PRAGMA foreign_keys=OFF")
    return connection


NOT_UTF8 = "CAST(X'6AFF6F6E657340782E6578616D706C65' AS TEXT)"  # 'j\xffones@x.example'


def test_text_that_is_not_utf8_is_set_aside_and_never_raised(spool: Spool, spool_path: str) -> None:
    """Red-team finding: one recipient address stored as TEXT with invalid UTF-8 made
    apsw raise on the whole claim, and every claim after it: the queue stood still. A
    sender like it made load_message raise on every retry."""
    for index in range(1, 6):
        spool.enqueue(message(index, now=10.0))
    sql = outside(spool_path)
    sql.execute(f"UPDATE recipients SET address = {NOT_UTF8} WHERE message_id = 'M00001'")
    sql.execute(f"UPDATE messages SET sender = {NOT_UTF8} WHERE id = 'M00002'")
    sql.execute(  # a recipient row whose message id is damaged: its message is unknown
        "UPDATE recipients SET message_id = CAST(X'4D30303030FF' AS TEXT)"
        " WHERE message_id = 'M00003'"
    )
    sql.execute(f"UPDATE messages SET id = {NOT_UTF8} WHERE id = 'M00004'")
    sql.execute(f"UPDATE recipients SET message_id = {NOT_UTF8} WHERE message_id = 'M00004'")
    result = spool.claim_due(now=20.0, limit=10)
    assert sorted(c.message_id for c in result.claims) == ["M00002", "M00005"]
    assert sorted((a.message_id, a.reason) for a in result.set_aside) == [
        ("M00001", "recipient row does not decode"),
        ("j\\xffones@x.example", "message id is not valid UTF-8"),
        ("rowid 3", "recipient row without a readable message id"),
    ]
    assert result.orphans_removed == 0  # the damaged id may be M00003's: kept, not deleted
    unreadable = spool.load_message("M00002")
    assert unreadable == Unreadable("sender does not decode")
    assert spool.claim_due(now=30.0, limit=10).claims == []  # nothing comes back
    admin = SpoolAdmin(sql)
    corrupt = {m.id: m for m in admin.messages(corrupt=True)}
    assert set(corrupt) == {"M00001", "j\ufffdones@x.example", "M0000\ufffd"}
    assert corrupt["M00001"].recipients[0].address == "j\ufffdones@x.example"
    assert corrupt["M0000\ufffd"].corrupt == "recipient rows without a message"
    assert [r.address for r in corrupt["M0000\ufffd"].recipients] == ["a@x.example"]
    shown = admin.message("M00001")
    assert shown is not None and shown.recipients[0].address == "j\ufffdones@x.example"
    assert [m.id for m in admin.messages()] == ["M00002", "M00003", "M00005"]
    assert admin.stats()["corrupt"] == 2


def test_envelope_addresses_with_control_characters_are_set_aside(
    spool: Spool, spool_path: str
) -> None:
    """Red-team finding: a sender (or recipient) with a LF, written from outside, was
    delivered and injected a header field into the Maildir file."""
    for index in range(1, 5):
        spool.enqueue(message(index, now=10.0))
    sql = outside(spool_path)
    sql.execute(
        "UPDATE messages SET sender = 'evil' || char(10) || 'X-Injected: yes' WHERE id = 'M00001'"
    )
    sql.execute(
        "UPDATE recipients SET address = 'a' || char(13) || '@x.example'"
        " WHERE message_id = 'M00002'"
    )
    sql.execute("UPDATE messages SET dsn_envid = 'id' || char(10) || 'X: y' WHERE id = 'M00003'")
    result = spool.claim_due(now=20.0, limit=10)
    assert [(a.message_id, a.reason) for a in result.set_aside] == [
        ("M00002", "recipient address has a control character")
    ]
    assert spool.load_message("M00001") == Unreadable("sender has a control character")
    loaded = spool.load_message("M00003")  # an optional value that is damaged is dropped
    assert isinstance(loaded, QueuedMessage) and loaded.envid is None


def test_recipient_rows_without_a_message_are_listed_then_removed(
    spool: Spool, spool_path: str
) -> None:
    """Red-team finding: a message deleted from outside with foreign keys off left its
    recipient rows unscheduled forever, counted as queued and shown nowhere."""
    spool.enqueue(message(1, ("a@x.example", "b@x.example"), now=10.0))
    spool.enqueue(message(2, now=10.0))
    sql = outside(spool_path)
    sql.execute("DELETE FROM messages WHERE id = 'M00001'")
    admin = SpoolAdmin(sql)
    (listed,) = admin.messages(corrupt=True)
    assert listed.id == "M00001" and len(listed.recipients) == 2
    result = spool.claim_due(now=20.0, limit=10)
    assert [c.message_id for c in result.claims] == ["M00002"]
    assert result.orphans_removed == 2 and result.set_aside == []
    assert sql.execute("SELECT COUNT(*) FROM recipients").fetchall() == [(1,)]
    assert admin.messages(corrupt=True) == []


def test_a_bounce_asked_for_during_a_delivery_that_defers_is_due_at_once(
    spool: Spool, spool_path: str
) -> None:
    """Red-team finding: `queue bounce` while the message was being delivered found
    nothing queued and recorded nothing."""
    spool.enqueue(message(1, ("a@x.example", "b@x.example"), now=10.0))
    assert len(spool.claim_due(now=20.0, limit=10).claims) == 1
    admin = SpoolAdmin(db.connect(spool_path))
    assert admin.bounce("M00001", now=30.0) == 2
    assert not spool.bounce_pending("M00001")  # owned: the delivery decides first
    spool.record_results(
        [
            RecipientUpdate(MessageId("M00001"), "a@x.example", Outcome.DEFERRED, "451", 900.0),
            RecipientUpdate(MessageId("M00001"), "b@x.example", Outcome.DELIVERED, "250", 40.0),
        ]
    )
    assert spool.bounce_pending("M00001")
    assert spool.next_due_at() == 10.0  # not 900: due again at once, when it was due before
    (claim,) = spool.claim_due(now=40.0, limit=10).claims
    assert claim.recipients == (ClaimedRecipient("a@x.example", 1, bounce_requested=True),)
    spool.record_results(
        [RecipientUpdate(MessageId("M00001"), "a@x.example", Outcome.FAILED, "550", 40.0)]
    )
    # Released instead (a stop, or a message that vanished): due at once all the same.
    spool.enqueue(message(2, now=10.0))
    spool.claim_due(now=50.0, limit=10)
    assert admin.bounce("M00002", now=60.0) == 1
    assert spool.release_leases() == 1
    (claim,) = spool.claim_due(now=60.0, limit=10).claims
    assert claim.recipients[0].bounce_requested


def test_release_leases_frees_what_a_dead_process_held(spool: Spool) -> None:
    spool.enqueue(message(1, now=100.0))
    spool.enqueue(message(2, now=300.0))
    assert len(spool.claim_due(now=2000.0, limit=10).claims) == 2
    assert spool.release_leases() == 2
    # Due again when they were due before, in the same order.
    claims = spool.claim_due(now=2000.0, limit=1).claims
    assert [c.message_id for c in claims] == ["M00001"]
    assert spool.next_due_at() == 300.0


def test_a_failure_keeps_its_message_until_the_notice_is_written(
    spool: Spool, spool_path: str
) -> None:
    spool.enqueue(message(1, ("a@x.example",), now=100.0))
    spool.claim_due(now=100.0, limit=10)
    spool.record_results(
        [
            RecipientUpdate(
                MessageId("M00001"), "a@x.example", Outcome.FAILED, "550 no", 100.0, notice=True
            )
        ]
    )
    admin = SpoolAdmin(db.connect(spool_path))
    assert admin.message("M00001") is not None  # the bounce needs its headers
    state = spool.notice_state("M00001")
    assert state is not None and state.recipients[0].notice_pending
    assert spool.pending_notice_messages() == ["M00001"]
    bounce = message(2, ("s@remote.example",), now=101.0)
    # Not what is pending: nothing is written.
    assert not spool.store_notices(
        "M00001", reported=frozenset({"x@x.example"}), notices=[(bounce, "bounce")], warned_at=None
    )
    assert admin.message("M00002") is None
    assert spool.store_notices(
        "M00001", reported=frozenset({"a@x.example"}), notices=[(bounce, "bounce")], warned_at=None
    )
    assert admin.message("M00001") is None  # reported: gone
    assert admin.message("M00002") is not None
    assert spool.pending_notice_messages() == []


def test_claims_are_capped_per_destination_domain(spool: Spool) -> None:
    for index in range(6):
        spool.enqueue(message(index, (f"u{index}@slow.example",), now=10.0 + index))
    for index in range(6, 9):
        spool.enqueue(message(index, (f"u{index}@fast.example",), now=10.0 + index))
    first = spool.claim_due(now=100.0, limit=50, caps={"slow.example": 2}, default_cap=1)
    assert [c.message_id for c in first.claims] == ["M00000", "M00001", "M00006"]
    assert not first.exhausted  # a cap left rows: ask again once there is room
    # A domain capped at 0 is skipped, however much of it is due.
    second = spool.claim_due(now=100.0, limit=50, caps={"slow.example": 0}, default_cap=5)
    assert [c.message_id for c in second.claims] == ["M00007", "M00008"]
    assert second.exhausted  # every due row of the domains allowed was taken
    limited = spool.claim_due(now=100.0, limit=1)
    assert len(limited.claims) == 1 and not limited.exhausted


def test_a_claim_may_take_the_rows_of_some_domains_alone_or_of_all_others(spool: Spool) -> None:
    """A lane's turn claims its own lane's rows: the local domains' (whatever their
    case in the address), or every other domain's, domains never seen included."""
    addresses = ["a@Local.Example", "b@r1.example", "c@r2.example", "d@local.example"]
    for index, address in enumerate(addresses):
        spool.enqueue(message(index, (address,), now=10.0 + index))
    local = DomainFilter(frozenset({"local.example"}), inside=True)
    first = spool.claim_due(now=100.0, limit=50, domains=local)
    assert [c.message_id for c in first.claims] == ["M00000", "M00003"]
    assert first.exhausted  # of the rows it was allowed
    remote = DomainFilter(frozenset({"local.example"}), inside=False)
    second = spool.claim_due(now=100.0, limit=1, domains=remote)
    assert [c.message_id for c in second.claims] == ["M00001"]
    assert not second.exhausted
    assert [c.message_id for c in spool.claim_due(now=100.0, limit=50).claims] == ["M00002"]


def test_a_claims_domain_filter_follows_each_new_set_of_names(spool: Spool) -> None:
    """The names live in a table of the writer's connection, loaded once per set: a
    new set (the accounts changed) is loaded again; a change of the table lost with its
    transaction is lost with it; a table gone is made and loaded again."""
    for index, address in enumerate(["a@one.example", "b@two.example", "c@one.example"]):
        spool.enqueue(message(index, (address,), now=10.0 + index))

    def claimed(names: frozenset[str]) -> list[str]:
        result = spool.claim_due(now=100.0, limit=50, domains=DomainFilter(names, inside=True))
        spool.release([(c.message_id, r.address) for c in result.claims for r in c.recipients])
        return [c.message_id for c in result.claims]

    assert claimed(frozenset()) == []  # no names: none of the rows (the first set too)
    one, two = frozenset({"one.example"}), frozenset({"two.example"})
    assert claimed(one) == ["M00000", "M00002"]
    assert claimed(two) == ["M00001"]
    assert claimed(one) == ["M00000", "M00002"]  # an equal set, but a new load
    loaded = frozenset({"two.example"})
    assert claimed(loaded) == ["M00001"]

    def change_then_fail(connection: Any) -> None:
        # What a claim would trust if the change stayed: the set's own generation.
        connection.execute(
            "UPDATE temp.claim_domains SET name = 'one.example'"
            " WHERE generation = (SELECT generation FROM temp.claim_domains LIMIT 1)"
        )
        raise RuntimeError("the transaction is lost")

    with pytest.raises(RuntimeError):
        spool._writer.submit(change_then_fail)
    assert claimed(loaded) == ["M00001"]  # the table's change went with its transaction
    spool._writer.submit(lambda connection: connection.execute("DROP TABLE temp.claim_domains"))
    assert claimed(loaded) == ["M00001"]  # a connection without the table makes it again
    big = frozenset({f"d{n}.example" for n in range(5000)} | {"one.example"})
    assert claimed(big) == ["M00000", "M00002"]


def _deleted_files() -> set[str]:
    """What this process's descriptors name that is deleted: SQLite's temp files."""
    return {name for name in open_files(os.getpid()) if name.endswith(" (deleted)")}


def test_the_writer_keeps_temporary_tables_in_memory(spool: Spool) -> None:
    """A claim over many local domains needs no temp directory: with none writable (a
    read-only /var/tmp) such claims failed with an I/O error and the queue runner gave
    up. SQLite spills temporary tables into a file of the temp directory; the writer's
    stay in memory, so no such file is ever opened."""
    spool.enqueue(message(1, ("a@one.example",), now=10.0))
    spool.enqueue(message(2, ("b@two.example",), now=11.0))
    before = _deleted_files()
    names = frozenset({f"d{n}.example" for n in range(150_000)} | {"one.example"})
    result = spool.claim_due(now=100.0, limit=50, domains=DomainFilter(names, inside=True))
    assert [c.message_id for c in result.claims] == ["M00001"]
    assert _deleted_files() - before == set()


def test_unreadable_messages_are_set_aside_not_retried(spool: Spool, spool_path: str) -> None:
    """Postfix's corrupt/ queue: kept, listed, excluded from claims and from flush."""
    spool.enqueue(message(1, now=10.0))
    spool.enqueue(message(2, now=10.0))
    spool.enqueue(message(3, now=10.0))
    outside = db.connect(spool_path)
    outside.execute("UPDATE messages SET body = 42 WHERE id = 'M00001'")
    outside.execute("UPDATE messages SET size = 'lots' WHERE id = 'M00002'")
    result = spool.claim_due(now=20.0, limit=10)
    # A row that does not decode is set aside at claim time...
    assert [(a.message_id, a.reason) for a in result.set_aside] == [
        ("M00002", "message row does not decode")
    ]
    assert sorted(c.message_id for c in result.claims) == ["M00001", "M00003"]
    # ...a body that does not, when a delivery reads it.
    unreadable = spool.load_message("M00001")
    assert isinstance(unreadable, Unreadable) and "int" in unreadable.reason
    spool.set_aside("M00001", unreadable.reason)
    loaded = spool.load_message("M00003")
    assert not isinstance(loaded, Unreadable) and loaded is not None
    assert loaded.body == message(3).body
    admin = SpoolAdmin(outside)
    assert admin.flush(now=30.0) == 0  # neither is made due again
    assert spool.claim_due(now=40.0, limit=10).claims == []
    assert spool.release_leases() == 1  # M00003 was owned; the corrupt ones are not
    assert [m.id for m in admin.messages()] == ["M00003"]
    corrupt = admin.messages(corrupt=True)
    assert [(m.id, m.corrupt is not None) for m in corrupt] == [("M00001", True), ("M00002", True)]
    assert admin.stats()["corrupt"] == 2
    assert {
        r
        for (r,) in outside.execute(
            "SELECT next_attempt_at FROM recipients WHERE message_id IN ('M00001', 'M00002')"
        )
    } == {UNSCHEDULED}


def test_flush_makes_everything_due_and_leaves_an_action(spool: Spool, spool_path: str) -> None:
    spool.enqueue(message(1, now=10.0))
    claims = spool.claim_due(now=10.0, limit=10).claims
    spool.record_results(
        [RecipientUpdate(claims[0].message_id, "a@x.example", Outcome.DEFERRED, "451", 5000.0)]
    )
    assert not spool.admin_actions_waiting()
    assert SpoolAdmin(db.connect(spool_path)).flush(now=20.0) == 1
    assert spool.admin_actions_waiting()
    assert spool.take_admin_actions() == [AdminAction(20.0, "flush", None, None, 1)]
    assert not spool.admin_actions_waiting()
    assert spool.next_due_at() == 20.0


def test_retries_beyond_the_horizon_are_pulled_forward(spool: Spool) -> None:
    """D-43: the clock was set back: a retry far ahead is capped at now + longest wait."""
    spool.enqueue(message(1, now=10.0))
    claims = spool.claim_due(now=10.0, limit=10).claims
    spool.record_results(
        [RecipientUpdate(claims[0].message_id, "a@x.example", Outcome.DEFERRED, "451", 9e9)]
    )
    assert spool.cap_schedule(latest=4000.0) == 1
    assert spool.next_due_at() == 4000.0
    assert spool.cap_schedule(latest=4000.0) == 0


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
    """A checkpoint must not pin the body reader's snapshot: a delivery whose body could
    not be read would find its message gone."""
    writer = GroupCommitter(spool_path)
    bodies = ThreadReader(spool_path)
    store = Spool(writer, db.connect(spool_path), bodies)
    try:
        for index in range(1, 4):
            store.enqueue(message(index, now=10.0))
            bodies.checkpoint()
        claims = store.claim_due(now=20.0, limit=10).claims
        assert sorted(c.message_id for c in claims) == ["M00001", "M00002", "M00003"]
        for claim in claims:
            loaded = store.load_message(claim.message_id)
            assert loaded is not None and not isinstance(loaded, Unreadable)
    finally:
        writer.stop()
        bodies.close()


def test_released_claims_are_due_again_at_their_old_time(spool_path: str) -> None:
    """If the body reader cannot see a claimed message (a snapshot pinned by an open
    statement once did that under load), the claim is released, not held."""
    writer = GroupCommitter(spool_path)
    bodies = ThreadReader(spool_path)
    store = Spool(writer, db.connect(spool_path), bodies)
    try:
        store.enqueue(message(1, now=10.0))

        open_statements: list[Any] = []

        def pin_snapshot(connection: Any) -> None:
            # A statement left open keeps its read transaction (and snapshot) alive.
            cursor = connection.execute("SELECT id FROM messages UNION ALL SELECT 1")
            next(cursor)
            open_statements.append(cursor)

        bodies.run(pin_snapshot)
        store.enqueue(message(2, now=12.0))
        claims = store.claim_due(now=20.0, limit=10).claims
        assert store.load_message("M00002") is None  # invisible to the pinned reader
        store.release([(c.message_id, r.address) for c in claims for r in c.recipients])
        bodies.run(lambda connection: open_statements.pop().close())
        assert store.next_due_at() == 10.0
        again = store.claim_due(now=20.0, limit=10).claims
        assert [c.message_id for c in again] == ["M00001", "M00002"]
        assert store.load_message("M00002") is not None
    finally:
        writer.stop()
        bodies.close()
