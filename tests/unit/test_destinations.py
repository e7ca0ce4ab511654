"""Per-destination windows, round-robin and dead destinations, without I/O."""

from __future__ import annotations

from gsmtp.message import MessageId
from gsmtp.queue.destinations import (
    IDLE_LIMIT,
    IDLE_MEMORY,
    INITIAL_WINDOW,
    SHARED_LANE,
    Batch,
    Destinations,
)
from gsmtp.spool import Claim, ClaimedRecipient
from tests.unit.queue_harness import DEFAULTS


def batch(domain: str, number: int, transport: str = "smtp") -> Batch:
    recipient = ClaimedRecipient(f"u{number}@{domain}", 0)
    claim = Claim(MessageId(f"M{number:05d}"), 0.0, 100, (recipient,))
    return Batch(claim, (transport, domain), (recipient,))


def start_all(destinations: Destinations, lane: str = SHARED_LANE) -> list[str]:
    started = []
    for destination in destinations.ready(lane):
        started.append(destinations.started(destination).claim.message_id)
    return started


def test_a_transport_with_a_full_window_waits_in_a_lane_of_its_own() -> None:
    """Local destinations are served from their own ready line (the queue manager gives
    them a limit of their own), remote ones from the shared one; put back, each goes
    back first in its own line."""
    destinations = Destinations(max_window=2, full_window={"local": 8})
    for number in range(3):
        destinations.add(batch("local.example", number, "local"))
        destinations.add(batch(f"r{number}.example", 10 + number))
    assert destinations.lane(("local", "local.example")) == "local"
    assert destinations.lane(("smtp", "local.example")) == SHARED_LANE
    first = next(destinations.ready(SHARED_LANE))
    assert first.key == ("smtp", "r0.example")
    destinations.put_back(first)
    assert start_all(destinations) == ["M00010", "M00011", "M00012"]
    assert start_all(destinations, "local") == ["M00000", "M00001", "M00002"]
    assert start_all(destinations) == start_all(destinations, "local") == []


def test_the_window_starts_at_5_grows_by_one_per_cohort_and_stops_at_the_cap() -> None:
    destinations = Destinations(max_window=DEFAULTS.max_per_domain)
    destination = destinations.get(("smtp", "x.example"))
    assert destination.window == INITIAL_WINDOW
    for _ in range(INITIAL_WINDOW):  # one cohort of 5 successes: about one more
        destination.running += 1
        destinations.finished(destination, reached=True)
    assert round(destination.window, 1) == 5.9
    destination.waiting.append(batch("x.example", 0))  # keep it from being forgotten
    for _ in range(1000):
        destination.running += 1
        destinations.finished(destination, reached=True)
    assert destination.window == DEFAULTS.max_per_domain
    destination.running += 1
    destinations.finished(destination, reached=False)
    assert destination.window == DEFAULTS.max_per_domain - 1 / DEFAULTS.max_per_domain


def test_local_destinations_start_and_stay_at_a_full_window_of_their_own() -> None:
    """Slow start probes a remote server, and max_per_domain is politeness towards it;
    the Maildir is ours, and its batches grow with the deliveries running at once: a
    local destination's window is the whole pool's from the start (capped by
    max_per_domain, one local domain ran at half the pool's speed)."""
    destinations = Destinations(max_window=20, full_window={"local": 100})
    local = destinations.get(("local", "foo.com"))
    assert local.allowed == 100 and local.capacity == 200
    remote = destinations.get(("smtp", "x.example"))
    assert remote.allowed == INITIAL_WINDOW
    for _ in range(500):
        remote.running += 1
        local.running += 1
        destinations.finished(remote, reached=True)
        destinations.finished(local, reached=True)
    assert remote.allowed == 20 and local.allowed == 100


def test_round_robin_across_destinations_fifo_within_each() -> None:
    destinations = Destinations(max_window=20)
    for number in range(3):
        destinations.add(batch("a.example", number))
    for number in range(10, 12):
        destinations.add(batch("b.example", number))
    assert start_all(destinations) == ["M00000", "M00010", "M00001", "M00011", "M00002"]


