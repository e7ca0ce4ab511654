"""Red team: the paced claims past full destinations (FRUITLESS_PAUSE) must neither
spin the dispatcher nor starve other destinations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
from gevent.event import Event

from gsmtp.queue import INITIAL_WINDOW
from tests.unit.queue_harness import FakeClock, QueueWorld, wait_until, world


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
    manager = qw.manager(concurrency=2 * INITIAL_WINDOW)
    manager.start()
    wait_until(lambda: qw.remote.active["stalled.example"] == INITIAL_WINDOW)
    wait_until(lambda: qw.owned("stalled.example") == 2 * INITIAL_WINDOW)
    for index in range(30):  # claimed past the full one: fills the other senders
        qw.enqueue([f"v{index}@slow.example"])
    manager.wake()
    wait_until(lambda: qw.remote.active["slow.example"] == INITIAL_WINDOW)
    gevent.sleep(0.1)  # the pause after that claim is over
    before = clock.readings
    gevent.sleep(0.3)  # nothing can start or finish meanwhile
    rounds = clock.readings - before
    assert rounds <= 5, f"{rounds} dispatcher rounds with every sender busy"
    qw.remote.hold["stalled.example"].set()
    qw.remote.hold["slow.example"].set()
    wait_until(lambda: qw.messages_left() == 0, timeout=30)
