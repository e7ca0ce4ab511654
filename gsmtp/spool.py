"""Mail at rest: enqueue, claim what is due, record results and notices (the operator's
side, `gsmtp queue ...`, is spool_admin.py).

Theory of operation. A message is one `messages` row (envelope sender, the body with its
Received: header, arrival time) and one `recipients` row per recipient, each `queued`,
`delivered` or `failed`, with its attempt count, next attempt time and last error.
Accepting a message is one transaction through the group committer, so the 250 follows
the fsync. A large body is written while it arrives, as numbered `body_parts` rows that
follow `messages.body` (then only the Received: header; `messages.parts` counts them):
the message row comes last, with the final part, so a message is stored whole or not at
all, and parts without a message row are debris to discard (see gsmtp.intake).

The queue manager *claims* due recipients: the running process owns what it claimed
until it records a result or releases it. Ownership does not expire (a lease that
lapses under a live delivery let a second sender take the same recipient); it is safe
because one process serves a spool (the single-instance lock), and whatever a dead
process owned is released when the next one starts: at least once, never lost. A
claimed row keeps the due time it had in `claimed_due` and moves its `next_attempt_at`
to UNSCHEDULED, so the due range of the index holds only claimable work. Rows of a
message that cannot be read are set aside the same way, without an owner, and the
message is marked `corrupt` (Postfix's corrupt/ queue): kept for inspection, never
retried in a loop. Bodies are not read at claim time but when a delivery starts.

Rows written from outside (the `sqlite3` shell) may hold anything: TEXT that is not
UTF-8 (apsw raises while decoding it, so text that may be corrupt is read as bytes,
`raw_text`, and decoded here, `decoded`), envelope addresses with control characters (a
CR or LF would inject header fields into a Maildir file or a notice), recipient rows
whose message was deleted with foreign keys off. Unreadable means set aside; recipient
rows without a message are deleted when a claim meets them (`orphan_recipients_removed`),
unless their message id itself does not decode: those may belong to a message whose
rows were damaged, so they are set aside and listed, not deleted.

A failed recipient keeps `notice_pending` until the notice step writes the bounce that
lists it; a message is deleted once no recipient is queued and no notice is pending.
`gsmtp queue ...` (another process, gsmtp.queue_control) leaves what it did in
`admin_actions`, which the running queue manager takes, acts on and logs.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import apsw

from gsmtp.db import execute_values, free_pages, incremental_vacuum, query, scalar
from gsmtp.diskspace import Ballast
from gsmtp.message import (
    AdminAction,
    MessageId,
    NewMessage,
    Outcome,
    QueuedMessage,
    RecipientDsn,
    Ret,
)
from gsmtp.protocol.address import has_control
from gsmtp.protocol.dsnparams import notify_text, parse_notify
from gsmtp.writer import GroupCommitter, ThreadReader

# Bodies up to this size may stay bound to a cached insert statement (see execute_values).
CACHED_BODY_LIMIT = 16 * 1024
UNSCHEDULED = 1e18  # next_attempt_at of a row nobody may claim: owned, or set aside
# What a notice quotes of the original: its headers, or with RET=FULL the whole message
# up to 100 KiB (dsn.MAX_RETURNED_MESSAGE); one byte more tells that it is larger.
NOTICE_HEADERS_LIMIT = 100 * 1024 + 1
# The destination domain of a stored address: what follows its last "@".
_DOMAIN = "lower(substr(address, length(rtrim(address, replace(address, '@', ''))) + 1))"
DOMAIN_OF_ADDRESS = _DOMAIN  # for the operator's filters (queue_control)
# A released claim is due when it was due, unless its message was held meanwhile (`gsmtp
# queue hold`): then it stays unscheduled until the release.
_DUE_UNLESS_HELD = (
    f"CASE WHEN EXISTS (SELECT 1 FROM messages WHERE id = recipients.message_id AND held = 1)"
    f" THEN {UNSCHEDULED!r} ELSE claimed_due END"
)


def raw_text(column: str) -> str:
    """SQL reading a TEXT column as the bytes stored (NULL when it holds no text): apsw
    decodes TEXT as UTF-8 and raises on bytes that are not, which an outside writer can
    store. Decode the value with `decoded`."""
    return f"CASE typeof({column}) WHEN 'text' THEN CAST({column} AS BLOB) END"


def decoded(value: Any) -> str | None:
    """A value read with `raw_text` as text; None when absent or not valid UTF-8."""
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def domain_of(address: str) -> str:
    """The destination domain as the claim query computes it (keys must agree)."""
    return address.rpartition("@")[2].lower()


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    address: str
    attempts: int
    bounce_requested: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """Recipients of one message now owned by this process; the body is read later."""

    message_id: MessageId
    received_at: float
    size: int
    recipients: tuple[ClaimedRecipient, ...]


@dataclass(frozen=True, slots=True)
class QueueShape:
    """The spool for the gauges: recipients by status, messages still to deliver and
    their bytes by state ("active": waiting for a first attempt or in delivery now;
    "deferred": waiting for a retry; "held": kept from delivery — set aside as
    unreadable, or held by the administrator), and when the oldest such message came."""

    by_status: dict[str, int]
    messages: dict[str, int]
    size: dict[str, int]
    oldest_received_at: float | None


# One row per message with recipients still queued, classified as QueueShape says.
_QUEUE_STATES = (
    "SELECT state, COUNT(*), TOTAL(size), MIN(received_at) FROM ("
    " SELECT m.size AS size, m.received_at AS received_at, CASE"
    " WHEN m.corrupt IS NOT NULL OR m.held = 1 THEN 'held'"
    " WHEN MAX(r.claimed_due IS NOT NULL) THEN 'active'"
    " WHEN MAX(r.last_error IS NOT NULL) THEN 'deferred'"
    " ELSE 'active' END AS state"
    " FROM recipients r JOIN messages m ON m.id = r.message_id"
    " WHERE r.status = 'queued' GROUP BY r.message_id"
    ") GROUP BY state"
)


@dataclass(frozen=True, slots=True)
class SetAside:
    """A message (or a stray row) that could not be read, and why."""

    message_id: str
    reason: str


# The generations of DomainFilter name sets (`Spool._names_generation`), from 1.
_NAME_SETS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class DomainFilter:
    """A claim for the rows of some destination domains alone (`inside`), or for the
    rows of every other domain. Names as `domain_of` gives them."""

    names: frozenset[str]
    inside: bool


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """What one claim took, what it set aside, and whether it took every due row of the
    domains it was allowed (`exhausted`: nothing more is claimable until new mail, a due
    time, a flush, or room for a destination that was skipped as full)."""

    claims: list[Claim]
    set_aside: list[SetAside]
    exhausted: bool
    orphans_removed: int = 0  # recipient rows of a message that no longer exists


@dataclass(frozen=True, slots=True)
class Unreadable:
    """`load_message`'s answer for a message whose row or body is not what was stored."""

    reason: str


