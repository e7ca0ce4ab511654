"""The queue manager: a bounded active set, one dispatcher, a pool of senders (and one of
local deliveries).

Theory of operation (Postfix's qmgr is the model). One greenlet, the dispatcher, owns
everything here but the deliveries themselves. Each round it

1. takes what the CLI did to the queue (`gsmtp queue flush|hold|release|delete|bounce`
   in another process, left in the spool's admin_actions; looked for when the CLI
   signalled, and once per `idle_poll` in case a signal was lost), logs each as an
   audit line and acts on it (a flush forgets the dead-destination memory of what it made due, and
   all of it for a whole-queue flush), and revives dead destinations whose time has come;
2. claims due recipients — only what can start now or soon: no more than the free
   slots can take, each destination capped at what its window can run plus one
   window waiting, and never more than `active_limit` recipients in memory. A claim
   reads no body; the rows are owned by this process until their results are
   recorded (ownership does not lapse; a crash releases it at the next start);
3. routes the claimed recipients into batches (one per message and destination) on
   per-destination FIFO queues; batches for a dead destination are deferred at once,
   without a connection;
4. starts deliveries round-robin across destinations, each within its window, while
   a slot is free in their lane (remote ones: a sender of `delivery.concurrency`;
   local ones: a local delivery of `local_concurrency`, beside the senders, see
   `_Lane`) and the bodies of running deliveries fit the byte budget (a body
   larger than the whole budget runs alone).

A delivery greenlet reads its body, calls the backend, records the results, and on
its way out updates its destination's window (a destination none of whose hosts
answered becomes dead, and its waiting batches are deferred), gives back its body
bytes and its slot, wakes the dispatcher, and lets the notice step look at its
message. It never starts another delivery, so no delivery ever waits for a slot of
the pool it runs in (that deadlocked the old scheduler once the pool was full).

The dispatcher sleeps until a delivery ends, new mail is queued, or at most
`idle_poll` (1 s): often enough to see a due time on time. The CLI sends SIGUSR1 after
a change (`admin_signalled`), so a flush is acted on at once, not at the next poll. Retry
times are wall time; no wait is longer than the longest retry step, and a time found
further ahead (the clock was set back) is pulled forward. An exception in a round is
logged and counted, and the dispatcher goes on after a pause; MAX_FAILED_ROUNDS failed
in a row mean the runner is broken, not unlucky: it raises and dies, and its owner (the
supervisor) ends the process for a restart rather than let it accept mail it never
delivers. Its greenlet is exposed (`greenlet`) for an owner to watch. `stop()` stops
claiming at once, gives running deliveries their time, then kills them.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import apsw
import gevent
from gevent.event import Event
from gevent.pool import Pool

from gsmtp import metrics
from gsmtp.db import DatabaseError
from gsmtp.delivery.base import Deliverer
from gsmtp.log import get_logger
from gsmtp.message import Outcome, RecipientResult
from gsmtp.queue import attempt
from gsmtp.queue.destinations import (
    INITIAL_WINDOW,
    SHARED_LANE,
    Batch,
    Destination,
    Destinations,
    Key,
)
from gsmtp.queue.notices import Notices, NoticeSettings
from gsmtp.queue.pacer import DeliveryPacer
from gsmtp.queue.retry import Clock, RetryPolicy
from gsmtp.routing import LOCAL, Route
from gsmtp.spool import (
    Claim,
    ClaimedRecipient,
    DomainFilter,
    Held,
    RecipientUpdate,
    Spool,
    Unreadable,
    domain_of,
)

IDLE_POLL = 1.0  # seconds: the longest the dispatcher sleeps (a flush is seen this soon)
ERROR_PAUSE = 1.0
RECORD_PAUSE_MAX = 30.0  # seconds: the longest pause between tries to record results
MAX_FAILED_ROUNDS = 30  # consecutive failed rounds (about 30 s): the runner is broken
# Bytes of bodies held by running deliveries, as a share of server.max_data_memory (the
# bodies being received): 64 MB at the default. A delivery's memory grows with the
# bodies it holds, so RSS stays bounded whatever the sizes and the backlog (L-16).
BODY_BUDGET_SHARE = 4
BODY_BUDGET = 64 * 1024 * 1024


def body_budget(max_data_memory: int) -> int:
    return max(1, max_data_memory // BODY_BUDGET_SHARE)


def lane_budget(body_budget: int) -> int:
    """Each lane's share of the body budget: half. One budget for both kept a body
    larger than all of it (a 35 MB relayed message against 32 MB a worker at the
    defaults) waiting until no delivery of either lane ran, and then alone, so the
    local lane stopped for the whole transfer (red team). A body larger than its lane's
    share still waits for its lane to hold none, and runs alone in it."""
    return max(1, body_budget // 2)


# A claim past full destinations looks at every due row of theirs (skipped, not sought
# past): with a backlog for one of them, each new message's wake-up made such a claim,
# which found nothing (a third of all claims in the relay bench, most of the writer's
# time). After one, the next comes only FRUITLESS_FACTOR times its duration later (a
# tenth of the time at most goes to them, however large the backlog), and no sooner
# than FRUITLESS_PAUSE if it found nothing; claims in between look at the first due
# rows of any destination, taking none of the full ones', and are not made at all
# while every destination known is full. So mail for another destination behind a
# full one's backlog waits that long at most. And no more than FRUITLESS_MAX: the
# duration includes the wait for the writer thread (others' commits, a stalled fsync),
# which says nothing of the claim's own cost.
FRUITLESS_PAUSE = 0.25
FRUITLESS_FACTOR = 10
FRUITLESS_MAX = 1.0
GAUGE_INTERVAL = 0.25  # seconds: deliveries in flight are shown at most this often
CLAIM_CHUNK = 25  # while senders are busy, wait until this many are free: fewer claims
CHUNK_WAIT = 0.25  # seconds: but no longer (the busy ones may hang for minutes)
CLAIM_FACTOR = 4  # recipients claimed per free sender (messages have several)
MIN_SCAN = 200
# A claim that may take local rows asks for this many at least while the local lane
# has started a delivery in the last LOCAL_RECENT seconds. While clients are served the
# pacer lets 2 deliveries start, and claims were sized by what could start: the idle
# senders' one (an unused lane counts for one) or a local slot come free, 4 rows, which
# a local backlog then filled. Each claim looks at MIN_SCAN due rows (about a
# millisecond of the writer's time) for 4 local deliveries of a fraction of one each:
# the C=100 M=100 cell made 120-280 claims a worker in 3-4 s. Local batches waiting to
# start hold back nothing (each takes milliseconds), and a destination's cap bounds
# what any claim takes for it.
LOCAL_MIN_CLAIM = 32
LOCAL_RECENT = 1.0
# A lane not in use has a claim of its own (a turn) this often at most, and, after one
# that found nothing, no sooner than this many times its duration: such a claim looks
# at every due row of the other lane (the local backlog's drain: 20 in 22 s, 1.1 s of
# the writer threads' time at once every second, 18 to 100 ms each).
UNUSED_LANE_TURN = 1.0
UNUSED_LANE_FACTOR = 30
# And no later than this: the duration includes the wait for the writer thread, and
# one stalled commit of 0.7 s put the next turn 21 s away (red team).
UNUSED_LANE_MAX = 5.0
SWEEP_SECONDS = 60.0
LONG_AGO = -1e18  # "no due row looked at yet"
# The audit line logged for each thing the CLI did (gsmtp.queue_control).
_AUDIT_EVENTS = {
    "hold": "message_held",
    "release": "message_released",
    "delete": "message_deleted",
    "bounce": "message_bounce_requested",
    "flush": "queue_flushed",
}


@dataclass(frozen=True, slots=True)
class _Attempted:
    """What one attempt came to, before it is recorded: the backend's results, the
    spool updates they make, and what they say of the destination (attempt.reached)."""

    results: list[RecipientResult]
    updates: list[RecipientUpdate]
    reached: bool | None


class BodyBudget:
    """Bytes of message bodies in memory for running deliveries."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit or self.used == 0

    def take(self, size: int) -> None:
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size


