"""`spool backup` as a set of shards: all or nothing, and a DEST that cannot be one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gsmtp import backup, db


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
    assert len(backup.backup_spool(spool, str(dest))) == 2
    before = {path.name: path.read_bytes() for path in dest.iterdir()}
    shard_1 = Path(spool).with_name("spool-1.sqlite")
    size = shard_1.stat().st_size
    with open(shard_1, "r+b") as file:  # every page after the header's: garbage
        file.seek(4096)
        file.write(os.urandom(size - 4096))
    with pytest.raises(backup.BackupError, match=rf"{shard_1}: .*nothing was replaced in {dest}"):
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