@dataclass(frozen=True, slots=True)
class Held:
    """`load_message`'s answer for a message held (`gsmtp queue hold`) after it was
    claimed: not to be sent, even before the queue manager has taken the CLI's action."""


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    message_id: MessageId
    address: str
    outcome: Outcome
    error: str
    next_attempt_at: float
    status: str = ""  # RFC 3463 code of the result, quoted by notices
    remote_mta: str = ""
    notice: bool = False  # a notice must report this result
    attempted: bool = True  # False: deferred without an attempt (dead destination)


@dataclass(frozen=True, slots=True)
class RecipientState:
    """One recipient as the notice step sees it."""

    address: str
    status: str
    notice_pending: bool
    in_flight: bool
    next_attempt_at: float
    last_error: str
    last_status: str
    remote_mta: str


@dataclass(frozen=True, slots=True)
class NoticeState:
    """A message and its recipients, for deciding its notices. `message.body` holds only
    the first NOTICE_HEADERS_LIMIT bytes (a notice quotes the headers)."""

    message: QueuedMessage
    kind: str  # "" for mail from outside; else the kind of notice this message is
    delay_warned: bool
    recipients: tuple[RecipientState, ...]


def insert_messages(connection: apsw.Connection, messages: list[NewMessage]) -> None:
    """Many messages in two statements (the group-commit fast path); a third only when
    one of them has spooled content (its last part goes in with it). The statement is
    cached (prepared once) only while every body is small (see `execute_values`)."""
    rows = []
    last_parts = []
    largest = 0
    for m in messages:
        size = len(m.body)
        largest = max(largest, size)
        parts = 0
        if m.spooled is not None:
            size = m.size
            parts = m.spooled.count
            if m.spooled.last:
                last_parts.append((m.id, parts, m.spooled.last))
                parts += 1
        rows.append(
            (
                m.id,
                m.sender,
                m.body,
                size,
                m.received_at,
                m.client,
                m.helo,
                int(m.smtputf8),
                m.ret.value if m.ret is not None else None,
                m.envid,
                parts,
            )
        )
    execute_values(
        connection,
        "INSERT INTO messages(id, sender, body, size, received_at, client, helo, smtputf8,"
        " dsn_ret, dsn_envid, parts) VALUES {values}",
        rows,
        cache=largest <= CACHED_BODY_LIMIT,
    )
    if last_parts:
        insert_parts(connection, last_parts)
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


def insert_parts(connection: apsw.Connection, parts: Sequence[tuple[str, int, bytes]]) -> None:
    """Body parts (message id, number, bytes) of messages still arriving, in one
    statement. Their message row comes later, with the last part."""
    execute_values(
        connection,
        "INSERT INTO body_parts(message_id, seq, data) VALUES {values}",
        list(parts),
        cache=False,
    )


# Pages given back per transaction by a discard (`give_back_pages`). Each page taken
# off the free list is a dirty page until the commit drops it (it lies past the new end
# of the file); past the page cache (2 MB by default) SQLite would spill them into the
# WAL, and a discard on a full disk would need the room it is meant to give back.
DISCARD_VACUUM_PAGES = 256


def discard_parts(
    connection: apsw.Connection, message_ids: Sequence[str], *, give_back_all: bool = False
) -> int:
    """Remove the parts of messages that were never stored. A message that was stored
    keeps its parts: so this is safe after any outcome of its commit, even one the
    server could not learn. Returns the free pages still to give back
    (`give_back_pages`, one transaction each): those it freed, or with
    `give_back_all` every free page (a retry, after a give-back that failed).

    The pages freed are given back to the file system (incremental vacuum), so the
    committed database size shrinks with them. That is what lets a full disk recover:
    a checkpoint copies only the pages below the committed size and cuts the file to
    it, so the refused message's pages, still in the WAL, need no room in the database
    file. (Discarded parts are mostly the last pages: little is moved.)"""
    before = 0 if give_back_all else free_pages(connection)
    execute_values(
        connection,
        "DELETE FROM body_parts WHERE message_id IN (SELECT column1 FROM (VALUES {values}))"
        " AND NOT EXISTS (SELECT 1 FROM messages WHERE id = body_parts.message_id)",
        [(message_id,) for message_id in message_ids],
    )
    return give_back_pages(connection, free_pages(connection) - before)


def give_back_pages(connection: apsw.Connection, pages: int) -> int:
    """Give up to DISCARD_VACUUM_PAGES of `pages` free pages back; how many are left."""
    step = min(pages, DISCARD_VACUUM_PAGES)
    if step > 0:
        incremental_vacuum(connection, step)
    return max(pages - step, 0)