@dataclass(eq=False, slots=True)
class _Lane:
    """Deliveries that share one limit, in a pool of their own: the senders
    (`delivery.concurrency`: sessions with other servers) or the local deliveries
    (`local_concurrency`: each waits for its Maildir batch, and a batch takes every
    one that waits). Both are paced alike (`DeliveryPacer.share`). Deliveries out of
    their slot, recording their results (and notices), are as many at most. Each lane
    has its share of the body budget (`lane_budget`)."""

    pool: Pool
    recording: Pool
    limit: int
    budget: BodyBudget

    def startable(self, pacer: DeliveryPacer) -> int:
        """Deliveries it may start now."""
        free: int = self.pool.free_count()
        return max(0, min(free, pacer.share(self.limit) - len(self.pool)))


class QueueManager:
    def __init__(
        self,
        *,
        spool: Spool,
        deliverers: Mapping[str, Deliverer],
        route: Callable[[str], Route],
        retry: RetryPolicy,
        notices: Notices,
        concurrency: int,
        local_concurrency: int,
        max_per_domain: int,
        active_limit: int = 10000,
        body_budget: int = BODY_BUDGET,
        clock: Clock = time.time,
        initial_window: int = INITIAL_WINDOW,
        idle_poll: float = IDLE_POLL,
        error_pause: float = ERROR_PAUSE,
        max_failed_rounds: int = MAX_FAILED_ROUNDS,
        pacer: DeliveryPacer | None = None,
        spawn: Callable[..., gevent.Greenlet] | None = None,
        local_domains: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self._spool = spool
        # The runner and the pacer are started through `spawn(name, fn)`: the
        # supervisor's, which notices their death (the process then exits).
        self._spawn = spawn or (lambda name, function, *args: gevent.spawn(function, *args))
        self._deliverers = deliverers
        self._route = route
        # The domains `route` sends LOCAL (None: unknown), so that a lane's turn claims
        # its own lane's rows alone, domains never seen included.
        self._local_domains = local_domains
        self._retry = retry
        self._notices = notices
        notices.on_queued = self.wake  # a notice is new mail
        self._clock = clock
        self._active_limit = active_limit
        self._idle_poll = idle_poll
        self._error_pause = error_pause
        self._max_failed_rounds = max_failed_rounds
        # Local deliveries have a lane of their own: counted against the senders, a
        # Maildir batch never held more files than there were senders (50 a worker at
        # the defaults), and a local backlog drained at half the speed that batches of
        # 200 reach, for 25 % more CPU a message (local end to end, 30,000 messages,
        # delivery.concurrency 100 against 400: 1,100-1,600 against 2,000-2,800 msg/s
        # in the drain, 2,020-2,150 against 1,600-1,840 µs a message).
        share = lane_budget(body_budget)
        self._lanes = {
            SHARED_LANE: _Lane(
                Pool(concurrency), Pool(concurrency), concurrency, BodyBudget(share)
            ),
            LOCAL: _Lane(
                Pool(local_concurrency),
                Pool(local_concurrency),
                local_concurrency,
                BodyBudget(share),
            ),
        }
        self._pacer = pacer or DeliveryPacer(concurrency)
        self._destinations = Destinations(
            max_window=max_per_domain,
            initial_window=initial_window,
            full_window={LOCAL: local_concurrency},
        )
        self.held = 0  # recipients in memory: claimed, waiting or running
        self._wake = Event()
        self._more = True  # the spool may hold claimable work
        self._looks = 0  # times something asked for another look (see _look_again)
        self._claimed_through = LONG_AGO  # due rows up to here were looked at
        self._fruitless_until = 0.0  # monotonic: no claim past full destinations before
        self._chunk_until: float | None = None  # monotonic: claim then, chunk or not
        self._last_turn = ""  # the lane the last claim was for, when lanes took turns
        self._local_started = LONG_AGO  # when the local lane last started a delivery
        # Monotonic: the turn a lane not counted in the last claim waits for (`_speculative`).
        self._turn_wait = math.inf
        # Per lane, monotonic: when it may have a turn again while not in use.
        self._unused_turn_at: dict[str, float] = defaultdict(float)
        self._shown_in_flight = self._shown_dead = -1  # the gauges' values, as last set
        self._next_in_flight_shown = 0.0
        self._last_now: float | None = None
        self._next_cap = 0.0  # monotonic times of the periodic checks
        self._next_sweep = 0.0
        self._next_admin_look = 0.0
        self._admin_signalled = True  # look at the CLI's actions in the first round
        self._stopping = False
        self._runner: gevent.Greenlet | None = None
        self._pacer_greenlet: gevent.Greenlet | None = None
        self._log = get_logger(component="queue")

    @property
    def greenlet(self) -> gevent.Greenlet | None:
        """The dispatcher, for an owner to watch (None before start)."""
        return self._runner

    def start(self) -> None:
        self._runner = self._spawn("queue_runner", self.run)
        self._pacer_greenlet = self._spawn("delivery_pacer", self._pacer.run)

    def reconfigure(
        self, *, retry: RetryPolicy, notices: NoticeSettings, body_budget: int | None = None
    ) -> None:
        """A reload: retry steps, max_age and notice settings for the next attempt's
        outcome (retries already scheduled keep their time); the body budget for the
        next deliveries started (running ones keep what they hold)."""
        self._retry = retry
        self._notices.reconfigure(notices)
        if body_budget is not None:
            for lane in self._lanes.values():
                lane.budget.limit = lane_budget(body_budget)

    def wake(self) -> None:
        """New mail was queued: look for due work now."""
        self._look_again()
        self._wake.set()

    def admin_signalled(self) -> None:
        """SIGUSR1: the CLI changed the queue; take its actions now."""
        self._log.info("queue_signalled", signal="SIGUSR1")
        self._admin_signalled = True
        self._wake.set()

    def _sender_left(self, _sender: gevent.Greenlet) -> None:
        self._wake.set()

    def _look_again(self) -> None:
        """Something may have made more work claimable (new mail, a flush, room for a
        destination). Counted, so a claim that was running meanwhile cannot undo it."""
        self._more = True
        self._looks += 1

    def _room_freed(self) -> None:
        """The CLI made work due (a flush, a release, a bounce): worth a claim now, even
        past full destinations."""
        self._fruitless_until = 0.0
        self._look_again()

    def stop_claiming(self) -> None:
        """SIGTERM: claim and start nothing more, from now on."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stop claiming, give running deliveries `timeout` seconds, then kill them
        (what they owned is released at the next start, so nothing is lost)."""
        self.stop_claiming()
        if self._pacer_greenlet is not None:
            self._pacer_greenlet.kill()
        if self._runner is not None:
            self._runner.join(timeout=1.0)
            self._runner.kill()
        self._release_waiting()
        deadline = time.monotonic() + timeout
        pools = [pool for lane in self._lanes.values() for pool in (lane.pool, lane.recording)]
        for pool in pools:
            pool.join(timeout=max(0.0, deadline - time.monotonic()))
        for pool in pools:
            pool.kill(timeout=1.0)
        self._notices.stop()

    def run(self) -> None:
        """The dispatcher's loop (runs until stopped; an owner may watch it). Raises the
        last error once `max_failed_rounds` rounds in a row have failed."""
        failed = 0
        while not self._stopping:
            try:
                timeout = self._round()
            except Exception as error:
                metrics.INTERNAL_ERRORS.labels("queue").inc()
                if isinstance(error, apsw.FullError):
                    # A full disk is no broken runner: the spool recovers by itself
                    # (SpoolUpkeep.checkpoint), and rounds go on in the meantime.
                    self._log.error("queue_round_failed", failed_in_a_row=failed, error=str(error))
                    gevent.sleep(self._error_pause)
                    continue
                failed += 1
                self._log_spool_error(
                    self._log.error, "queue_round_failed", error, failed_in_a_row=failed
                )
                if failed >= self._max_failed_rounds:
                    self._log.error("queue_runner_broken", failed_in_a_row=failed)
                    raise
                gevent.sleep(self._error_pause)
                continue
            failed = 0
            self._wake.wait(timeout)
            self._wake.clear()

    # -- one round ----------------------------------------------------------------------

    def _round(self) -> float:
        now = self._clock()
        self._check_clock(now)
        self._check_admin_actions()
        for destination in self._destinations.revive(now, self._retry.longest_wait):
            self._log.info("destination_revived", destination=destination.key[1])
        if time.monotonic() >= self._next_cap:
            self._next_cap = time.monotonic() + self._idle_poll
            if self._spool.cap_schedule(now + self._retry.longest_wait):
                self._look_again()
        next_due = None
        if not self._more:
            next_due = self._spool.next_due_after(self._claimed_through)
            self._more = next_due is not None and next_due <= now
        again = self._claim(now)
        self._dispatch()
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_SECONDS
            self._notices.sweep()
        self._show_gauges()
        if again:
            return 0.0
        waits = [self._idle_poll]
        if next_due is not None and not self._more:
            waits.append(next_due - now)
        revival = self._destinations.next_revival()
        if revival is not None:
            waits.append(revival - now)
        pause_left = self._fruitless_until - time.monotonic()
        if self._more and pause_left > 0:
            # Only a pause still running: one over has nothing left to wait for (a
            # claim that could not be made waits for a sender or a wake-up instead).
            waits.append(pause_left)
        if self._more and self._chunk_until is not None:
            waits.append(max(0.0, self._chunk_until - time.monotonic()))
        if self._more and self._turn_wait < math.inf:
            waits.append(max(0.0, self._turn_wait - time.monotonic()))
        return max(0.0, min(waits))

    def _show_gauges(self) -> None:
        """Deliveries in flight and dead destinations, written only when they changed,
        and the first at most every GAUGE_INTERVAL but at once when it drops to 0: a
        round follows every delivery, and each write of a multiprocess value takes a
        lock and writes a memory-mapped file (7 % of a worker's event loop in the
        relay bench, written every round)."""
        in_flight, dead = self._running(), self._destinations.dead_count()
        now = time.monotonic()
        if in_flight != self._shown_in_flight and (
            in_flight == 0 or now >= self._next_in_flight_shown
        ):
            metrics.DELIVERIES_IN_FLIGHT.set(in_flight)
            self._shown_in_flight = in_flight
            self._next_in_flight_shown = now + GAUGE_INTERVAL
        if dead != self._shown_dead:
            metrics.DEAD_DESTINATIONS.set(dead)
            self._shown_dead = dead

    def _check_clock(self, now: float) -> None:
        """The wall clock went back: look at every due row again, and pull retries that
        now lie too far ahead forward at once."""
        if self._last_now is not None and now < self._last_now - 1.0:
            self._log.warning("clock_went_back", seconds=round(self._last_now - now, 3))
            self._claimed_through = LONG_AGO
            self._look_again()
            self._next_cap = 0.0
        self._last_now = now

    def _check_admin_actions(self) -> None:
        """Audit and apply what the CLI did: at once when it signalled, else once per
        `idle_poll` (a signal can be lost: the CLI may not be allowed to send it). Not
        every round: a round follows every batch of deliveries, and the look is a query
        on the event loop's own connection. A look that fails is made again next round."""
        if not self._admin_signalled and time.monotonic() < self._next_admin_look:
            return
        waiting = self._spool.admin_actions_waiting()
        self._admin_signalled = False
        self._next_admin_look = time.monotonic() + self._idle_poll
        if not waiting:
            return
        for action in self._spool.take_admin_actions():
            fields: dict[str, object] = {"source": "cli", "at": action.at}
            if action.message_id is not None:
                fields["msg_id"] = action.message_id
            if action.domain is not None:
                fields["domain"] = action.domain
            if action.action in ("flush", "bounce"):
                fields["recipients"] = action.count
            if action.action == "flush" and (
                action.message_id is None or action.domain is not None
            ):
                fields["dead_destinations_forgotten"] = self._destinations.forget_dead(
                    action.domain
                )
            if action.action == "hold" and action.message_id is not None:
                self._release_held(action.message_id)
            self._log.info(_AUDIT_EVENTS.get(action.action, "queue_changed"), **fields)
            if action.action in ("flush", "release", "bounce"):
                self._room_freed()
                self._claimed_through = LONG_AGO

    def _release_held(self, message_id: str) -> None:
        """A message held after it was claimed: what has not started is given back (the
        spool keeps a held message's rows unscheduled); a running delivery finishes."""
        dropped = self._destinations.drop_waiting(message_id)
        if dropped:
            self._spool.release(
                [(message_id, recipient.address) for b in dropped for recipient in b.recipients]
            )
            self.held -= sum(len(b.recipients) for b in dropped)

    def _claim(self, now: float) -> bool:
        """Claim what can start now or soon; True to claim again at once."""
        self._turn_wait = math.inf
        if self._stopping or not self._more:
            return False
        room = self._active_limit - self.held
        running = self._running()
        wants, unused, held = self._wanted()
        # A lane not in use counts for one delivery in a claim that may take any lane's
        # rows: its mail may not exist (no local mail in a relay), and counting its 512
        # free slots made every claim large and none wait for senders to come free
        # (relay end to end: 2,000 against 1,400 µs a message). One is enough to find
        # its mail: the first batch claimed puts the lane in use. While another lane is
        # in use, only when its turn may come (`_lane_turn`): that one's claims would
        # otherwise look for it whenever a slot came free, and take the other lane's
        # rows instead (`_speculative`).
        counted = {
            name: self._speculative(name, want, unused) if name in unused else want
            for name, want in wants.items()
        }
        want = sum(counted.values())
        if room <= 0 or want <= 0:
            self._chunk_until = None
            return False
        if want < min(CLAIM_CHUNK, max(1, self._pacer.allowed // 2)) and running > 0:
            # Wait for more senders to come free: fewer, larger claims. Half the allowed
            # senders at most, so a small pool never waits for the last one to finish,
            # and CHUNK_WAIT at most: the busy ones may hang (stalled hosts, tarpits).
            if self._chunk_until is None:
                self._chunk_until = time.monotonic() + CHUNK_WAIT
            if time.monotonic() < self._chunk_until:
                return False
        self._chunk_until = None
        paused = time.monotonic() < self._fruitless_until
        caps = self._destinations.caps()
        turn = None
        domains = None
        chosen = None if paused else self._lane_turn(counted, unused, caps)
        if chosen is not None:
            turn, caps = chosen
            domains = self._lane_domains(turn)
            # A turn that takes its own lane's rows alone takes what the lane can start.
            want = wants[turn] if domains is not None else counted[turn]
        if domains is None or not domains.inside:
            # It may take remote rows: it leaves the local lane room of its own
            # (`_local_reserve`).
            room -= self._local_reserve(held[LOCAL])
            if room <= 0:
                return False
        limit = min(room, want * CLAIM_FACTOR)
        if (domains is None or domains.inside) and (
            time.monotonic() - self._local_started < LOCAL_RECENT
        ):
            limit = min(room, max(limit, LOCAL_MIN_CLAIM))
        if paused and caps and all(cap <= 0 for cap in caps.values()):
            return False  # every known destination is full; others wait for the pause
        skip_full = not paused and any(cap <= 0 for cap in caps.values())
        looks = self._looks
        started = time.monotonic()
        result = self._spool.claim_due(
            now,
            limit,
            caps=caps,
            default_cap=self._destinations.default_room,
            scan=max(MIN_SCAN, 2 * limit),
            skip_full=skip_full,
            domains=domains,
        )
        if skip_full:
            pause = min(FRUITLESS_MAX, FRUITLESS_FACTOR * (time.monotonic() - started))
            if not result.claims:
                pause = max(pause, FRUITLESS_PAUSE)
            self._fruitless_until = time.monotonic() + pause
        for aside in result.set_aside:
            self._log.error("message_set_aside", msg_id=aside.message_id, reason=aside.reason)
        if result.orphans_removed:
            self._log.warning("orphan_recipients_removed", count=result.orphans_removed)
        suspended: list[tuple[Batch, Destination]] = []
        for claim in result.claims:
            try:
                batches = self._batches(claim)
            except Exception:  # a routing bug: defer the message, never leave it owned
                metrics.INTERNAL_ERRORS.labels("queue").inc()
                self._log.exception("routing_failed", msg_id=claim.message_id)
                batch = Batch(claim, ("", ""), claim.recipients)
                self._record(
                    attempt.updates_for(batch, attempt.internal_error(batch), now, self._retry)
                )
                continue
            for batch in batches:
                self.held += len(batch.recipients)
                destination = self._destinations.get(batch.key)
                if destination.dead_until is None:
                    self._destinations.add(batch)
                else:
                    suspended.append((batch, destination))
        self._destinations.note_full()
        if suspended:
            self._suspend(suspended, now)
        if turn is not None and result.claims:
            # It had mail (its own; or, with no local domains to tell lanes apart, of
            # domains never seen): more may follow, and the domains are known now.
            self._unused_turn_at.pop(turn, None)
        elif turn in unused:
            took = time.monotonic() - started
            self._unused_turn_at[turn] = time.monotonic() + min(
                UNUSED_LANE_MAX, max(UNUSED_LANE_TURN, UNUSED_LANE_FACTOR * took)
            )
        if result.exhausted and turn is not None:
            # Nothing more for this lane; the others' rows were not looked at. The next
            # claim, in the pause this one began, is for every lane.
            return True
        if result.exhausted and looks == self._looks:
            self._more = False
            self._claimed_through = now
        return not result.exhausted and bool(result.claims)

    def _speculative(self, name: str, want: int, unused: set[str]) -> int:
        """What a lane not in use counts for in a claim: one delivery, to find its mail
        if there is any; none while the pacer holds deliveries back (clients served,
        the event loop late), another lane is in use and this one's turn may not come
        yet. A local backlog under client load (2 deliveries at once) made a claim each
        time a local delivery ended, for the idle senders' one: it took the local row
        that had room, 1 or 2 rows a claim, each claim a look at MIN_SCAN due rows on the
        writer thread, where acknowledgements wait for their commits (C=100 M=100:
        120-280 claims a worker in 3-4 s, about a millisecond each, for 1,000 rows). Its
        mail is found by its turns meanwhile, UNUSED_LANE_TURN to UNUSED_LANE_MAX apart
        while they find nothing (the round wakes for the next, `_turn_wait`), or by the
        other lane's claims while that one wants deliveries (they take the oldest due
        rows, whichever lane's). Without client load it counts as before: no
        acknowledgement waits behind the claims then."""
        if (
            self._pacer.holding_back
            and len(unused) < len(self._lanes)
            and time.monotonic() < self._unused_turn_at[name]
        ):
            self._turn_wait = min(self._turn_wait, self._unused_turn_at[name])
            return 0
        return min(1, want)

    def _lane_turn(
        self, wants: Mapping[str, int], unused: set[str], caps: dict[str, int]
    ) -> tuple[str, dict[str, int]] | None:
        """The lane this claim is for, among those that want deliveries (they take
        turns), with its caps: the others' destinations count as full, so the claim
        looks past their due rows (`Destinations.caps`). Claims take due rows oldest
        first, so without turns a backlog of one lane took the claims every lane asked
        for: remote mail behind a local backlog over several domains waited for its
        drain; and once one remote delivery ran (the senders' lane in use, wanting 99
        deliveries, the local lane none), each claim sized by the senders took 400 local
        rows (red team: 3,380 local deliveries before the remote mail).

        A turn's claim is one past full destinations: no more often than the fruitless
        pause lets one come (a tenth of the claims' time at most), and for a lane not in
        use (whose mail may not exist: a relay has no local mail) seldom
        (UNUSED_LANE_TURN), for in a local backlog's drain each claim for the idle
        senders would look at every due local row to find nothing. No turn is taken
        where it would not change the claim (the others' destinations are full anyway,
        or none is known). A turn claims the rows of its lane's domains alone, domains
        never seen included (`_lane_domains`): local mail behind a remote backlog over
        more domains than the queue had seen waited for all of it (red team: 400 over
        400 domains)."""
        now = time.monotonic()
        wanting = [
            name
            for name, lane_want in wants.items()
            if lane_want > 0 and (name not in unused or now >= self._unused_turn_at[name])
        ]
        names = list(self._lanes)
        after = names.index(self._last_turn) + 1 if self._last_turn in names else 0
        for turn in names[after:] + names[:after]:
            turn_caps = self._destinations.caps(turn) if turn in wanting else caps
            if turn_caps != caps:
                self._last_turn = turn
                return turn, turn_caps
        return None

    def _lane_domains(self, turn: str) -> DomainFilter | None:
        """The rows a turn of this lane claims: those of the local domains for the local
        lane, those of every other domain for the senders' (lanes are LOCAL and
        SHARED_LANE). None, every row, when the local domains cannot be read now: a
        turn then also takes the other lane's rows of domains never seen, as before."""
        if self._local_domains is None:
            return None
        try:
            names = self._local_domains()
        except Exception:  # the accounts unreadable now (busy, I/O): claim as before
            return None
        return DomainFilter(names, inside=turn == LOCAL)

    def _local_reserve(self, local_held: int) -> int:
        """Room in the active set that claims which may take remote rows leave to the
        local lane's own turns: a remote backlog of slow hosts over more domains than a
        claim had seen filled the active set (10,000 held, every sender busy), and local
        mail then waited for room behind it (red team: 61 of 668 local messages
        delivered in 20 s). The local lane's limit, a quarter of the active set at most,
        and never so much that the senders could not all run; less what the local lane
        holds already (`local_held`, in batches: a message's recipients of one domain
        count once, which errs on the side of room), else a local drain with a small
        active set per worker ran a quarter fewer deliveries at once (red team). None
        while the local domains are unknown: no claim could take local rows alone."""
        if self._local_domains is None:
            return 0
        senders = self._lanes[SHARED_LANE].limit
        reserve = min(
            self._lanes[LOCAL].limit,
            self._active_limit // 4,
            max(0, self._active_limit - senders),
        )
        return max(0, reserve - local_held)

    def _wanted(self) -> tuple[dict[str, int], set[str], dict[str, int]]:
        """Deliveries a claim should find work for, per lane: what it may start less
        what its destinations hold ready to start; the lanes not in use (nothing
        running or held); and the batches each lane's destinations hold."""
        ready: dict[str, int] = defaultdict(int)
        held: dict[str, int] = defaultdict(int)
        for destination in self._destinations:
            line = self._destinations.lane(destination.key)
            held[line] += destination.held
            if destination.can_start():
                free = destination.allowed - destination.running
                ready[line] += min(len(destination.waiting), free)
        wants = {}
        unused = set()
        for name, lane in self._lanes.items():
            if not held[name] and not len(lane.pool):
                unused.add(name)
            wants[name] = max(0, lane.startable(self._pacer) - ready[name])
        return wants, unused, held

    def _batches(self, claim: Claim) -> list[Batch]:
        groups: dict[Key, list[ClaimedRecipient]] = defaultdict(list)
        for recipient in claim.recipients:
            route = self._route(recipient.address)
            groups[(route.transport, domain_of(recipient.address))].append(recipient)
        return [Batch(claim, key, tuple(recipients)) for key, recipients in groups.items()]

    def _running(self) -> int:
        return sum(len(lane.pool) for lane in self._lanes.values())

    def _dispatch(self) -> None:
        """Start deliveries round-robin, in each lane while it has a free slot, as long
        as its body bytes are free (a batch waiting for them holds up its lane: it would
        wait for ever behind smaller ones otherwise)."""
        for name, lane in self._lanes.items():
            for destination in self._destinations.ready(name):
                if self._stopping:
                    self._destinations.put_back(destination)
                    return
                if not lane.budget.fits(destination.waiting[0].size):
                    self._destinations.put_back(destination)  # FIFO: the same batch first
                    break
                if lane.startable(self._pacer) <= 0:
                    self._destinations.put_back(destination)
                    break
                batch = self._destinations.started(destination)
                lane.budget.take(batch.size)
                sender = lane.pool.spawn(self._deliver, batch, destination)
                if name == LOCAL:
                    self._local_started = time.monotonic()
                # Look again once the sender has left the pool: its slot is free only
                # then (a wake-up from inside `_deliver` comes while it still holds the
                # slot). rawlink: called in the hub (setting an event never blocks),
                # where link would spawn a greenlet for it after every delivery.
                sender.rawlink(self._sender_left)

    def _suspend(self, batches: Sequence[tuple[Batch, Destination]], now: float) -> None:
        """Defer batches of dead destinations without calling the backend."""
        by_batch = []
        for batch, destination in batches:
            results = attempt.suspended(batch, destination.dead_reason)
            updates = attempt.updates_for(
                batch,
                results,
                now,
                self._retry,
                not_before=destination.dead_until,
                attempted=False,  # no connection was made: not an attempt
            )
            attempt.log_results(self._log, batch, updates, now=now)
            by_batch.append((batch, updates))
        try:
            self._record([update for _, updates in by_batch for update in updates])
        finally:
            for batch, _ in batches:
                self.held -= len(batch.recipients)
        for batch, updates in by_batch:
            message_id = batch.claim.message_id
            self._check_bounce_requests(message_id, updates)
            if self._notices.worth_a_look(message_id, updates, batch.claim.received_at):
                self._notices.settle_later(message_id)

    # -- one delivery (in a sender greenlet) --------------------------------------------

    def _deliver(self, batch: Batch, destination: Destination) -> None:
        """One delivery: the attempt in a sender slot, then its results recorded out of
        it. The slot, the body's bytes and the destination's window are given back as
        soon as the backend has answered (`_sender_done`): waiting for the result
        commit (a group-commit pass and its fsync) in the slot kept senders of a local
        backlog's drain idle (+5 % end to end without it). The recipients stay owned (counted in
        `held`) until their results are recorded, so nothing claims them meanwhile."""
        updates: Sequence[RecipientUpdate] = ()
        try:
            attempted: _Attempted | None = None
            try:
                attempted = self._attempt(batch)
            finally:
                self._sender_done(batch, destination, attempted)
            if attempted is not None and self._recorded(batch, attempted):
                updates = attempted.updates
        finally:
            self.held -= len(batch.recipients)
        message_id = batch.claim.message_id
        if self._notices.worth_a_look(message_id, updates, batch.claim.received_at):
            self._notices.settle(message_id)

    def _sender_done(
        self, batch: Batch, destination: Destination, attempted: _Attempted | None
    ) -> None:
        """The backend has answered (or the attempt ended without it): the slot, the
        body bytes and the destination's window go back, and the dispatcher looks."""
        self._lanes[self._destinations.lane(batch.key)].budget.give(batch.size)
        reached = attempted.reached if attempted is not None else None
        if reached is False and destination.dead_until is None:
            self._declare_dead(destination, attempted.updates if attempted is not None else ())
        if self._destinations.finished(destination, reached=reached):
            self._look_again()
        current = gevent.getcurrent()
        # As many recording as sending at most: with the spool slow to commit, the work
        # after deliveries (results, notices) must stay bounded by the pool, not by
        # active_limit (a red-team stall parked 10,000 greenlets). When recording is
        # full, the delivery records in its slot, as before.
        for lane in self._lanes.values():
            if current in lane.pool and lane.recording.free_count() > 0:
                lane.pool.discard(current)  # its slot is free now (the semaphore released)
                lane.recording.add(current, blocking=False)  # not full: never raises PoolFull
        self._wake.set()

    def _attempt(self, batch: Batch) -> _Attempted | None:
        """Deliver. Whatever goes wrong before there are results, the recipients are
        deferred (451 4.3.0), never left owned by nobody; None when there is nothing to
        record (the message vanished, is held, or was set aside)."""
        message_id = batch.claim.message_id
        try:
            message = self._spool.load_message(message_id)
            if message is None:
                # Deleted meanwhile (its rows went with it), or not visible to the body
                # reader yet: whatever is left is due again, not owned by nobody.
                self._log.info("message_vanished", msg_id=message_id)
                self._spool.release([(message_id, r.address) for r in batch.recipients])
                self._look_again()
                return None
            if isinstance(message, Held):
                # Held by the CLI since the claim (its action not taken yet): given
                # back unscheduled (the spool keeps a held message's rows so), or due
                # if a release came meanwhile: its claim may have run before, so look
                # again.
                self._spool.release([(message_id, r.address) for r in batch.recipients])
                self._look_again()
                return None
            if isinstance(message, Unreadable):
                self._spool.set_aside(message_id, message.reason)
                self._log.error("message_set_aside", msg_id=message_id, reason=message.reason)
                return None
            results = attempt.run(self._deliverers[batch.key[0]], message, batch, self._log)
            updates = attempt.updates_for(
                batch, results, self._clock(), self._retry, message=message
            )
        except Exception:
            metrics.INTERNAL_ERRORS.labels("delivery").inc()
            self._log.exception("delivery_crashed", msg_id=message_id)
            results = attempt.internal_error(batch)
            updates = attempt.updates_for(batch, results, self._clock(), self._retry)
        return _Attempted(results, updates, attempt.reached(results))

    def _recorded(self, batch: Batch, attempted: _Attempted) -> bool:
        """Record the results, log them; False when the spool refused them (the
        recipients stay owned: delivered again after a restart, never lost)."""
        message_id = batch.claim.message_id
        try:
            self._record(attempted.updates, until_stopped=True)
        except Exception as error:
            metrics.INTERNAL_ERRORS.labels("spool").inc()
            self._log_spool_error(self._log.error, "results_not_recorded", error, msg_id=message_id)
            return False
        attempt.log_results(
            self._log, batch, attempted.updates, attempted.results, now=self._clock()
        )
        self._check_bounce_requests(message_id, attempted.updates)
        return True

    def _check_bounce_requests(self, message_id: str, updates: Sequence[RecipientUpdate]) -> None:
        """`gsmtp queue bounce` while the message was owned: a deferred recipient it
        asked to bounce is due at once (apply_results), at a time a claim may already
        have looked past; so look again."""
        if any(u.outcome is Outcome.DEFERRED for u in updates) and self._spool.bounce_pending(
            message_id
        ):
            self._look_again()

    def _declare_dead(self, destination: Destination, updates: Sequence[RecipientUpdate]) -> None:
        """No host of it answered: dead until the retry time of what just failed; the
        batches waiting for it are deferred without connecting."""
        now = self._clock()
        deferred = [u for u in updates if u.next_attempt_at > now]
        until = min((u.next_attempt_at for u in deferred), default=None)
        if until is None:
            until = self._retry.next_attempt_at(1, now)
        reason = deferred[0].error if deferred else "no host could be reached"
        self._destinations.kill(destination, until, reason)
        self._log.warning(
            "destination_dead", destination=destination.key[1], until=until, reason=reason
        )
        waiting = list(destination.waiting)
        destination.waiting.clear()
        if waiting:
            try:
                self._suspend([(batch, destination) for batch in waiting], now)
            except Exception as error:
                metrics.INTERNAL_ERRORS.labels("spool").inc()
                self._log_spool_error(
                    self._log.error, "results_not_recorded", error, count=len(waiting)
                )

    @staticmethod
    def _log_spool_error(
        log: Callable[..., Any], event: str, error: Exception, **fields: object
    ) -> None:
        """An error of the spool (full disk, busy, unreadable) is expected in operation:
        logged as a value. Anything else is a bug: logged with its traceback."""
        if isinstance(error, (apsw.Error, DatabaseError)):
            log(event, error=str(error), **fields)
        else:
            log(event, exc_info=error, **fields)

    def _record(self, updates: Sequence[RecipientUpdate], *, until_stopped: bool = False) -> None:
        """Record results; one retry after a pause, or (`until_stopped`: what a delivery
        did) as long as the spool refuses them with a spool error and the server runs,
        each pause twice the last, up to RECORD_PAUSE_MAX. Given up, the rows stay owned
        and are delivered again after a restart (never lost): a delivery's results given
        up after one retry left its copies owned and undelivered in the spool until the
        restart delivered them twice (red team: 509 of them, while `gsmtp queue hold
        --all` kept the spool locked for 37 s)."""
        if not updates:
            return
        pause = self._error_pause
        tries = 1
        while True:
            try:
                self._spool.record_results(updates)
                return
            except Exception as error:
                persistent = until_stopped and isinstance(error, (apsw.Error, DatabaseError))
                if tries > 1 and (not persistent or self._stopping):
                    raise
                self._log_spool_error(
                    self._log.warning, "results_not_recorded", error, retrying=True
                )
            gevent.sleep(pause)
            pause = min(max(pause * 2, self._error_pause), RECORD_PAUSE_MAX)
            tries += 1

    def _release_waiting(self) -> None:
        """At stop: give back what was claimed but not started."""
        owned = [
            (batch.claim.message_id, recipient.address)
            for destination in self._destinations
            for batch in destination.waiting
            for recipient in batch.recipients
        ]
        if not owned:
            return
        try:
            self._spool.release(owned)
        except Exception:
            self._log.warning("claims_not_released", count=len(owned), exc_info=True)
