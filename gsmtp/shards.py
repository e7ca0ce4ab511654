"""Spool shards: one SQLite file per worker, where they are, and adopting an orphan.

With `server.workers = N` worker k keeps its mail in shard k: shard 0 is the file at
`spool.path` (so a spool from before workers is shard 0 unchanged, and the accounts
stay there), shard k is `<stem>-<k><suffix>` beside it (`spool-1.sqlite`, ...). Files
are found by that name, never by a count in the configuration, so the CLI sees every
shard that holds mail whatever `workers` says now.

When `workers` is lowered, shards k >= N have no worker: worker k mod N adopts them at
start-up (`adopt`): under the orphan's own lock it copies the orphan's messages,
recipients and body parts into its shard in one transaction, then deletes them from the
orphan in a second one, then removes the orphan's files. A crash between the two
commits leaves the messages in both; the next adoption recognises them (same id, sender,
arrival time and size) and only deletes them from the orphan, so nothing is delivered
twice by adoption and nothing is lost. An id that names a different message in each
shard (never expected: ids carry the microsecond and a per-process random sequence) is
not overwritten: the orphan is left alone and the operator told.

No threads and no gevent: called at start-up before the spool's threads exist.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import apsw

from gsmtp.db import query, scalar, transaction

# Tables that hold mail, in the order their rows must be copied (foreign keys).
_MAIL_TABLES = ("messages", "recipients", "body_parts")


def shard_path(spool_path: str, index: int) -> str:
    """Shard `index` of the spool at `spool_path` (shard 0 is spool_path itself)."""
    if index == 0:
        return spool_path
    path = Path(spool_path)
    return str(path.with_name(f"{path.stem}-{index}{path.suffix}"))


def existing(spool_path: str) -> list[tuple[int, str]]:
    """(index, path) of shard 0 and of every other shard file present, by index."""
    path = Path(spool_path)
    pattern = re.compile(rf"{re.escape(path.stem)}-([1-9][0-9]*){re.escape(path.suffix)}\Z")
    found = [(0, spool_path)]
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            match = pattern.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), str(path.parent / entry.name)))
    return sorted(found)


def orphans(spool_path: str, worker: int, workers: int) -> list[str]:
    """The shards without a worker (index >= workers) that `worker` adopts."""
    return [
        path
        for index, path in existing(spool_path)
        if index >= workers and index % workers == worker
    ]


@dataclass(frozen=True, slots=True)
class Adopted:
    """What one adoption moved (messages already copied by an interrupted one count)."""

    messages: int


class AdoptionRefused(Exception):
    """The orphan cannot be merged safely; it is left as it is (the message says why)."""


def adopt(connection: apsw.Connection, orphan: str) -> Adopted:
    """Move every message of the shard file `orphan` into `connection`'s database, then
    empty the orphan (see the module docstring). Both must be at the same schema
    version (open the orphan once with `db.connect` first). The caller holds the
    orphan's lock and removes its files afterwards (`remove`)."""
    connection.execute("ATTACH DATABASE ? AS orphan", (orphan,))
    try:
        ours = int(scalar(connection, "PRAGMA main.user_version"))
        theirs = int(scalar(connection, "PRAGMA orphan.user_version"))
        if ours != theirs:
            raise AdoptionRefused(f"schema version {theirs}, ours is {ours}")
        clashes = query(
            connection,
            "SELECT o.id FROM orphan.messages o JOIN main.messages m ON m.id = o.id"
            " WHERE m.sender IS NOT o.sender OR m.received_at IS NOT o.received_at"
            " OR m.size IS NOT o.size LIMIT 1",
        )
        if clashes:
            raise AdoptionRefused(f"message id {clashes[0][0]!r} names another message here")
        moved = int(scalar(connection, "SELECT COUNT(*) FROM orphan.messages"))
        with transaction(connection):
            for table in _MAIL_TABLES:
                connection.execute(
                    f"INSERT OR IGNORE INTO main.{table} SELECT * FROM orphan.{table}"
                )
        with transaction(connection):
            for table in reversed(_MAIL_TABLES):
                connection.execute(f"DELETE FROM orphan.{table}")
        return Adopted(moved)
    finally:
        connection.execute("DETACH DATABASE orphan")


def remove(path: str) -> None:
    """Remove an emptied shard whose connections are all closed: its WAL first, so a
    stale WAL can never be replayed into a new file of the same name, then the file,
    then its full-disk ballast (`.reserve`, gsmtp.diskspace: no worker keeps it now).
    The lock file stays (see gsmtp.lockfile)."""
    for name in (f"{path}-wal", f"{path}-shm", path, f"{path}.reserve"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
