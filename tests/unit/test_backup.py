"""`spool backup` as a set of shards: all or nothing, and a DEST that cannot be one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import apsw
import pytest

from gsmtp import backup, db, lockfile


def two_shards(tmp_path: Path) -> str:
    """A spool of shard 0 and shard 1, each holding a domain: its path."""
    spool = tmp_path / "spool" / "spool.sqlite"
    for path, domain in (
        (spool, "zero.example"),
        (spool.with_name("spool-1.sqlite"), "one.example"),
    ):
        connection = db.connect(str(path))
        connection.execute("INSERT INTO domains(name) VALUES (?)", (domain,))
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
    return str(spool)


def test_a_shard_that_cannot_be_copied_leaves_dest_as_it_was(tmp_path: Path) -> None:
    """Red-team finding: shard 0 was copied (replacing the older copy with --force)
    before shard 1 failed, leaving a set from two different times."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    assert len(backup.backup_spool(spool, str(dest)).copies) == 2
    before = {path.name: path.read_bytes() for path in dest.iterdir()}
    shard_1 = Path(spool).with_name("spool-1.sqlite")
    size = shard_1.stat().st_size
    with open(shard_1, "r+b") as file:  # every page after the header's: garbage
        file.seek(4096)
        file.write(os.urandom(size - 4096))
    with pytest.raises(
        backup.BackupError,
        match=rf"copying {shard_1} into {dest}: .*nothing was replaced in {dest}",
    ):
        backup.backup_spool(spool, str(dest), overwrite=True)
    assert {path.name: path.read_bytes() for path in dest.iterdir()} == before  # no .tmp either


@pytest.mark.parametrize("dest", ["/dev/null", "a-file"])
def test_a_dest_that_is_not_a_directory_is_named(tmp_path: Path, dest: str) -> None:
    spool = two_shards(tmp_path)
    if dest == "a-file":
        dest = str(tmp_path / dest)
        Path(dest).write_text("not a directory\n")
    with pytest.raises(backup.BackupError, match=f"{dest} is not a directory"):
        backup.backup_spool(spool, dest, overwrite=True)


def domains_in(path: Path) -> set[str]:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {row[0] for row in connection.execute("SELECT name FROM domains")}
    finally:
        connection.close()


def leave_a_wal(path: Path) -> None:
    """A WAL at `path`-wal, as a database opened there and killed leaves it: its last
    commit (the domain stale.example) only in the WAL."""
    connection = db.connect(str(path))
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute("INSERT INTO domains(name) VALUES ('stale.example')")
    shutil.copy(f"{path}-wal", f"{path}.kept-wal")
    connection.close()
    os.replace(f"{path}.kept-wal", f"{path}-wal")


