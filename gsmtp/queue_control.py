"""Queue control from the CLI: hold, release, flush, delete with filters; the qshape summary;
waking the running server. One spool connection in, a value out (no printing).

Each function takes one connection to one spool (shard) and returns what it changed or
counted, so a caller with several shards loops and sums. Every change is one
transaction that also records what was done in `admin_actions`; the running server
takes those rows, acts on them (a flush forgets the dead-destination memory of what it
made due) and logs each as an audit line. `wake_server` then sends SIGUSR1 to the
server holding the spool's lock, so it does that at once rather than at its next poll.

Hold is a flag on the message (`messages.held`): its queued recipients keep their
status and are unscheduled (next_attempt_at = UNSCHEDULED, no owner, like a message set
aside) so no claim sees them; one being delivered at that moment finishes that attempt
and is unscheduled again when its result is recorded (spool.apply_results). Release
makes them due now (Postfix's `postsuper -H` followed by a flush of them).
"""

from __future__ import annotations

import errno
import json
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import apsw

from gsmtp import lockfile
from gsmtp.db import query, transaction
from gsmtp.spool import DOMAIN_OF_ADDRESS, UNSCHEDULED

# qshape's default age buckets, in minutes: a message is counted in the first bucket
# its age is below; the last column counts what is older than every bucket.
SUMMARY_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which messages a command touches (all given criteria must hold). `sender` and
    `recipient` match a part of the address, case-insensitively (like exiqgrep's
    patterns, without regular expressions); `domain` is the exact destination domain of
    a queued recipient; `older_than` is an age in seconds."""

    sender: str | None = None
    recipient: str | None = None
    domain: str | None = None
    older_than: float | None = None

    @property
    def empty(self) -> bool:
        return (
            self.sender is None
            and self.recipient is None
            and self.domain is None
            and self.older_than is None
        )


NO_FILTER = Filter()


@dataclass(frozen=True, slots=True)
class Summary:
    """Messages by destination domain and age (qshape): `rows[domain][i]` counts the
    messages with a queued recipient in `domain` whose age falls in bucket i (the last
    index: older than every bucket). A message counts once per domain it waits for."""

    buckets: tuple[int, ...] = SUMMARY_BUCKETS
    rows: dict[str, list[int]] = field(default_factory=dict)

    def total(self) -> list[int]:
        width = len(self.buckets) + 1
        return [sum(row[i] for row in self.rows.values()) for i in range(width)]

    def merged(self, other: Summary) -> Summary:
        """Two shards' summaries as one."""
        rows = {domain: list(counts) for domain, counts in self.rows.items()}
        for domain, counts in other.rows.items():
            mine = rows.setdefault(domain, [0] * len(counts))
            for i, count in enumerate(counts):
                mine[i] += count
        return Summary(self.buckets, rows)


def matching(
    connection: apsw.Connection,
    selection: Filter = NO_FILTER,
    now: float = 0.0,
    ids: Sequence[str] | None = None,
    *,
    corrupt: bool = False,
) -> list[str]:
    """Ids of the messages that `selection` selects, restricted to `ids` when given,
    oldest first; those set aside as corrupt only with `corrupt`."""
    where, params = _where(selection, now, ids, corrupt)
    rows = query(
        connection,
        f"SELECT id FROM messages m WHERE {where} ORDER BY received_at, rowid",
        params,
    )
    return [str(row[0]) for row in rows]


def hold(
    connection: apsw.Connection,
    selection: Filter = NO_FILTER,
    now: float = 0.0,
    ids: Sequence[str] | None = None,
) -> list[str]:
    """Hold the selected messages not held yet; the ids held."""
    with transaction(connection):
        held = matching(connection, selection, now, ids)
        held = [i for i in held if not _is_held(connection, i)]
        _each(
            connection,
            "UPDATE messages SET held = 1 WHERE id = ?",
            held,
        )
        _each(
            connection,
            "UPDATE recipients SET next_attempt_at = ?2 WHERE message_id = ?1"
            " AND status = 'queued' AND claimed_due IS NULL",
            held,
            UNSCHEDULED,
        )
        record(connection, "hold", now, [(i, None, 0) for i in held])
    return held


