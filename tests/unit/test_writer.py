"""The group-commit writer on a real SQLite file, with real SQLite errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import gevent
import pytest

from gsmtp import db
from gsmtp.writer import GroupCommitter, ThreadReader

ROOM_PAGES = 50  # the spool may grow by this many pages: 200 KB


def limited_connect(path: str) -> apsw.Connection:
    """A writer connection on a "disk" with little room left: SQLite's page limit gives a
    real SQLITE_FULL in the middle of a statement, which rolls the whole transaction
    back, as a full file system or an I/O error does."""
    connection = db.connect(path)
    pages = db.scalar(connection, "PRAGMA page_count")
    connection.execute(f"PRAGMA max_page_count={pages + ROOM_PAGES}")
    return connection


@pytest.fixture
def committer(tmp_path: Path) -> Iterator[GroupCommitter]:
    path = str(tmp_path / "spool.sqlite")
    db.connect(path).execute("CREATE TABLE t(name TEXT, body BLOB)")
    writer = GroupCommitter(path, open_connection=limited_connect)
    yield writer
    writer.stop(timeout=10)


def insert(name: str, size: int = 10) -> Callable[[apsw.Connection], None]:
    def work(connection: apsw.Connection) -> None:
        connection.execute("INSERT INTO t VALUES (?, zeroblob(?))", (name, size))

    return work


def insert_items(connection: apsw.Connection, items: list[tuple[str, int]]) -> None:
    """A batch function: many like items in one statement."""
    db.execute_values(
        connection, "INSERT INTO t SELECT column1, zeroblob(column2) FROM (VALUES {values})", items
    )


def names(committer: GroupCommitter) -> list[str]:
    return sorted(committer.submit(lambda c: [row[0] for row in c.execute("SELECT name FROM t")]))


def hold_the_writer(committer: GroupCommitter) -> tuple[gevent.Greenlet, threading.Event]:
    """A unit that keeps the writer thread inside its transaction until released, so
    that everything submitted meanwhile lands in the next batch, together."""
    running, release = threading.Event(), threading.Event()

    def work(connection: apsw.Connection) -> None:
        running.set()
        release.wait(10)
        insert("holder")(connection)

    holder = gevent.spawn(committer.submit, work)
    while not running.is_set():  # a condition polled, not a guess at timing
        gevent.sleep(0.001)
    return holder, release


def test_a_checkpoint_in_a_batch_runs_before_its_transaction_and_the_rest_commit(
    committer: GroupCommitter,
) -> None:
    """finish_checkpoint (see tests/unit/test_wal_restart.py) submitted together with
    writes: one batch, the checkpoint outside the transaction (inside one, SQLite would
    refuse it), the writes committed together, each submitter given its own outcome."""
    before = committer.commits
    holder, release = hold_the_writer(committer)
    checkpoint = gevent.spawn(committer.finish_checkpoint)
    writes = [gevent.spawn(committer.submit, insert(f"w{n}")) for n in range(5)]
    gevent.sleep(0.05)  # every unit is queued behind the holder
    release.set()
    gevent.joinall([holder, checkpoint, *writes], raise_error=True)
    frames, copied = checkpoint.value
    assert frames == copied  # every frame copied: no reader held any back
    assert [write.value for write in writes] == [None] * 5
    assert committer.commits == before + 2  # the holder's batch, then all five together
    assert names(committer) == ["holder", "w0", "w1", "w2", "w3", "w4"]


@pytest.mark.parametrize("batched", [False, True], ids=["callables", "batch-function"])
def test_a_statement_that_fills_the_disk_fails_its_batch_and_the_writer_goes_on(
    committer: GroupCommitter, batched: bool
) -> None:
    """Issue 7 item 6: when SQLite rolls the whole transaction back under a unit, every
    unit of the batch gets the error (their clients get 451 4.3.0), nothing of theirs is
    stored, and the next batch commits normally. Whatever SQLite undoes (the statement
    or the whole transaction), each unit's answer matches what is stored."""
    holder, release = hold_the_writer(committer)
    big = 5 * ROOM_PAGES * 4096
    submit: Callable[[str, int], Any]
    if batched:
        submit = lambda name, size: committer.submit_item(insert_items, (name, size))  # noqa: E731
    else:
        submit = lambda name, size: committer.submit(insert(name, size))  # noqa: E731
    small, too_big = gevent.spawn(submit, "small", 10), gevent.spawn(submit, "big", big)
    gevent.sleep(0)  # both are submitted before the holder's batch ends
    release.set()
    holder.get(timeout=10)
    for unit in (small, too_big):
        unit.join(timeout=10)
        assert unit.ready(), "the writer thread died: no answer"
    assert isinstance(too_big.exception, apsw.FullError), too_big.exception
    if not batched:
        # Here SQLite lost the whole transaction (the case that killed the thread).
        assert isinstance(small.exception, apsw.FullError), small.exception
    stored = names(committer)
    assert ("small" in stored) == small.successful()
    assert "big" not in stored
    assert not committer.done.ready()
    committer.submit(insert("after"))
    assert names(committer) == sorted(
        ["after", "holder", *(["small"] if small.successful() else [])]
    )


