"""Red team: the paced claims past full destinations (FRUITLESS_PAUSE) must neither
spin the dispatcher nor starve other destinations."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.event import Event

from gsmtp import queue_control
from gsmtp.message import QueuedMessage, RecipientResult
from gsmtp.queue import INITIAL_WINDOW, DeliveryPacer
from gsmtp.queue.manager import CLAIM_FACTOR, FRUITLESS_PAUSE, UNUSED_LANE_MAX, QueueManager
from gsmtp.spool import Held, Spool
from tests.unit.queue_harness import (
    DEFAULTS,
    ClaimRecordingSpool,
    FakeClock,
    FakeDeliverer,
    QueueWorld,
    wait_until,
    world,
)


class CountingClock(FakeClock):
    """A clock standing still that counts its readings: one per dispatcher round."""

    def __init__(self) -> None:
        super().__init__()
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now


@pytest.fixture
def clock() -> CountingClock:
    return CountingClock()


@pytest.fixture
def qw(tmp_path: Path, clock: CountingClock) -> Iterator[QueueWorld]:
    with world(tmp_path, clock) as queue_world:
        yield queue_world


def test_the_dispatcher_does_not_spin_while_every_sender_is_busy_after_a_paced_claim(
    qw: QueueWorld, clock: CountingClock
) -> None:
    """Every sender busy (two stalled destinations), work left to claim (`_more`), and
    a claim past a full destination made once: the dispatcher must wait for a sender or
    a wake-up, not run round after round (its wait was the pause's end, long past: 0)."""
    qw.remote.hold["stalled.example"] = Event()
    qw.remote.hold["slow.example"] = Event()
    for index in range(30):
        qw.enqueue([f"u{index}@stalled.example"])
    # No round but those woken (no sender ends): the new mail is claimed all at once.
    manager = qw.manager(concurrency=2 * INITIAL_WINDOW, idle_poll=60.0)
    manager.start()
    wait_until(lambda: qw.remote.active["stalled.example"] == INITIAL_WINDOW)
    wait_until(lambda: qw.owned("stalled.example") == 2 * INITIAL_WINDOW)
    wait_until(lambda: not manager._more, what="a claim past the full one, found nothing")
    for index in range(30):  # fills the other senders
        qw.enqueue([f"v{index}@slow.example"])
    manager.wake()
    wait_until(lambda: qw.remote.active["slow.example"] == INITIAL_WINDOW)
    gevent.sleep(FRUITLESS_PAUSE + 0.1)  # the pause after that claim is over
    before = clock.readings
    gevent.sleep(0.3)  # nothing can start or finish meanwhile
    rounds = clock.readings - before
    assert rounds <= 5, f"{rounds} dispatcher rounds with every sender busy"
    qw.remote.hold["stalled.example"].set()
    qw.remote.hold["slow.example"].set()
    wait_until(lambda: qw.messages_left() == 0, timeout=30)


class ReleasedWhileHeldSpool(Spool):
    """When a delivery finds its message held, runs `on_held` (once) before answering:
    the CLI's release lands between the read of `held` and the rows given back."""

    def __init__(self, inner: Spool) -> None:
        super().__init__(inner._writer, inner._reader)
        self.on_held: Callable[[str], None] | None = None

    def load_message(self, message_id: str) -> Any:
        found = super().load_message(message_id)
        if isinstance(found, Held) and self.on_held is not None:
            on_held, self.on_held = self.on_held, None
            on_held(message_id)
        return found


def test_a_message_released_while_its_delivery_gives_it_back_is_delivered(
    qw: QueueWorld,
) -> None:
    """Held (no signal) while claimed, then released with a signal while its delivery,
    having read it held, is about to give its rows back: the manager takes the release
    (and claims: nothing, the rows are still owned) before the rows come back due at
    their old time, behind what the claim looked at. The message must still go, without
    waiting for new mail or a restart."""
    qw.remote.hold["slow.example"] = Event()
    first = qw.enqueue(["a@slow.example"])
    second = qw.enqueue(["b@slow.example"])
    spool = ReleasedWhileHeldSpool(qw.spool)
    manager = qw.manager(spool=spool, idle_poll=60.0, max_per_domain=1)
    manager.start()
    wait_until(lambda: len(qw.remote.calls) == 1 and qw.owned("slow.example") == 2)
    assert queue_control.hold(qw.admin._db, ids=[second]) == [second]  # no signal

    def release(message_id: str) -> None:
        assert queue_control.release(qw.admin._db, now=qw.clock(), ids=[message_id])
        manager.admin_signalled()
        wait_until(lambda: not qw.rows("SELECT 1 FROM admin_actions"), what="actions taken")
        wait_until(lambda: not manager._more, what="the claim after the release")

    spool.on_held = release
    qw.remote.hold["slow.example"].set()
    wait_until(lambda: spool.on_held is None, what="the delivery finding it held")
    wait_until(
        lambda: [call[0] for call in qw.remote.calls] == [first, second],
        timeout=5,
        what="the released message delivered",
    )


class SlowWriterSpool(Spool):
    """Claims past full destinations wait `delay` seconds first, as behind a slow
    commit (a disk that stalls an fsync) queued on the spool's writer thread."""

    def __init__(self, inner: Spool) -> None:
        super().__init__(inner._writer, inner._reader)
        self.delay = 0.0

    def claim_due(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("skip_full", True):
            gevent.sleep(self.delay)
        return super().claim_due(*args, **kwargs)


def test_a_claim_slowed_by_the_writer_does_not_pause_other_destinations_tenfold(
    qw: QueueWorld,
) -> None:
    """The pause after a claim past a full destination is ten times that claim's
    duration, and the duration includes waiting for the writer (others' commits, a
    stalled fsync): 0.5 s of waiting made mail for another destination, behind the
    full one's backlog (more than a claim's scan), wait 5 s after the disk recovered."""
    qw.remote.hold["stalled.example"] = Event()
    for index in range(300):  # more due rows than a claim's scan, all older
        qw.enqueue([f"u{index}@stalled.example"])
    spool = SlowWriterSpool(qw.spool)
    manager = qw.manager(spool=spool, concurrency=2 * INITIAL_WINDOW)
    manager.start()
    wait_until(lambda: qw.owned("stalled.example") == 2 * INITIAL_WINDOW)
    spool.delay = 0.5
    qw.enqueue(["a@flowing.example"])
    manager.wake()
    wait_until(lambda: len(qw.remote.calls_for("flowing.example")) == 1, what="the first")
    spool.delay = 0.0  # the writer is quick again
    qw.enqueue(["b@flowing.example"])
    manager.wake()
    wait_until(
        lambda: len(qw.remote.calls_for("flowing.example")) == 2,
        timeout=3,
        what="mail for another destination within about a second",
    )
    qw.remote.hold["stalled.example"].set()


def test_free_senders_do_not_wait_forever_for_more_to_come_free(qw: QueueWorld) -> None:
    """While senders are busy, a claim waits until CLAIM_CHUNK (at most half the pool)
    are free: fewer, larger claims. When the busy ones hang (tarpits, stalled hosts: up
    to the attempt deadline), the free ones must not sit idle with mail due: local mail
    for the Maildir, with its wake-up, waited until a stalled delivery ended."""
    qw.remote.hold["stalled.example"] = Event()
    qw.remote.hold["other.example"] = Event()
    for index in range(INITIAL_WINDOW):
        qw.enqueue([f"u{index}@stalled.example"])
    qw.enqueue(["v@other.example"])
    manager = qw.manager(concurrency=2 * INITIAL_WINDOW)  # 4 free: fewer than half
    manager.start()
    wait_until(lambda: qw.remote.total_active == INITIAL_WINDOW + 1)
    qw.enqueue(["x@local.example"])
    manager.wake()
    wait_until(lambda: len(qw.local.calls) == 1, timeout=5, what="the local mail delivered")
    qw.remote.hold["stalled.example"].set()
    qw.remote.hold["other.example"].set()


class StaggeredDeliverer(FakeDeliverer):
    """Deliveries that end one by one (2 to 14 ms), as a relay's do, not all at once."""

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        self.delay = 0.002 * (1 + len(self.calls) % 7)
        return super().deliver(message, recipients)


def test_an_idle_local_lane_does_not_make_the_claims_of_a_relay_backlog_large(
    qw: QueueWorld,
) -> None:
    """A relay backlog at the defaults, no local mail: the 512 free slots of the local
    lane counted as work to claim for made every claim ask for 2,000 rows and scan
    4,000, to take the few its one destination had room for; and no claim waited for
    senders to come free (relay end to end: 2,000 against 1,400 µs of CPU a message).
    An unused lane counts for one delivery in a claim that may take any row; its own
    turns, kept to its own domains, take nothing from the relay backlog."""
    counting = ClaimRecordingSpool(qw.spool)
    for index in range(600):
        qw.enqueue([f"u{index}@relay.example"])
    qw.remote = StaggeredDeliverer()
    manager = qw.manager(spool=counting, idle_poll=60.0, max_per_domain=DEFAULTS.concurrency)
    manager.start()
    wait_until(lambda: qw.messages_left() == 0, timeout=60, what="the backlog to drain")
    assert len(qw.remote.calls) == 600
    most = CLAIM_FACTOR * (DEFAULTS.concurrency + 1)
    claims = list(zip(counting.lanes, counting.limits, counting.scans, counting.taken, strict=True))
    for lane, limit, scan, taken in claims:
        if lane == "local":
            assert taken == 0, claims
        else:
            assert limit <= most and scan <= 2 * most, claims


def hold_to_the_pacers_floor(manager: QueueManager) -> None:
    """Give `manager` a pacer that sees a client always served and the loop always late
    (every probe halves to the floor), starting at the floor: clients waiting."""
    manager._pacer = DeliveryPacer(DEFAULTS.concurrency, high=-1.0, clients=lambda: 1)
    manager._pacer.allowed = manager._pacer.minimum
    manager._pacer.serving = True
    assert manager._pacer.holding_back


@pytest.mark.parametrize("window", [None, 16], ids=["window-512", "window-16"])
def test_local_deliveries_held_to_the_pacers_floor_share_their_claims(
    qw: QueueWorld, window: int | None
) -> None:
    """While clients are served the pacer lets 2 deliveries start. A local backlog then
    paid a claim, a look at MIN_SCAN due rows on the writer thread, for every few
    local deliveries of a fraction of a millisecond each: claims were sized by what
    could start (4 rows), and the idle senders' lane, counted for one delivery, made
    one each time a local slot came free, taking the 1 or 2 local rows the window had
    room for (the C=100 M=100 cell: 120-280 claims a worker in 3-4 s). Now a claim that
    may take local rows asks for LOCAL_MIN_CLAIM while the local lane is busy, and an
    unused lane counts only when its turn may come; the pacer still starts 2."""
    counting = ClaimRecordingSpool(qw.spool)
    for index in range(400):
        qw.enqueue([f"user{index % 4}@local.example"])
    settings = {"local_concurrency": window} if window else {}
    manager = qw.manager(spool=counting, idle_poll=60.0, **settings)
    hold_to_the_pacers_floor(manager)
    manager.start()
    wait_until(lambda: qw.messages_left() == 0, timeout=60, what="the backlog to drain")
    assert len(qw.local.calls) == 400
    assert qw.local.max_total <= manager._pacer.minimum
    made = len(counting.limits)
    taken = list(zip(counting.limits, counting.taken, strict=False))  # one may be running
    assert made <= 30, taken  # were 101 (4 rows each) and 186 (mostly 1 or 2)


def test_local_mail_while_every_sender_hangs_without_client_load_starts_at_once(
    qw: QueueWorld,
) -> None:
    """Red team of the paced claims: with every sender hung on a remote backlog (the
    senders' lane can start nothing) and no client served, local mail arriving after a
    fruitless local turn waited for an unrelated wake-up (idle_poll). Without client
    load the unused lane counts in every claim, as before: a chunk's wait at most."""
    stalled = Event()
    for index in range(50):
        qw.remote.hold[f"stalled{index}.example"] = stalled
    for index in range(300):
        qw.enqueue([f"w{index}@stalled{index % 50}.example"])
    manager = qw.manager(idle_poll=60.0)  # no client: every sender may run
    manager.start()
    wait_until(lambda: qw.remote.total_active == DEFAULTS.concurrency)
    gevent.sleep(0.2)  # a fruitless turn of the local lane was taken meanwhile
    qw.enqueue(["x@local.example"])
    manager.wake()
    wait_until(lambda: len(qw.local.calls) == 1, timeout=1.0, what="the local mail")
    stalled.set()
    wait_until(lambda: qw.messages_left() == 0, timeout=30, what="the backlog")


def test_mail_of_an_unused_lane_under_client_load_waits_for_its_turn_not_for_a_poll(
    qw: QueueWorld,
) -> None:
    """Red team of the paced claims: under client load (the pacer at its floor) with
    both local slots hung on a local backlog, an unused lane does not count in claims
    until its turn may come; nothing woke the round then, and remote mail waited for
    idle_poll (60 s here). The round now wakes for the turn: UNUSED_LANE_MAX at most."""
    qw.local.hold["local.example"] = Event()
    for index in range(300):
        qw.enqueue([f"user{index % 4}@local.example"])
    manager = qw.manager(idle_poll=60.0)
    hold_to_the_pacers_floor(manager)
    manager.start()
    wait_until(lambda: qw.local.total_active == manager._pacer.minimum)
    for name in ("a", "b"):  # the second after the senders' fruitless turn for the first
        gevent.sleep(0.2)
        qw.enqueue([f"{name}@remote.example"])
        manager.wake()
        wait_until(
            lambda n=name: any(rcpts == (f"{n}@remote.example",) for _, rcpts in qw.remote.calls),
            timeout=UNUSED_LANE_MAX + 1.0,
            what=f"the remote mail {name}",
        )
    qw.local.hold["local.example"].set()
    wait_until(lambda: qw.messages_left() == 0, timeout=30, what="the backlog")