def _dsn_columns(dsn: RecipientDsn | None) -> tuple[str | None, str | None]:
    """recipients.dsn_notify and dsn_orcpt for one recipient's RFC 3461 parameters."""
    if dsn is None:
        return None, None
    return (notify_text(dsn.notify) if dsn.notify is not None else None), dsn.orcpt


def insert_message(connection: apsw.Connection, message: NewMessage) -> None:
    insert_messages(connection, [message])


def apply_results(connection: apsw.Connection, batch: list[tuple[RecipientUpdate, ...]]) -> None:
    """Results of many deliveries in a few statements (the group-commit fast path).

    A deferred recipient whose bounce the administrator asked for while it was being
    delivered (`gsmtp queue bounce` sets bounce_requested on owned rows too) is due
    again at once, at the time it was claimed or bounced, so that the next claim fails
    it as asked rather than after the next retry step. One of a message held while it
    was being delivered (`gsmtp queue hold`) is unscheduled until the release."""
    updates = [update for unit in batch for update in unit]
    execute_values(
        connection,
        "UPDATE recipients SET status = v.column1, attempts = attempts + v.column2,"
        " next_attempt_at = CASE WHEN v.column1 = 'queued' AND EXISTS (SELECT 1 FROM"
        f" messages WHERE id = recipients.message_id AND held = 1) THEN {UNSCHEDULED!r}"
        " WHEN v.column1 = 'queued' AND bounce_requested = 1"
        " THEN min(v.column3, coalesce(claimed_due, v.column3)) ELSE v.column3 END,"
        " last_error = v.column4, last_status = v.column5,"
        " remote_mta = v.column6, notice_pending = v.column7, claimed_due = NULL"
        " FROM (VALUES {values}) AS v"
        " WHERE recipients.message_id = v.column8 AND recipients.address = v.column9",
        [
            (
                u.outcome.status.value,
                int(u.attempted),
                u.next_attempt_at,
                u.error,
                u.status or None,
                u.remote_mta or None,
                int(u.notice),
                u.message_id,
                u.address,
            )
            for u in updates
        ],
    )
    _delete_finished(connection, {u.message_id for u in updates})


def _delete_finished(connection: apsw.Connection, message_ids: Iterable[str]) -> None:
    """Delete the messages with nothing queued and no notice pending. `+status`: find a
    message's recipients by the primary key; the status index would scan every queued
    recipient in the spool."""
    execute_values(
        connection,
        "DELETE FROM messages WHERE id IN (SELECT column1 FROM (VALUES {values}))"
        " AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = messages.id"
        " AND (+status = 'queued' OR notice_pending = 1))",
        [(message_id,) for message_id in message_ids],
    )


