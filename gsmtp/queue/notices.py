"""Notices: which notices a message gets, and writing them (bounces, delay warnings).

Theory of operation. A result that must be reported (`needs_notice`: a failure, or a
delivery whose recipient asked RFC 3461 NOTIFY=SUCCESS) is stored with its recipient as
a pending notice, in the same write as the result. After
each delivery of a message, the notice step looks at the whole message (`decide`, the
one function that chooses notices): while any of its recipients is in flight or due
now, it waits, as Postfix's queue manager does until a message leaves the active queue;
then ONE bounce lists every recipient whose failure is pending. Failures that come
later (after retries) get a notice of their own; so do successes asked for with
NOTIFY=SUCCESS (`delivered` into a Maildir here, `relayed` to a peer without DSN). A
delay warning (RFC 3464 `Action: delayed`) goes once per message, when it is deferred
and older than `delay_warning`. Each recipient's NOTIFY (`dsn.notice_due`) decides
whether it is listed: NEVER means no notice at all.

Never a notice to the null sender (RFC 5321 §6.1). A notice of ours that cannot be
delivered goes to the local postmaster instead of being dropped; a notice to the
postmaster that fails is dropped (logged), so nothing loops. Writing is conditional:
the notices are stored, the pending flags cleared and the warning recorded in one
transaction, only if nothing changed since `decide` looked; a crash before it leaves
the flags set, and a periodic sweep finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gevent.pool import Group

from gsmtp import metrics
from gsmtp.delivery import dsn
from gsmtp.log import get_logger
from gsmtp.message import (
    MessageId,
    NewMessage,
    Outcome,
    QueuedMessage,
    RecipientResult,
)
from gsmtp.protocol.dsnparams import Notify
from gsmtp.queue.retry import Clock
from gsmtp.spool import NoticeState, RecipientState, RecipientUpdate, Spool

BOUNCE = "bounce"
DELAY = "delay"
SUCCESS = "success"
POSTMASTER = "postmaster"  # a notice about one of our notices, to the postmaster
SETTLE_ATTEMPTS = 3


class NoticeWriter(Protocol):
    """What builds notices (gsmtp.acceptance.Acceptor: the one producer of stored mail)."""

    def bounce(
        self,
        message: QueuedMessage,
        failed: Sequence[RecipientResult],
        *,
        now: float,
        recipient: str | None = None,
    ) -> NewMessage: ...

    def delay_warning(
        self,
        message: QueuedMessage,
        delayed: Sequence[RecipientResult],
        *,
        now: float,
        retry_until: float,
    ) -> NewMessage: ...

    def notice(
        self,
        message: QueuedMessage,
        entries: Sequence[tuple[RecipientResult, dsn.Action]],
        *,
        now: float,
        retry_until: float | None = None,
        recipient: str | None = None,
    ) -> NewMessage: ...


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    postmaster: str  # postmaster@<server.hostname>
    delay_warning: float | None  # None: no delay warnings
    max_age: float


@dataclass(frozen=True, slots=True)
class Decision:
    reported: frozenset[str]  # pending notices this decision settles
    failed: tuple[RecipientState, ...]  # listed in a failure notice (empty: none)
    failure_to: str
    failure_kind: str
    delayed: tuple[RecipientState, ...]  # listed in a delay warning (empty: none)
    # listed in a success notice, each `delivered` or `relayed` (empty: none)
    succeeded: tuple[tuple[RecipientState, dsn.Action], ...] = ()


def needs_notice(result: RecipientResult, notify: frozenset[Notify] | None) -> bool:
    """Whether a result is stored as a pending notice: what its recipient's NOTIFY
    (None: not given, the RFC default) asks to hear of this outcome."""
    return dsn.notice_due(notify, dsn.delivery_event(result)) is not None


def _success_action(row: RecipientState) -> dsn.Action:
    """A delivered row reported as a success: relayed when a remote host took it (only a
    peer without DSN leaves the report to us), else delivered here."""
    return dsn.Action.RELAYED if row.remote_mta else dsn.Action.DELIVERED


def _event(action: dsn.Action) -> dsn.DeliveryEvent:
    if action is dsn.Action.RELAYED:
        return dsn.DeliveryEvent.RELAYED_TO_NON_DSN_PEER
    return dsn.DeliveryEvent.DELIVERED


def decide(state: NoticeState, now: float, settings: NoticeSettings) -> Decision | None:
    """The notices `state`'s message gets now, or None (nothing, or not yet)."""
    recipients = state.recipients
    if any(r.in_flight or (r.status == "queued" and r.next_attempt_at <= now) for r in recipients):
        return None  # the rest of the message is still moving: report it together
    pending = tuple(r for r in recipients if r.notice_pending)
    message = state.message
    sender = message.sender

    def wants(row: RecipientState, event: dsn.DeliveryEvent) -> bool:
        if state.kind:
            return True  # our own notices carry no NOTIFY; only failures are pending
        notify = message.recipient_dsn(row.address).notify
        return dsn.notice_due(notify, event) is not None

    if not state.kind and sender:
        to, kind = sender, BOUNCE
    elif state.kind in (BOUNCE, DELAY):
        to, kind = settings.postmaster, POSTMASTER
    else:
        to, kind = "", ""  # mail from <> (RFC 5321 §6.1), or a postmaster notice
    delayed: tuple[RecipientState, ...] = ()
    if (
        settings.delay_warning is not None
        and not state.kind
        and sender
        and not state.delay_warned
        and now - state.message.received_at >= settings.delay_warning
    ):
        delayed = tuple(
            r for r in recipients if r.status == "queued" and wants(r, dsn.DeliveryEvent.DELAYED)
        )
    if not pending and not delayed:
        return None
    failed: tuple[RecipientState, ...] = ()
    succeeded: tuple[tuple[RecipientState, dsn.Action], ...] = ()
    if to:
        failed = tuple(
            r for r in pending if r.status == "failed" and wants(r, dsn.DeliveryEvent.FAILED)
        )
    if sender and not state.kind:
        succeeded = tuple(
            (r, _success_action(r))
            for r in pending
            if r.status == "delivered" and wants(r, _event(_success_action(r)))
        )
    return Decision(frozenset(r.address for r in pending), failed, to, kind, delayed, succeeded)


