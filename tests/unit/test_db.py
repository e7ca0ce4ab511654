"""The spool file itself: created safely, never unlinked under us, space that comes back."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import apsw
import pytest

from gsmtp import backup, db


@pytest.fixture
def spool_path(tmp_path: Path) -> str:
    return str(tmp_path / "spool" / "spool.sqlite")


def test_a_second_connection_keeps_the_first_ones_locks(spool_path: str) -> None:
    """Issue 7 item 5, in one process: connect() beside a live connection must not drop
    its POSIX locks, or an outside reader checkpoints and unlinks -wal and -shm."""
    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command is not installed (Debian package sqlite3)")
    # Opened like the server opens its reader, writer and body reader; then a write.
    connections = [db.connect(spool_path) for _ in range(3)]
    connections[1].execute("INSERT INTO domains(name) VALUES ('foo.com')")
    live_files = {suffix: os.stat(spool_path + suffix).st_ino for suffix in ("-wal", "-shm")}
    outside = subprocess.run(
        ["sqlite3", spool_path, "SELECT COUNT(*) FROM domains"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert outside.stdout.strip() == "1"
    reader = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True)
    assert reader.execute("SELECT COUNT(*) FROM domains").fetchone() == (1,)
    reader.close()
    # The very files the live connections use: not unlinked (and made anew by a reader).
    for suffix, inode in live_files.items():
        assert os.stat(spool_path + suffix).st_ino == inode, f"{suffix} was unlinked"
    for connection in connections:
        connection.close()


def test_the_file_is_created_0600_whatever_the_umask(spool_path: str) -> None:
    old = os.umask(0)
    try:
        connection = db.connect(spool_path)
        connection.execute("INSERT INTO domains(name) VALUES ('foo.com')")
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(spool_path + suffix).st_mode) == 0o600, suffix


def test_new_spools_use_incremental_auto_vacuum_and_a_wal_size_limit(spool_path: str) -> None:
    connection = db.connect(spool_path)
    assert db.scalar(connection, "PRAGMA auto_vacuum") == db.AUTO_VACUUM_INCREMENTAL
    assert db.scalar(connection, "PRAGMA journal_size_limit") == db.JOURNAL_SIZE_LIMIT
    assert db.convert_to_incremental_vacuum(connection) is False  # nothing to do


def test_an_old_spool_is_converted_once_and_keeps_its_data(spool_path: str) -> None:
    Path(spool_path).parent.mkdir()
    old = apsw.Connection(spool_path)  # made like gsmtp made spools before: no auto-vacuum
    old.execute("PRAGMA journal_mode=WAL")
    old.execute(db._MIGRATIONS[0])  # its first tables, made without auto-vacuum
    old.execute("PRAGMA user_version=1")
    old.close()
    connection = db.connect(spool_path)
    connection.execute("INSERT INTO domains(name) VALUES ('foo.com')")
    assert db.scalar(connection, "PRAGMA auto_vacuum") == 0
    assert db.convert_to_incremental_vacuum(connection) is True
    assert db.scalar(connection, "PRAGMA auto_vacuum") == db.AUTO_VACUUM_INCREMENTAL
    assert db.query(connection, "SELECT name FROM domains") == [("foo.com",)]
    assert db.convert_to_incremental_vacuum(connection) is False


def test_incremental_vacuum_gives_pages_back(spool_path: str) -> None:
    connection = db.connect(spool_path)
    connection.execute("CREATE TABLE blobs(b BLOB)")
    connection.execute("INSERT INTO blobs VALUES (zeroblob(4000000))")
    connection.execute("DELETE FROM blobs")
    free = db.free_pages(connection)
    assert free > 900
    with db.transaction(connection):
        left = db.incremental_vacuum(connection, 500)
    assert left == free - 500
    with db.transaction(connection):
        assert db.incremental_vacuum(connection, free) == 0
    connection.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    assert os.path.getsize(spool_path) < 200_000


def _run(connection: apsw.Connection, *statements: str) -> None:
    for statement in statements:
        list(connection.execute(statement))


def _killed_mid_write(connection: apsw.Connection, path: str, companion: str) -> None:
    """The files at `path` as a writer killed now leaves them: the database and its
    `companion` (-wal or -journal) as they are, put back once `connection` has ended
    (its open transaction rolled back, its WAL checkpointed)."""
    for suffix in ("", companion):
        shutil.copy(path + suffix, path + ".killed" + suffix)
    if not connection.getautocommit():
        _run(connection, "ROLLBACK")
    connection.close()
    for suffix in ("", companion):
        os.replace(path + ".killed" + suffix, path + suffix)


def _other_programs(path: str, kind: str) -> None:
    """Another program's file at `path`, of `kind`."""
    if kind == "text":
        Path(path).write_text("not a database\n" * 100)
        return
    connection = apsw.Connection(path)
    if kind == "tables":
        _run(connection, "CREATE TABLE notes(body TEXT)")
    elif kind == "view":
        _run(connection, "CREATE VIEW now AS SELECT 1")
    elif kind == "application_id":
        _run(connection, "PRAGMA application_id=1234")
    elif kind == "versioned":  # numbered like a spool, with two of its table names
        _run(
            connection, "CREATE TABLE meta(k)", "CREATE TABLE messages(id)", "PRAGMA user_version=3"
        )
    elif kind == "wal":  # in WAL mode, its last commit in the WAL only (its writer killed)
        _run(connection, "PRAGMA journal_mode=WAL", "PRAGMA wal_autocheckpoint=0")
        _run(connection, "CREATE TABLE notes(body TEXT)", "INSERT INTO notes VALUES ('x')")
        _killed_mid_write(connection, path, "-wal")
        return
    elif kind == "hot_journal":  # a rollback journal left by a writer killed mid-transaction
        _run(connection, "PRAGMA cache_size=1", "CREATE TABLE notes(body BLOB)", "BEGIN")
        _run(connection, *["INSERT INTO notes VALUES (randomblob(2000))"] * 100)
        _killed_mid_write(connection, path, "-journal")
        return
    connection.close()


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("tables", "it holds notes"),
        ("view", "it holds now"),
        ("application_id", "application_id 1234"),
        ("versioned", "no domains, recipients, users tables"),
        ("wal", "it holds notes"),
        ("hot_journal", "it holds notes"),
        ("text", "not an SQLite database"),
    ],
)
def test_another_programs_file_is_refused_and_left_unchanged(
    spool_path: str, kind: str, why: str
) -> None:
    """Red-team findings: `queue stats` migrated any file named like a shard, and the
    server then adopted it as an orphan and deleted it; then, a foreign WAL was
    checkpointed, a hot journal rolled back, a versioned file switched to WAL. Not a
    spool: not written to, and said why (a hot journal's file is read as it stands)."""
    Path(spool_path).parent.mkdir()
    _other_programs(spool_path, kind)
    companions = ("", "-wal", "-journal")
    before = {
        s: Path(spool_path + s).read_bytes() for s in companions if Path(spool_path + s).exists()
    }
    with pytest.raises(db.NotASpool, match=f"{spool_path}: not a gsmtp spool \\({why}"):
        db.connect(spool_path)
    after = {
        s: Path(spool_path + s).read_bytes() for s in companions if Path(spool_path + s).exists()
    }
    assert after == before


