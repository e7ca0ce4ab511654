"""No zombie process: a full disk is survived, the reserve refuses in time and clears when
mail leaves, a dead component ends the process so that systemd restarts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apsw
import pytest

from tests.integration.conftest import Factory
from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment,
    wait_for,
)

MB = 1024 * 1024
LINE = b"x" * 998 + b"\r\n"


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A real, small file system: a tmpfs of the given size (needs root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        directory = tmp_path / f"fs{len(mounted)}"
        directory.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(
                "mounting a tmpfs is not permitted here (needs root with CAP_SYS_ADMIN): "
                + (result.stderr.strip() or f"mount exited {result.returncode}")
            )
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def mail_from(wire: SmtpWire, parameters: str = "") -> str:
    return wire.command(f"MAIL FROM:<a@remote.example>{parameters}")


def send(port: int, size: int, subject: str = "big", timeout: float = 60) -> str:
    """A message of about `size` bytes to jones@foo.com: the reply to MAIL if refused,
    else the reply to the final dot."""
    with SmtpWire(port, timeout=timeout) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        reply = mail_from(wire)
        if not reply.startswith("250"):
            return reply
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(f"Subject: {subject}\r\n\r\n".encode() + LINE * (size // len(LINE)) + b".\r\n")
        return wire.read_reply()[-1]


def disk_free(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def spool_bytes(gsmtp: GsmtpProcess) -> int:
    """The spool's files on disk: the database and its WAL."""
    return sum(
        os.path.getsize(f"{gsmtp.spool_path}{suffix}")
        for suffix in ("", "-wal")
        if os.path.exists(f"{gsmtp.spool_path}{suffix}")
    )


def test_a_message_the_disk_cannot_hold_gets_451_and_the_next_one_250(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """Issue 7 item 6: a write error during a statement rolled the transaction back, the
    writer thread died on `ROLLBACK TO unit`, and no client was ever answered again."""
    disk = small_filesystem("8m")
    gsmtp = gsmtp_factory(
        {
            "spool": {"path": str(disk / "spool.sqlite"), "min_free": "0"},
            "server": {"max_message_size": "20MB"},
        }
    )
    assert send(gsmtp.port, 12 * MB).startswith("451 4.3.0")
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)]
    # The next message is answered, and stored once there is room again: at once, or
    # after a 451 or two while the WAL still holds the refused message's pages (its
    # next checkpoint lets it start over). A dead writer answers nothing: a timeout.
    replies = [send(gsmtp.port, 1000, subject="small", timeout=10)]
    deadline = time.monotonic() + 30
    while not replies[-1].startswith("250 2.0.0") and time.monotonic() < deadline:
        time.sleep(0.2)  # a client's retry after a 451
        replies.append(send(gsmtp.port, 1000, subject="small", timeout=10))
    assert replies[-1].startswith("250 2.0.0"), replies
    assert all(reply.startswith(("250 2.0.0", "451 4.3.0")) for reply in replies), replies
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="the small message delivered")
    gsmtp.signal(signal.SIGTERM)
    assert gsmtp.wait(timeout=15) == 0
    assert "component_died" not in gsmtp.log()