def test_a_wal_left_in_dest_never_replays_over_the_copy(tmp_path: Path) -> None:
    """Red-team finding: a -wal beside DEST/spool.sqlite (an old copy once opened there
    by a node, then killed) was replayed over the new copy when it was opened: the copy
    read as the old node's mail, and the new one's was lost."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    dest.mkdir()
    leave_a_wal(dest / "spool.sqlite")
    (dest / "spool.sqlite").unlink()  # removed as the "exists" refusal said; the -wal stays
    with pytest.raises(backup.BackupError, match=r"spool\.sqlite-wal exists.*use --force"):
        backup.backup_spool(spool, str(dest))
    leave_a_wal(dest / "spool.sqlite")
    backup.backup_spool(spool, str(dest), overwrite=True)
    assert not (dest / "spool.sqlite-wal").exists()
    assert domains_in(dest / "spool.sqlite") == {"zero.example"}
    assert domains_in(dest / "spool-1.sqlite") == {"one.example"}


def test_the_live_spool_of_another_server_is_never_replaced(tmp_path: Path) -> None:
    """Red-team finding: `--force` into another running node's spool directory put the
    copy over its live spool (its mail then in an unlinked file)."""
    spool = two_shards(tmp_path)
    other = tmp_path / "other"
    db.connect(str(other / "spool.sqlite")).close()
    lock = lockfile.acquire(lockfile.lock_path(str(other / "spool.sqlite")))
    assert isinstance(lock, lockfile.InstanceLock)
    before = (other / "spool.sqlite").read_bytes()
    try:
        with pytest.raises(
            backup.BackupError,
            match=rf"is in use by a running gsmtp, server or backup \(PID {os.getpid()}\)",
        ):
            backup.backup_spool(spool, str(other), overwrite=True)
    finally:
        lock.release()
    assert (other / "spool.sqlite").read_bytes() == before
    assert sorted(p.name for p in other.iterdir()) == ["spool.sqlite", "spool.sqlite.lock"]


def test_a_target_that_is_not_a_file_is_refused_before_anything_changes(tmp_path: Path) -> None:
    """Red-team finding: with spool-1.sqlite a directory in DEST, --force replaced
    spool.sqlite and deleted a stale copy before failing on it."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    backup.backup_spool(spool, str(dest))
    (dest / "spool-1.sqlite").unlink()
    (dest / "spool-1.sqlite").mkdir()
    shutil.copy(dest / "spool.sqlite", dest / "spool-2.sqlite")  # a stale copy
    before = {path.name: path.is_file() and path.read_bytes() for path in dest.iterdir()}
    with pytest.raises(
        backup.BackupError, match=r"spool-1\.sqlite exists and is not a regular file"
    ):
        backup.backup_spool(spool, str(dest), overwrite=True)
    assert {path.name: path.is_file() and path.read_bytes() for path in dest.iterdir()} == before


def test_a_full_dest_is_named_and_leaves_the_old_copies_and_no_temporary(
    tmp_path: Path, small_disk: Path
) -> None:
    """Red-team findings: a full disk said "not an error", and left the temporary copy's
    -wal and -shm behind."""
    spool = two_shards(tmp_path)
    dest = small_disk / "backup"
    backup.backup_spool(spool, str(dest))
    before = {path.name: path.read_bytes() for path in dest.iterdir()}
    connection = db.connect(str(Path(spool).with_name("spool-1.sqlite")))
    connection.executemany(
        "INSERT INTO domains(name) VALUES (?)", [(f"{n:0500}.example",) for n in range(4000)]
    )
    connection.close()
    with pytest.raises(
        backup.BackupError,
        match=rf"no room for the copy of .*spool-1\.sqlite in {dest}; nothing was replaced",
    ):
        backup.backup_spool(spool, str(dest), overwrite=True)
    assert {path.name: path.read_bytes() for path in dest.iterdir()} == before


def test_an_unusable_dest_is_one_line(tmp_path: Path) -> None:
    spool = two_shards(tmp_path)
    with pytest.raises(backup.BackupError, match="DEST is empty"):
        backup.backup_spool(spool, "")
    with pytest.raises(backup.BackupError, match="File name too long"):
        backup.backup_spool(spool, str(tmp_path / ("x" * 300)))


