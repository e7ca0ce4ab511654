"""The CLI run as root works on the spool as the spool's owner (the service user).

SQLite creates files beside the database (`-wal`, `-shm`, the lock file); made by root,
they would be root's, and the server (running as the service user) could no longer
open its own spool. So before a command opens the spool, a root CLI takes the identity
of the owner of the spool file, or of the directory that will hold it (setgroups([]),
setgid, setuid: for good, the command needs nothing else of root's). A spool whose
directory does not exist yet is refused: root would create the directory and the file
as its own, and the service user could not open them; the message says how to create
the directory for that user.

Does no I/O beyond stat and the identity calls; reads no configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Refused:
    """The command must not go on; `reason` is for the operator."""

    reason: str


@dataclass(frozen=True, slots=True)
class Switched:
    uid: int
    gid: int


def adopt_spool_owner(spool_path: str) -> Switched | Refused | None:
    """As root, become the owner of the spool (or of its directory). None: nothing to do
    (not root, or the spool is root's own)."""
    if os.geteuid() != 0:
        return None
    spool = Path(spool_path)
    directory = spool.parent
    try:
        info = spool.stat() if spool.exists() else directory.stat()
    except FileNotFoundError:
        return Refused(
            f"the spool directory {directory} does not exist; as root this would create "
            "it and the spool as root's, which the service user cannot open. Create it "
            f"for that user first: install -d -o gsmtp -g gsmtp -m 0700 {directory} "
            "(or run this command as that user)"
        )
    except OSError as error:
        return Refused(f"cannot look at the spool {spool}: {error.strerror}")
    if info.st_uid == 0:
        return None
    os.setgroups([])
    os.setgid(info.st_gid)
    os.setuid(info.st_uid)
    return Switched(info.st_uid, info.st_gid)
