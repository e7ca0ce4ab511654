"""The queue runner: claims due recipients, delivers them over a pool of senders, records
what happened, retries on a schedule, expires and bounces.

Theory of operation. One runner greenlet loops: claim what is due (as many recipients as
there are free senders can take), group the claimed recipients into batches — one per
(message, transport, destination domain), so a remote domain gets one SMTP transaction
with all its recipients — and hand each batch to a sender greenlet in a bounded pool,
at most `max_per_domain` at once per destination. Each sender records its results in
one transaction: delivered; deferred with the next attempt at the next retry step (the
last step repeats) plus up to 10 % jitter, so a restart does not retry everything at
once; failed on a permanent error or once the message is older than `max_age`. Failed
recipients of a message with a sender get one RFC 3464 bounce, enqueued in the same
transaction. Between rounds the runner sleeps until the next due time, a wake-up (a new
message: the seed's signal, as a gevent Event), or at most IDLE_SECONDS. An exception in
one delivery is logged and counted; the recipients are deferred, the runner goes on.
When acceptance and delivery compete for the process's core, a DeliveryPacer lowers
the number of concurrent deliveries so that clients waiting on replies come first.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import gevent
from gevent.event import Event
from gevent.pool import Pool

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.delivery.base import Deliverer
from gsmtp.log import get_logger
from gsmtp.message import Outcome, QueuedMessage, RecipientResult
from gsmtp.routing import Route
from gsmtp.spool import Claim, RecipientUpdate, Spool

IDLE_SECONDS = 5.0
JITTER_FRACTION = 0.1


class DeliveryPacer:
    """Acceptance before delivery. Clients wait on the event loop for every reply,
    deliveries can wait for the next retry; when both compete for the one core a
    Python process gets, the loop's lag (how late a short sleep wakes) says which is
    losing. Additive increase, multiplicative decrease on the number of concurrent
    deliveries: above `high` lag it halves (never below `minimum`, so mail keeps
    moving under any load), below `low` it grows back to the configured concurrency."""

    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 2,
        high: float = 0.004,
        low: float = 0.001,
        interval: float = 0.02,
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.allowed = maximum
        self._high = high
        self._low = low
        self.interval = interval

    def observe(self, lag: float) -> None:
        if lag > self._high:
            self.allowed = max(self.minimum, self.allowed // 2)
        elif lag < self._low:
            self.allowed = min(self.maximum, self.allowed + 1)

    def run(self) -> None:
        """Probe the loop forever (the scheduler owns and kills this greenlet); the
        allowance is exported as gsmtp_delivery_concurrency_allowed."""
        while True:
            metrics.DELIVERY_CONCURRENCY_ALLOWED.set(self.allowed)
            started = time.monotonic()
            gevent.sleep(self.interval)
            self.observe(time.monotonic() - started - self.interval)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    steps: tuple[float, ...]
    max_age: float
    jitter: Callable[[], float] = field(default=random.random)

    def next_attempt_at(self, attempts_made: int, now: float) -> float:
        """After the n-th failed attempt wait steps[n-1]; the last step repeats."""
        step = self.steps[min(max(attempts_made, 1), len(self.steps)) - 1]
        return now + step * (1.0 + JITTER_FRACTION * self.jitter())

    def expired(self, received_at: float, now: float) -> bool:
        return now - received_at >= self.max_age


@dataclass(frozen=True, slots=True)
class _Batch:
    claim: Claim
    route: Route
    recipients: tuple[str, ...]


class Scheduler:
    def __init__(
        self,
        *,
        spool: Spool,
        deliverers: Mapping[str, Deliverer],
        route: Callable[[str], Route],
        retry: RetryPolicy,
        acceptor: Acceptor,
        concurrency: int,
        max_per_domain: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._spool = spool
        self._deliverers = deliverers
        self._route = route
        self._retry = retry
        self._acceptor = acceptor
        self._clock = clock
        self._pool = Pool(concurrency)
        self._claim_batch = max(1, concurrency // 4)
        self._pacer = DeliveryPacer(concurrency)
        self._pacer_greenlet: gevent.Greenlet | None = None
        self._max_per_domain = max_per_domain
        self._active: dict[str, int] = defaultdict(int)
        self._waiting: dict[str, deque[_Batch]] = defaultdict(deque)
        self._wake = Event()
        self._stopping = False
        self._runner: gevent.Greenlet | None = None
        self._log = get_logger(component="scheduler")

    def start(self) -> None:
        self._runner = gevent.spawn(self._run)
        self._pacer_greenlet = gevent.spawn(self._pacer.run)

    def wake(self) -> None:
        """A new message is queued: look for due work now."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stop claiming, give running deliveries `timeout` seconds, then kill them
        (their leases are released at the next start, so nothing is lost)."""
        self._stopping = True
        self._waiting.clear()
        self._wake.set()
        if self._pacer_greenlet is not None:
            self._pacer_greenlet.kill()
        if self._runner is not None:
            self._runner.join(timeout=1.0)
            self._runner.kill()
        self._pool.join(timeout=timeout)
        self._pool.kill(timeout=timeout)

    # -- the runner -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            claimed = 0
            try:
                claimed = self._claim_and_dispatch()
            except Exception:
                metrics.INTERNAL_ERRORS.labels("scheduler").inc()
                self._log.exception("queue_run_failed")
            if claimed and len(self._pool) < self._pacer.allowed:
                continue
            self._wake.wait(self._sleep_seconds())

    def _claim_and_dispatch(self) -> int:
        busy = len(self._pool)
        room = min(self._pool.free_count(), self._pacer.allowed - busy)
        if room <= 0 or self._stopping:
            return 0
        if room < min(self._claim_batch, self._pacer.allowed) and busy > 0:
            return 0  # wait for more senders to come free: fewer, larger claims
        # A claim is in recipients and a sender takes a batch; room * 4 leaves space for
        # messages with several recipients at one domain, but not while paced, when
        # every batch must fit the pacer's allowance.
        paced = self._pacer.allowed < self._pacer.maximum
        claims = self._spool.claim_due(self._clock(), limit=room if paced else room * 4)
        for claim in claims:
            for batch in self._batches(claim):
                self._dispatch(batch)
        return sum(len(claim.recipients) for claim in claims)

    def _sleep_seconds(self) -> float:
        if len(self._pool) >= self._pacer.allowed:
            return 0.05  # woken sooner by a sender finishing (see _deliver)
        next_due = self._spool.next_due_at()
        if next_due is None:
            return IDLE_SECONDS
        return min(max(next_due - self._clock(), 0.0), IDLE_SECONDS)

    def _batches(self, claim: Claim) -> list[_Batch]:
        groups: dict[Route, list[str]] = defaultdict(list)
        for recipient in claim.recipients:
            groups[self._route(recipient)].append(recipient)
        return [_Batch(claim, route, tuple(recipients)) for route, recipients in groups.items()]

    def _dispatch(self, batch: _Batch) -> None:
        destination = batch.route.destination
        if self._active[destination] >= self._max_per_domain:
            self._waiting[destination].append(batch)
            return
        self._active[destination] += 1
        self._pool.spawn(self._deliver, batch)

    # -- one sender -------------------------------------------------------------------

    def _deliver(self, batch: _Batch) -> None:
        try:
            self._attempt(batch)
        except Exception:
            metrics.INTERNAL_ERRORS.labels("delivery").inc()
            self._log.exception("delivery_crashed", msg_id=batch.claim.message.id)
        finally:
            destination = batch.route.destination
            self._active[destination] -= 1
            waiting = self._waiting.get(destination)
            if waiting and not self._stopping:
                next_batch = waiting.popleft()
                self._active[destination] += 1
                self._pool.spawn(self._deliver, next_batch)
            elif self._active[destination] <= 0:
                self._active.pop(destination, None)
                self._waiting.pop(destination, None)
            self._wake.set()

    def _attempt(self, batch: _Batch) -> None:
        message = batch.claim.message
        transport = batch.route.transport
        requested = [r for r in batch.recipients if r in batch.claim.bounce_requested]
        to_deliver = [r for r in batch.recipients if r not in batch.claim.bounce_requested]
        results = [
            RecipientResult(r, Outcome.FAILED, "5.0.0", "Bounced by the administrator")
            for r in requested
        ]
        if to_deliver:
            results += self._call_deliverer(transport, message, to_deliver)
        now = self._clock()
        updates, failed = self._settle(batch.claim, results, now)
        bounces = []
        if failed and message.sender:
            bounces.append(self._acceptor.bounce(message, failed, now=now))
        self._spool.record_results(updates, bounces)
        for update in updates:
            metrics.DELIVERIES.labels(transport, update.outcome.value).inc()
        for result in results:
            event = _LOG_EVENTS[result.outcome]
            self._log.info(
                event,
                msg_id=message.id,
                rcpt=result.address,
                transport=transport,
                outcome=result.outcome.value,
                reply=result.reply,
                mx=result.remote_mta or None,
            )
        for bounce in bounces:
            self._log.info("bounce_queued", msg_id=bounce.id, original=message.id)

    def _call_deliverer(
        self, transport: str, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]:
        deliverer = self._deliverers[transport]
        started = time.monotonic()
        try:
            results = deliverer.deliver(message, recipients)
        except Exception:
            metrics.INTERNAL_ERRORS.labels("delivery").inc()
            self._log.exception("delivery_crashed", msg_id=message.id, transport=transport)
            results = [
                RecipientResult(r, Outcome.DEFERRED, "4.3.0", "451 4.3.0 Internal error")
                for r in recipients
            ]
        finally:
            metrics.DELIVERY_SECONDS.labels(transport).observe(time.monotonic() - started)
        returned = {result.address for result in results}
        missing = [r for r in recipients if r not in returned]
        results += [
            RecipientResult(r, Outcome.DEFERRED, "4.3.0", "451 4.3.0 No result from transport")
            for r in missing
        ]
        return results

    def _settle(
        self, claim: Claim, results: Sequence[RecipientResult], now: float
    ) -> tuple[list[RecipientUpdate], list[RecipientResult]]:
        """Turn results into spool updates; deferred past max_age becomes failed."""
        updates: list[RecipientUpdate] = []
        failed: list[RecipientResult] = []
        message = claim.message
        for result in results:
            outcome = result.outcome
            if outcome is Outcome.DEFERRED and self._retry.expired(message.received_at, now):
                result = RecipientResult(
                    result.address,
                    Outcome.FAILED,
                    "4.4.7",
                    f"Delivery time expired; last error: {result.reply}",
                    result.remote_mta,
                )
                outcome = Outcome.FAILED
            next_at = now
            if outcome is Outcome.DEFERRED:
                attempts = claim.attempts.get(result.address, 0) + 1
                next_at = self._retry.next_attempt_at(attempts, now)
            if outcome is Outcome.FAILED:
                failed.append(result)
            updates.append(
                RecipientUpdate(message.id, result.address, outcome, result.reply, next_at)
            )
        return updates, failed


_LOG_EVENTS = {
    Outcome.DELIVERED: "message_delivered",
    Outcome.DEFERRED: "message_deferred",
    Outcome.FAILED: "message_failed",
}
