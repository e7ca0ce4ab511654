"""The WAL starts again from its beginning under steady writes (issue 8, the 100 KiB
cell): the reader thread's checkpoints copy the frames, and the writer finishes the
checkpoint between two batches so that its next commit restarts the WAL.

Real SQLite files, the real writer and reader threads. The WAL's length is read from
what a checkpoint reports (frames in the WAL): a restarted WAL holds only the frames of
the commits since.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import apsw
import gevent
import pytest
from structlog.testing import capture_logs

from gsmtp import db, spool_upkeep
from gsmtp.diskspace import Ballast, SpaceReserve
from gsmtp.spool import Spool
from gsmtp.spool_upkeep import SpoolUpkeep
from gsmtp.writer import GroupCommitter, ThreadReader

PAGE = 4096


@dataclass
class Threads:
    path: str
    writer: GroupCommitter
    bodies: ThreadReader


@pytest.fixture
def threads(tmp_path: Path) -> Iterator[Threads]:
    path = str(tmp_path / "spool.sqlite")
    db.connect(path).execute("CREATE TABLE t(body BLOB)")
    found = Threads(path, GroupCommitter(path), ThreadReader(path))
    yield found
    assert found.writer.stop(timeout=30)
    found.bodies.close()


def write_pages(writer: GroupCommitter, pages: int) -> None:
    """One commit of a body of `pages` pages (as many WAL frames, and a few more)."""
    writer.submit(lambda c: c.execute("INSERT INTO t VALUES (zeroblob(?))", (pages * PAGE,)))


def wal_frames(threads: Threads) -> int:
    """Frames in the WAL now (a checkpoint reports them; it copies what it can)."""
    frames, _ = threads.bodies.checkpoint()
    return frames


def test_the_next_commit_after_the_writer_finishes_a_checkpoint_restarts_the_wal(
    threads: Threads,
) -> None:
    """A reader's snapshot keeps the reader thread's checkpoint from copying the last
    commit (as the next commits do under load, written while it copies); once the
    snapshot is gone, a commit still appends to the long WAL, unless the writer has
    finished the checkpoint first: then the commit starts the WAL again."""
    outside = db.connect(threads.path)

    def frames_after_a_commit(*, finish: bool) -> int:
        write_pages(threads.writer, 200)
        outside.execute("BEGIN")
        assert outside.execute("SELECT COUNT(*) FROM t").fetchall()  # its snapshot
        write_pages(threads.writer, 50)
        frames, copied = threads.bodies.checkpoint()
        assert frames - copied >= 50  # the commit after the snapshot is not copied
        outside.execute("COMMIT")
        if finish:
            assert threads.writer.finish_checkpoint() == (frames, frames)
        write_pages(threads.writer, 10)
        return wal_frames(threads)

    assert frames_after_a_commit(finish=False) > 250  # appended: the WAL did not restart
    assert frames_after_a_commit(finish=True) < 20  # the 10-page commit alone


@pytest.fixture
def upkeep(threads: Threads) -> SpoolUpkeep:
    ballast = Ballast(threads.path, size=0)
    spool = Spool(threads.writer, db.connect(threads.path), threads.bodies, ballast=ballast)
    reserve = SpaceReserve(threads.path, 0)
    return SpoolUpkeep(
        spool, writer=threads.writer, bodies=threads.bodies, ballast=ballast, reserve=reserve
    )


@pytest.mark.parametrize("restart_frames", [1000, 10**9], ids=["restarts", "control"])
def test_steady_writes_keep_the_wal_short_once_it_is_long_enough_to_restart(
    threads: Threads, upkeep: SpoolUpkeep, monkeypatch: pytest.MonkeyPatch, restart_frames: int
) -> None:
    """Four greenlets commit 64 KiB bodies back to back (the writer always has the next
    batch waiting) while the checkpoint task runs every 20 ms: the WAL restarts each
    time it has reached RESTART_FRAMES and a checkpoint has caught up with it. The
    control (a RESTART_FRAMES never reached: no help from the writer) shows that the
    reader's checkpoints alone let the WAL grow: all 12,000 frames in one WAL."""
    monkeypatch.setattr(spool_upkeep, "RESTART_FRAMES", restart_frames)
    lengths: list[int] = []  # the WAL's frames after each commit, from the writer's hook

    def record(connection: apsw.Connection, name: str, frames: int) -> int:
        lengths.append(frames)
        return apsw.SQLITE_OK

    threads.writer.submit(lambda c: c.set_wal_hook(record))  # (the auto-checkpoint's hook)
    written = 0

    def write() -> None:
        nonlocal written
        while written < 12000:
            write_pages(threads.writer, 16)
            written += 16

    def check() -> None:
        while written < 12000:
            upkeep.checkpoint()
            gevent.sleep(0.02)

    writers = [gevent.spawn(write) for _ in range(4)]
    checker = gevent.spawn(check)
    gevent.joinall([*writers, checker], raise_error=True)
    if restart_frames == 10**9:
        assert max(lengths) > 6000, max(lengths)  # 12,724 here: it never restarted
    else:
        assert max(lengths) < 6000, max(lengths)  # 2,365 to 3,176 here


def test_a_failed_finishing_checkpoint_is_reported_and_the_task_goes_on(
    threads: Threads, upkeep: SpoolUpkeep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of the writer's checkpoint (an I/O error, a full disk) is the
    checkpoint's: logged as checkpoint_failed, the next round tries again."""
    monkeypatch.setattr(spool_upkeep, "RESTART_FRAMES", 10)
    calls = []

    def failing() -> tuple[int, int]:
        calls.append(1)
        raise apsw.IOError("disk I/O error")

    monkeypatch.setattr(threads.writer, "finish_checkpoint", failing)
    with capture_logs() as logs:
        write_pages(threads.writer, 50)
        upkeep.checkpoint()
        write_pages(threads.writer, 50)
        upkeep.checkpoint()
    assert len(calls) == 2
    failed = [entry for entry in logs if entry["event"] == "checkpoint_failed"]
    assert [entry["error"] for entry in failed] == ["disk I/O error"] * 2
