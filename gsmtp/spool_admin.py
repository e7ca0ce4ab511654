"""The operator's view of the spool: `gsmtp queue list|show|stats|flush|delete|bounce`.

`EveryShard` gives the same view of every spool shard together (server.workers).

Runs in the CLI process on a connection of its own, beside a running server (WAL lets
both in). Every reading tolerates rows that do not decode: a message set aside as
corrupt must still be listed. Text is read as the bytes stored (apsw raises on TEXT
that is not UTF-8, which an outside writer can store) and decoded with U+FFFD for what
does not decode; the CLI escapes control characters when it prints. Recipient rows
without a message (deleted from outside with foreign keys off) are listed with the
corrupt messages until the queue manager removes them. Changes (flush, delete, bounce,
and hold/release in gsmtp.queue_control) are recorded in `admin_actions`, which the
running queue manager takes, acts on (a flush forgets its dead destinations) and logs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from gsmtp import queue_control
from gsmtp.db import query, scalar, transaction
from gsmtp.spool import UNSCHEDULED


@dataclass(frozen=True, slots=True)
class RecipientRow:
    address: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    in_delivery: bool = False  # owned by a running delivery right now


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: str
    sender: str
    size: int
    received_at: float
    client: str
    helo: str
    recipients: tuple[RecipientRow, ...]
    corrupt: str | None = None
    held: bool = False

    @property
    def in_delivery(self) -> bool:
        return any(r.in_delivery for r in self.recipients)

    @property
    def next_attempt_at(self) -> float | None:
        """When the queue runner next tries a recipient not being delivered now (None:
        none waits, e.g. held or set aside)."""
        due = [
            r.next_attempt_at
            for r in self.recipients
            if r.status == "queued" and not r.in_delivery and r.next_attempt_at < UNSCHEDULED
        ]
        return min(due, default=None)


class SpoolAdmin:
    """`gsmtp queue ...`: list, show, stats, flush, delete, bounce."""

    def __init__(self, connection: apsw.Connection) -> None:
        self._db = connection

    def messages(self, *, corrupt: bool = False) -> list[MessageRow]:
        """Messages in the queue, or those set aside as corrupt (and after them, one
        entry per message id that recipient rows name but no message has)."""
        rows = query(
            self._db,
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            f" WHERE corrupt IS {'NOT ' if corrupt else ''}NULL ORDER BY received_at",
        )
        found = [self._message_row(row) for row in rows]
        return found + self._without_message() if corrupt else found

    def matching(self, selection: queue_control.Filter, now: float) -> list[str]:
        """Ids of the messages (corrupt ones too) `selection` selects: `queue list`'s filters."""
        return queue_control.matching(self._db, selection, now, corrupt=True)

    def message(self, message_id: str) -> MessageRow | None:
        rows = query(
            self._db, f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        )
        return self._message_row(rows[0]) if rows else None

    def headers(self, message_id: str) -> bytes:
        rows = query(
            self._db, "SELECT CAST(body AS BLOB), parts FROM messages WHERE id = ?", (message_id,)
        )
        if not rows or not isinstance(rows[0][0], bytes):
            return b""
        value: bytes = rows[0][0]
        parts = rows[0][1]
        end = value.find(b"\r\n\r\n")
        if end < 0 and parts:
            # A large message: its content is in body parts; read them only up to the
            # end of the header section.
            value = _head_from_parts(self._db, message_id, value)
            end = value.find(b"\r\n\r\n")
        return value if end < 0 else value[: end + 2]

    def stats(self) -> dict[str, int]:
        messages = scalar(self._db, "SELECT COUNT(*) FROM messages")
        recipients = scalar(self._db, "SELECT COUNT(*) FROM recipients")
        by_status = dict(query(self._db, "SELECT status, COUNT(*) FROM recipients GROUP BY status"))
        result = {"messages": int(messages), "recipients": int(recipients)}
        for status in ("queued", "delivered", "failed"):
            result[status] = int(by_status.get(status, 0))
        result["corrupt"] = int(
            scalar(self._db, "SELECT COUNT(*) FROM messages WHERE corrupt IS NOT NULL")
        )
        result["held"] = queue_control.held_count(self._db)
        return result

    def flush(self, now: float | None = None) -> int:
        """Make every queued recipient due now and tell the running queue manager to
        forget its dead destinations (like `postqueue -f`)."""
        return queue_control.flush(self._db, now if now is not None else time.time())

    def delete(self, message_id: str) -> bool:
        return bool(queue_control.delete(self._db, now=time.time(), ids=[message_id]))

    def bounce(self, message_id: str, now: float | None = None) -> int:
        """Ask the runner to bounce a message's queued recipients at once. Those being
        delivered right now keep their delivery: if it ends deferred they are due again
        at once (see spool.apply_results) and bounced then; if it delivers them, there
        is nothing to bounce. Recipients set aside as corrupt are left alone."""
        when = now if now is not None else time.time()
        with transaction(self._db):
            self._db.execute(
                "UPDATE recipients SET bounce_requested = 1,"
                " next_attempt_at = CASE WHEN claimed_due IS NULL THEN :now"
                " ELSE next_attempt_at END,"
                " claimed_due = CASE WHEN claimed_due IS NULL THEN NULL"
                " ELSE min(claimed_due, :now) END"
                " WHERE message_id = :id AND status = 'queued'"
                " AND (next_attempt_at < :unscheduled OR claimed_due IS NOT NULL)",
                {"now": when, "id": message_id, "unscheduled": UNSCHEDULED},
            )
            changed = int(self._db.changes())
            if changed:
                queue_control.record(self._db, "bounce", when, [(message_id, None, changed)])
            return changed

    def _message_row(self, row: tuple[Any, ...]) -> MessageRow:
        """Tolerant of what does not decode: a corrupt message must still be listed."""
        rowid, message_id, sender, size, received_at, client, helo, corrupt, held = row
        recipients = query(
            self._db,
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients"
            " WHERE message_id = (SELECT id FROM messages WHERE rowid = ?) ORDER BY address",
            (rowid,),
        )
        return MessageRow(
            _text(message_id),
            _text(sender),
            size if isinstance(size, int) else 0,
            float(received_at) if isinstance(received_at, int | float) else 0.0,
            _text(client),
            _text(helo),
            tuple(_recipient_row(row[1:]) for row in recipients),
            _text(corrupt) if corrupt is not None else None,
            held == 1,
        )

    def _without_message(self) -> list[MessageRow]:
        """Recipient rows whose message does not exist, one entry per message id they
        name (a scan of every recipient: for the operator's `queue list --corrupt`)."""
        rows = query(
            self._db,
            f"SELECT {_RECIPIENT_COLUMNS} FROM recipients"
            " WHERE NOT EXISTS (SELECT 1 FROM messages WHERE id = recipients.message_id)"
            " ORDER BY message_id, address",
        )
        entries: dict[str, list[RecipientRow]] = {}
        for row in rows:
            entries.setdefault(_text(row[0]), []).append(_recipient_row(row[1:]))
        return [
            MessageRow(
                message_id,
                "",
                0,
                0.0,
                "",
                "",
                tuple(recipients),
                "recipient rows without a message",
            )
            for message_id, recipients in entries.items()
        ]


