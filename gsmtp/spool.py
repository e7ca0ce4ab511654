"""Mail in flight: enqueue, claim what is due (with leases), record results, administer.

Theory of operation. A message is one `messages` row (envelope sender, the body with its
Received: header, arrival time) and one `recipients` row per recipient, each `queued`,
`delivered` or `failed`, with its attempt count, next attempt time and last error.
Accepting a message is one transaction through the group committer, so the 250 follows
the fsync. The queue runner *claims* due recipients by stamping a lease on them; a
lease keeps a second sender off the same recipient while one works on it, and leases
left by a dead process are released at start-up, so a crash mid-delivery means
delivery again after restart (at least once, never lost). A message is deleted once no
recipient is left queued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from gsmtp.db import execute_values, query, scalar, transaction
from gsmtp.message import MessageId, NewMessage, Outcome, QueuedMessage, RecipientDsn, Ret
from gsmtp.protocol.dsnparams import notify_text, parse_notify
from gsmtp.writer import GroupCommitter, ThreadReader

LEASE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Claim:
    """Recipients of one message handed to the queue runner."""

    message: QueuedMessage
    recipients: tuple[str, ...]
    attempts: dict[str, int]
    bounce_requested: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    message_id: MessageId
    address: str
    outcome: Outcome
    error: str
    next_attempt_at: float


def insert_messages(connection: apsw.Connection, messages: list[NewMessage]) -> None:
    """Many messages in two statements (the group-commit fast path)."""
    execute_values(
        connection,
        "INSERT INTO messages(id, sender, body, size, received_at, client, helo, smtputf8,"
        " dsn_ret, dsn_envid) VALUES {values}",
        [
            (
                m.id,
                m.sender,
                m.body,
                len(m.body),
                m.received_at,
                m.client,
                m.helo,
                int(m.smtputf8),
                m.ret.value if m.ret is not None else None,
                m.envid,
            )
            for m in messages
        ],
    )
    execute_values(
        connection,
        "INSERT OR IGNORE INTO recipients(message_id, address, status, next_attempt_at,"
        " dsn_notify, dsn_orcpt)"
        " SELECT column1, column2, 'queued', column3, column4, column5 FROM (VALUES {values})",
        [
            (m.id, r, m.received_at, *_dsn_columns(m.dsn.get(r)))
            for m in messages
            for r in m.recipients
        ],
    )


def _dsn_columns(dsn: RecipientDsn | None) -> tuple[str | None, str | None]:
    """recipients.dsn_notify and dsn_orcpt for one recipient's RFC 3461 parameters."""
    if dsn is None:
        return None, None
    return (notify_text(dsn.notify) if dsn.notify is not None else None), dsn.orcpt


def insert_message(connection: apsw.Connection, message: NewMessage) -> None:
    insert_messages(connection, [message])


def apply_results(
    connection: apsw.Connection,
    batch: list[tuple[tuple[RecipientUpdate, ...], tuple[NewMessage, ...]]],
) -> None:
    """Results of many deliveries in a few statements (the group-commit fast path)."""
    updates = [update for unit, _ in batch for update in unit]
    execute_values(
        connection,
        "UPDATE recipients SET status = v.column1, attempts = attempts + 1,"
        " next_attempt_at = v.column2, last_error = v.column3, lease_until = NULL"
        " FROM (VALUES {values}) AS v"
        " WHERE recipients.message_id = v.column4 AND recipients.address = v.column5",
        [
            (
                "queued" if u.outcome is Outcome.DEFERRED else u.outcome.value,
                u.next_attempt_at,
                u.error,
                u.message_id,
                u.address,
            )
            for u in updates
        ],
    )
    # `+status`: find the message's recipients by the primary key; the status index
    # would scan every queued recipient in the spool.
    execute_values(
        connection,
        "DELETE FROM messages WHERE id IN (SELECT column1 FROM (VALUES {values}))"
        " AND NOT EXISTS (SELECT 1 FROM recipients"
        " WHERE message_id = messages.id AND +status = 'queued')",
        [(message_id,) for message_id in {u.message_id for u in updates}],
    )
    insert_messages(connection, [bounce for _, bounces in batch for bounce in bounces])