def test_an_empty_file_and_a_spool_are_spools(spool_path: str) -> None:
    db.connect(spool_path).close()  # created
    db.connect(spool_path).close()  # and opened again
    Path(spool_path + ".empty").touch()
    db.connect(spool_path + ".empty").close()


def test_a_spool_copy_with_a_hot_journal_is_a_spool_and_is_rolled_back(
    spool_path: str, tmp_path: Path
) -> None:
    """Red-team finding: a backup copy (rollback mode) with a hot journal beside it (an
    edit killed mid-transaction) was refused as not a spool. It is one: opened, its
    journal rolled back, and its mail is there."""
    spool = db.connect(spool_path)
    spool.execute("INSERT INTO domains(name) VALUES ('kept.example')")
    spool.close()
    copy = str(tmp_path / "copy.sqlite")
    (made,) = backup.backup_spool(spool_path, str(tmp_path / "backup")).copies
    shutil.copy(made.path, copy)
    editor = apsw.Connection(copy)
    _run(editor, "PRAGMA cache_size=1", "BEGIN")
    _run(editor, *["INSERT INTO domains(name) VALUES (hex(randomblob(900)))"] * 100)
    _killed_mid_write(editor, copy, "-journal")
    assert os.path.getsize(copy + "-journal") > 0
    restored = db.connect(copy)
    assert db.query(restored, "SELECT name FROM domains") == [("kept.example",)]


def test_a_file_another_program_is_writing_is_left_alone(spool_path: str) -> None:
    """Red-team finding: a foreign database locked by its program's write transaction
    could not be read, was taken for a spool, converted, then adopted and deleted."""
    Path(spool_path).parent.mkdir()
    writer = apsw.Connection(spool_path)
    _run(writer, "CREATE TABLE notes(body TEXT)", "BEGIN EXCLUSIVE")
    _run(writer, "INSERT INTO notes VALUES ('precious')")
    before = Path(spool_path).read_bytes()
    try:
        with pytest.raises(db.DatabaseError, match="locked by another program's write"):
            db.connect(spool_path)
    finally:
        _run(writer, "COMMIT")
        writer.close()
    assert Path(spool_path).read_bytes() != before  # the program's commit, not ours
    check = apsw.Connection(spool_path, flags=apsw.SQLITE_OPEN_READONLY)
    assert list(check.execute("PRAGMA journal_mode")) == [("delete",)]
    assert [row[0] for row in check.execute("SELECT name FROM sqlite_schema")] == ["notes"]


def test_a_double_slash_path_is_still_probed(spool_path: str) -> None:
    """Red-team finding: for "//tmp/...", the probe's URI named a host, could not open,
    and the file was taken for a spool and converted."""
    Path(spool_path).parent.mkdir()
    _other_programs(spool_path, "tables")
    before = Path(spool_path).read_bytes()
    with pytest.raises(db.NotASpool, match="it holds notes"):
        db.connect("/" + spool_path)
    assert Path(spool_path).read_bytes() == before


def test_a_torn_file_with_a_hot_journal_is_left_alone(spool_path: str) -> None:
    """Red-team finding: another program's file with a hot journal and a page torn by
    its killed writer could not be read as it stands, and was taken for a spool (rolled
    back, converted, or adopted and deleted). Now: cannot tell, left alone."""
    Path(spool_path).parent.mkdir()
    writer = apsw.Connection(spool_path)
    _run(writer, "PRAGMA page_size=1024", "PRAGMA cache_size=2")
    _run(writer, *[f"CREATE TABLE notes{n}(body TEXT)" for n in range(300)])
    _run(writer, "BEGIN", *[f"DROP TABLE notes{n}" for n in range(0, 300, 3)])
    _killed_mid_write(writer, spool_path, "-journal")
    with open(spool_path, "r+b") as file:  # every page but the first: torn
        file.seek(1024)
        file.write(b"\xff" * (os.path.getsize(spool_path) - 1024))
    before = {s: Path(spool_path + s).read_bytes() for s in ("", "-journal")}
    with pytest.raises(db.DatabaseError, match="cannot be read as it stands"):
        db.connect(spool_path)
    assert {s: Path(spool_path + s).read_bytes() for s in ("", "-journal")} == before
