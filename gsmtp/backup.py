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
set, all or nothing as far as a file system allows: every target is checked, and every
copy made, checked and fsynced, before any gets its name; then only renames and
unlinks in DEST remain. Refused, with --force too: DEST that is the spool's own
directory by any name, a target (or a -wal, -shm, -journal beside it) that is not a
regular file, or a target that is another running gsmtp's live spool: the backup takes
each target's server lock (`<target>.lock`, left in DEST like any spool's) and holds it
until its copies are in place, so a server cannot start there meanwhile either.
Refused without --force, removed with it: a copy already there, what SQLite
kept beside one (a -wal would be replayed over the new copy when it is opened), and a
shard copy that the spool no longer has (the node had more workers when DEST was last
written: a node restored from DEST would adopt it and deliver its mail again). A file
with a shard's name that is not a gsmtp spool is left out (gsmtp.db.not_a_spool).

Never opens and closes the spool file outside SQLite (see `gsmtp.db`).
"""

from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import apsw

from gsmtp import db, lockfile, shards


class BackupError(Exception):
    """The backup was not made; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class BackupCopy:
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Backup:
    """What `backup_spool` made: the copies, shard 0 first, and the files with a
    shard's name it left out (why each is not a gsmtp spool, for a warning)."""

    copies: list[BackupCopy]
    left_out: list[str]


# What SQLite keeps beside a database file, and would read with a copy put there.
_COMPANIONS = ("-wal", "-shm", "-journal")


def check_target(spool_path: str, destination: str, *, overwrite: bool = False) -> Path:
    """The path the copy of `spool_path` gets in `destination`; BackupError if it may
    not go there:
    - the spool is missing;
    - DEST is empty, not a directory, or the spool's own directory by any name (".", a
      symlink: --force there replaced the live spool under the running server);
    - the target, or a -wal, -shm or -journal beside it, is not a regular file (a
      symlink, a directory);
    - a copy, or a -wal, -shm or -journal beside it (SQLite would replay a WAL left
      there over the copy when it is opened), exists and `overwrite` is off."""
    spool = Path(spool_path)
    if not spool.is_file():
        raise BackupError(f"no spool at {spool_path}")
    if not destination:
        raise BackupError("DEST is empty; give a directory for the copy")
    directory = Path(destination)
    target = directory / spool.name
    if directory.exists() and not directory.is_dir():
        raise BackupError(f"{destination} is not a directory; give a directory for the copy")
    with contextlib.suppress(OSError):  # a DEST that does not exist yet is not the spool's
        if os.path.samefile(directory, spool.parent):
            raise BackupError(
                f"{destination} is the spool's own directory: the copy would replace"
                f" the live spool {spool_path}; give another directory"
            )
    for name in (str(target), *(f"{target}{suffix}" for suffix in _COMPANIONS)):
        if os.path.lexists(name) and (os.path.islink(name) or not os.path.isfile(name)):
            raise BackupError(
                f"{name} exists and is not a regular file; remove it or give another DEST"
            )
    if overwrite:
        return target
    if target.exists():
        raise BackupError(f"{target} exists; remove it or use --force to replace it")
    for suffix in _COMPANIONS:
        if os.path.exists(f"{target}{suffix}"):
            raise BackupError(
                f"{target}{suffix} exists, left by a database opened there: SQLite would read"
                " it with the copy; remove it or use --force"
            )
    return target


def backup_spool(spool_path: str, destination: str, *, overwrite: bool = False) -> Backup:
    """Copy every shard of the spool at `spool_path` into `destination` (see the module
    docstring). All or nothing as far as it can be: every target is checked, and every
    shard copied under a temporary name, checked and fsynced, before any copy gets its
    name; a shard that cannot be copied (corrupt, unreadable, no room) leaves DEST as
    it was. A file with a shard's name that is not a gsmtp spool is left out."""
    try:
        return _backup_spool(spool_path, destination, overwrite=overwrite)
    except OSError as error:
        raise BackupError(f"{error.filename or destination}: {error.strerror}") from None
    except db.DatabaseError as error:  # a shard another program holds locked
        raise BackupError(str(error)) from None


