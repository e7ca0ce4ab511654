"""The single-instance lock: flock on `<spool>.lock`, the holder's PID inside."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gsmtp import lockfile, workers


def test_the_second_taker_learns_the_holders_pid(tmp_path: Path) -> None:
    path = lockfile.lock_path(str(tmp_path / "var" / "spool.sqlite"))
    first = lockfile.acquire(path)
    assert isinstance(first, lockfile.InstanceLock)
    assert Path(path).read_text().splitlines() == [str(os.getpid()), own_start()]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # flock belongs to the open file description: a second open conflicts even here.
    second = lockfile.acquire(path)
    assert second == lockfile.HeldBy(path, os.getpid())
    first.release()
    third = lockfile.acquire(path)
    assert isinstance(third, lockfile.InstanceLock)
    third.release()


def test_a_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.sqlite.lock")
    Path(path).write_text("999999\n")  # left by a server that was killed
    lock = lockfile.acquire(path)
    assert isinstance(lock, lockfile.InstanceLock)
    assert Path(path).read_text().splitlines() == [str(os.getpid()), own_start()]
    lock.release()


def test_the_lock_is_the_real_files_whatever_name_reaches_it(tmp_path: Path) -> None:
    """Red-team finding: keyed on the path string, a second server reaching the same
    database through a symlink (to the file, or to its directory) took a lock of its
    own and delivered the same recipients as the first."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "spool.sqlite").write_bytes(b"")
    (tmp_path / "linked-file.sqlite").symlink_to(real / "spool.sqlite")
    (tmp_path / "linked-dir").symlink_to(real)
    names = [
        str(real / "spool.sqlite"),
        str(tmp_path / "linked-file.sqlite"),
        str(tmp_path / "linked-dir" / "spool.sqlite"),
    ]
    paths = {lockfile.lock_path(name) for name in names}
    assert paths == {os.path.realpath(real / "spool.sqlite") + ".lock"}
    first = lockfile.acquire(lockfile.lock_path(names[0]))
    assert isinstance(first, lockfile.InstanceLock)
    for name in names[1:]:
        assert lockfile.acquire(lockfile.lock_path(name)) == lockfile.HeldBy(
            first.path, os.getpid()
        )
    first.release()
    # A spool not made yet, reached through a symlinked directory: the same rule.
    assert lockfile.lock_path(str(tmp_path / "linked-dir" / "new.sqlite")) == (
        os.path.realpath(real / "new.sqlite") + ".lock"
    )


def _held_for_an_exited_pid(path: str) -> tuple[lockfile.InstanceLock, int]:
    """The lock as a killed supervisor leaves it: still held (here by an open file
    description of this process, standing for the workers that inherited it), the file
    naming a PID that has exited and been reaped."""
    lock = lockfile.acquire(path)
    assert isinstance(lock, lockfile.InstanceLock)
    exited = subprocess.Popen(["true"])
    exited.wait()
    Path(path).write_text(f"{exited.pid}\n")  # a new description: the flock stays
    return lock, exited.pid


def test_a_lock_held_for_an_exited_pid_is_waited_for_and_then_taken(tmp_path: Path) -> None:
    """Red-team finding: after a kill -9 of the supervisor, its workers (worker 0 holds
    the node lock it inherited) stop within their grace, and a new `serve` meanwhile
    was refused at once, naming the dead PID. Now it waits for them."""
    path = str(tmp_path / "spool.sqlite.lock")
    held, dead = _held_for_an_exited_pid(path)
    told: list[lockfile.HeldBy] = []
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            held.release()  # the last orphaned worker ends

    lock = lockfile.acquire_after_exited_holder(path, 30.0, waiting=told.append, sleep=nap)
    assert isinstance(lock, lockfile.InstanceLock)
    assert told == [lockfile.HeldBy(path, dead)] and len(naps) == 3
    assert Path(path).read_text().splitlines() == [str(os.getpid()), own_start()]
    lock.release()


