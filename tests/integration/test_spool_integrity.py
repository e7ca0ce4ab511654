"""The spool cannot be corrupted from outside: outside readers, a second server, backups."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import apsw
import pytest

from tests.integration.conftest import Factory
from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment_has,
    open_files,
    wait_for,
)


def send(port: int, subject: str, body: bytes = b"body\r\n") -> str:
    """One message to jones@foo.com; the reply to the final dot."""
    with SmtpWire(port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(f"Subject: {subject}\r\n\r\n".encode() + body + b".\r\n")
        return wire.read_reply()[-1]


def queue_id(reply: str) -> str:
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def delivered_subjects(gsmtp: GsmtpProcess) -> list[str]:
    found = []
    for file in gsmtp.maildir_files("jones@foo.com"):
        for line in file.read_bytes().split(b"\n"):
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
                break
    return sorted(found)


def blocked(gsmtp_factory: Factory, settings: dict | None = None) -> GsmtpProcess:  # type: ignore[type-arg]
    """A server whose local deliveries are all deferred (its Maildir root is a file), so
    accepted mail stays in the spool until `unblock`."""
    gsmtp = gsmtp_factory(settings, start=False)
    gsmtp.maildir.write_text("not a directory: every delivery is deferred")
    gsmtp.start()
    return gsmtp


def unblock(gsmtp: GsmtpProcess) -> None:
    gsmtp.maildir.unlink()


def read_from_outside(spool: Path) -> None:
    """What an operator does: the sqlite3 command, Python's sqlite3 (also read-only)."""
    outside = subprocess.run(
        ["sqlite3", str(spool), "SELECT COUNT(*) FROM messages"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert outside.returncode == 0, outside.stderr
    for uri in (str(spool), f"file:{spool}?mode=ro"):
        connection = sqlite3.connect(uri, uri=uri.startswith("file:"))
        connection.execute("SELECT COUNT(*) FROM messages").fetchone()
        connection.close()


needs_sqlite3 = pytest.mark.skipif(
    not environment_has("sqlite3"), reason="the sqlite3 command (Debian package sqlite3)"
)


@needs_sqlite3
def test_outside_readers_leave_the_live_wal_alone(gsmtp_factory: Factory) -> None:
    """Issue 7 item 5: reading the spool with sqlite3 while the server runs used to
    checkpoint and unlink -wal and -shm under it; a message answered 250 afterwards was
    gone after kill -9."""
    gsmtp = blocked(gsmtp_factory)
    assert gsmtp.process is not None
    first = queue_id(send(gsmtp.port, "before the outside read"))
    wal = f"{gsmtp.spool_path}-wal"
    read_from_outside(gsmtp.spool_path)
    for suffix in ("", "-wal", "-shm"):
        path = f"{gsmtp.spool_path}{suffix}"
        assert os.path.exists(path), f"{path} was unlinked under the running server"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    files = open_files(gsmtp.process.pid)
    assert wal in files
    assert not [f for f in files if f.endswith("(deleted)")], files
    second = queue_id(send(gsmtp.port, "after the outside read"))
    gsmtp.kill9()
    unblock(gsmtp)
    gsmtp.start()
    wait_for(
        lambda: delivered_subjects(gsmtp) == ["after the outside read", "before the outside read"],
        timeout=20,
        what=f"{first} and {second} in the Maildir",
    )


@needs_sqlite3
def test_a_deleted_message_stays_deleted_after_an_outside_read_and_kill9(
    gsmtp_factory: Factory,
) -> None:
    gsmtp = blocked(gsmtp_factory)
    doomed = queue_id(send(gsmtp.port, "deleted"))
    gsmtp.cli("queue", "delete", doomed)
    read_from_outside(gsmtp.spool_path)
    queue_id(send(gsmtp.port, "kept"))  # the server writes again after the outside read
    gsmtp.kill9()
    unblock(gsmtp)
    gsmtp.start()
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        timeout=20,
        what="the spool to drain",
    )
    assert delivered_subjects(gsmtp) == ["kept"]


def test_a_second_serve_on_the_same_spool_exits_2_naming_the_pid(
    gsmtp: GsmtpProcess, tmp_path: Path
) -> None:
    """Issue 7 item 8: the second server used to start, release the first one's leases
    and deliver the same recipients again."""
    assert gsmtp.process is not None
    directory = tmp_path / "second"
    directory.mkdir()
    second = GsmtpProcess(directory, {"spool": {"path": str(gsmtp.spool_path)}})
    refused = subprocess.Popen(
        [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(second.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = refused.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        refused.kill()
        _, stderr = refused.communicate()
        raise AssertionError(
            f"the second server started: {stderr}\nthe first: {gsmtp.process.poll()} {gsmtp.log()}"
        ) from None
    assert refused.returncode == 2, stderr
    assert stderr == (
        f"gsmtp: spool {gsmtp.spool_path} is already served by PID {gsmtp.process.pid}"
        f" (lock {os.path.realpath(gsmtp.spool_path)}.lock)\n"
    )
    assert second.cli("queue", "stats").stdout.startswith("messages: "), "the CLI takes no lock"
    assert queue_id(send(gsmtp.port, "first server still serves"))
    gsmtp.kill9()  # the kernel drops the lock with the process
    second.start()
    try:
        assert queue_id(send(second.port, "second server"))
        wait_for(
            lambda: delivered_subjects(second) == ["first server still serves", "second server"],
            what="delivery by the second server",
        )
    finally:
        second.stop()


def refused_serve(config: Path) -> subprocess.CompletedProcess[str]:
    """`gsmtp serve -c config`, expected to exit at once (killed after 60 s if not)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        stderr += "\n(it started and was killed after 60 s)"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("link", ["file", "directory"])
def test_a_second_serve_reaching_the_spool_through_a_symlink_exits_2(
    gsmtp: GsmtpProcess, tmp_path: Path, link: str
) -> None:
    """Red-team finding: the lock was keyed on the path string, so a second server whose
    spool.path reached the same database through a symlink started beside the first,
    and both delivered the same recipient."""
    assert gsmtp.process is not None
    directory = tmp_path / "second"
    directory.mkdir()
    if link == "file":
        alias = directory / "alias.sqlite"
        alias.symlink_to(gsmtp.spool_path)
    else:
        (directory / "spool-dir").symlink_to(gsmtp.spool_path.parent)
        alias = directory / "spool-dir" / gsmtp.spool_path.name
    second = GsmtpProcess(directory, {"spool": {"path": str(alias)}})
    refused = refused_serve(second.config)
    assert refused.returncode == 2, refused.stderr
    real_lock = os.path.realpath(gsmtp.spool_path) + ".lock"
    assert refused.stderr == (
        f"gsmtp: spool {alias} is already served by PID {gsmtp.process.pid} (lock {real_lock})\n"
    )
    assert list(directory.glob("*.lock")) == []  # no lock file of its own
    assert gsmtp.process.poll() is None


def test_backup_while_serving_is_consistent_and_complete(
    gsmtp_factory: Factory, tmp_path: Path
) -> None:
    gsmtp = blocked(gsmtp_factory)
    acknowledged = [queue_id(send(gsmtp.port, f"early {n}")) for n in range(20)]
    stop = threading.Event()
    later: list[str] = []

    def keep_sending() -> None:
        while not stop.is_set():
            later.append(send(gsmtp.port, "during the backup", b"x" * 50000 + b"\r\n"))

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        wait_for(lambda: len(later) >= 3, what="mail arriving during the backup")
        destination = tmp_path / "backups" / "today"
        result = gsmtp.cli("spool", "backup", str(destination))
    finally:
        stop.set()
        sender.join(timeout=30)
    assert all(reply.startswith("250") for reply in later)
    copy = destination / "spool.sqlite"
    assert result.stdout.startswith(f"spool copied to {copy} (")
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    assert not Path(f"{copy}-wal").exists(), "the copy is one self-contained file"
    assert set(acknowledged) <= sound_spool_ids(copy)

    again = gsmtp.cli("spool", "backup", str(destination), check=False)
    assert again.returncode == 1
    assert again.stderr == (
        f"gsmtp: backup failed: {copy} exists; remove it or use --force to replace it\n"
    )
    assert gsmtp.cli("spool", "backup", str(destination), "--force").returncode == 0


def test_a_backup_into_the_spools_own_directory_is_refused_even_with_force(
    gsmtp_factory: Factory, tmp_path: Path
) -> None:
    """Red-team finding: `spool backup <the spool's directory> --force` replaced the
    live spool under the running server (integrity check failed at the next start).
    (An empty DEST is refused as such: tests/unit/test_backup.py.)"""
    gsmtp = blocked(gsmtp_factory)
    acknowledged = [queue_id(send(gsmtp.port, f"kept {n}")) for n in range(5)]
    spool_dir = Path(gsmtp.spool_path).parent
    alias = tmp_path / "alias"
    alias.symlink_to(spool_dir)
    before = Path(gsmtp.spool_path).stat().st_ino
    for destination in (str(spool_dir), str(alias), "."):
        refused = gsmtp.cli("spool", "backup", destination, "--force", check=False, cwd=spool_dir)
        assert refused.returncode == 1
        assert "is the spool's own directory: the copy would replace the live spool" in (
            refused.stderr
        )
        assert refused.stderr.startswith("gsmtp: backup failed: ")
    assert Path(gsmtp.spool_path).stat().st_ino == before  # the same file, never replaced
    assert [f for f in spool_dir.iterdir() if f.name.endswith(".tmp")] == []
    assert set(acknowledged) <= sound_spool_ids(Path(gsmtp.spool_path))
    assert gsmtp.process.poll() is None


def sound_spool_ids(path: Path) -> set[str]:
    """The message ids of the spool file at `path`, read-only, once it passes its
    integrity check."""
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {row[0] for row in connection.execute("SELECT id FROM messages")}
    finally:
        connection.close()