def release(
    connection: apsw.Connection,
    selection: Filter = NO_FILTER,
    now: float = 0.0,
    ids: Sequence[str] | None = None,
) -> list[str]:
    """Release the selected held messages: their queued recipients are due now."""
    with transaction(connection):
        released = [i for i in matching(connection, selection, now, ids) if _is_held(connection, i)]
        _each(connection, "UPDATE messages SET held = 0 WHERE id = ?", released)
        _each(
            connection,
            "UPDATE recipients SET next_attempt_at = ?2 WHERE message_id = ?1"
            " AND status = 'queued' AND claimed_due IS NULL AND next_attempt_at >= ?3",
            released,
            now,
            UNSCHEDULED,
        )
        record(connection, "release", now, [(i, None, 0) for i in released])
    return released


def flush(
    connection: apsw.Connection,
    now: float,
    *,
    ids: Sequence[str] | None = None,
    domain: str | None = None,
) -> int:
    """Make queued recipients due now (like `postqueue -f`, `-i ID`, `-s DOMAIN`): all of
    them, those of the messages `ids`, or those for `domain`; held messages stay held.
    The number of recipients made due. The server forgets the dead-destination memory of
    every domain flushed (of all when neither ids nor a domain is given)."""
    domain = normal_domain(domain) if domain is not None else None
    conditions = ["status = 'queued'", "next_attempt_at < :unscheduled"]
    if domain is not None:
        conditions.append(f"{DOMAIN_OF_ADDRESS} = :domain")
    if ids is not None:
        conditions.append("message_id IN (SELECT value FROM json_each(:ids))")
    params: dict[str, Any] = {
        "now": now,
        "unscheduled": UNSCHEDULED,
        "domain": domain,
        "ids": _json_list(ids or []),
    }
    where = " AND ".join(conditions)
    with transaction(connection):
        flushed = query(
            connection,
            f"SELECT message_id, {DOMAIN_OF_ADDRESS}, COUNT(*) FROM recipients WHERE {where}"
            " GROUP BY 1, 2",
            params,
        )
        connection.execute(f"UPDATE recipients SET next_attempt_at = :now WHERE {where}", params)
        count = int(connection.changes())
        if ids is None and domain is None:
            record(connection, "flush", now, [(None, None, count)])
        elif ids is None:
            record(connection, "flush", now, [(None, domain, count)])
        else:
            record(connection, "flush", now, [(str(m), str(d), int(n)) for m, d, n in flushed])
    return count


def delete(
    connection: apsw.Connection,
    selection: Filter = NO_FILTER,
    now: float = 0.0,
    ids: Sequence[str] | None = None,
) -> list[str]:
    """Delete the selected messages without notice (`postsuper -d`); the ids deleted.
    One being delivered right now finishes that attempt (its result finds no row)."""
    with transaction(connection):
        # An id given explicitly may name a message set aside as corrupt (`queue list
        # --corrupt` shows them so that they can be removed).
        deleted = matching(connection, selection, now, ids, corrupt=ids is not None)
        _each(connection, "DELETE FROM messages WHERE id = ?", deleted)
        record(connection, "delete", now, [(i, None, 0) for i in deleted])
    return deleted


def record(
    connection: apsw.Connection,
    action: str,
    now: float,
    entries: Iterable[tuple[str | None, str | None, int]],
) -> None:
    """Leave (message id, domain, count) entries of `action` for the server's audit log
    (inside the caller's transaction)."""
    for message_id, domain, count in entries:
        connection.execute(
            "INSERT INTO admin_actions(at, action, message_id, domain, count)"
            " VALUES (?, ?, ?, ?, ?)",
            (now, action, message_id, domain, count),
        )


def held_count(connection: apsw.Connection) -> int:
    rows = query(connection, "SELECT COUNT(*) FROM messages WHERE held = 1")
    return int(rows[0][0])


