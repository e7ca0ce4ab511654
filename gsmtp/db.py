"""The SQLite database under the spool and the accounts: pragmas, schema, write path.

Durability rules live here: WAL, `synchronous=FULL` (a commit is on disk when it
returns; NORMAL may lose the last commits on power loss), a busy timeout, file mode 0600.
Schema changes are numbered migrations recorded in `PRAGMA user_version`.

Never open and close the database file beside a live connection: closing *any*
descriptor of a file drops every POSIX lock the process holds on it, and an outside
reader (`sqlite3 spool.sqlite ...`) then believes it is the last user, checkpoints and
unlinks `-wal` and `-shm` under the running server ("How To Corrupt An SQLite Database
File" §2.2). So the file is created (0600) only when it does not exist yet, before any
connection to it exists, and never touched with plain `open()` again.

Space comes back: new spools use incremental auto-vacuum (`incremental_vacuum` hands
free pages back to the file system) and every connection limits the WAL file left
behind after a checkpoint to JOURNAL_SIZE_LIMIT.

No threads here: the server's write path and body reader live in `gsmtp.writer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import apsw

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000
AUTOCHECKPOINT_PAGES = 50000  # about 200 MB of WAL
# The WAL is cut back to this size when it restarts after a checkpoint. Below the WAL
# written between two checkpoints under load (so the hot path never pays for growing
# the file again), far below what a backlog of large messages makes it grow to.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL

_MIGRATIONS: tuple[str, ...] = (
    # 1: the seed's users/spool/rcpt, made per-recipient.
    """
    CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta(key, value) VALUES ('accounts_serial', 0);
    CREATE TABLE domains(name TEXT PRIMARY KEY);
    CREATE TABLE users(
        address TEXT PRIMARY KEY,
        domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        local_part TEXT NOT NULL,
        password_hash TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE messages(
        id TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        body BLOB NOT NULL,
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        client TEXT NOT NULL,
        helo TEXT NOT NULL,
        smtputf8 INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE recipients(
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'delivered', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        lease_until REAL,
        bounce_requested INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (message_id, address)
    );
    CREATE INDEX recipients_due ON recipients(status, next_attempt_at);
    CREATE TRIGGER domains_changed_insert AFTER INSERT ON domains
        BEGIN UPDATE meta SET value = value + 1 WHERE key = 'accounts_serial'; END;
    CREATE TRIGGER domains_changed_delete AFTER DELETE ON domains
        BEGIN UPDATE meta SET value = value + 1 WHERE key = 'accounts_serial'; END;
    CREATE TRIGGER users_changed_insert AFTER INSERT ON users
        BEGIN UPDATE meta SET value = value + 1 WHERE key = 'accounts_serial'; END;
    CREATE TRIGGER users_changed_delete AFTER DELETE ON users
        BEGIN UPDATE meta SET value = value + 1 WHERE key = 'accounts_serial'; END;
    """,
    # RFC 3461 DSN parameters as the client gave them (NULL: not given). xtext values are
    # stored decoded; dsn_notify is "NEVER" or a comma list of SUCCESS, FAILURE, DELAY;
    # dsn_orcpt is "addr-type;address".
    """
    ALTER TABLE messages ADD COLUMN dsn_ret TEXT CHECK (dsn_ret IN ('FULL', 'HDRS'));
    ALTER TABLE messages ADD COLUMN dsn_envid TEXT;
    ALTER TABLE recipients ADD COLUMN dsn_notify TEXT;
    ALTER TABLE recipients ADD COLUMN dsn_orcpt TEXT;
    """,
    # The queue manager (issue 7): ownership instead of expiring leases, notices collected
    # per recipient, delay warnings recorded, unreadable messages set aside, flush signal.
    """
    ALTER TABLE recipients RENAME COLUMN lease_until TO claimed_due;
    UPDATE recipients SET next_attempt_at = claimed_due - 3600, claimed_due = NULL
        WHERE claimed_due IS NOT NULL;  -- old one-hour leases: due from their claim
    ALTER TABLE recipients ADD COLUMN notice_pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE recipients ADD COLUMN last_status TEXT;
    ALTER TABLE recipients ADD COLUMN remote_mta TEXT;
    ALTER TABLE messages ADD COLUMN notice_kind TEXT;
    ALTER TABLE messages ADD COLUMN delay_warned_at REAL;
    ALTER TABLE messages ADD COLUMN corrupt TEXT;
    CREATE INDEX recipients_notice ON recipients(message_id) WHERE notice_pending = 1;
    INSERT OR IGNORE INTO meta(key, value) VALUES ('flush_serial', 0);
    """,
    # AUTH and submission: a disabled user cannot log in; may_send_as is a JSON list of
    # normalised addresses and "@domain" entries it may use as MAIL FROM besides its own.
    # Any change to a user (password, flag, senders) bumps the serial, so a running
    # server sees it within AccountsCache.REFRESH_SECONDS.
    """
    ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN may_send_as TEXT NOT NULL DEFAULT '[]';
    CREATE TRIGGER users_changed_update AFTER UPDATE ON users
        BEGIN UPDATE meta SET value = value + 1 WHERE key = 'accounts_serial'; END;
    """,
    # Bodies written as they arrive (bounded memory): a large message's content is in
    # body_parts, numbered from 0, after messages.body (then its Received: header only);
    # messages.parts says how many. Parts are written before their message row exists
    # (so no foreign key); they go with their message (the trigger), and parts with no
    # message (a client gone mid-DATA, a crash) are removed by the server.
    """
    ALTER TABLE messages ADD COLUMN parts INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE body_parts(
        message_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (message_id, seq)
    );
    CREATE TRIGGER messages_parts_delete AFTER DELETE ON messages WHEN old.parts > 0
        BEGIN DELETE FROM body_parts WHERE message_id = old.id; END;
    """,
    # Queue control (issue 11): a held message is kept until an operator releases it (its
    # queued recipients are unscheduled meanwhile, their statuses kept); what the CLI
    # did is left in admin_actions for the running server to act on and log (audit).
    """
    ALTER TABLE messages ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE admin_actions(
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        message_id TEXT,
        domain TEXT,
        count INTEGER NOT NULL DEFAULT 0
    );
    """,
)


def query(connection: apsw.Connection, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """All rows of a statement, untyped (SQLite values are checked where they are used)."""
    return [tuple(row) for row in connection.execute(sql, params)]


def execute_values(
    connection: apsw.Connection,
    statement: str,
    rows: list[tuple[Any, ...]],
    *,
    cache: bool = True,
) -> None:
    """Run `statement` (containing one `{values}`) with all rows as a multi-row VALUES
    list. One statement is one step: apsw gives up the GIL once per step, so a single
    step instead of one per row keeps the writer thread from waiting on the event loop
    for the GIL again and again.

    `cache=False` for large values (bodies): a statement in apsw's cache keeps the
    values last bound to it until it runs again, and each number of rows is a statement
    of its own, so cached inserts of large bodies would hold on to many of them."""
    if not rows:
        return
    width = len(rows[0])
    per_chunk = max(1, _MAX_VARIABLES // width)
    for start in range(0, len(rows), per_chunk):
        chunk = rows[start : start + per_chunk]
        placeholders = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
        connection.execute(
            statement.format(values=placeholders),
            [value for row in chunk for value in row],
            can_cache=cache,
        )


_MAX_VARIABLES = 30000  # under SQLite's default limit of 32766 bound parameters


def scalar(connection: apsw.Connection, sql: str, params: Any = ()) -> Any:
    """The first column of the first row, or None."""
    rows = query(connection, sql, params)
    return rows[0][0] if rows else None


class DatabaseError(Exception):
    """The spool cannot be opened or used; the message names the file and the cause."""


class NotASpool(DatabaseError):
    """The file is another program's SQLite database; nothing was written to it."""


def connect(path: str) -> apsw.Connection:
    """Open (creating 0600 if needed) and configure a connection; apply migrations."""
    file = Path(path)
    foreign = not_a_spool(path)  # before anything could write to it
    if foreign:
        raise NotASpool(f"{path}: not a gsmtp spool ({foreign}); left as it is")
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_private(file)
        connection = apsw.Connection(str(file))
        connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        if int(scalar(connection, "PRAGMA user_version")) == 0 and not _has_tables(connection):
            # Only possible before the first table exists; older spools are converted
            # once by `convert_to_incremental_vacuum` at server start-up.
            connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = scalar(connection, "PRAGMA journal_mode=WAL")
        if mode != "wal":
            raise DatabaseError(f"{path}: cannot switch to WAL mode (got {mode})")
        connection.execute("PRAGMA synchronous=FULL")
        # Checkpoints run on their own thread (ThreadReader.checkpoint); this is only the
        # safety net that keeps the WAL bounded should they fall behind.
        connection.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        connection.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        connection.execute("PRAGMA foreign_keys=ON")
        _migrate(connection)
    except apsw.Error as error:
        raise DatabaseError(f"{path}: {error}") from None
    except OSError as error:
        raise DatabaseError(f"{path}: {error.strerror}") from None
    return connection


def _create_private(file: Path) -> None:
    """Create the database file with mode 0600 whatever the umask, only if it does not
    exist yet. A file that did not exist has no connection in this process whose locks
    closing this descriptor could drop (see the module docstring); an existing file is
    left alone, however it was made."""
    try:
        descriptor = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


# Tables every gsmtp spool has had since its first migration.
_SPOOL_TABLES = frozenset({"meta", "domains", "users", "messages", "recipients"})


def not_a_spool(path: str) -> str | None:
    """Why the file at `path` is some other program's, or None for a gsmtp spool, an
    empty file or no file. A file that only has a spool's name (a stray
    `spool-2.sqlite`, a `spool.path` set to the wrong file) must not be migrated,
    switched to WAL, adopted and deleted as an orphan shard, or even checkpointed or
    rolled back: read through a read-only connection, which does none of that (it may
    add a -shm beside a WAL database, as any reader does). DatabaseError when it cannot
    tell because another program holds the file locked for writing: a spool is in WAL
    mode, where a reader waits for no writer, so it is left alone like a foreign one."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    # An absolute path with one leading slash: in a URI, "//tmp/..." would name a host.
    uri = "file:/" + quote(os.path.abspath(path).lstrip("/"))
    try:
        return _probe(path, uri, immutable=False)
    except apsw.ReadOnlyError:
        # A hot rollback journal beside it (a writer killed mid-transaction): only a
        # write can resolve it. A spool's backup copy is in rollback mode and may have
        # one; what the file says before the rollback is enough to tell whose it is,
        # and a file that cannot be read as it stands is left alone.
        try:
            return _probe(path, uri, immutable=True)
        except apsw.Error as error:
            raise DatabaseError(
                f"{path}: a rollback journal is pending and the file cannot be read as it"
                f" stands ({error}); left as it is (if it is a gsmtp spool, open it once"
                " with sqlite3 to roll the journal back)"
            ) from None


def _probe(path: str, uri: str, *, immutable: bool) -> str | None:
    """Why the file at `uri` is foreign, or None; apsw.ReadOnlyError for a hot journal
    and, when the file is read as it stands (`immutable`), any error reading it."""
    opened = f"{uri}?immutable=1" if immutable else f"{uri}?mode=ro"
    try:
        probe = apsw.Connection(opened, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
    except apsw.Error:
        if immutable:
            raise
        return None  # not for us to say: opening it for real reports why it cannot be
    try:
        probe.set_busy_timeout(BUSY_TIMEOUT_MS)
        return _why_foreign(probe)
    except apsw.NotADBError:
        return "not an SQLite database"
    except apsw.BusyError:
        raise DatabaseError(
            f"{path}: locked by another program's write transaction (a gsmtp spool never"
            " is: it is in WAL mode); left as it is"
        ) from None
    except apsw.ReadOnlyError:
        raise
    except apsw.Error:
        if immutable:
            raise
        return None  # unreadable: likewise
    finally:
        probe.close()


def _why_foreign(connection: apsw.Connection) -> str | None:
    version = int(scalar(connection, "PRAGMA user_version"))
    application = int(scalar(connection, "PRAGMA application_id"))
    if application:
        return f"application_id {application}"
    names = {str(row[0]) for row in query(connection, "SELECT name FROM sqlite_schema")}
    if version == 0:
        return f"it holds {', '.join(sorted(names)[:5])}" if names else None
    missing = sorted(_SPOOL_TABLES - names)
    if not missing:
        return None
    return f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''}"


def _has_tables(connection: apsw.Connection) -> bool:
    return bool(scalar(connection, "SELECT COUNT(*) FROM sqlite_schema"))


def convert_to_incremental_vacuum(connection: apsw.Connection) -> bool:
    """Switch a spool made before incremental auto-vacuum to it: a one-time VACUUM that
    rewrites the whole file (needs exclusive use: the server calls it at start-up, under
    its single-instance lock, before anything else opens the spool). True if it ran."""
    if int(scalar(connection, "PRAGMA auto_vacuum")) == AUTO_VACUUM_INCREMENTAL:
        return False
    connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
    connection.execute("VACUUM")
    return True


def incremental_vacuum(connection: apsw.Connection, pages: int) -> int:
    """Give up to `pages` free pages back to the file system (inside the caller's
    transaction); the number of free pages left. SQLite frees one page per step of the
    statement, so the statement is run to its end."""
    for _ in connection.execute(f"PRAGMA incremental_vacuum({int(pages)})"):
        pass
    return int(scalar(connection, "PRAGMA freelist_count"))


def free_pages(connection: apsw.Connection) -> int:
    """Pages of the file that hold no data (read from the header: cheap)."""
    return int(scalar(connection, "PRAGMA freelist_count"))


def _migrate(connection: apsw.Connection) -> None:
    version = int(scalar(connection, "PRAGMA user_version"))
    if version > len(_MIGRATIONS):
        raise DatabaseError(f"schema version {version} is newer than this gsmtp knows")
    while version < len(_MIGRATIONS):
        with transaction(connection):
            # Read again under the write lock: another process (a worker opening shard 0
            # for its accounts) may have applied this step meanwhile.
            version = int(scalar(connection, "PRAGMA user_version"))
            if version < len(_MIGRATIONS):
                connection.execute(_MIGRATIONS[version])
                connection.execute(f"PRAGMA user_version={version + 1}")
                version += 1


def check_integrity(connection: apsw.Connection) -> str:
    """'ok', or SQLite's first complaint; a corrupt spool must not be served."""
    return str(scalar(connection, "PRAGMA quick_check"))


@contextmanager
def transaction(connection: apsw.Connection) -> Iterator[apsw.Connection]:
    """A synchronous write transaction (CLI and start-up)."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
