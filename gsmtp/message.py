"""The vocabulary every layer shares: message ids, messages at rest and in flight,
recipient statuses and delivery outcomes.

No I/O and no dependencies on other gsmtp modules but the protocol's values (the RFC
3461 DSN parameters the session parses, re-exported here): the spool stores these
values, the queue runner moves them, delivery backends consume and produce them, the
accept step creates them. Keeping them here lets storage and delivery both import the words they
share instead of one importing the other (STYLE.md: "a storage module importing its
vocabulary from a consumer").
"""

from __future__ import annotations

import enum
import itertools
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NewType

from gsmtp.protocol.dsnparams import Notify as Notify
from gsmtp.protocol.dsnparams import RecipientDsn as RecipientDsn
from gsmtp.protocol.dsnparams import Ret as Ret

MessageId = NewType("MessageId", str)

_sequence = itertools.count(secrets.randbelow(1 << 24))


def new_message_id(now: float) -> MessageId:
    """Time-ordered and unique: 13 hex digits of microseconds, then 6 of a sequence
    that starts at a random point (ids from one microsecond still differ)."""
    return MessageId(f"{int(now * 1_000_000):013X}{next(_sequence) & 0xFFFFFF:06X}")


class RecipientStatus(enum.Enum):
    """Where a recipient stands, as stored in `recipients.status`."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"


class Outcome(enum.Enum):
    """What one delivery attempt did for one recipient (OpenSMTPD's OK / TEMPFAIL /
    PERMFAIL)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"

    @property
    def status(self) -> RecipientStatus:
        """The stored status after this outcome: a deferred recipient stays queued."""
        if self is Outcome.DEFERRED:
            return RecipientStatus.QUEUED
        return RecipientStatus(self.value)


@dataclass(frozen=True, slots=True)
class SpooledContent:
    """The content of a large message, written to the spool while it arrived: `count`
    body parts (numbered from 0) of `size` bytes in all, and `last`, the rest of it,
    which is stored as one more part together with the message."""

    count: int
    size: int
    last: bytes = b""

    @property
    def total(self) -> int:
        return self.size + len(self.last)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message about to be stored: accepted from a client, or written by gsmtp
    itself (a bounce)."""

    id: MessageId
    sender: str  # "" is the null reverse-path
    recipients: tuple[str, ...]
    # CRLF line endings, Received: already prepended. With `spooled`, only what comes
    # before the spooled content (the Received: header).
    body: bytes
    received_at: float
    client: str
    helo: str
    smtputf8: bool = False
    # RFC 3461, as the client asked: RET and ENVID (decoded) of the message; NOTIFY and
    # ORCPT by recipient, only for recipients that gave any.
    ret: Ret | None = None
    envid: str | None = None
    dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)
    spooled: SpooledContent | None = None

    @property
    def size(self) -> int:
        """Bytes of the whole body, spooled content included."""
        return len(self.body) + (self.spooled.total if self.spooled is not None else 0)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message as the spool hands it to delivery."""

    id: MessageId
    sender: str  # "" is the null reverse-path
    body: bytes  # CRLF line endings, Received: already prepended
    received_at: float
    smtputf8: bool
    # RFC 3461, as in NewMessage: notices and the next hop (when it offers DSN) use them.
    ret: Ret | None = None
    envid: str | None = None
    dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)

    def recipient_dsn(self, recipient: str) -> RecipientDsn:
        """NOTIFY/ORCPT of one recipient (both None when the client gave neither)."""
        return self.dsn.get(recipient, _NO_DSN)


_NO_DSN = RecipientDsn()


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient. `status` is an RFC 3463 code ("5.1.1"), `reply`
    the text to keep as last_error and quote in a bounce, `remote_mta` who said it.
    `unreachable` says no host of the destination could be reached at all (every
    address refused or timed out the connection, or failed before the greeting), or
    that the smarthost refused our credentials: the queue manager then treats the
    destination as dead until its next retry.
    `peer_dsn`, for a delivered recipient: None when it was delivered here (a mailbox),
    True when it was relayed to a peer that offered DSN and got our RFC 3461 parameters
    (its notices are now that peer's job), False when relayed to a peer without DSN (RFC
    3461 §5.2.2: a "relayed" notice if SUCCESS was asked)."""

    address: str
    outcome: Outcome
    status: str
    reply: str
    remote_mta: str = ""
    unreachable: bool = False
    peer_dsn: bool | None = None
    tls_version: str = ""  # relayed over TLS: "TLSv1.3"; "" in plaintext or not relayed
    tls_verified: bool = False  # relayed to a certificate verified for the host name


def results_for_all(
    recipients: Sequence[str], outcome: Outcome, status: str, reply: str, remote_mta: str = ""
) -> list[RecipientResult]:
    """One result copied to every recipient (a connection failure, a whole-message reply)."""
    return [RecipientResult(r, outcome, status, reply, remote_mta) for r in recipients]


@dataclass(frozen=True, slots=True)
class AdminAction:
    """What an operator did to the queue from the CLI (`gsmtp queue hold|release|flush|
    delete|bounce`), left in the spool for the running server to act on and log:
    `action` is the verb, `message_id` the message (None: the whole queue or a domain),
    `domain` the destination flushed, `count` the recipients a flush made due."""

    at: float
    action: str
    message_id: str | None
    domain: str | None
    count: int