def summary(
    connection: apsw.Connection, now: float, buckets: tuple[int, ...] = SUMMARY_BUCKETS
) -> Summary:
    """Queued messages by destination domain × age (`qshape`). Held messages and
    those set aside as corrupt are left out: they are not waiting for delivery."""
    rows = query(
        connection,
        f"SELECT DISTINCT r.message_id, {DOMAIN_OF_ADDRESS},"
        " m.received_at FROM recipients r JOIN messages m ON m.id = r.message_id"
        " WHERE r.status = 'queued' AND m.held = 0 AND m.corrupt IS NULL",
    )
    table: dict[str, list[int]] = {}
    for _, domain, received_at in rows:
        if not isinstance(received_at, int | float):
            continue
        age_minutes = max(0.0, now - float(received_at)) / 60.0
        column = next((i for i, limit in enumerate(buckets) if age_minutes < limit), len(buckets))
        counts = table.setdefault(str(domain), [0] * (len(buckets) + 1))
        counts[column] += 1
    return Summary(buckets, dict(sorted(table.items(), key=lambda item: -sum(item[1]))))


def normal_domain(domain: str) -> str:
    """A destination domain as the spool compares it (DOMAIN_OF_ADDRESS of a lower-case
    address): lower case, without the trailing dot of an absolute name, so that
    `--domain Remote.Example.` selects the same recipients in list, hold and flush."""
    return domain.strip().lower().rstrip(".")


# -- waking the server ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Woken:
    pid: int


@dataclass(frozen=True, slots=True)
class NotWoken:
    """No server to wake (not running), or it could not be signalled: it sees the change
    at its next poll (within a second) or at its next start."""

    reason: str
    running: bool = True  # False: no server holds the spool


def wake_server(spool_path: str) -> Woken | NotWoken:
    """SIGUSR1 to the server that holds the spool's lock (the PID in the lock file, and
    only once that process is seen to hold the lock: a stale or planted PID could name
    an unrelated process)."""
    path = lockfile.lock_path(spool_path)
    try:
        pid = lockfile.holder(path)
    except lockfile.HolderUnverified as unverified:
        return NotWoken(
            f"the spool's lock is held, but this process cannot read /proc/locks or"
            f" /proc/{unverified.pid}/fdinfo to confirm that PID {unverified.pid}, which"
            f" the lock file names, holds it"
        )
    if pid is None:
        return NotWoken("no server holds the spool's lock", running=False)
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError as error:
        if error.errno == errno.ESRCH:
            return NotWoken("the server has just stopped", running=False)
        return NotWoken(f"cannot signal PID {pid}: {error.strerror}")
    return Woken(pid)


# -- helpers --------------------------------------------------------------------------------


def _where(
    selection: Filter, now: float, ids: Sequence[str] | None, corrupt: bool
) -> tuple[str, dict[str, Any]]:
    conditions = ["1" if corrupt else "m.corrupt IS NULL"]
    params: dict[str, Any] = {}
    if ids is not None:
        conditions.append("m.id IN (SELECT value FROM json_each(:ids))")
        params["ids"] = _json_list(ids)
    if selection.sender is not None:
        conditions.append("instr(lower(m.sender), lower(:sender)) > 0")
        params["sender"] = selection.sender
    if selection.recipient is not None:
        conditions.append(
            "EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id"
            " AND instr(lower(r.address), lower(:recipient)) > 0)"
        )
        params["recipient"] = selection.recipient
    if selection.domain is not None:
        conditions.append(
            "EXISTS (SELECT 1 FROM recipients WHERE message_id = m.id AND status = 'queued'"
            f" AND {DOMAIN_OF_ADDRESS} = :domain)"
        )
        params["domain"] = normal_domain(selection.domain)
    if selection.older_than is not None:
        conditions.append("m.received_at <= :before")
        params["before"] = now - selection.older_than
    return " AND ".join(conditions), params


def _is_held(connection: apsw.Connection, message_id: str) -> bool:
    rows = query(connection, "SELECT held FROM messages WHERE id = ?", (message_id,))
    return bool(rows and rows[0][0])


def _each(connection: apsw.Connection, sql: str, ids: Sequence[str], *extra: Any) -> None:
    for message_id in ids:
        connection.execute(sql, (message_id, *extra))


def _json_list(values: Sequence[str]) -> str:
    return json.dumps(list(values))