class Spool:
    """The server's view of the spool: writes go through the group committer."""

    def __init__(
        self, writer: GroupCommitter, reader: apsw.Connection, bodies: ThreadReader | None = None
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._bodies = bodies

    def enqueue(self, message: NewMessage) -> MessageId:
        """Store a message durably; returns once committed (raises if it was not)."""
        self._writer.submit_item(insert_messages, message)
        return message.id

    def release_leases(self) -> int:
        """At start-up: whatever a previous process held is free again."""

        def work(connection: apsw.Connection) -> int:
            connection.execute(
                # Due again from when it was claimed (the lease began LEASE_SECONDS
                # before it ends).
                "UPDATE recipients SET next_attempt_at = lease_until - :lease,"
                " lease_until = NULL WHERE lease_until IS NOT NULL",
                {"lease": LEASE_SECONDS},
            )
            return int(connection.changes())

        return int(self._writer.submit(work))

    def claim_due(self, now: float, limit: int) -> list[Claim]:
        """Lease up to `limit` due recipients, grouped by message, oldest due first.

        The writer thread runs three single-step statements (choose, lease, describe,
        the last aggregated to one JSON row); the bodies are read afterwards by the
        body reader's thread (or the reader connection when there is none)."""

        def work(connection: apsw.Connection) -> str:
            params = {"lease": now + LEASE_SECONDS, "now": now, "limit": limit}
            chosen = scalar(
                connection,
                "SELECT json_group_array(rowid) FROM (SELECT rowid FROM recipients"
                " WHERE status = 'queued' AND next_attempt_at <= :now"
                " ORDER BY next_attempt_at LIMIT :limit)",
                params,
            )
            # The lease also moves next_attempt_at past the lease, so the due range of
            # the index holds only unclaimed work and a claim never re-reads it.
            connection.execute(
                "UPDATE recipients SET lease_until = :lease, next_attempt_at = :lease"
                " WHERE rowid IN (SELECT value FROM json_each(:chosen))",
                {**params, "chosen": chosen},
            )
            return str(
                scalar(
                    connection,
                    "SELECT json_group_array(json_array(message_id, address, attempts,"
                    " bounce_requested)) FROM recipients"
                    " WHERE rowid IN (SELECT value FROM json_each(:chosen))",
                    {"chosen": chosen},
                )
            )

        rows = json.loads(self._writer.submit(work))
        by_message: dict[str, list[tuple[str, int]]] = {}
        bounce_requested: set[str] = set()
        for message_id, address, attempts, bounce in rows:
            by_message.setdefault(message_id, []).append((address, attempts))
            if bounce:
                bounce_requested.add(address)
        ids = list(by_message)
        if self._bodies is not None:
            messages = self._bodies.run(lambda connection: _load_messages(connection, ids))
        else:
            messages = _load_messages(self._reader, ids)
        missing = [message_id for message_id in by_message if message_id not in messages]
        if missing:
            self._release(missing, now)
        claims = []
        for message_id, recipients in by_message.items():
            message = messages.get(message_id)
            if message is None:
                continue
            claims.append(
                Claim(
                    message,
                    tuple(address for address, _ in recipients),
                    dict(recipients),
                    frozenset(a for a, _ in recipients if a in bounce_requested),
                )
            )
        return claims

    def _release(self, message_ids: list[str], now: float) -> None:
        """Claimed recipients whose message could not be read: due again now rather
        than held by the lease (a message deleted meanwhile took its rows with it)."""

        self._writer.submit(
            lambda connection: connection.execute(
                "UPDATE recipients SET lease_until = NULL, next_attempt_at = :now"
                " WHERE message_id IN (SELECT value FROM json_each(:ids))",
                {"now": now, "ids": json.dumps(message_ids)},
            )
        )

    def record_results(
        self, updates: Sequence[RecipientUpdate], bounces: Sequence[NewMessage] = ()
    ) -> None:
        """Apply delivery outcomes and enqueue any bounces, in one transaction (shared
        with the results of other senders that finish meanwhile)."""
        self._writer.submit_item(apply_results, (tuple(updates), tuple(bounces)))

    def next_due_at(self) -> float | None:
        value = scalar(
            self._reader,
            "SELECT MIN(next_attempt_at) FROM recipients WHERE status = 'queued'",
        )
        return float(value) if value is not None else None

    def counts_by_status(self) -> dict[str, int]:
        rows = query(self._reader, "SELECT status, COUNT(*) FROM recipients GROUP BY status")
        return {str(status): int(count) for status, count in rows}

    def oldest_queued_at(self) -> float | None:
        value = scalar(
            self._reader,
            "SELECT MIN(m.received_at) FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE r.status = 'queued'",
        )
        return float(value) if value is not None else None


def _load_messages(connection: apsw.Connection, ids: list[str]) -> dict[str, QueuedMessage]:
    found: dict[str, QueuedMessage] = {}
    for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        rows = query(
            connection,
            "SELECT id, sender, body, received_at, smtputf8, dsn_ret, dsn_envid FROM messages"
            f" WHERE id IN ({','.join('?' * len(chunk))})",
            chunk,
        )
        dsn = load_recipient_dsn(connection, chunk)
        for message_id, sender, body, received_at, smtputf8, ret, envid in rows:
            found[message_id] = QueuedMessage(
                MessageId(message_id),
                sender,
                bytes(body),
                float(received_at),
                bool(smtputf8),
                ret=Ret(ret) if ret is not None else None,
                envid=envid,
                dsn=dsn.get(message_id, {}),
            )
    return found


def load_recipient_dsn(
    connection: apsw.Connection, message_ids: Sequence[str]
) -> dict[str, dict[str, RecipientDsn]]:
    """RFC 3461 NOTIFY/ORCPT of the recipients of these messages (at most 500 ids) that
    gave any, by message id and address: the `dsn` of each QueuedMessage."""
    rows = query(
        connection,
        "SELECT message_id, address, dsn_notify, dsn_orcpt FROM recipients"
        f" WHERE message_id IN ({','.join('?' * len(message_ids))})"
        " AND (dsn_notify IS NOT NULL OR dsn_orcpt IS NOT NULL)",
        list(message_ids),
    )
    found: dict[str, dict[str, RecipientDsn]] = {}
    for message_id, address, notify, orcpt in rows:
        parsed = parse_notify(notify) if notify is not None else None
        found.setdefault(message_id, {})[address] = RecipientDsn(
            parsed if isinstance(parsed, frozenset) else None, orcpt
        )
    return found


# -- administration (CLI: works beside a running server, WAL lets both in) -------------


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


class SpoolAdmin:
    """`gsmtp queue ...`: list, show, stats, flush, delete, bounce."""

    def __init__(self, connection: apsw.Connection) -> None:
        self._db = connection

    def messages(self) -> list[MessageRow]:
        rows = query(
            self._db,
            "SELECT id, sender, size, received_at, client, helo FROM messages ORDER BY received_at",
        )
        return [self._message_row(row) for row in rows]

    def message(self, message_id: str) -> MessageRow | None:
        rows = query(
            self._db,
            "SELECT id, sender, size, received_at, client, helo FROM messages WHERE id = ?",
            (message_id,),
        )
        return self._message_row(rows[0]) if rows else None

    def headers(self, message_id: str) -> bytes:
        value = scalar(self._db, "SELECT body FROM messages WHERE id = ?", (message_id,))
        if value is None:
            return b""
        body = bytes(value)
        end = body.find(b"\r\n\r\n")
        return body if end < 0 else body[: end + 2]

    def stats(self) -> dict[str, int]:
        messages = scalar(self._db, "SELECT COUNT(*) FROM messages")
        recipients = scalar(self._db, "SELECT COUNT(*) FROM recipients")
        by_status = dict(query(self._db, "SELECT status, COUNT(*) FROM recipients GROUP BY status"))
        result = {"messages": int(messages), "recipients": int(recipients)}
        for status in ("queued", "delivered", "failed"):
            result[status] = int(by_status.get(status, 0))
        return result

    def flush(self, now: float | None = None) -> int:
        """Make every queued recipient due now (like `postqueue -f`)."""
        with transaction(self._db):
            self._db.execute(
                "UPDATE recipients SET next_attempt_at = ?"
                " WHERE status = 'queued' AND lease_until IS NULL",
                (now if now is not None else time.time(),),
            )
            return int(self._db.changes())

    def delete(self, message_id: str) -> bool:
        with transaction(self._db):
            self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            return bool(self._db.changes())

    def bounce(self, message_id: str, now: float | None = None) -> int:
        """Expire a message's queued recipients so the runner bounces them at once."""
        with transaction(self._db):
            self._db.execute(
                "UPDATE recipients SET next_attempt_at = ?, bounce_requested = 1"
                " WHERE message_id = ? AND status = 'queued' AND lease_until IS NULL",
                (now if now is not None else time.time(), message_id),
            )
            return int(self._db.changes())

    def _message_row(self, row: tuple[Any, ...]) -> MessageRow:
        message_id, sender, size, received_at, client, helo = row
        recipients = query(
            self._db,
            "SELECT address, status, attempts, next_attempt_at, last_error FROM recipients"
            " WHERE message_id = ? ORDER BY address",
            (message_id,),
        )
        return MessageRow(
            str(message_id),
            str(sender),
            int(size),
            float(received_at),
            str(client),
            str(helo),
            tuple(RecipientRow(a, s, int(n), float(t), e) for a, s, n, t, e in recipients),
        )
