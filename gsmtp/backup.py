"""`gsmtp spool backup DEST`: a consistent copy of the spool, taken while the server runs.

SQLite's online backup API copies the database from one read snapshot, in one step: a
server committing in another process meanwhile can then not make it start over, and in
WAL mode that server is never held up (readers do not block writers). The copy holds
every message committed before the backup began. DEST is a directory, so that later
spool shards and other spool-owned files fit beside the copy; the copy is named after
the spool file. It is written under a temporary name, checked (quick_check), switched
to a self-contained rollback journal, fsynced, and only then given its name: a file
under that name is always a complete copy. An existing copy is replaced only when asked
(`overwrite`, the CLI's --force): a backup run twice must not silently replace a good
copy.

A spool with workers is several files (gsmtp.shards); `backup_spool` copies them as a
set, all or none: every target is checked before any is copied, every copy is made and
checked before any gets its name, and a shard copy already in DEST
that the spool no longer has (the node had more workers when DEST was last written) is
refused, or with `overwrite` removed: a node restored from DEST would adopt that stale
copy and deliver its messages a second time.

Never opens and closes the spool file outside SQLite (see `gsmtp.db`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import apsw

from gsmtp import db, shards


class BackupError(Exception):
    """The backup was not made; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class BackupCopy:
    path: str
    size: int


def check_target(spool_path: str, destination: str, *, overwrite: bool = False) -> Path:
    """The path the copy of `spool_path` gets in `destination`; BackupError if it may
    not go there: the
    spool is missing, the copy would be the spool itself (DEST is the spool's own
    directory, by any name: "", ".", a symlink; --force there replaced the live spool
    under the running server), or a copy exists and `overwrite` is off. The CLI checks
    every shard before it copies any, so a refused backup leaves no mixed set."""
    spool = Path(spool_path)
    if not spool.is_file():
        raise BackupError(f"no spool at {spool_path}")
    directory = Path(destination)
    target = directory / spool.name
    if directory.exists() and not directory.is_dir():
        raise BackupError(f"{destination} is not a directory; give a directory for the copy")
    with contextlib.suppress(OSError):  # a DEST that does not exist yet is not the spool's
        if os.path.samefile(directory, spool.parent):
            raise BackupError(
                f"{destination or '.'} is the spool's own directory: the copy would replace"
                f" the live spool {spool_path}; give another directory"
            )
    if target.exists() and not overwrite:
        raise BackupError(f"{target} exists; remove it or use --force to replace it")
    return target


def backup_spool(spool_path: str, destination: str, *, overwrite: bool = False) -> list[BackupCopy]:
    """Copy every shard of the spool at `spool_path` into `destination` (see the module
    docstring); the copies, shard 0 first. All or nothing: every shard is copied under
    a temporary name and checked before any copy gets its name, so a shard that cannot
    be copied (corrupt, unreadable) leaves DEST as it was."""
    paths = [path for _, path in shards.existing(spool_path)]
    targets = [check_target(shard, destination, overwrite=overwrite) for shard in paths]
    stale = stale_copies(spool_path, destination)
    if stale and not overwrite:
        names = ", ".join(path.name for path in stale)
        raise BackupError(
            f"{destination} holds {names}, a shard this spool no longer has: a node restored"
            " from it would deliver that mail again; remove it or use --force"
        )
    directory = Path(destination)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise BackupError(f"cannot create {directory}: {error.strerror}") from None
    temporaries = [directory / f".{target.name}.{os.getpid()}.tmp" for target in targets]
    try:
        for shard, temporary in zip(paths, temporaries, strict=True):
            try:
                _copy(shard, temporary)
            except apsw.Error as error:
                raise BackupError(
                    f"{shard}: {error}; nothing was replaced in {destination}"
                ) from None
        for copy in stale:
            shards.remove(str(copy))
        for temporary, target in zip(temporaries, targets, strict=True):
            _publish(temporary, target, overwrite=overwrite)
    except OSError as error:
        raise BackupError(f"{destination}: {error.strerror}") from None
    finally:
        for temporary in temporaries:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    return [BackupCopy(str(target), target.stat().st_size) for target in targets]


def stale_copies(spool_path: str, destination: str) -> list[Path]:
    """Shard copies in `destination` whose shard the spool at `spool_path` lacks."""
    ours = {index for index, _ in shards.existing(spool_path)}
    copies = shards.existing(str(Path(destination) / Path(spool_path).name))
    return [Path(path) for index, path in copies if index not in ours]


def _copy(spool_path: str, temporary: Path) -> None:
    # Read-write without CREATE: a missing spool is an error, and a WAL left by a crash
    # can be recovered; nothing is written to the spool.
    source = apsw.Connection(spool_path, flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        source.set_busy_timeout(db.BUSY_TIMEOUT_MS)
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(descriptor)  # a new file: no connection to it exists yet
        copy = apsw.Connection(str(temporary))
        try:
            with copy.backup("main", source, "main") as step:
                step.step(-1)  # all pages from one snapshot: never restarted by writers
            verdict = db.check_integrity(copy)
            if verdict != "ok":
                raise BackupError(f"the copy failed its integrity check: {verdict}")
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            copy.close()
    finally:
        source.close()


def _publish(temporary: Path, target: Path, *, overwrite: bool) -> None:
    """fsync the copy, give it its name (atomically), fsync the directory."""
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if overwrite:
        os.replace(temporary, target)
    else:
        try:
            os.link(temporary, target)  # fails if a copy appeared meanwhile
        except FileExistsError:
            raise BackupError(f"{target} exists; remove it or use --force to replace it") from None
    directory = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
