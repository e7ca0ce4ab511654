"""Large bodies in parts: written as they arrive, stored whole with their message or not
at all, read back whole, gone with their message, and never left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import apsw
import gevent
import pytest

from gsmtp import backup, db
from gsmtp.acceptance import Acceptor
from gsmtp.diskspace import Ballast
from gsmtp.message import MessageId, NewMessage, Outcome, SpooledContent
from gsmtp.protocol.address import Address
from gsmtp.protocol.session import Envelope
from gsmtp.spool import RecipientUpdate, Spool, Unreadable
from gsmtp.spool_admin import SpoolAdmin
from gsmtp.writer import GroupCommitter, ThreadReader

TRACE = b"Received: from c.example by mx.example; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
PARTS = [b"From: a@remote.example\r\nSubject: big\r\n", b"X-Long: " + b"x" * 300 + b"\r\n\r\n"]
PARTS.append(b"body " * 1000 + b"\r\n")


@pytest.fixture
def spool_path(tmp_path: Path) -> str:
    return str(tmp_path / "spool.sqlite")


@pytest.fixture
def spool(spool_path: str) -> Iterator[Spool]:
    writer = GroupCommitter(spool_path)
    bodies = ThreadReader(spool_path)
    yield Spool(writer, db.connect(spool_path), bodies)
    writer.stop()
    bodies.close()


def rows(spool_path: str, sql: str) -> list[tuple[object, ...]]:
    return [tuple(row) for row in db.connect(spool_path).execute(sql)]


def spooled_message(spool: Spool, message_id: str, last: bytes = b"the end\r\n") -> NewMessage:
    """Parts written as a connection writes them, then the message with the rest."""
    for seq, part in enumerate(PARTS):
        spool.write_part(MessageId(message_id), seq, part)
    message = NewMessage(
        id=MessageId(message_id),
        sender="a@remote.example",
        recipients=("b@local.example",),
        body=TRACE,
        received_at=1000.0,
        client="192.0.2.1",
        helo="c.example",
        spooled=SpooledContent(len(PARTS), sum(map(len, PARTS)), last),
    )
    spool.enqueue(message)
    return message


def test_a_spooled_message_is_read_back_whole(spool: Spool, spool_path: str) -> None:
    message = spooled_message(spool, "M1")
    loaded = spool.load_message("M1")
    assert loaded is not None and not isinstance(loaded, Unreadable)
    assert loaded.body == TRACE + b"".join(PARTS) + b"the end\r\n"
    assert message.size == len(loaded.body)
    assert rows(spool_path, "SELECT size, parts, body FROM messages") == [
        (message.size, len(PARTS) + 1, TRACE)
    ]


def test_a_small_message_has_no_parts(spool: Spool, spool_path: str) -> None:
    """The hot path is unchanged: the body in the message row, nothing else."""
    spool.enqueue(
        NewMessage(MessageId("S1"), "", ("b@local.example",), b"x\r\n", 1.0, "192.0.2.1", "c")
    )
    assert rows(spool_path, "SELECT parts FROM messages") == [(0,)]
    assert rows(spool_path, "SELECT COUNT(*) FROM body_parts") == [(0,)]


def test_the_rest_may_be_empty(spool: Spool) -> None:
    """The content ended exactly where a part did: no empty last part."""
    spooled_message(spool, "M1", last=b"")
    loaded = spool.load_message("M1")
    assert loaded is not None and not isinstance(loaded, Unreadable)
    assert loaded.body == TRACE + b"".join(PARTS)


@pytest.mark.parametrize(
    "damage",
    [
        "DELETE FROM body_parts WHERE seq = 1",
        "DELETE FROM body_parts WHERE seq = 3",
        "UPDATE body_parts SET data = 7 WHERE seq = 0",
        "UPDATE messages SET parts = 9",
        "UPDATE body_parts SET data = x'00' WHERE seq = 2",
    ],
)
def test_a_damaged_part_makes_the_message_unreadable(
    spool: Spool, spool_path: str, damage: str
) -> None:
    """Unreadable: the queue manager sets it aside (corrupt), never delivers a piece."""
    spooled_message(spool, "M1")
    db.connect(spool_path).execute(damage)
    assert isinstance(spool.load_message("M1"), Unreadable)


def test_parts_go_with_their_message(spool: Spool, spool_path: str) -> None:
    spooled_message(spool, "M1")
    spooled_message(spool, "M2")
    spool.record_results(
        [RecipientUpdate(MessageId("M1"), "b@local.example", Outcome.DELIVERED, "", 0.0)]
    )
    assert rows(spool_path, "SELECT DISTINCT message_id FROM body_parts") == [("M2",)]
    assert SpoolAdmin(db.connect(spool_path)).delete("M2")
    assert rows(spool_path, "SELECT COUNT(*) FROM body_parts") == [(0,)]


def test_discarding_keeps_what_was_stored(spool: Spool, spool_path: str) -> None:
    """A connection discards after any outcome of its commit, even an unknown one: the
    parts of a stored message stay, those of one never stored go."""
    spooled_message(spool, "M1")
    spool.write_part(MessageId("M2"), 0, b"half a message\r\n")
    spool.discard_parts(MessageId("M1"))
    spool.discard_parts(MessageId("M2"))
    assert rows(spool_path, "SELECT DISTINCT message_id FROM body_parts") == [("M1",)]


def test_orphan_parts_are_removed_at_start(spool: Spool, spool_path: str) -> None:
    spooled_message(spool, "M1")
    for seq in range(3):
        spool.write_part(MessageId("GONE"), seq, b"x\r\n")
    assert spool.remove_orphan_parts() == 3
    assert rows(spool_path, "SELECT DISTINCT message_id FROM body_parts") == [("M1",)]


def test_notices_and_queue_show_read_the_headers_across_parts(
    spool: Spool, spool_path: str
) -> None:
    spooled_message(spool, "M1")
    state = spool.notice_state("M1")
    assert state is not None
    assert state.message.body == TRACE + b"".join(PARTS) + b"the end\r\n"
    headers = SpoolAdmin(db.connect(spool_path)).headers("M1")
    assert headers == TRACE + PARTS[0] + PARTS[1][:-2]


def test_a_backup_holds_the_parts(spool: Spool, spool_path: str, tmp_path: Path) -> None:
    spooled_message(spool, "M1")
    (copy,) = backup.backup_spool(spool_path, str(tmp_path / "backup")).copies
    connection = apsw.Connection(copy.path)
    stored = [row[0] for row in connection.execute("SELECT data FROM body_parts ORDER BY seq")]
    assert stored == [*PARTS, b"the end\r\n"]


def test_large_values_are_not_kept_by_the_statement_cache(spool: Spool) -> None:
    """apsw keeps the values last bound to a cached statement: a cached insert of parts
    (or of large bodies) would hold them in memory until that statement runs again."""
    jobs = [gevent.spawn(spool.write_part, MessageId(f"M{n}"), 0, b"p" * 100_000) for n in range(5)]
    gevent.joinall(jobs, raise_error=True)
    big = NewMessage(MessageId("B"), "", ("b@l.example",), b"b" * 100_000, 1.0, "192.0.2.1", "c")
    spool.enqueue(big)
    spool.enqueue(NewMessage(MessageId("S"), "", ("b@l.example",), b"s\r\n", 1.0, "192.0.2.1", "c"))
    entries = spool._writer._connection.cache_stats(True)["entries"]
    cached = [e["query"] for e in entries]
    assert not [q for q in cached if "body_parts" in q and "INSERT" in q], cached
    # The small message's insert is cached (prepared once), the large one's was not.
    uses = [e["uses"] for e in entries if e["query"].startswith("INSERT INTO messages")]
    assert uses == [1], entries


def test_the_accept_step_stores_the_trace_in_front_of_spooled_content() -> None:
    envelope = Envelope(
        helo="c.example",
        sender=Address("a", "remote.example"),
        recipients=(Address("b", "local.example"),),
        content=b"rest\r\n",
        smtputf8=False,
        esmtp=True,
    )
    acceptor = Acceptor("mx.local.example")
    message = acceptor.accept(
        envelope,
        client_ip="192.0.2.1",
        tls=False,
        now=1000.0,
        message_id=MessageId("M1"),
        spooled=SpooledContent(2, 500_000),
    )
    assert message.id == "M1" and message.body.startswith(b"Received: ")
    assert b"id M1" in message.body and message.body.endswith(b"\r\n")
    assert b"rest" not in message.body
    assert message.spooled == SpooledContent(2, 500_000, b"rest\r\n")
    assert message.size == len(message.body) + 500_000 + len(b"rest\r\n")
    small = acceptor.accept(envelope, client_ip="192.0.2.1", tls=False, now=1000.0)
    assert small.spooled is None and small.body.endswith(b"\r\nrest\r\n")


def test_discarded_parts_give_their_pages_back_in_their_own_commits(
    spool: Spool, spool_path: str
) -> None:
    """A full disk recovers only if the discard's commit shrinks the database: a
    checkpoint then copies nothing of the refused message's pages (still in the WAL)
    and needs no room to grow the file. Given back DISCARD_VACUUM_PAGES at a time, so
    the pages taken off the free list never spill into the WAL."""
    spooled_message(spool, "M1")
    before = rows(spool_path, "PRAGMA page_count")[0][0]
    for seq in range(12):  # 3 MB: more than the page cache holds
        spool.write_part(MessageId("M2"), seq, bytes([seq]) * 256 * 1024)
    wal = Path(spool_path + "-wal")
    wal_before = wal.stat().st_size
    spool.discard_parts(MessageId("M2"))
    assert rows(spool_path, "SELECT DISTINCT message_id FROM body_parts") == [("M1",)]
    assert rows(spool_path, "PRAGMA page_count")[0][0] <= before + 8
    assert wal.stat().st_size - wal_before < 256 * 1024  # a few pages, not the parts


class FullWriter:
    """The spool's writer on a full disk: its first `failures` units fail."""

    def __init__(self, inner: GroupCommitter, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def submit(self, work: object) -> object:
        if self.failures > 0:
            self.failures -= 1
            raise apsw.FullError("database or disk is full")
        return self.inner.submit(work)  # type: ignore[arg-type]


def test_a_discard_on_a_full_disk_spends_the_ballast_and_tries_again(
    spool: Spool, spool_path: str
) -> None:
    ballast = Ballast(spool_path, size=64 * 1024)
    assert ballast.restore() is None and ballast.path.stat().st_size == 64 * 1024
    spool.write_part(MessageId("M2"), 0, b"half a message\r\n")
    full = Spool(FullWriter(spool._writer, failures=1), spool._reader, ballast=ballast)  # type: ignore[arg-type]
    full.discard_parts(MessageId("M2"))
    assert not ballast.path.exists() and ballast.released
    assert full.disk_was_full and not full.discards_owed
    assert rows(spool_path, "SELECT COUNT(*) FROM body_parts") == [(0,)]
    assert ballast.restore() is None and ballast.path.exists()  # room again: made anew


def test_a_discard_that_still_fails_is_owed_and_retried(spool: Spool, spool_path: str) -> None:
    """Not left on the disk until the next start: the checkpoint task retries it."""
    ballast = Ballast(spool_path, size=64 * 1024)
    spool.write_part(MessageId("M2"), 0, b"half a message\r\n")
    full = Spool(FullWriter(spool._writer, failures=3), spool._reader, ballast=ballast)  # type: ignore[arg-type]
    with pytest.raises(apsw.FullError):
        full.discard_parts(MessageId("M2"))  # no ballast to spend (never made)
    assert full.discards_owed == {"M2"}
    with pytest.raises(apsw.FullError):
        full.retry_discards()
    assert full.discards_owed == {"M2"}
    with pytest.raises(apsw.FullError):
        full.retry_discards()
    assert full.retry_discards() == 1 and not full.discards_owed
    assert rows(spool_path, "SELECT COUNT(*) FROM body_parts") == [(0,)]
