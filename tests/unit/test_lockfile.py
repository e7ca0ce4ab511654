"""The single-instance lock: flock on `<spool>.lock`, the holder's PID inside."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
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
        f" exited; they did not finish their stop in time (lock {path}, held by PID"
        f" {os.getpid()})"
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
            f" for them to finish their stop (lock {path}, held by PID {os.getpid()})"
        )
        Path(path).write_text(f"{unrelated.pid}\n")  # a file of an older gsmtp: no start
        assert not lockfile.exited(lockfile.HeldBy(path, unrelated.pid))
    finally:
        unrelated.kill()
        unrelated.wait()
        lock.release()


def own_start() -> str:
    """This process's start, as /proc/self/stat gives it (clock ticks after boot)."""
    return start_of(os.getpid())


def start_of(pid: int) -> str:
    """The start of process `pid`, as /proc/<pid>/stat gives it (clock ticks after boot)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


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
            env=_environment(),
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


# Runs in a mount namespace where /proc/locks cannot be read (a unix socket's file bound
# over it: opening that fails with ENXIO), as behind a container runtime hiding it: asks
# lockfile.holder and queue_control.wake_server about the spool (argv[1]); prints both.
HIDDEN_PROC_LOCKS = """
import sys
from gsmtp import lockfile, queue_control
try:
    open("/proc/locks").close()
except OSError:
    pass
else:
    sys.exit("/proc/locks is readable: not hidden")
try:
    print(lockfile.holder(lockfile.lock_path(sys.argv[1])))
except lockfile.HolderUnverified as unverified:
    print("unverified", unverified.pid)