# Text columns read as stored bytes (see the module docstring).
_MESSAGE_COLUMNS = (
    "rowid, CAST(id AS BLOB), CAST(sender AS BLOB), size, received_at, CAST(client AS BLOB),"
    " CAST(helo AS BLOB), CAST(corrupt AS BLOB), held"
)
_RECIPIENT_COLUMNS = (
    "CAST(message_id AS BLOB), CAST(address AS BLOB), CAST(status AS BLOB), attempts,"
    " coalesce(claimed_due, next_attempt_at), CAST(last_error AS BLOB), claimed_due IS NOT NULL"
)


def _recipient_row(row: tuple[Any, ...]) -> RecipientRow:
    address, status, attempts, due, error, owned = row
    return RecipientRow(
        _text(address),
        _text(status),
        attempts if isinstance(attempts, int) else 0,
        float(due) if isinstance(due, int | float) else 0.0,
        _text(error) if error is not None else None,
        owned == 1,
    )


def _head_from_parts(connection: apsw.Connection, message_id: str, body: bytes) -> bytes:
    """`body` and as many parts as it takes to hold the end of the header section."""
    head = bytearray(body)
    cursor = connection.execute(
        "SELECT data FROM body_parts WHERE message_id = ? ORDER BY seq", (message_id,)
    )
    try:
        for (data,) in cursor:
            if not isinstance(data, bytes):
                break
            searched = max(0, len(head) - 3)
            head += data
            if head.find(b"\r\n\r\n", searched) >= 0:
                break
    finally:
        cursor.close()
    return bytes(head)


def _text(value: Any) -> str:
    """A value read with CAST(... AS BLOB): undecodable bytes become U+FFFD."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


class EveryShard:
    """`gsmtp queue ...` over every spool shard (gsmtp.shards) at once: lists merged by
    arrival, counts summed, an id looked for in each (ids are unique across shards)."""

    def __init__(self, admins: Sequence[SpoolAdmin]) -> None:
        self._admins = tuple(admins)

    def messages(self, *, corrupt: bool = False) -> list[MessageRow]:
        found = [row for admin in self._admins for row in admin.messages(corrupt=corrupt)]
        return sorted(found, key=lambda row: row.received_at)

    def matching(self, selection: queue_control.Filter, now: float) -> list[str]:
        return [id_ for admin in self._admins for id_ in admin.matching(selection, now)]

    def message(self, message_id: str) -> MessageRow | None:
        return next(
            (row for admin in self._admins if (row := admin.message(message_id)) is not None),
            None,
        )

    def headers(self, message_id: str) -> bytes:
        return next(
            (admin.headers(message_id) for admin in self._admins if admin.message(message_id)),
            b"",
        )

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for admin in self._admins:
            for key, value in admin.stats().items():
                total[key] = total.get(key, 0) + value
        return total

    def flush(self, now: float | None = None) -> int:
        return sum(admin.flush(now) for admin in self._admins)

    def delete(self, message_id: str) -> bool:
        return any([admin.delete(message_id) for admin in self._admins])

    def bounce(self, message_id: str, now: float | None = None) -> int:
        return sum(admin.bounce(message_id, now) for admin in self._admins)
