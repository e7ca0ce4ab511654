"""One delivery attempt of a batch, and what its results mean for the spool.

The backend is called with the message and the batch's recipients; whatever it does,
every recipient ends with a result (a backend that raises, or forgets a recipient,
defers it with 451 4.3.0: a bug in a transport must never lose or bounce mail).
Results become spool updates: delivered; deferred to the next retry step; failed on a
permanent error, or once the message is older than `max_age` (counted from arrival:
RFC 5321 §4.5.4.1's give-up time). A deferral because the destination is dead makes
no attempt ("delivery temporarily suspended") and is not retried before the
destination may be tried again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from gsmtp import metrics
from gsmtp.delivery.base import Deliverer
from gsmtp.message import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.queue.destinations import Batch
from gsmtp.queue.notices import needs_notice
from gsmtp.queue.retry import RetryPolicy
from gsmtp.spool import RecipientUpdate

ADMIN_BOUNCE_REPLY = "550 5.0.0 Bounced by the administrator"
INTERNAL_ERROR = "451 4.3.0 Internal error"
_REPLY_CODES = re.compile(r"\A\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3} )?")
_LOG_EVENTS = {
    Outcome.DELIVERED: "message_delivered",
    Outcome.DEFERRED: "message_deferred",
    Outcome.FAILED: "message_failed",
}


def run(
    deliverer: Deliverer, message: QueuedMessage, batch: Batch, log: Any
) -> list[RecipientResult]:
    """Deliver the batch (or fail what the administrator bounced); one result each."""
    requested = [r.address for r in batch.recipients if r.bounce_requested]
    to_deliver = [r.address for r in batch.recipients if not r.bounce_requested]
    results = results_for_all(requested, Outcome.FAILED, "5.0.0", ADMIN_BOUNCE_REPLY)
    if not to_deliver:
        return results
    transport = batch.key[0]
    started = time.monotonic()
    try:
        delivered = list(deliverer.deliver(message, to_deliver))
    except Exception:
        metrics.INTERNAL_ERRORS.labels("delivery").inc()
        log.exception("delivery_crashed", msg_id=message.id, transport=transport)
        delivered = results_for_all(to_deliver, Outcome.DEFERRED, "4.3.0", INTERNAL_ERROR)
    finally:
        metrics.DELIVERY_SECONDS.labels(transport).observe(time.monotonic() - started)
    returned = {result.address for result in delivered}
    missing = [r for r in to_deliver if r not in returned]
    delivered += results_for_all(
        missing, Outcome.DEFERRED, "4.3.0", "451 4.3.0 No result from transport"
    )
    wanted = set(to_deliver)
    return results + [r for r in delivered if r.address in wanted]


def internal_error(batch: Batch) -> list[RecipientResult]:
    """The batch could not be attempted for a fault of ours: try again later."""
    addresses = [r.address for r in batch.recipients]
    return results_for_all(addresses, Outcome.DEFERRED, "4.3.0", INTERNAL_ERROR)


def reached(results: Sequence[RecipientResult]) -> bool | None:
    """What the attempt says about the destination: False when no host could be
    reached, True when one answered, None when nothing was learned."""
    results = [r for r in results if r.reply != ADMIN_BOUNCE_REPLY]  # no backend call
    if not results:
        return None
    if any(result.unreachable for result in results):
        return False
    if all(result.status == "4.3.0" and result.outcome is Outcome.DEFERRED for result in results):
        return None  # our own fault (a crash, a local write error), not the destination's
    return True


def updates_for(
    batch: Batch,
    results: Sequence[RecipientResult],
    now: float,
    retry: RetryPolicy,
    *,
    not_before: float | None = None,
    attempted: bool = True,
    message: QueuedMessage | None = None,
) -> list[RecipientUpdate]:
    """Results as spool updates; a deferral past max_age becomes a failure (4.4.7).
    `message` (when it was read) gives each recipient's NOTIFY for `needs_notice`;
    without it a failure is kept pending and the notice step reads NOTIFY itself."""
    attempts = {r.address: r.attempts for r in batch.recipients}
    expired = retry.expired(batch.claim.received_at, now)
    updates = []
    for result in results:
        if result.outcome is Outcome.DEFERRED and expired:
            result = RecipientResult(
                result.address,
                Outcome.FAILED,
                "4.4.7",
                f"Delivery time expired; last error: {result.reply}",
                result.remote_mta,
            )
        next_at = now
        if result.outcome is Outcome.DEFERRED:
            next_at = retry.next_attempt_at(attempts.get(result.address, 0) + 1, now)
            if not_before is not None:
                next_at = max(next_at, not_before)
        updates.append(
            RecipientUpdate(
                batch.claim.message_id,
                result.address,
                result.outcome,
                result.reply,
                next_at,
                status=result.status,
                remote_mta=result.remote_mta,
                notice=(
                    needs_notice(result, message.recipient_dsn(result.address).notify)
                    if message is not None
                    else result.outcome is Outcome.FAILED
                ),
                attempted=attempted,
            )
        )
    return updates


def suspended(batch: Batch, reason: str) -> list[RecipientResult]:
    """Deferred without a connection: the destination is dead for now (Postfix's
    "delivery temporarily suspended"). What the administrator bounced fails all the
    same: that needs no connection."""
    text = _REPLY_CODES.sub("", reason, count=1) or "no host could be reached"
    requested = [r.address for r in batch.recipients if r.bounce_requested]
    waiting = [r.address for r in batch.recipients if not r.bounce_requested]
    return results_for_all(
        requested, Outcome.FAILED, "5.0.0", ADMIN_BOUNCE_REPLY
    ) + results_for_all(
        waiting,
        Outcome.DEFERRED,
        "4.4.1",
        f"451 4.4.1 delivery temporarily suspended: {text}",
    )


def bounce_reason(update: RecipientUpdate) -> str:
    """Why a recipient failed for good, as gsmtp_bounces_total counts it."""
    if update.error == ADMIN_BOUNCE_REPLY:
        return "admin"
    if update.status == "4.4.7":
        return "expired"
    return "rejected"


def log_results(
    log: Any,
    batch: Batch,
    updates: Sequence[RecipientUpdate],
    results: Sequence[RecipientResult] = (),
    *,
    now: float,
) -> None:
    """One line per recipient (the operator's log: `delay`, seconds from the message's
    arrival to `now`, and `attempt`, which attempt this was — attempts made so far for
    a deferral that made none, like Postfix's delays= and OpenSMTPD's retry count), and
    the delivery metrics: outcomes, time in queue of each delivered recipient, bounces."""
    transport = batch.key[0]
    by_address = {result.address: result for result in results}
    attempts = {r.address: r.attempts for r in batch.recipients}
    delay = max(now - batch.claim.received_at, 0.0)
    for update in updates:
        metrics.DELIVERIES.labels(transport, update.outcome.value).inc()
        if update.outcome is Outcome.DELIVERED:
            metrics.TIME_IN_QUEUE.observe(delay)
        elif update.outcome is Outcome.FAILED:
            metrics.BOUNCES.labels(bounce_reason(update)).inc()
        result = by_address.get(update.address)
        log.info(
            _LOG_EVENTS[update.outcome],
            msg_id=update.message_id,
            rcpt=update.address,
            transport=transport,
            outcome=update.outcome.value,
            reply=update.error,
            mx=(result and result.remote_mta) or None,
            delay=round(delay, 3),
            attempt=attempts.get(update.address, 0) + int(update.attempted),
            **_tls_fields(update, result),
        )


def _tls_fields(update: RecipientUpdate, result: RecipientResult | None) -> dict[str, Any]:
    """A message relayed to a peer: over which TLS version ("" plaintext) and whether
    the peer's certificate was verified for its name."""
    if update.outcome is not Outcome.DELIVERED or result is None or not result.remote_mta:
        return {}
    return {"tls_version": result.tls_version or None, "tls_verified": result.tls_verified}
