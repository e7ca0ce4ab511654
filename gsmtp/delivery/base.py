"""The delivery interface the queue runner sees.

No I/O. A backend takes one message and some of its recipients and says, per recipient,
delivered, deferred (try again later) or failed (bounce now) — OpenSMTPD's OK /
TEMPFAIL / PERMFAIL. Expected failures are values (`gsmtp.message.RecipientResult`),
never exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from gsmtp.message import QueuedMessage, RecipientResult


class Deliverer(Protocol):
    """Delivers one message to some of its recipients; never raises for an expected failure."""

    def deliver(
        self, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]: ...


@runtime_checkable
class WaitsOnDisk(Protocol):
    """A backend whose deliveries spend most of their time waiting for the disk (the
    Maildir's batches), which costs the event loop nothing: the queue manager does not
    count them against the pacer's allowance, so a batch is not bounded by the few
    senders the pacer allows while clients keep the loop busy."""

    @property
    def waiting(self) -> int:
        """Deliveries waiting for their batch to be durable now."""
        ...

    def on_wait(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a delivery starts to wait (its sender's slot in the
        pacer's allowance is free again)."""
        ...