def test_only_a_window_runs_and_a_window_more_is_all_a_claim_may_add() -> None:
    destinations = Destinations(max_window=20)
    for number in range(12):
        destinations.add(batch("a.example", number))
    assert len(start_all(destinations)) == INITIAL_WINDOW
    destination = destinations.get(("smtp", "a.example"))
    assert destination.capacity == 2 * INITIAL_WINDOW
    assert destinations.caps() == {"a.example": 0}  # 12 held: full
    assert destinations.default_room == 2 * INITIAL_WINDOW


def test_dead_until_its_time_a_flush_or_a_success() -> None:
    destinations = Destinations(max_window=20)
    destination = destinations.get(("smtp", "down.example"))
    destinations.kill(destination, 100.0, "451 4.4.1 connect failed")
    destinations.add(batch("down.example", 1))
    assert start_all(destinations) == []  # dead: nothing starts
    assert destinations.dead_count() == 1 and destinations.next_revival() == 100.0
    assert destinations.revive(50.0, 3600.0) == []
    assert destinations.revive(100.0, 3600.0) == [destination]
    destinations.kill(destination, 200.0, "again")
    assert destinations.revive(50.0 - 10 * 86400, 3600.0) == [destination]  # clock set back
    destinations.kill(destination, 300.0, "again")
    assert destinations.forget_dead() == 1 and destinations.dead_count() == 0
    destinations.kill(destination, 400.0, "again")
    destination.running += 1
    destinations.finished(destination, reached=True)  # started before it died, got through
    assert destination.dead_until is None


def test_an_idle_destination_keeps_its_window_for_a_while_then_starts_over() -> None:
    """Claimed just in time, a destination with a steady backlog empties for a moment
    between claims: its window is kept through such moments (it kept a relay at 5 to 10
    deliveries at once when it started over each time), and starts over after
    IDLE_MEMORY seconds idle."""
    now = [100.0]
    destinations = Destinations(max_window=20, clock=lambda: now[0])
    destination = destinations.get(("smtp", "x.example"))
    destination.window = 12.0
    destination.running += 1
    destinations.finished(destination, reached=True)  # nothing held now: idle
    now[0] += IDLE_MEMORY - 1
    assert destinations.caps() == {"x.example": destination.capacity}
    again = destinations.add(batch("x.example", 1))
    assert again is destination and destination.allowed == 12
    destinations.started(destination)
    destinations.finished(destination, reached=True)
    now[0] += IDLE_MEMORY + 1
    assert destinations.caps() == {}  # forgotten
    assert destinations.get(("smtp", "x.example")).window == INITIAL_WINDOW


def test_the_idle_destinations_remembered_are_bounded_whatever_the_domains_seen() -> None:
    """Mail to many domains, each seen once (a list server, bounces): every idle one was
    kept for IDLE_MEMORY, and each dispatcher round walks all of them (the ready count,
    caps sent to every claim as JSON, note_full, dead_count, next_revival, revive:
    5 ms a round with 5,000 of them). The memory holds at most IDLE_LIMIT idle ones,
    the longest idle forgotten first; one idle a moment ago keeps its window."""
    now = [100.0]
    destinations = Destinations(max_window=20, clock=lambda: now[0])
    busy = destinations.get(("smtp", "busy.example"))
    busy.window = 12.0
    for number in range(5 * IDLE_LIMIT):
        destination = destinations.add(batch(f"d{number}.example", number))
        destinations.started(destination)
        destinations.finished(destination, reached=True)
    busy.running += 1
    destinations.finished(busy, reached=True)  # idle a moment ago
    assert len(destinations) <= IDLE_LIMIT
    assert len(destinations.caps()) <= IDLE_LIMIT
    assert destinations.get(("smtp", "busy.example")) is busy and busy.allowed == 12
