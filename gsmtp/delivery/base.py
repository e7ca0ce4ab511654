"""The delivery interface the scheduler sees, and the values that cross it.

No I/O. A backend takes one message and some of its recipients and says, per recipient,
delivered, deferred (try again later) or failed (bounce now) — OpenSMTPD's OK /
TEMPFAIL / PERMFAIL. Expected failures are values here, never exceptions.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType, Protocol

MessageId = NewType("MessageId", str)


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message as the spool hands it to delivery."""

    id: MessageId
    sender: str  # "" is the null reverse-path
    body: bytes  # CRLF line endings, Received: already prepended
    received_at: float
    smtputf8: bool


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient. `status` is an RFC 3463 code ("5.1.1"), `reply`
    the text to keep as last_error and quote in a bounce, `remote_mta` who said it."""

    address: str
    outcome: Outcome
    status: str
    reply: str
    remote_mta: str = ""


def results_for_all(
    recipients: Sequence[str], outcome: Outcome, status: str, reply: str, remote_mta: str = ""
) -> list[RecipientResult]:
    """One result copied to every recipient (a connection failure, a whole-message reply)."""
    return [RecipientResult(r, outcome, status, reply, remote_mta) for r in recipients]


class Deliverer(Protocol):
    """Delivers one message to some of its recipients; never raises for an expected failure."""

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]: ...
