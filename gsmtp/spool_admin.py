"""The operator's view of the spool: `gsmtp queue list|show|stats|flush|delete|bounce`.

Runs in the CLI process on a connection of its own, beside a running server (WAL lets
both in). Every reading tolerates rows that do not decode: a message set aside as
corrupt must still be listed. A flush makes every queued recipient due now and bumps
`flush_serial` in `meta`, which the running queue manager polls to forget its dead
destinations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import apsw

from gsmtp.db import query, scalar, transaction
from gsmtp.spool import UNSCHEDULED


@dataclass(frozen=True, slots=True)
class RecipientRow:
    address: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


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


class SpoolAdmin:
    """`gsmtp queue ...`: list, show, stats, flush, delete, bounce."""

    def __init__(self, connection: apsw.Connection) -> None:
        self._db = connection

    def messages(self, *, corrupt: bool = False) -> list[MessageRow]:
        """Messages in the queue, or those set aside as corrupt."""
        rows = query(
            self._db,
            "SELECT id, sender, size, received_at, client, helo, corrupt FROM messages"
            f" WHERE corrupt IS {'NOT ' if corrupt else ''}NULL ORDER BY received_at",
        )
        return [self._message_row(row) for row in rows]

    def message(self, message_id: str) -> MessageRow | None:
        rows = query(
            self._db,
            "SELECT id, sender, size, received_at, client, helo, corrupt FROM messages"
            " WHERE id = ?",
            (message_id,),
        )
        return self._message_row(rows[0]) if rows else None

    def headers(self, message_id: str) -> bytes:
        rows = query(self._db, "SELECT body, parts FROM messages WHERE id = ?", (message_id,))
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
        return result

    def flush(self, now: float | None = None) -> int:
        """Make every queued recipient due now and tell the running queue manager to
        forget its dead destinations (like `postqueue -f`)."""
        with transaction(self._db):
            self._db.execute(
                "UPDATE recipients SET next_attempt_at = ?"
                " WHERE status = 'queued' AND next_attempt_at < ?",
                (now if now is not None else time.time(), UNSCHEDULED),
            )
            changed = int(self._db.changes())
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES ('flush_serial', 1)"
                " ON CONFLICT(key) DO UPDATE SET value = value + 1"
            )
            return changed

    def delete(self, message_id: str) -> bool:
        with transaction(self._db):
            self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            return bool(self._db.changes())

    def bounce(self, message_id: str, now: float | None = None) -> int:
        """Expire a message's queued recipients so the runner bounces them at once."""
        with transaction(self._db):
            self._db.execute(
                "UPDATE recipients SET next_attempt_at = ?, bounce_requested = 1"
                " WHERE message_id = ? AND status = 'queued' AND next_attempt_at < ?",
                (now if now is not None else time.time(), message_id, UNSCHEDULED),
            )
            return int(self._db.changes())

    def _message_row(self, row: tuple[Any, ...]) -> MessageRow:
        """Tolerant of what does not decode: a corrupt message must still be listed."""
        message_id, sender, size, received_at, client, helo, corrupt = row
        recipients = query(
            self._db,
            "SELECT address, status, attempts, coalesce(claimed_due, next_attempt_at),"
            " last_error FROM recipients WHERE message_id = ? ORDER BY address",
            (message_id,),
        )
        return MessageRow(
            _text(message_id),
            _text(sender),
            size if isinstance(size, int) else 0,
            float(received_at) if isinstance(received_at, int | float) else 0.0,
            _text(client),
            _text(helo),
            tuple(
                RecipientRow(
                    _text(a),
                    _text(s),
                    n if isinstance(n, int) else 0,
                    float(t) if isinstance(t, int | float) else 0.0,
                    e if isinstance(e, str) else None,
                )
                for a, s, n, t, e in recipients
            ),
            corrupt if isinstance(corrupt, str) else None,
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
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