def test_a_file_with_a_shards_name_that_is_no_spool_is_left_out(tmp_path: Path) -> None:
    spool = two_shards(tmp_path)
    stray = Path(spool).with_name("spool-3.sqlite")
    stray.write_text("not a database\n" * 100)
    made = backup.backup_spool(spool, str(tmp_path / "backup"))
    assert [Path(copy.path).name for copy in made.copies] == ["spool.sqlite", "spool-1.sqlite"]
    assert made.left_out == [f"{stray}: not a gsmtp spool (not an SQLite database)"]
    assert stray.read_text() == "not a database\n" * 100


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("what", ["a dangling symlink", "a -wal that is a directory"])
def test_odd_files_at_a_targets_name_are_refused_before_anything_changes(
    tmp_path: Path, what: str, overwrite: bool
) -> None:
    """Red-team findings: a dangling symlink at spool-1.sqlite passed the checks (shard
    0 was published, then the link failed); with --force a -wal that is a directory was
    not checked, and shard 0 was replaced before it failed."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    dest.mkdir()
    if what == "a dangling symlink":
        odd = dest / "spool-1.sqlite"
        odd.symlink_to(tmp_path / "nowhere")
    else:
        odd = dest / "spool-1.sqlite-wal"
        odd.mkdir()
    before = {path.name: path.is_file() and path.read_bytes() for path in dest.iterdir()}
    with pytest.raises(backup.BackupError, match=rf"{odd} exists and is not a regular file"):
        backup.backup_spool(spool, str(dest), overwrite=overwrite)
    assert {path.name: path.is_file() and path.read_bytes() for path in dest.iterdir()} == before


def test_a_stale_copy_goes_when_its_shard_was_left_out(tmp_path: Path) -> None:
    """Red-team finding: with spool-1.sqlite a stray file (left out), an old copy of
    shard 1 in DEST was kept, to be adopted and delivered again after a restore."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    backup.backup_spool(spool, str(dest))
    Path(spool).with_name("spool-1.sqlite").write_text("not a database\n" * 100)
    (dest / "spool.sqlite").unlink()  # so that only the stale copy stands in the way
    with pytest.raises(backup.BackupError, match=r"holds spool-1\.sqlite, a shard this spool"):
        backup.backup_spool(spool, str(dest), overwrite=False)
    made = backup.backup_spool(spool, str(dest), overwrite=True)
    assert len(made.left_out) == 1 and not (dest / "spool-1.sqlite").exists()


def test_a_server_cannot_start_on_a_target_while_its_copy_is_made(tmp_path: Path) -> None:
    """Red-team finding: a server that started on DEST during a long copy had its live
    spool replaced (and its -wal removed) under it. The backup holds each target's
    server lock until its copies are in place."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    held: list[object] = []
    real_copy = backup._copy

    def copy_then_try_to_serve(source: str, temporary: Path) -> None:
        real_copy(source, temporary)
        held.append(lockfile.acquire(lockfile.lock_path(str(dest / "spool.sqlite"))))
        # No server holds it: `gsmtp queue` on DEST must not send its wake-up SIGUSR1
        # to the backup, which has no handler (red-team finding: it killed the backup).
        assert lockfile.holder(lockfile.lock_path(str(dest / "spool.sqlite"))) is None

    backup._copy = copy_then_try_to_serve  # type: ignore[assignment]
    try:
        backup.backup_spool(spool, str(dest))
    finally:
        backup._copy = real_copy  # type: ignore[assignment]
    assert held and all(isinstance(lock, lockfile.HeldBy) for lock in held)
    # What the refused `serve` says names the backup, not a server (red-team leftover:
    # it said "already served by PID n", n being the backup's).
    path = lockfile.lock_path(str(dest / "spool.sqlite"))
    assert lockfile.already_served("spool.sqlite", path, held[0]) == (  # type: ignore[arg-type]
        f"gsmtp: spool spool.sqlite is being written by `gsmtp spool backup` (PID {os.getpid()}),"
        f" which holds its lock until its copies are in place (lock {path});"
        " start the server once the backup has ended"
    )
    assert lockfile.acquire(path) is not None


def test_a_killed_backups_temporary_goes_with_the_next_backup(tmp_path: Path) -> None:
    """Red-team finding: `kill -9` of a backup mid-copy left `.spool.sqlite.<pid>.tmp`
    in DEST for good (the next backup, another PID, never looked at it)."""
    spool = two_shards(tmp_path)
    dest = tmp_path / "backup"
    dest.mkdir()
    leftovers = [dest / ".spool.sqlite.99999.tmp", dest / ".spool-1.sqlite.99998.tmp-wal"]
    for leftover in [*leftovers, dest / ".spool-1.sqlite.99998.tmp"]:
        leftover.write_bytes(b"half a copy")
    backup.backup_spool(spool, str(dest))
    names = sorted(path.name for path in dest.iterdir())
    assert names == ["spool-1.sqlite", "spool-1.sqlite.lock", "spool.sqlite", "spool.sqlite.lock"]