def test_a_live_holder_is_refused_at_once_and_an_exited_one_after_the_wait(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "spool.sqlite.lock")
    live = lockfile.acquire(path)
    assert isinstance(live, lockfile.InstanceLock)
    told: list[lockfile.HeldBy] = []
    refused = lockfile.acquire_after_exited_holder(
        path, 30.0, waiting=told.append, sleep=lambda _: None
    )
    assert refused == lockfile.HeldBy(path, os.getpid()) and told == []
    assert not lockfile.exited(refused)
    live.release()

    held, dead = _held_for_an_exited_pid(path)
    ticks = iter(range(100))
    refused = lockfile.acquire_after_exited_holder(
        path, 5.0, waiting=told.append, sleep=lambda _: None, clock=lambda: float(next(ticks))
    )
    assert refused == lockfile.HeldBy(path, dead) and len(told) == 1
    assert lockfile.already_served("spool.sqlite", path, refused) == (
        f"gsmtp: spool spool.sqlite is still served by the workers of PID {dead}, which has"
        f" exited; they did not finish their stop in time (lock {path})"
    )
    held.release()


def test_a_supervisor_waits_for_a_shard_an_earlier_worker_still_holds(tmp_path: Path) -> None:
    """With the node lock taken, shard k's lock can only be an earlier node's worker k
    still stopping: waited for until the deadline (a worker forked while it is held
    would fail the start), then named."""
    spool = str(tmp_path / "spool.sqlite")
    (tmp_path / "spool-1.sqlite").write_bytes(b"")
    shard_lock = lockfile.acquire(lockfile.lock_path(str(tmp_path / "spool-1.sqlite")))
    assert isinstance(shard_lock, lockfile.InstanceLock)
    refusal = workers.wait_for_draining_shards(spool, time.monotonic())
    assert refusal == (
        f"gsmtp: shard {tmp_path / 'spool-1.sqlite'} is still served by PID {os.getpid()},"
        f" a worker of an earlier server still stopping (lock {shard_lock.path})"
    )
    threading.Timer(0.3, shard_lock.release).start()
    assert workers.wait_for_draining_shards(spool, time.monotonic() + 10) is None
    assert lockfile.holder(shard_lock.path) is None


def test_a_server_that_takes_the_lock_during_the_wait_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """Red-team finding: two serves started together after a kill -9 of the supervisor;
    the one that lost polled on until its deadline (and could start later beside
    nobody's knowledge). Now a live holder seen during the wait is refused at once."""
    path = str(tmp_path / "spool.sqlite.lock")
    held, _ = _held_for_an_exited_pid(path)
    winner: list[lockfile.InstanceLock | lockfile.HeldBy] = []
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            held.release()
            winner.append(lockfile.acquire(path))  # the other serve, live

    refused = lockfile.acquire_after_exited_holder(path, 30.0, waiting=lambda _: None, sleep=nap)
    assert refused == lockfile.HeldBy(path, os.getpid()) and len(naps) == 2
    assert isinstance(winner[0], lockfile.InstanceLock)
    winner[0].release()


def test_a_pid_now_naming_another_process_counts_as_exited(tmp_path: Path) -> None:
    """Red-team finding: the dead supervisor's PID given to an unrelated process made a
    restart exit 2 naming it, and `gsmtp queue flush` signalled it (SIGUSR1 killed it).
    The lock file records its writer's start (clock ticks after boot, immune to the
    wall clock): a process with that PID and another start is not the writer."""
    path = str(tmp_path / "spool.sqlite.lock")
    lock = lockfile.acquire(path)
    assert isinstance(lock, lockfile.InstanceLock)
    holder = lockfile.acquire(path)
    assert isinstance(holder, lockfile.HeldBy) and holder.started == int(own_start())
    assert not lockfile.exited(holder)  # the writer itself
    assert lockfile.holder(path) == os.getpid()
    unrelated = subprocess.Popen(["sleep", "30"])
    try:
        Path(path).write_text(f"{unrelated.pid}\n{own_start()}\n")  # its PID, our start
        reused = lockfile.HeldBy(path, unrelated.pid, int(own_start()))
        assert lockfile.exited(reused)
        assert lockfile.holder(path) is None  # nothing for the CLI to signal
        assert lockfile.waiting_for_orphans("spool.sqlite", path, reused, 8.0) == (
            f"gsmtp: spool spool.sqlite is still served by the workers of PID {unrelated.pid},"
            " which has exited (that number now names another process); waiting up to 8 s"
            f" for them to finish their stop (lock {path})"
        )
        Path(path).write_text(f"{unrelated.pid}\n")  # a file of an older gsmtp: no start
        assert not lockfile.exited(lockfile.HeldBy(path, unrelated.pid))
    finally:
        unrelated.kill()
        unrelated.wait()
        lock.release()