def test_one_failing_unit_does_not_spoil_the_others(committer: GroupCommitter) -> None:
    holder, release = hold_the_writer(committer)

    def broken(connection: apsw.Connection) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")

    good, bad = (
        gevent.spawn(committer.submit, insert("good")),
        gevent.spawn(committer.submit, broken),
    )
    gevent.sleep(0)
    release.set()
    holder.get(timeout=10)
    good.get(timeout=10)
    bad.join(timeout=10)
    assert isinstance(bad.exception, apsw.SQLError)
    assert names(committer) == ["good", "holder"]


def test_stop_reports_a_writer_that_does_not_finish(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite")
    writer = GroupCommitter(path)
    blocker = db.connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    waiting = gevent.spawn(writer.submit, lambda c: c.execute("DELETE FROM domains"))
    gevent.sleep(0)  # submitted; the thread waits on the lock whether it began or not
    assert writer.stop(timeout=0.05) is False
    blocker.execute("ROLLBACK")
    waiting.get(timeout=10)
    assert writer.stop(timeout=10) is True


def test_items_gathered_in_one_pass_of_the_loop_share_one_commit(
    committer: GroupCommitter,
) -> None:
    """A Maildir batch answers all its deliveries at once; each records its results.
    Gathered, they reach the idle writer together: one transaction, not one each (the
    thread would otherwise take the first before the others are submitted)."""
    answered = gevent.event.Event()

    def record(number: int) -> None:
        answered.wait()
        time.sleep(0.002)  # work that lets the writer thread run (logging, a syscall)
        committer.submit_gathered(insert_items, (f"r{number}", 10))

    greenlets = [gevent.spawn(record, number) for number in range(30)]
    gevent.sleep(0.05)
    before = committer.commits
    answered.set()
    gevent.joinall(greenlets, raise_error=True, timeout=10)
    assert committer.commits == before + 1
    assert names(committer) == sorted(f"r{number}" for number in range(30))


def test_gathered_items_fail_alone_and_refuse_after_stop(committer: GroupCommitter) -> None:
    """A bad item of a gathered group fails alone (savepoint retry), like submit_item;
    after stop, submitting raises instead of waiting for a thread that is gone."""

    def record(item: Any) -> Exception | None:
        try:
            committer.submit_gathered(insert_items, item)
        except Exception as error:
            return error
        return None

    bad = ("b", object())  # cannot be bound: the statement fails
    greenlets = [gevent.spawn(record, item) for item in [("a", 1), bad, ("c", 1)]]
    outcomes = [g.get(timeout=10) for g in greenlets]
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], Exception)
    assert names(committer) == ["a", "c"]
    committer.stop(timeout=10)
    with pytest.raises(db.DatabaseError):
        committer.submit_gathered(insert_items, ("d", 1))


