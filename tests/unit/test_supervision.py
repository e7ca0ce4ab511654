"""Owners notice deaths: greenlets, threads, stalls, health checks, housekeeping rounds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gevent
from gevent.threadpool import ThreadPool
from prometheus_client import REGISTRY

from gsmtp import db
from gsmtp.housekeeping import Housekeeping, Task
from gsmtp.supervision import Progress, Supervisor, stop_thread_pools
from gsmtp.writer import GroupCommitter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def errors_counted(where: str) -> float:
    return REGISTRY.get_sample_value("gsmtp_internal_errors_total", {"where": where}) or 0.0


def test_a_greenlet_that_raises_is_a_death_logged_and_counted() -> None:
    supervisor = Supervisor()
    before = errors_counted("housekeeping")

    def broken() -> None:
        gevent.sleep(0)
        raise RuntimeError("a bug")

    supervisor.spawn("housekeeping", broken)
    assert supervisor.died.wait(timeout=10)
    assert supervisor.death is not None
    assert supervisor.death.component == "housekeeping"
    assert supervisor.death.reason == "RuntimeError: a bug"
    assert errors_counted("housekeeping") == before + 1


def test_a_long_lived_loop_that_returns_is_a_death_too() -> None:
    supervisor = Supervisor()
    supervisor.spawn("sweeper", lambda: None)
    assert supervisor.died.wait(timeout=10)
    assert supervisor.death is not None and supervisor.death.component == "sweeper"


def test_ends_after_stop_are_expected() -> None:
    supervisor = Supervisor()
    greenlet = supervisor.spawn("sweeper", gevent.sleep, 60)
    supervisor.stop()
    greenlet.kill()
    gevent.sleep(0.01)
    assert not supervisor.died.is_set()


def test_a_thread_that_dies_is_a_death() -> None:
    supervisor = Supervisor()
    pool = ThreadPool(1)

    def thread_loop() -> None:
        raise OSError("the thread's bug")

    supervisor.watch_thread("writer", pool.spawn(thread_loop))
    assert supervisor.died.wait(timeout=10)
    assert supervisor.death is not None
    assert supervisor.death.component == "writer"
    assert "OSError" in supervisor.death.reason
    pool.kill()


def test_a_failed_health_check_is_a_death() -> None:
    supervisor = Supervisor()
    state = {"problem": None}
    supervisor.watch_health("listener", lambda: state["problem"])
    supervisor.check()
    assert supervisor.death is None
    state["problem"] = "listener 127.0.0.1:25 stopped accepting"
    supervisor.check()
    assert supervisor.death is not None
    assert supervisor.death.reason == "listener 127.0.0.1:25 stopped accepting"


def test_progress_counts_only_while_work_is_pending() -> None:
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 500
    assert progress.stalled_for(clock()) == 0.0  # idle is not stalled
    progress.begin()
    clock.now += 10
    progress.begin()
    clock.now += 5
    assert progress.stalled_for(clock()) == 15.0
    progress.end()
    clock.now += 1
    assert progress.stalled_for(clock()) == 1.0
    progress.end()
    assert progress.stalled_for(clock() + 100) == 0.0


def test_a_writer_blocked_with_work_pending_counts_as_dead(tmp_path: Path) -> None:
    """The writer's thread is really blocked (another connection holds the write lock);
    the clock is injected, so 60 s pass at once. Its submitter is not answered: no 451
    for a commit whose outcome the server cannot know; the process then exits."""
    clock = FakeClock()
    path = str(tmp_path / "spool.sqlite")
    writer = GroupCommitter(path, clock=clock)
    supervisor = Supervisor(clock=clock)
    supervisor.watch_progress("writer", writer.progress, limit=60)
    clock.now += 3600
    supervisor.check()
    assert supervisor.death is None, "an idle writer is not a stalled one"

    blocker = db.connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    waiting = gevent.spawn(writer.submit, lambda c: c.execute("DELETE FROM domains"))
    gevent.sleep(0)
    assert writer.progress.outstanding == 1
    clock.now += 59
    supervisor.check()
    assert supervisor.death is None
    clock.now += 2
    supervisor.check()
    assert supervisor.death is not None
    assert supervisor.death.component == "writer"
    assert "no progress for 61s" in supervisor.death.reason
    assert not waiting.ready()

    blocker.execute("ROLLBACK")
    waiting.get(timeout=10)
    assert writer.stop(timeout=10)


class _Boom(Exception):
    pass


def test_housekeeping_survives_expected_errors_and_runs_every_task() -> None:
    clock = FakeClock()
    calls: list[str] = []
    failures = iter([OSError("no space left on device"), None])

    def flaky() -> None:
        calls.append("flaky")
        failure = next(failures)
        if failure is not None:
            raise failure

    housekeeping = Housekeeping(
        [Task("flaky", 1.0, flaky), Task("steady", 1.0, lambda: calls.append("steady"))],
        tick=0.1,
        clock=clock,
    )
    before = errors_counted("housekeeping")
    clock.now += 1
    housekeeping.run_due()
    assert calls == ["flaky", "steady"]
    assert errors_counted("housekeeping") == before + 1
    clock.now += 0.5
    housekeeping.run_due()
    assert calls == ["flaky", "steady"], "not due yet"
    clock.now += 0.5
    housekeeping.run_due()
    assert calls == ["flaky", "steady", "flaky", "steady"]


def test_a_bug_in_housekeeping_ends_its_loop_and_its_owner_notices() -> None:
    def buggy() -> None:
        raise _Boom("not an expected error")

    housekeeping = Housekeeping([Task("buggy", 0.0, buggy)], tick=0.001)
    supervisor = Supervisor()
    supervisor.spawn("housekeeping", housekeeping.run)
    assert supervisor.died.wait(timeout=10)
    assert supervisor.death is not None
    assert supervisor.death.component == "housekeeping"
    assert supervisor.death.reason == "_Boom: not an expected error"


def test_the_checker_runs_by_itself() -> None:
    clock = FakeClock()
    progress = Progress(clock)
    supervisor = Supervisor(clock=clock, check_seconds=0.001)
    supervisor.watch_progress("maildir", progress, limit=0.5)
    supervisor.start()
    progress.begin()
    clock.now += 1
    assert supervisor.died.wait(timeout=10)
    assert supervisor.death is not None and supervisor.death.component == "maildir"
    supervisor.stop()


def test_thread_pools_stop_within_the_time_given_even_with_a_task_hung() -> None:
    """ThreadPool.kill alone waits for a running task without a limit (a Maildir write
    on a hung disk would hold the stop past its deadline)."""
    release = threading.Event()
    hung, idle = ThreadPool(1), ThreadPool(2)
    hung.spawn(release.wait, 30)
    idle.spawn(lambda: None).get()
    gevent.sleep(0.05)
    started = time.monotonic()
    try:
        left = stop_thread_pools({"maildir": hung, "dkim": idle}, 0.3)
        took = time.monotonic() - started
    finally:
        release.set()
    assert left == ["maildir"]
    assert took < 5  # bounded by the timeout, not by the hung task (30 s)
    assert idle.size == 0  # the idle pool did stop
    stop_thread_pools({"maildir": hung}, 5)
    assert hung.size == 0