def own_start() -> str:
    """This process's start, as /proc/self/stat gives it (clock ticks after boot)."""
    return Path(f"/proc/{os.getpid()}/stat").read_text().rpartition(")")[2].split()[19]


def test_a_live_holder_seen_from_another_time_namespace_is_not_taken_for_gone(
    tmp_path: Path,
) -> None:
    """Red-team finding: in another time namespace (`unshare -T`), /proc/PID/stat's
    start is shifted by the boottime offset, and a live server was taken as exited."""
    path = str(tmp_path / "spool.sqlite.lock")
    lock = lockfile.acquire(path)
    assert isinstance(lock, lockfile.InstanceLock)
    check = (
        "import sys; from gsmtp import lockfile; "
        "held = lockfile.acquire(sys.argv[1]); print(held.pid, lockfile.exited(held))"
    )
    try:
        shifted = subprocess.run(
            ["unshare", "-T", "--boottime", "100000", "--", sys.executable, "-c", check, path],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        if shifted.returncode != 0 and "unshare" in shifted.stderr:
            pytest.skip(f"no time namespace here: {shifted.stderr.strip()}")
        assert shifted.stdout.split() == [str(os.getpid()), "False"], shifted.stderr
    finally:
        lock.release()


@pytest.mark.parametrize("first_line", ["0", "4194304", "99999999999", "12ab", ""])
def test_a_lock_file_no_process_could_have_written_is_refused_at_once(
    tmp_path: Path, first_line: str
) -> None:
    """Red-team leftover: a lock file edited by hand (PID 0, a number no Linux hands out)
    made a second serve wait out the orphans' grace before refusing a live server."""
    path = str(tmp_path / "spool.sqlite.lock")
    live = lockfile.acquire(path)
    assert isinstance(live, lockfile.InstanceLock)
    Path(path).write_text(f"{first_line}\n")
    told: list[lockfile.HeldBy] = []
    refused = lockfile.acquire_after_exited_holder(
        path, 30.0, waiting=told.append, sleep=lambda _: pytest.fail("waited")
    )
    assert refused == lockfile.HeldBy(path, None) and told == []
    assert lockfile.already_served("spool.sqlite", path, refused) == (
        f"gsmtp: spool spool.sqlite is already served by another process (lock {path})"
    )
    live.release()


def test_a_pid_above_the_current_pid_max_still_names_its_process(tmp_path: Path) -> None:
    """Red-team finding: lowering /proc/sys/kernel/pid_max leaves running processes with
    higher PIDs; a lock file naming one was taken for nobody, so the restart after a
    kill -9 of such a supervisor was refused instead of waiting for its workers. Only
    numbers no Linux hands out (PID_MAX_LIMIT, 2^22) name nobody."""
    path = str(tmp_path / "spool.sqlite.lock")
    live = lockfile.acquire(path)
    assert isinstance(live, lockfile.InstanceLock)
    highest = lockfile.PID_CEILING - 1
    Path(path).write_text(f"{highest}\n")
    held = lockfile.acquire(path)
    assert held == lockfile.HeldBy(path, highest)
    live.release()
