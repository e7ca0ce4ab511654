"""The delivery interface the queue runner sees.

No I/O. A backend takes one message and some of its recipients and says, per recipient,
delivered, deferred (try again later) or failed (bounce now) — OpenSMTPD's OK /
TEMPFAIL / PERMFAIL. Expected failures are values (`gsmtp.message.RecipientResult`),
never exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gsmtp.message import QueuedMessage, RecipientResult


class Deliverer(Protocol):
    """Delivers one message to some of its recipients; never raises for an expected failure."""

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]: ...