class Notices:
    """Runs `decide` for a message and stores what it chose. `settle` runs in the
    caller's greenlet; `settle_later` in this object's own group (the dispatcher must
    not wait for it)."""

    def __init__(
        self, *, spool: Spool, writer: NoticeWriter, settings: NoticeSettings, clock: Clock
    ) -> None:
        self._spool = spool
        self._writer = writer
        self._settings = settings
        self._clock = clock
        self._busy: set[str] = set()
        self._owed: set[str] = set()  # messages with a pending notice (this process)
        self._again: set[str] = set()
        self._group = Group()
        self._log = get_logger(component="notices")
        self.on_queued: Callable[[], None] = _nothing  # the queue manager's wake-up

    def reconfigure(self, settings: NoticeSettings) -> None:
        """A reload: delay_warning and max_age for the next decision."""
        self._settings = settings

    def worth_a_look(
        self, message_id: MessageId, updates: Sequence[RecipientUpdate], received_at: float
    ) -> bool:
        """After a delivery: could this message owe a notice now? (Spares a read.) A
        failure found while the rest of its message was in flight is owed until the
        last delivery of the message ends."""
        if any(update.notice for update in updates):
            self._owed.add(message_id)
        if message_id in self._owed:
            return True
        warn_after = self._settings.delay_warning
        return (
            warn_after is not None
            and self._clock() - received_at >= warn_after
            and any(update.outcome is Outcome.DEFERRED for update in updates)
        )

    def settle(self, message_id: MessageId) -> None:
        """Write the notices the message owes now; one settle per message at a time
        (a request meanwhile makes the running one look again)."""
        if message_id in self._busy:
            self._again.add(message_id)
            return
        self._busy.add(message_id)
        try:
            while True:
                self._again.discard(message_id)
                self._settle(message_id)
                if message_id not in self._again:
                    return
        except Exception:
            metrics.INTERNAL_ERRORS.labels("notices").inc()
            self._log.exception("notice_failed", msg_id=message_id)
        finally:
            self._busy.discard(message_id)

    def settle_later(self, message_id: MessageId) -> None:
        self._group.spawn(self.settle, message_id)

    def sweep(self) -> None:
        """Pending notices left behind (a crash between a result and its notice)."""
        for message_id in self._spool.pending_notice_messages():
            if message_id not in self._busy:
                self.settle_later(message_id)

    def stop(self) -> None:
        self._group.kill(timeout=1.0)

    def _settle(self, message_id: MessageId) -> None:
        for _ in range(SETTLE_ATTEMPTS):
            state = self._spool.notice_state(message_id)
            if state is None or not any(r.notice_pending for r in state.recipients):
                self._owed.discard(message_id)
            if state is None:
                return
            now = self._clock()
            decision = decide(state, now, self._settings)
            if decision is None:
                return
            notices = self._compose(state, decision, now)
            stored = self._spool.store_notices(
                message_id,
                reported=decision.reported,
                notices=notices,
                warned_at=now if decision.delayed else None,
            )
            if stored:
                self._owed.discard(message_id)
                self._logged(state, decision, notices)
                if notices:
                    self.on_queued()
                return
        # Lost the race each time: whatever changed the state asks again.

    def _compose(
        self, state: NoticeState, decision: Decision, now: float
    ) -> list[tuple[NewMessage, str]]:
        notices: list[tuple[NewMessage, str]] = []
        if decision.failed:
            failed = [_result(r, Outcome.FAILED, "54") for r in decision.failed]
            bounce = self._writer.bounce(
                state.message, failed, now=now, recipient=decision.failure_to
            )
            notices.append((bounce, decision.failure_kind))
        if decision.delayed:
            delayed = [_result(r, Outcome.DEFERRED, "4") for r in decision.delayed]
            warning = self._writer.delay_warning(
                state.message,
                delayed,
                now=now,
                retry_until=state.message.received_at + self._settings.max_age,
            )
            notices.append((warning, DELAY))
        for action in (dsn.Action.DELIVERED, dsn.Action.RELAYED):  # one notice per kind
            entries = [
                (_result(r, Outcome.DELIVERED, "2"), a)
                for r, a in decision.succeeded
                if a is action
            ]
            if entries:
                notices.append((self._writer.notice(state.message, entries, now=now), SUCCESS))
        return notices

    def _logged(
        self, state: NoticeState, decision: Decision, notices: list[tuple[NewMessage, str]]
    ) -> None:
        original = state.message.id
        for notice, kind in notices:
            metrics.NOTICES.labels(kind).inc()
            event = _QUEUED_EVENTS.get(kind, "bounce_queued")
            self._log.info(
                event, msg_id=notice.id, original=original, kind=kind, rcpt=notice.recipients[0]
            )
        unreported = len(decision.reported) - len(decision.failed) - len(decision.succeeded)
        if unreported:
            self._log.info("notice_suppressed", msg_id=original, count=unreported, kind=state.kind)


_QUEUED_EVENTS = {DELAY: "delay_warning_queued", SUCCESS: "success_notice_queued"}


def _nothing() -> None:
    pass


def _result(row: RecipientState, outcome: Outcome, classes: str) -> RecipientResult:
    """A stored row as the result a notice quotes; its status of one of `classes`."""
    status = row.last_status
    if not status or status[0] not in classes:
        status = f"{classes[0]}.0.0"
    reply = row.last_error or _DEFAULT_REPLY[outcome]
    return RecipientResult(row.address, outcome, status, reply, row.remote_mta)


_DEFAULT_REPLY = {
    Outcome.DEFERRED: "queued",
    Outcome.FAILED: "failed",
    Outcome.DELIVERED: "delivered",
}