def test_a_disk_filled_by_a_wal_no_checkpoint_could_empty_is_recovered(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """The failing order of the test above, made certain: a reader (this test) pins the
    WAL while a message too large for the disk arrives, so no checkpoint copies any of
    its parts and the WAL fills the disk. Discarding them then needs new WAL frames, and
    a checkpoint needs the database file to grow: both failed with SQLITE_FULL for ever
    (every later message 451) until the server spent its ballast file, shrank the
    database in the discard's own commit and restarted the WAL."""
    disk = small_filesystem("8m")
    gsmtp = gsmtp_factory(
        {
            "spool": {"path": str(disk / "spool.sqlite"), "min_free": "0"},
            "server": {"max_message_size": "20MB"},
        }
    )
    pin = apsw.Connection(str(gsmtp.spool_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        pin.execute("BEGIN")
        assert pin.execute("SELECT COUNT(*) FROM messages").fetchall() == [(0,)]
        assert send(gsmtp.port, 12 * MB).startswith("451 4.3.0")
    finally:
        pin.close()
    # The space comes back by itself (parts discarded, database shrunk, WAL emptied),
    # and mail flows again: every message accepted at once, and delivered.
    wait_for(lambda: disk_free(disk) > 4 * MB, what="the disk's space given back", timeout=30)
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM body_parts") == [(0,)]
    for _ in range(5):
        assert send(gsmtp.port, 1000, subject="small", timeout=10).startswith("250 2.0.0")
    wait_for(
        lambda: len(gsmtp.maildir_files("jones@foo.com")) == 5, what="the small messages delivered"
    )
    gsmtp.signal(signal.SIGTERM)
    assert gsmtp.wait(timeout=15) == 0
    log = gsmtp.log()
    assert "component_died" not in log
    assert "Traceback" not in log


def test_a_ballast_a_start_could_not_make_is_made_later_without_cutting_the_wal_meanwhile(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """Red-team finding: a start on a disk with too little room for the ballast file
    (spool_ballast_not_made) put the spool in "recovering" for as long as it lasted:
    a TRUNCATE checkpoint every 0.5 s, cutting the WAL to nothing under every writer.
    Now nothing is recovered from (the WAL keeps its size, as on a roomy disk) and the
    file is made once there is room."""
    disk = small_filesystem("8m")
    gsmtp = gsmtp_factory(
        {"spool": {"path": str(disk / "spool.sqlite"), "min_free": "0"}}, start=False
    )
    filler = disk / "filler"
    filler.write_bytes(bytes(max(0, disk_free(disk) - MB)))  # 1 MiB left: no ballast
    gsmtp.start()
    assert "spool_ballast_not_made" in gsmtp.log()
    assert send(gsmtp.port, 1000, subject="small", timeout=10).startswith("250 2.0.0")
    wal = Path(str(gsmtp.spool_path) + "-wal")
    # Checkpoints run every 0.5 s: over four rounds, the WAL that took the message stays.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert wal.stat().st_size > 0, "the WAL was cut: the spool thought it was recovering"
        time.sleep(0.05)  # sampling the WAL's size through the rounds, not waiting
    ballast = Path(str(gsmtp.spool_path) + ".reserve")
    assert not ballast.exists()
    filler.unlink()
    wait_for(ballast.exists, what="the ballast made once there is room")
    wait_for(lambda: "spool_ballast_made" in gsmtp.log(), what="spool_ballast_made logged")
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="the message delivered")


@pytest.mark.xdist_group("heavy")  # fills 96 MB of tmpfs; see test_body_memory.py
def test_the_reserve_refuses_mail_in_time_and_clears_once_the_queue_drains(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """Issue 7 item 9 and "space comes back": below spool.min_free MAIL gets 452 4.3.1
    (also a SIZE= that would eat into it), before the disk is full; delivery goes on,
    the spool file shrinks (incremental vacuum) and MAIL is accepted again."""
    disk = small_filesystem("96m")
    gsmtp = gsmtp_factory(
        {
            "spool": {"path": str(disk / "spool.sqlite"), "min_free": "40MB"},
            "server": {"max_message_size": "64MB"},  # so that SIZE= meets the reserve first
        },
        start=False,
    )
    gsmtp.maildir.write_text("not a directory: every delivery is deferred")
    gsmtp.start()
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        stat = os.statvfs(disk)
        free = stat.f_bavail * stat.f_frsize - os.path.getsize(f"{gsmtp.spool_path}-wal")
        too_big = free - 40 * MB + MB
        assert mail_from(wire, f" SIZE={too_big}") == "452 4.3.1 Insufficient system storage"

    replies: list[str] = []
    while len(replies) < 12 and not (replies and replies[-1].startswith("452")):
        replies.append(send(gsmtp.port, 8 * MB))
    accepted = [r for r in replies if r.startswith("250 2.0.0")]
    assert len(accepted) >= 2 and replies[-1] == "452 4.3.1 Insufficient system storage", replies
    wait_for(
        lambda: os.path.getsize(gsmtp.spool_path) > (len(accepted) - 1) * 8 * MB,
        what="the checkpoint to move the messages into the database file",
    )

    gsmtp.maildir.unlink()  # deliveries go through from the next retry on
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        timeout=30,
        what="the queue to drain",
    )
    wait_for(
        lambda: os.path.getsize(gsmtp.spool_path) < 8 * MB,
        timeout=30,
        what=f"the spool file to shrink (now {spool_bytes(gsmtp)} bytes with its WAL)",
    )
    assert os.path.getsize(f"{gsmtp.spool_path}-wal") <= 17 * MB  # journal_size_limit
    wait_for(
        lambda: send(gsmtp.port, 1000, subject="after").startswith("250 2.0.0"),
        timeout=10,
        what="MAIL to be accepted again",
    )
    assert "component_died" not in gsmtp.log()


@pytest.mark.xdist_group("heavy")  # fills 96 MB of tmpfs; see test_body_memory.py
def test_a_size_refused_for_the_reserve_gets_the_free_pages_back_at_once(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """A MAIL refused 452 for its SIZE= alone (MAIL without SIZE= is still accepted)
    means the disk is short for that mail: the pages the drained queue left free in the
    spool go back at once, not after the 10 s that free pages must otherwise stay free
    (spool_upkeep.VACUUM_WINDOW_SECONDS), so the client's next try is accepted."""
    disk = small_filesystem("96m")
    gsmtp = gsmtp_factory(
        {
            "spool": {"path": str(disk / "spool.sqlite"), "min_free": "40MB"},
            "server": {"max_message_size": "64MB"},
        },
        start=False,
    )
    gsmtp.maildir.write_text("not a directory: every delivery is deferred")
    gsmtp.start()
    replies = [send(gsmtp.port, 8 * MB) for _ in range(2)]
    assert all(reply.startswith("250 2.0.0") for reply in replies), replies
    wait_for(
        lambda: os.path.getsize(gsmtp.spool_path) > 8 * MB,
        what="the checkpoint to move the messages into the database file",
    )
    gsmtp.maildir.unlink()
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        timeout=30,
        what="the queue to drain",
    )
    free = disk_free(disk) - os.path.getsize(f"{gsmtp.spool_path}-wal")
    size = free - 40 * MB + MB  # just past what the reserve allows now
    assert size < os.path.getsize(gsmtp.spool_path) - 8 * MB  # the free pages would hold it

    def mail(parameters: str) -> str:
        with SmtpWire(gsmtp.port) as wire:
            wire.read_reply()
            wire.command("EHLO c.example")
            return mail_from(wire, parameters)

    assert mail("").startswith("250")  # not short for mail without SIZE=
    assert mail(f" SIZE={size}") == "452 4.3.1 Insufficient system storage"
    wait_for(
        lambda: mail(f" SIZE={size}").startswith("250"),
        timeout=7,  # well inside the 10 s window a page must stay free otherwise
        what=f"MAIL SIZE={size} to be accepted (spool {spool_bytes(gsmtp)} bytes)",
    )


FAULT_INJECTION = """
import sys
from gevent import monkey

monkey.patch_all()
from pathlib import Path

import gevent
from gevent.monkey import get_original

from gsmtp import app
from gsmtp.config import load


class InjectedFault(BaseException):
    '''Not an Exception: no handler on its way swallows it, like a bug's would not.'''


def inject(application, component):
    if component == "reader-while-starting":
        sleep = get_original("time", "sleep")

        def read(connection):
            # On the reader thread: die once the start waits for a read behind this one.
            while not application._bodies._pending:
                sleep(0.01)
            raise InjectedFault("injected fault")

        application._bodies.run(read)
        return
    while "listener" not in application.supervisor.names:  # started
        gevent.sleep(0.01)
    if component == "housekeeping":
        application._housekeeper.kill(RuntimeError("injected fault"), block=False)
    elif component == "writer":
        def unit(connection):
            raise InjectedFault("injected fault")
        application._writer.submit(unit)
    elif component == "reader":
        def read(connection):
            raise InjectedFault("injected fault")
        application._bodies.run(read)


def build(config, **options):
    application = app.Application(config, **options)
    gevent.spawn(inject, application, sys.argv[2])
    return application


sys.exit(app.serve(load(Path(sys.argv[1])), application_factory=build))
"""


@pytest.mark.parametrize("component", ["housekeeping", "writer", "reader", "reader-while-starting"])
def test_a_dead_component_ends_the_process_non_zero_naming_it(
    gsmtp_factory: Factory, component: str
) -> None:
    """Issue 7 item 7: the runner or the housekeeping loop died silently and the process
    lived on half-dead. Here one component dies of a bug (fault injection, like a
    signal aimed at one component): logged with its traceback, exit 70."""
    gsmtp = gsmtp_factory(start=False)
    with gsmtp.log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", FAULT_INJECTION, str(gsmtp.config), component],
            stdout=log,
            stderr=log,
            cwd=gsmtp.directory,
            env=environment(),
        )
    try:
        status = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log_text = gsmtp.log()
    assert status == 70, log_text
    died = [line for line in log_text.splitlines() if '"event":"component_died"' in line]
    assert died, log_text
    assert f'"component":"{component.split("-")[0]}"' in died[0]
    assert "injected fault" in died[0] and "Traceback" in died[0]
    assert '"event":"server_aborted"' in log_text


def test_sigterm_while_the_reader_waits_in_a_truncating_checkpoint_exits_within_grace(
    gsmtp_factory: Factory, small_filesystem: Callable[[str], Path]
) -> None:
    """DESIGN.md: exit 0 within grace + 2 s. A disk-full recovery's TRUNCATE checkpoint
    waits on the body reader's thread, up to the busy timeout (5 s), for a reader that
    pins the WAL (here this test). The stop must not wait for it beyond its deadline
    (the reader's close waited 5 s for whatever was submitted to it)."""
    grace = 1.0
    disk = small_filesystem("8m")
    gsmtp = gsmtp_factory(
        {
            "spool": {"path": str(disk / "spool.sqlite"), "min_free": "0"},
            "server": {"max_message_size": "20MB", "shutdown_grace": f"{grace:g}s"},
        }
    )
    pin = apsw.Connection(str(gsmtp.spool_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        pin.execute("BEGIN")
        assert pin.execute("SELECT COUNT(*) FROM messages").fetchall() == [(0,)]
        assert send(gsmtp.port, 12 * MB).startswith("451 4.3.0")
        # Recovering: each checkpoint is a TRUNCATE that waits 5 s for this pin, and the
        # next one starts half a second after it gave up (CHECKPOINT_SECONDS).
        failed = wait_for(
            lambda: gsmtp.events("checkpoint_failed"), what="a TRUNCATE given up", timeout=30
        )
        count = len(failed)
        time.sleep(1.5)  # the next TRUNCATE has started; it waits until +5.5 s
        assert len(gsmtp.events("checkpoint_failed")) == count
        started = time.monotonic()
        gsmtp.signal(signal.SIGTERM)
        remaining = grace + 2 - (time.monotonic() - started)
        assert gsmtp.wait(timeout=max(remaining, 0.1)) == 0, "not exited within grace + 2 s"
    finally:
        pin.close()