def _backup_spool(spool_path: str, destination: str, *, overwrite: bool) -> Backup:
    paths: list[tuple[int, str]] = []  # (index, path) of the shards to copy
    left_out: list[str] = []
    for index, path in shards.existing(spool_path):
        foreign = db.not_a_spool(path)
        if foreign and index:
            left_out.append(f"{path}: not a gsmtp spool ({foreign})")
        elif foreign:
            raise BackupError(f"{path}: not a gsmtp spool ({foreign})")
        else:
            paths.append((index, path))
    targets = [check_target(shard, destination, overwrite=overwrite) for _, shard in paths]
    stale = stale_copies(destination, Path(spool_path).name, copied={i for i, _ in paths})
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
    locks = _lock_targets(targets)
    for target in targets:  # a killed backup's: under the lock, no backup is making one
        for leftover in directory.glob(f".{glob.escape(target.name)}.*.tmp"):
            _remove_with_companions(leftover)
    temporaries = [directory / f".{target.name}.{os.getpid()}.tmp" for target in targets]
    try:
        for (_, shard), temporary in zip(paths, temporaries, strict=True):
            _copy_or_explain(shard, temporary, destination)
        # Every copy made: from here on, only renames and unlinks in one directory.
        for temporary, target in zip(temporaries, targets, strict=True):
            _publish(temporary, target, overwrite=overwrite)
        for copy in stale:
            shards.remove(str(copy))
        _fsync(directory, directory=True)
    finally:
        for temporary in temporaries:
            _remove_with_companions(temporary)
        for lock in locks:
            lock.release()
    return Backup([BackupCopy(str(t), t.stat().st_size) for t in targets], left_out)


def stale_copies(destination: str, name: str, *, copied: set[int]) -> list[Path]:
    """Shard copies of the spool file `name` in `destination` whose shard is not among
    the `copied` ones (the spool no longer has it, or it was left out as no spool)."""
    copies = shards.existing(str(Path(destination) / name))
    return [Path(path) for index, path in copies if index not in copied]


def _lock_targets(targets: list[Path]) -> list[lockfile.InstanceLock]:
    """Each target's server lock, held until the copies are in place: a target that is
    a running gsmtp's live spool is refused, and a server cannot start on one while its
    copy is being made (it meets the lock and names this process)."""
    locks: list[lockfile.InstanceLock] = []
    try:
        for target in targets:
            lock = lockfile.acquire(lockfile.lock_path(str(target)), backup=True)
            if isinstance(lock, lockfile.HeldBy):
                holder = f" (PID {lock.pid})" if lock.pid is not None else ""
                raise BackupError(
                    f"{target} is in use by a running gsmtp, server or backup{holder}:"
                    " a copy there would replace a live spool or race another backup;"
                    " give another directory, or wait for the backup to end"
                )
            locks.append(lock)
    except BaseException:
        for held in locks:
            held.release()
        raise
    return locks


def _copy_or_explain(shard: str, temporary: Path, destination: str) -> None:
    """`_copy`, its failures told as BackupError (DEST is unchanged at this point)."""
    unchanged = f"nothing was replaced in {destination}"
    try:
        _copy(shard, temporary)
    except apsw.FullError:
        raise BackupError(
            f"no room for the copy of {shard} in {destination}; {unchanged}"
        ) from None
    except apsw.Error as error:
        detail = str(error) if str(error) not in ("", "not an error") else type(error).__name__
        raise BackupError(f"copying {shard} into {destination}: {detail}; {unchanged}") from None
    except OSError as error:
        where = error.filename or destination
        raise BackupError(f"{where}: {error.strerror}; {unchanged}") from None


def _remove_with_companions(path: Path) -> None:
    for name in (str(path), *(f"{path}{suffix}" for suffix in _COMPANIONS)):
        with contextlib.suppress(OSError):  # gone, or a read-only DEST: nothing to undo
            os.unlink(name)


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
    _fsync(temporary)  # now, so an I/O error comes before any copy is published


def _publish(temporary: Path, target: Path, *, overwrite: bool) -> None:
    """Give the fsynced copy its name (atomically). With `overwrite`, what SQLite kept
    beside the old copy goes first: a WAL there would be replayed over the new one."""
    if overwrite:
        for suffix in _COMPANIONS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{target}{suffix}")
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)  # fails if a copy appeared meanwhile
    except FileExistsError:
        raise BackupError(f"{target} exists; remove it or use --force to replace it") from None


def _fsync(path: Path, *, directory: bool = False) -> None:
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