print(queue_control.wake_server(sys.argv[1]))
"""

# A server's part: takes the lock of the spool argv[1] names, says so, and waits, with
# SIGUSR1's default action (it ends the process: a signal sent is seen).
HOLDER = """
import sys, time
from gsmtp import lockfile
lock = lockfile.acquire(lockfile.lock_path(sys.argv[1]))
assert isinstance(lock, lockfile.InstanceLock), lock
print("held", flush=True)
time.sleep(60)
"""


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _hold(spool: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, spool], stdout=subprocess.PIPE, text=True, env=_environment()
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def _without_proc_locks(
    directory: Path, spool: str, *user: str
) -> subprocess.CompletedProcess[str]:
    """HIDDEN_PROC_LOCKS for `spool` in a new mount namespace, as `user` (setpriv
    options) if given; skips where this machine cannot make one."""
    hider = directory / "hide.sock"
    hider.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(hider))
    script = 'mount --bind "$1" /proc/locks && shift && exec "$@"'
    command = [sys.executable, "-c", HIDDEN_PROC_LOCKS, spool]
    if user:
        command = ["setpriv", *user, "--", *command]
    result = _in_mount_namespace("cannot hide /proc/locks here", script, str(hider), *command)
    assert result.returncode == 0, result.stderr
    return result


def _in_mount_namespace(why: str, script: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """The shell `script` with `arguments` in a new mount namespace; skips, saying `why`,
    where this machine cannot make one or mount in it."""
    result = subprocess.run(
        ["unshare", "-m", "--", "sh", "-c", script, "sh", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env=_environment(),
    )
    if result.returncode != 0 and ("unshare" in result.stderr or "mount" in result.stderr):
        pytest.skip(f"{why}: {result.stderr.strip()}")
    return result


def _stop(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()


def test_with_proc_locks_hidden_only_the_holder_is_signalled(tmp_path: Path) -> None:
    """Red-team finding (issue 8): where /proc/locks cannot be read, the CLI tested only
    that *someone* held the lock and signalled whatever PID the file named: whoever
    could write the lock file had `gsmtp queue flush` send SIGUSR1 (default action:
    terminate) to a process of their choice. The named process's own descriptors
    (/proc/<pid>/fdinfo) now tell whether it holds the lock."""
    spool = str(tmp_path / "spool.sqlite")
    holder = _hold(spool)
    planted = subprocess.Popen(["sleep", "60"])
    try:
        # The file names the real holder: confirmed through its fdinfo, and signalled.
        seen = _without_proc_locks(tmp_path, spool).stdout.splitlines()
        assert seen[0] == str(holder.pid)
        assert seen[1] == f"Woken(pid={holder.pid})"
        assert holder.wait(timeout=10) == -signal.SIGUSR1
        holder = _hold(spool)
        # The lock held, its file now naming an unrelated live process (with that
        # process's own start, so it does not count as exited): nobody is signalled.
        Path(lockfile.lock_path(spool)).write_text(f"{planted.pid}\n{start_of(planted.pid)}\n")
        seen = _without_proc_locks(tmp_path, spool).stdout.splitlines()
        assert seen[0] == "None"
        assert "running=False" in seen[1]
        time.sleep(0.2)
        assert planted.poll() is None, "the planted process was signalled"
    finally:
        _stop(planted)
        _stop(holder)


def test_with_nothing_to_confirm_the_holder_the_server_is_not_signalled() -> None:
    """Where neither /proc/locks nor the named process's fdinfo can be read (another
    user's process), a held lock's PID cannot be confirmed: not signalled, and the CLI
    says why instead of "no server"."""
    directory = Path(tempfile.mkdtemp(dir="/tmp"))  # nobody must reach the lock file
    try:
        directory.chmod(0o755)
        spool = str(directory / "spool.sqlite")
        nobody = ("--reuid=65534", "--regid=65534", "--clear-groups")
        probe = subprocess.run(
            ["setpriv", *nobody, "--", sys.executable, "-c", "import gsmtp.lockfile"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_environment(),
        )
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot run this checkout's Python: {probe.stderr.strip()}")
        holder = _hold(spool)
        try:
            os.chmod(lockfile.lock_path(spool), 0o644)
            seen = _without_proc_locks(directory, spool, *nobody).stdout.splitlines()
            assert seen[0] == f"unverified {holder.pid}"
            assert "running=True" in seen[1] and f"/proc/{holder.pid}/fdinfo" in seen[1]
            time.sleep(0.2)
            assert holder.poll() is None, "the holder was signalled"
        finally:
            _stop(holder)
    finally:
        shutil.rmtree(directory)


# In a mount namespace: two fresh tmpfs give their first files the same inode number. A
# server's lock on one, and on the other an flock of another process that the lock file
# is made to name; prints what lockfile.holder says.
SAME_INODE_ELSEWHERE = r"""
set -e
a="$1/a"; b="$1/b"; python="$2"
mkdir -p "$a" "$b"
mount -t tmpfs tmpfs "$a"
mount -t tmpfs tmpfs "$b"
touch "$a/spool.sqlite.lock" "$b/other.lock"
first=$(stat -c %i "$a/spool.sqlite.lock")
[ "$first" = "$(stat -c %i "$b/other.lock")" ] || { echo "inodes differ"; exit 3; }
hold='import fcntl, os, sys, time
fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_SH)
time.sleep(60)'
"$python" -c "$hold" "$a/spool.sqlite.lock" >/dev/null 2>&1 &
server=$!
"$python" -c "$hold" "$b/other.lock" >/dev/null 2>&1 &
victim=$!
sleep 0.5
echo "$victim" > "$a/spool.sqlite.lock"
echo "victim $victim"
ask='import sys; from gsmtp import lockfile; print(lockfile.holder(sys.argv[1]))'
"$python" -c "$ask" "$a/spool.sqlite.lock"
kill "$server" "$victim"
"""


def test_an_flock_on_another_file_with_the_same_inode_number_is_not_the_servers(
    tmp_path: Path,
) -> None:
    """Red-team finding: the holder was recognised by the inode number alone (in
    /proc/locks, then in the fdinfo lock lines), so a process holding an flock on a file
    of another file system with the same number, named in the lock file, was signalled
    by `gsmtp queue flush`. The descriptor must be open on this very file (its device
    and inode, through /proc/<pid>/fd)."""
    result = _in_mount_namespace(
        "cannot mount two tmpfs here", SAME_INODE_ELSEWHERE, str(tmp_path), sys.executable
    )
    if result.returncode == 3:
        pytest.skip("the two tmpfs gave their files different inode numbers")
    assert result.returncode == 0, result.stderr
    victim, answer = result.stdout.splitlines()
    assert victim.startswith("victim ") and answer == "None"


def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_names_nobody(
    tmp_path: Path,
) -> None:
    """Red-team finding: a directory in the lock file's place made `gsmtp queue flush`
    end in a traceback (IsADirectoryError), and a FIFO made it hang on its open."""
    path = tmp_path / "spool.sqlite.lock"
    os.mkfifo(path)
    with pytest.raises(OSError, match="not a regular file"):
        lockfile.acquire(str(path))
    assert lockfile.holder(str(path)) is None
    path.unlink()
    path.mkdir()
    with pytest.raises(OSError):
        lockfile.acquire(str(path))
    assert lockfile.holder(str(path)) is None