# Run in a process of its own: the server monkey-patches gevent (cli.serve), and only
# then is the writer thread's Event built on gevent locks, which a loop callback cannot
# wait for. This test process is not patched.
GATHERED_ONE_BY_ONE = """
import sys
from gevent import monkey

monkey.patch_all()
import gevent

from gsmtp import db
from gsmtp.writer import GroupCommitter, ThreadReader


def insert_names(connection, items):
    db.execute_values(connection, "INSERT INTO t SELECT column1 FROM (VALUES {values})", items)


db.connect(sys.argv[1]).execute("CREATE TABLE t(name TEXT)")
committer = GroupCommitter(sys.argv[1])
with gevent.Timeout(30, SystemExit("a gathered item was never committed")):
    for number in range(300):
        committer.submit_gathered(insert_names, (f"g{number}",))
print(committer.submit(lambda connection: db.scalar(connection, "SELECT count(*) FROM t")))
committer.stop(timeout=10)
"""


def test_each_gathered_item_wakes_the_writer_however_the_thread_stands(tmp_path: Path) -> None:
    """One item at a time, as the queue manager records a suspended batch: each is
    committed on its own. Waking the thread may have to wait for its Event's lock (the
    thread takes it going to sleep); handed over from a loop callback, that wait raised
    BlockingSwitchOutError now and then, the thread slept on with the item, and its
    submitter waited for good. Many rounds: each meets the thread at another point of
    its loop."""
    done = subprocess.run(
        [sys.executable, "-c", GATHERED_ONE_BY_ONE, str(tmp_path / "spool.sqlite")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "300"), done.stderr[-2000:]


def test_reads_that_arrive_while_the_reader_is_busy_share_one_transaction(
    committer: GroupCommitter, tmp_path: Path
) -> None:
    """Body loads submitted while the reader thread is busy run together, in one read
    transaction (one snapshot); the transaction ends with the batch, so the next read
    sees what was committed meanwhile; a failing read spoils none of the others; a
    checkpoint runs alone, outside any transaction."""
    reader = ThreadReader(str(tmp_path / "spool.sqlite"))
    try:
        committer.submit(insert("before"))
        release = threading.Event()
        reader_busy = threading.Event()

        def hold(connection: apsw.Connection) -> None:
            reader_busy.set()
            release.wait(10)

        def look(connection: apsw.Connection) -> tuple[bool, int]:
            in_transaction = not connection.get_autocommit()
            return in_transaction, db.scalar(connection, "SELECT COUNT(*) FROM t")

        def broken(connection: apsw.Connection) -> None:
            connection.execute("SELECT * FROM no_such_table")

        first = gevent.spawn(reader.run, hold)
        while not reader_busy.is_set():
            gevent.sleep(0.001)
        gathered = [gevent.spawn(reader.run, look) for _ in range(5)]
        failing = gevent.spawn(reader.run, broken)
        gevent.sleep(0.01)  # all submitted while `hold` runs
        committer.submit(insert("meanwhile"))
        release.set()
        gevent.joinall([first, *gathered, failing], timeout=10)
        outcomes = [greenlet.get() for greenlet in gathered]
        assert all(in_transaction for in_transaction, _ in outcomes)
        assert len({count for _, count in outcomes}) == 1  # one snapshot for all five
        assert isinstance(failing.exception, apsw.SQLError)
        assert reader.run(look)[1] == 2  # the snapshot went with its batch
        reader.checkpoint()
        assert reader.run(lambda connection: connection.get_autocommit()) is False
        assert reader.progress.outstanding == 0
    finally:
        reader.close()


def test_a_stopped_reader_refuses_reads(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite")
    db.connect(path).execute("CREATE TABLE t(name TEXT)")
    reader = ThreadReader(path)
    assert reader.run(lambda connection: db.scalar(connection, "SELECT COUNT(*) FROM t")) == 0
    reader.close()
    assert reader.done.ready() and reader.done.successful()
    with pytest.raises(db.DatabaseError, match="stopped"):
        reader.run(lambda connection: None)