class Spool:
    """The server's view of the spool: writes go through the group committer, bodies
    through the body reader's thread."""

    def __init__(
        self,
        writer: GroupCommitter,
        reader: apsw.Connection,
        bodies: ThreadReader | None = None,
        *,
        ballast: Ballast | None = None,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._bodies = bodies
        self._ballast = ballast
        # The last DomainFilter's names, their generation and their JSON: a host of
        # 50,000 domains took 26 ms of the event loop to write them for each lane's
        # turn (red team). The writer's connection keeps them in a table of its own,
        # loaded again only when the generation changes (`_domain_set`).
        # None at first: whatever set comes first is a new one, an empty one too (a
        # filter of no names is a filter still: the local lane's turn claims nothing).
        self._filter_names: tuple[frozenset[str] | None, int, str] = (None, 0, "[]")
        # Messages whose parts could not be discarded yet (the disk was full): tried
        # again by `retry_discards`, not left on the disk until the next start.
        self.discards_owed: set[MessageId] = set()
        # A write found the disk full since the last recovery (see SpoolUpkeep.checkpoint).
        self.disk_was_full = False

    def enqueue(self, message: NewMessage) -> MessageId:
        """Store a message durably; returns once committed (raises if it was not)."""
        try:
            self._writer.submit_item(insert_messages, message)
        except apsw.FullError:
            self.disk_was_full = True
            raise
        return message.id

    # -- bodies as they arrive ------------------------------------------------------------

    def write_part(self, message_id: MessageId, seq: int, data: bytes) -> None:
        """Write part `seq` of a message still arriving; returns once committed, in a
        group commit with whatever else is being written (the message's own commit
        comes later, so the 250 follows the fsync of every part). Raises if it was
        not written."""
        try:
            self._writer.submit_item(insert_parts, (message_id, seq, data))
        except apsw.FullError:
            self.disk_was_full = True
            raise

    def discard_parts(self, message_id: MessageId) -> None:
        """Drop the parts of a message that will not be stored (see `discard_parts`).
        A unit of its own, not batched with like ones: the writer then applies it after
        everything submitted before it, such as a part whose writer was interrupted.
        If the disk is full, the ballast file is given up and the discard tried again;
        if it still fails, it is owed (`retry_discards`) and the error raised."""
        try:
            try:
                self._discard([message_id])
            except apsw.FullError:
                self.disk_was_full = True
                if self._ballast is None or not self._ballast.release():
                    raise
                self._discard([message_id])  # in the room the ballast left
        except apsw.Error:
            self.discards_owed.add(message_id)
            raise

    def retry_discards(self) -> int:
        """Discard the parts owed (see `discard_parts`) and give back every free page;
        how many messages' parts went. Raises what the writer raised (they stay owed)."""
        owed = sorted(self.discards_owed)
        if not owed:
            return 0
        self._discard(owed, give_back_all=True)
        self.discards_owed.difference_update(owed)
        return len(owed)

    def _discard(self, message_ids: list[MessageId], *, give_back_all: bool = False) -> None:
        left = self._writer.submit(
            lambda connection: discard_parts(connection, message_ids, give_back_all=give_back_all)
        )
        while left > 0:
            left = self._writer.submit(partial(give_back_pages, pages=left))

    def read_parts(
        self, message_id: MessageId, count: int, consume: Callable[[bytes], bool]
    ) -> bool:
        """Hand parts 0..count-1 of a message still arriving to `consume`, in order and
        one at a time (a large body is never held whole), on the body reader's thread;
        stop early when it returns False. False if a part is missing."""

        def work(connection: apsw.Connection) -> bool:
            found = 0
            # Closed on every way out: an open statement would pin the reader's snapshot.
            cursor = connection.execute(
                "SELECT seq, data FROM body_parts WHERE message_id = ? AND seq < ? ORDER BY seq",
                (message_id, count),
            )
            try:
                for seq, data in cursor:
                    if seq != found or not isinstance(data, bytes):
                        break
                    found += 1
                    if not consume(data):
                        return True
            finally:
                cursor.close()
            return found == count

        if self._bodies is not None:
            return self._bodies.run(work)
        return work(self._reader)

    def remove_orphan_parts(self) -> int:
        """At start-up: parts without a message (its client went away, or the server
        died, before the message was stored). Returns how many went."""

        def work(connection: apsw.Connection) -> int:
            connection.execute(
                "DELETE FROM body_parts WHERE message_id NOT IN (SELECT id FROM messages)"
            )
            return int(connection.changes())

        return int(self._writer.submit(work))

    # -- ownership ----------------------------------------------------------------------

    def release_leases(self) -> int:
        """At start-up: whatever a previous process owned is due again, at the time it
        was due when claimed (the single-instance lock says no one else owns it)."""

        def work(connection: apsw.Connection) -> int:
            connection.execute(
                f"UPDATE recipients SET next_attempt_at = {_DUE_UNLESS_HELD},"
                " claimed_due = NULL WHERE status = 'queued' AND next_attempt_at = :unscheduled"
                " AND claimed_due IS NOT NULL",
                {"unscheduled": UNSCHEDULED},
            )
            return int(connection.changes())

        return int(self._writer.submit(work))

    def _names_generation(self, names: frozenset[str]) -> tuple[int, str]:
        """The generation of this set of names (a new one whenever the set object
        changes: the accounts keep one object per snapshot; numbered across the process,
        so two spools on one writer could never take each other's) and its JSON."""
        if self._filter_names[0] is not names:
            self._filter_names = (names, next(_NAME_SETS), json.dumps(list(names)))
        return self._filter_names[1], self._filter_names[2]

    def claim_due(
        self,
        now: float,
        limit: int,
        *,
        caps: Mapping[str, int] | None = None,
        default_cap: int | None = None,
        scan: int | None = None,
        skip_full: bool = True,
        domains: DomainFilter | None = None,
    ) -> ClaimResult:
        """Own up to `limit` due recipients, oldest due first, grouped by message.

        `caps` bounds how many rows of a destination domain one claim takes (0: none,
        the queue manager holds enough for it), `default_cap` that of any other domain;
        the per-domain count looks at the first `scan` due rows of the domains not
        capped at 0 (`skip_full`: a look at each row of those capped at 0 finds them,
        however many there are), or else at the first `scan` due rows of any domain.
        `domains` limits the claim to the rows of some domains, or of all but those.
        Rows that do not decode are set aside with their message and returned as
        SetAside, never as claims."""
        caps = dict(caps or {})
        full = [d for d, cap in caps.items() if cap <= 0] if skip_full else []
        generation, names = self._names_generation(domains.names) if domains else (0, "")
        params = {
            "now": now,
            "limit": limit,
            "scan": scan or limit,
            "full": json.dumps(full) if full else "",
            "domains": names,
            "generation": generation,
            "inside": domains.inside if domains else True,
            "caps": json.dumps(caps),
            "default_cap": default_cap if default_cap is not None else limit,
            "unscheduled": UNSCHEDULED,
        }
        scanned, capped, rows = json.loads(
            self._writer.submit(lambda connection: _claim(connection, params))
        )
        claims: dict[str, list[ClaimedRecipient]] = {}
        heads: dict[str, tuple[float, int]] = {}
        broken: dict[int, tuple[str, str]] = {}  # message rowid: (shown id, reason)
        stray: list[int] = []  # recipient rowids: no message, and an id that does not decode
        orphans: list[int] = []  # recipient rowids: no message
        for row in rows:
            rowid, id_hex, address_hex, attempts, bounce, message_rowid, size, received_at = row
            message_id = _from_hex(id_hex)
            if message_rowid is None:
                (orphans if message_id is not None else stray).append(rowid)
                continue
            if message_id is None:
                broken[message_rowid] = (_shown_hex(id_hex), "message id is not valid UTF-8")
                continue
            address = _from_hex(address_hex)
            if address is None or not isinstance(attempts, int):
                broken.setdefault(message_rowid, (message_id, "recipient row does not decode"))
                continue
            reason = _unusable(address, size, received_at)
            if reason is not None:
                broken.setdefault(message_rowid, (message_id, reason))
                continue
            claims.setdefault(message_id, []).append(
                ClaimedRecipient(address, attempts, bool(bounce))
            )
            heads[message_id] = (float(received_at), size)
        set_aside = [SetAside(shown, reason) for shown, reason in broken.values()]
        set_aside += [
            SetAside(f"rowid {r}", "recipient row without a readable message id") for r in stray
        ]
        removed = 0
        if broken or stray or orphans:
            removed = self._writer.submit(
                lambda connection: _set_aside_rows(connection, broken, stray, orphans)
            )
        unusable = {message_id for message_id, _ in broken.values()}
        return ClaimResult(
            [
                Claim(MessageId(m), heads[m][0], heads[m][1], tuple(recipients))
                for m, recipients in claims.items()
                if m not in unusable
            ],
            set_aside,
            exhausted=scanned < params["scan"] and not capped and len(rows) < limit,
            orphans_removed=removed,
        )

    def release(self, owned: Sequence[tuple[str, str]]) -> None:
        """Give back claimed (message id, address) pairs not started: due again when they
        were due before."""
        self._writer.submit(
            lambda connection: execute_values(
                connection,
                f"UPDATE recipients SET next_attempt_at = {_DUE_UNLESS_HELD}, claimed_due = NULL"
                " FROM (VALUES {values}) AS v WHERE recipients.message_id = v.column1"
                " AND recipients.address = v.column2 AND claimed_due IS NOT NULL",
                [tuple(pair) for pair in owned],
            )
        )

    def set_aside(self, message_id: str, reason: str) -> None:
        """Mark a message corrupt and unschedule its queued recipients."""
        self._writer.submit(lambda connection: _set_aside(connection, message_id, reason))

    def load_message(self, message_id: str) -> QueuedMessage | Unreadable | Held | None:
        """The message a delivery is about to send (None: deleted meanwhile; Held: held
        since it was claimed, which the queue manager may not have seen yet: it looks
        for the CLI's actions only when signalled or once per poll)."""

        def work(connection: apsw.Connection) -> QueuedMessage | Unreadable | Held | None:
            rows = query(
                connection,
                f"SELECT {raw_text('sender')}, body, received_at, smtputf8, size, dsn_ret,"
                f" {raw_text('dsn_envid')}, parts, held FROM messages WHERE id = ?",
                (message_id,),
            )
            if not rows:
                return None
            if rows[0][8]:
                return Held()
            row = rows[0][:8]
            if row[7]:  # parts
                body = _with_parts(connection, message_id, row[1], row[7])
                if isinstance(body, Unreadable):
                    return body
                row = (row[0], body, *row[2:])
            message = _decode_message(message_id, row)
            if isinstance(message, QueuedMessage):
                dsn = load_recipient_dsn(connection, [message_id]).get(message_id, {})
                message = dataclasses.replace(message, dsn=dsn)
            return message

        if self._bodies is not None:
            return self._bodies.run(work)
        return work(self._reader)

    # -- results --------------------------------------------------------------------------

    def record_results(self, updates: Sequence[RecipientUpdate]) -> None:
        """Apply delivery outcomes in one transaction (shared with the results of other
        senders that finish meanwhile, and always with those recorded in the same pass
        of the event loop: a Maildir batch's); the rows are no longer owned."""
        self._writer.submit_gathered(apply_results, tuple(updates))

    def bounce_pending(self, message_id: str) -> bool:
        """True if a queued recipient of the message awaits the bounce the administrator
        asked for (made due by `apply_results`: the queue manager must look again)."""
        return bool(
            scalar(
                self._reader,
                "SELECT 1 FROM recipients WHERE message_id = ? AND status = 'queued'"
                " AND bounce_requested = 1 AND next_attempt_at < ? LIMIT 1",
                (message_id, UNSCHEDULED),
            )
        )

    def next_due_at(self) -> float | None:
        value = scalar(
            self._reader,
            "SELECT MIN(next_attempt_at) FROM recipients"
            " WHERE status = 'queued' AND next_attempt_at < ?",
            (UNSCHEDULED,),
        )
        return float(value) if value is not None else None

    def next_due_after(self, after: float) -> float | None:
        """The earliest retry later than `after` (what became due since the last claim
        looked)."""
        value = scalar(
            self._reader,
            "SELECT MIN(next_attempt_at) FROM recipients"
            " WHERE status = 'queued' AND next_attempt_at > ? AND next_attempt_at < ?",
            (after, UNSCHEDULED),
        )
        return float(value) if value is not None else None

    def cap_schedule(self, latest: float) -> int:
        """Bring every retry later than `latest` forward to it: after the clock was set
        back, a time stored before would otherwise park the recipient (D-43). A cheap
        indexed read first; the write only when something is out of range."""
        beyond = scalar(
            self._reader,
            "SELECT COUNT(*) FROM recipients WHERE status = 'queued'"
            " AND next_attempt_at > ? AND next_attempt_at < ?",
            (latest, UNSCHEDULED),
        )
        if not beyond:
            return 0

        def work(connection: apsw.Connection) -> int:
            connection.execute(
                "UPDATE recipients SET next_attempt_at = :latest WHERE status = 'queued'"
                " AND next_attempt_at > :latest AND next_attempt_at < :unscheduled",
                {"latest": latest, "unscheduled": UNSCHEDULED},
            )
            return int(connection.changes())

        return int(self._writer.submit(work))

    def admin_actions_waiting(self) -> bool:
        """True when the CLI left actions (gsmtp.queue_control) for the server: a cheap
        read, done every round of the queue manager."""
        return bool(scalar(self._reader, "SELECT EXISTS (SELECT 1 FROM admin_actions)"))

    def take_admin_actions(self) -> list[AdminAction]:
        """The actions the CLI left, oldest first, removed from the spool as they are
        taken (the server's log keeps them)."""
        return list(self._writer.submit(_take_admin_actions))

    # -- notices --------------------------------------------------------------------------

    def notice_state(self, message_id: str) -> NoticeState | None:
        """The message's envelope, headers and recipients (None: gone or unreadable: a
        sender or an address that does not decode or holds a control character)."""
        rows = query(
            self._reader,
            f"SELECT {raw_text('sender')}, substr(body, 1, ?), received_at, smtputf8,"
            f" {raw_text('notice_kind')}, delay_warned_at, dsn_ret, {raw_text('dsn_envid')},"
            " parts FROM messages WHERE id = ? AND corrupt IS NULL",
            (NOTICE_HEADERS_LIMIT, message_id),
        )
        if not rows:
            return None
        raw_sender, head, received_at, smtputf8, kind, warned, ret, envid, parts = rows[0]
        sender = decoded(raw_sender)
        if sender is None or has_control(sender) or not isinstance(received_at, int | float):
            return None
        if parts and isinstance(head, bytes):
            head = read_head(self._reader, message_id, head, NOTICE_HEADERS_LIMIT)
        recipients = query(
            self._reader,
            f"SELECT {raw_text('address')}, status, notice_pending, claimed_due IS NOT NULL,"
            f" next_attempt_at, {raw_text('last_error')}, {raw_text('last_status')},"
            f" {raw_text('remote_mta')} FROM recipients WHERE message_id = ?",
            (message_id,),
        )
        states = []
        for address, status, pending, in_flight, due, error, code, mta in recipients:
            text = decoded(address)
            if text is None or has_control(text):
                return None
            states.append(
                RecipientState(
                    text,
                    str(status),
                    bool(pending),
                    bool(in_flight),
                    float(due),
                    _lenient(error),
                    _lenient(code),
                    _lenient(mta),
                )
            )
        message = QueuedMessage(
            MessageId(message_id),
            sender,
            head if isinstance(head, bytes) else b"",
            float(received_at),
            bool(smtputf8),
            ret=_ret(ret),
            envid=_printable(envid),
            dsn=load_recipient_dsn(self._reader, [message_id]).get(message_id, {}),
        )
        return NoticeState(message, _lenient(kind), warned is not None, tuple(states))

    def store_notices(
        self,
        message_id: str,
        *,
        reported: frozenset[str],
        notices: Sequence[tuple[NewMessage, str]],
        warned_at: float | None,
    ) -> bool:
        """Enqueue `notices` (message, kind), clear the pending notices of `reported` and
        record a delay warning, all or nothing; False (and nothing done) when the state
        changed since it was read: exactly `reported` must still be pending, and no delay
        warning recorded when one is being sent."""

        def work(connection: apsw.Connection) -> bool:
            pending = {
                str(row[0])
                for row in query(
                    connection,
                    "SELECT address FROM recipients WHERE message_id = ? AND notice_pending = 1",
                    (message_id,),
                )
            }
            if pending != reported:
                return False
            if warned_at is not None:
                connection.execute(
                    "UPDATE messages SET delay_warned_at = ? WHERE id = ?"
                    " AND delay_warned_at IS NULL",
                    (warned_at, message_id),
                )
                if not connection.changes():
                    return False
            insert_messages(connection, [notice for notice, _ in notices])
            for notice, kind in notices:
                connection.execute(
                    "UPDATE messages SET notice_kind = ? WHERE id = ?", (kind, notice.id)
                )
            connection.execute(
                "UPDATE recipients SET notice_pending = 0"
                " WHERE message_id = ? AND notice_pending = 1",
                (message_id,),
            )
            _delete_finished(connection, [message_id])
            return True

        return bool(self._writer.submit(work))

    def pending_notice_messages(self, limit: int = 100) -> list[MessageId]:
        """Messages with a notice still to write (one left behind by a crash, say)."""
        rows = query(
            self._reader,
            f"SELECT DISTINCT {raw_text('message_id')} FROM recipients"
            " WHERE notice_pending = 1 LIMIT ?",
            (limit,),
        )
        return [MessageId(text) for (raw,) in rows if (text := decoded(raw)) is not None]

    # -- gauges ---------------------------------------------------------------------------

    def queue_shape(self) -> QueueShape:
        """Counts for the gauges, read on the body reader's thread (two passes over
        the queue: never on the event loop)."""

        def work(connection: apsw.Connection) -> QueueShape:
            by_status = {
                str(status): int(count)
                for status, count in query(
                    connection, "SELECT status, COUNT(*) FROM recipients GROUP BY status"
                )
            }
            messages: dict[str, int] = {}
            size: dict[str, int] = {}
            oldest: float | None = None
            for state, count, total, received_at in query(connection, _QUEUE_STATES):
                messages[str(state)] = int(count)
                size[str(state)] = int(total)
                if isinstance(received_at, int | float) and (
                    oldest is None or received_at < oldest
                ):
                    oldest = float(received_at)
            return QueueShape(by_status, messages, size, oldest)

        if self._bodies is not None:
            return self._bodies.run(work)
        return work(self._reader)

    def counts_by_status(self) -> dict[str, int]:
        rows = query(self._reader, "SELECT status, COUNT(*) FROM recipients GROUP BY status")
        return {str(status): int(count) for status, count in rows}

    def oldest_queued_at(self) -> float | None:
        value = scalar(
            self._reader,
            "SELECT MIN(m.received_at) FROM messages m JOIN recipients r ON r.message_id = m.id"
            " WHERE r.status = 'queued'",
        )
        return float(value) if isinstance(value, int | float) else None


def load_recipient_dsn(
    connection: apsw.Connection, message_ids: Sequence[str]
) -> dict[str, dict[str, RecipientDsn]]:
    """RFC 3461 NOTIFY/ORCPT of the recipients of these messages (at most 500 ids) that
    gave any, by message id and address: the `dsn` of each QueuedMessage. A damaged
    value counts as not given."""
    rows = query(
        connection,
        f"SELECT {raw_text('message_id')}, {raw_text('address')}, {raw_text('dsn_notify')},"
        f" {raw_text('dsn_orcpt')} FROM recipients"
        f" WHERE message_id IN ({','.join('?' * len(message_ids))})"
        " AND (dsn_notify IS NOT NULL OR dsn_orcpt IS NOT NULL)",
        list(message_ids),
    )
    found: dict[str, dict[str, RecipientDsn]] = {}
    for raw_id, raw_address, raw_notify, raw_orcpt in rows:
        message_id, address, notify = decoded(raw_id), decoded(raw_address), decoded(raw_notify)
        if message_id is None or address is None:
            continue  # a damaged row: its recipient is set aside when claimed
        parsed = parse_notify(notify) if notify is not None else None
        found.setdefault(message_id, {})[address] = RecipientDsn(
            parsed if isinstance(parsed, frozenset) else None, _printable(raw_orcpt)
        )
    return found


def _domain_set(connection: apsw.Connection, generation: int, names: str) -> None:
    """In the writer thread: make `temp.claim_domains` hold the names (a JSON list) of
    this generation. Read through its primary key, a claim's domain filter costs a
    lookup a row; the list as a JSON parameter was parsed and indexed again by every
    claim (9-17 ms at 10,000 domains, 42-72 at 50,000). Each row carries its
    generation, so the table says itself what it holds: a transaction rolled back (the
    disk full) takes the rows back with their generation, and the next claim loads
    them again (an empty set is loaded each time: nothing to load)."""
    connection.execute(
        "CREATE TEMP TABLE IF NOT EXISTS claim_domains"
        " (name TEXT NOT NULL PRIMARY KEY, generation INTEGER NOT NULL) WITHOUT ROWID"
    )
    if scalar(connection, "SELECT generation FROM temp.claim_domains LIMIT 1") == generation:
        return
    connection.execute(
        "DELETE FROM temp.claim_domains; INSERT OR IGNORE INTO temp.claim_domains"
        " SELECT value, :generation FROM json_each(:names)",
        {"names": names, "generation": generation},
    )


def _claim(connection: apsw.Connection, params: dict[str, Any]) -> str:
    """In the writer thread: choose, own and describe, three single-step statements (the
    last aggregated to one JSON row, so the thread needs the GIL only a few times).
    Only the values JSON can hold are described; anything else comes back as null and
    is set aside by the caller. Returns `[rows scanned, rows left by a cap, [[row], ...]]`."""
    # Skipping full domains costs a look at each of their due rows: only when there are.
    skip = f" AND {_DOMAIN} NOT IN (SELECT value FROM json_each(:full))" if params["full"] else ""
    if params["generation"]:
        _domain_set(connection, params["generation"], params["domains"])
        among = "IN" if params["inside"] else "NOT IN"
        skip += f" AND {_DOMAIN} {among} (SELECT name FROM temp.claim_domains)"
    chosen = scalar(
        connection,
        "WITH caps AS MATERIALIZED (SELECT key, value AS cap FROM json_each(:caps)),"
        f" due AS MATERIALIZED (SELECT rowid AS id, message_id AS m,"
        f" next_attempt_at AS due, {_DOMAIN} AS d FROM recipients"
        f" WHERE status = 'queued' AND next_attempt_at <= :now{skip}"
        " ORDER BY next_attempt_at LIMIT :scan),"
        # Caps count messages (one delivery each), not recipients; ids are time-ordered.
        " ranked AS MATERIALIZED (SELECT id, due, d, n <= coalesce(cap, :default_cap) AS ok"
        " FROM (SELECT id, due, d, dense_rank() OVER (PARTITION BY d ORDER BY m) AS n"
        " FROM due) LEFT JOIN caps ON key = d)"
        " SELECT json_array((SELECT count(*) FROM due), (SELECT count(*) FROM ranked"
        " WHERE NOT ok), json((SELECT json_group_array(id) FROM (SELECT id FROM ranked"
        " WHERE ok ORDER BY due, id LIMIT :limit))))",
        params,
    )
    scanned, capped, ids = json.loads(chosen)
    chosen_ids = json.dumps(ids)
    connection.execute(
        "UPDATE recipients SET claimed_due = next_attempt_at, next_attempt_at = :unscheduled"
        " WHERE rowid IN (SELECT value FROM json_each(:chosen))",
        {**params, "chosen": chosen_ids},
    )
    # Text as the hex of its stored bytes: JSON then holds only ASCII whatever the rows
    # hold (text that is not UTF-8 made apsw raise on the whole claim), and the caller
    # decodes each value alone.
    rows = scalar(
        connection,
        "SELECT json_group_array(json_array(r.rowid,"
        f" {_hex_text('r.message_id')}, {_hex_text('r.address')},"
        " CASE typeof(r.attempts) WHEN 'integer' THEN r.attempts END,"
        " CASE typeof(r.bounce_requested) WHEN 'integer' THEN r.bounce_requested END,"
        " m.rowid,"
        " CASE typeof(m.size) WHEN 'integer' THEN m.size END,"
        " CASE WHEN typeof(m.received_at) IN ('real', 'integer') THEN m.received_at END))"
        " FROM recipients r LEFT JOIN messages m ON m.id = r.message_id"
        " WHERE r.rowid IN (SELECT value FROM json_each(:chosen))",
        {"chosen": chosen_ids},
    )
    return f"[{int(scanned)}, {int(capped)}, {rows}]"


def _take_admin_actions(connection: apsw.Connection) -> list[AdminAction]:
    rows = query(
        connection,
        f"SELECT id, at, {raw_text('action')}, {raw_text('message_id')}, {raw_text('domain')},"
        " count FROM admin_actions ORDER BY id",
    )
    if rows:
        connection.execute("DELETE FROM admin_actions WHERE id <= ?", (rows[-1][0],))
    return [
        AdminAction(
            float(at) if isinstance(at, int | float) else 0.0,
            _lenient(action),
            decoded(message_id),
            decoded(domain),
            count if isinstance(count, int) else 0,
        )
        for _, at, action, message_id, domain, count in rows
    ]


def _unusable(address: str, size: Any, received_at: Any) -> str | None:
    """Why a claimed row whose texts decoded cannot be delivered, or None."""
    if has_control(address):
        return "recipient address has a control character"
    if not isinstance(size, int) or not isinstance(received_at, int | float):
        return "message row does not decode"
    return None


def _hex_text(column: str) -> str:
    """SQL: the hex of a TEXT column's stored bytes, NULL when it holds no text."""
    return f"CASE typeof({column}) WHEN 'text' THEN hex({column}) END"


def _from_hex(value: Any) -> str | None:
    """A `_hex_text` value as text; None when absent or not valid UTF-8."""
    return decoded(bytes.fromhex(value)) if isinstance(value, str) else None


def _shown_hex(value: Any) -> str:
    """A `_hex_text` value for a log line, however broken (backslash escapes)."""
    if not isinstance(value, str):
        return "(no text)"
    return bytes.fromhex(value).decode("utf-8", "backslashreplace")


def _set_aside(connection: apsw.Connection, message_id: str, reason: str) -> None:
    """Mark a message corrupt and unschedule its queued recipients (owned or not)."""
    connection.execute("UPDATE messages SET corrupt = ? WHERE id = ?", (reason, message_id))
    connection.execute(
        "UPDATE recipients SET next_attempt_at = ?, claimed_due = NULL"
        " WHERE message_id = ? AND status = 'queued'",
        (UNSCHEDULED, message_id),
    )


def _set_aside_rows(
    connection: apsw.Connection,
    broken: Mapping[int, tuple[str, str]],
    stray: Sequence[int],
    orphans: Sequence[int],
) -> int:
    """What a claim could not use: messages (by rowid, their ids may not decode) set
    aside, recipient rows without a readable message id unscheduled, recipient rows
    whose message is gone deleted. Returns how many of those were deleted."""
    for message_rowid, (_, reason) in broken.items():
        connection.execute(
            "UPDATE messages SET corrupt = ? WHERE rowid = ?", (reason, message_rowid)
        )
        connection.execute(
            "UPDATE recipients SET next_attempt_at = ?, claimed_due = NULL"
            " WHERE message_id = (SELECT id FROM messages WHERE rowid = ?) AND status = 'queued'",
            (UNSCHEDULED, message_rowid),
        )
    for rowid in stray:
        connection.execute(
            "UPDATE recipients SET next_attempt_at = ?, claimed_due = NULL WHERE rowid = ?",
            (UNSCHEDULED, rowid),
        )
    removed = 0
    for rowid in orphans:
        # Still without a message in this transaction (ids are never reused, but the
        # claim's transaction has ended): then nothing can ever deliver the row.
        connection.execute(
            "DELETE FROM recipients WHERE rowid = ?"
            " AND NOT EXISTS (SELECT 1 FROM messages WHERE id = recipients.message_id)",
            (rowid,),
        )
        removed += connection.changes()
    return removed


def read_head(connection: apsw.Connection, message_id: str, body: bytes, limit: int) -> bytes:
    """The first `limit` bytes of a message whose messages.body is `body`, its parts
    read only as far as needed (a notice quotes the headers; `queue show` prints them).
    Parts that do not decode are left out: the delivery that needs them sets the
    message aside."""
    head = [body[:limit]]
    size = len(head[0])
    cursor = connection.execute(
        "SELECT substr(data, 1, ?) FROM body_parts WHERE message_id = ? ORDER BY seq",
        (limit, message_id),
    )
    try:
        for (data,) in cursor:
            if size >= limit:
                break
            if isinstance(data, bytes):
                head.append(data[: limit - size])
                size += len(head[-1])
    finally:
        cursor.close()
    return b"".join(head)


def _with_parts(
    connection: apsw.Connection, message_id: str, body: Any, count: Any
) -> bytes | Unreadable:
    """messages.body followed by the message's parts, all of which must be there. Put
    together as they are read, one part at a time: the body is held once, not twice
    (BytesIO hands over its buffer without a copy)."""
    if not isinstance(body, bytes):
        return Unreadable(f"body is {type(body).__name__}, not a blob")
    if not isinstance(count, int) or count < 0:
        return Unreadable(f"part count {count!r} does not decode")
    whole = io.BytesIO()
    whole.write(body)
    found = 0
    # Closed on every way out: an open statement would pin the reader's snapshot.
    cursor = connection.execute(
        "SELECT seq, data FROM body_parts WHERE message_id = ? ORDER BY seq", (message_id,)
    )
    try:
        for seq, data in cursor:
            if seq != found or not isinstance(data, bytes):
                return Unreadable(f"body part {found} is missing or does not decode")
            whole.write(data)
            found += 1
    finally:
        cursor.close()
    if found != count:
        return Unreadable(f"{found} body parts of {count} were found")
    return whole.getvalue()


def _decode_message(message_id: str, row: tuple[Any, ...]) -> QueuedMessage | Unreadable:
    sender, body, received_at, smtputf8, size, ret, envid, _ = row
    if not isinstance(body, bytes):
        return Unreadable(f"body is {type(body).__name__}, not a blob")
    if not isinstance(size, int) or size != len(body):
        return Unreadable(f"body has {len(body)} bytes, {size!r} were stored")
    sender = decoded(sender)
    if sender is None:
        return Unreadable("sender does not decode")
    if has_control(sender):
        return Unreadable("sender has a control character")
    if not isinstance(received_at, int | float) or not isinstance(smtputf8, int):
        return Unreadable("envelope does not decode")
    return QueuedMessage(
        MessageId(message_id),
        sender,
        body,
        float(received_at),
        bool(smtputf8),
        ret=_ret(ret),
        envid=_printable(envid),
    )


def _lenient(raw: Any) -> str:
    """Free text we stored (a reply, a status), read with `raw_text`: damaged bytes
    become U+FFFD rather than an exception; notices quote it, nothing parses it."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""


def _printable(raw: Any) -> str | None:
    """An optional RFC 3461 value (ENVID, ORCPT) read with `raw_text`: None when absent
    or damaged (not UTF-8, a control character): the notice goes out without it."""
    text = decoded(raw)
    return None if text is None or has_control(text) else text


def _ret(value: Any) -> Ret | None:
    """messages.dsn_ret (a CHECK keeps it FULL, HDRS or NULL)."""
    return Ret(value) if value in ("FULL", "HDRS") else None
