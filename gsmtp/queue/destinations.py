"""Per-destination queues: a concurrency window each, round-robin between them, and the
memory of destinations that cannot be reached.

No I/O; time comes in as an argument. A destination is a (transport, domain) pair. Its
queue holds the batches the queue manager claimed for it, FIFO; its window says how
many deliveries to it may run at once. Following Postfix's qmgr, a window starts small
(5) and moves by 1/N per delivery (N = the current window): up on every delivery that
reached the destination, down on one that could not connect to any of its hosts — so
the window moves by about one per "cohort" of N deliveries, and stays within
[1, max_per_domain].

A delivery that reached no host at all makes the destination dead until its retry
time: the queue manager then defers every other message for it without connecting
("delivery temporarily suspended"), instead of making each one wait for the same
connect time-outs. `gsmtp queue flush` forgets every dead destination (`--domain D`, or
flushing a message, those of D or of the message's domains); a later success
(a delivery started before it died) revives it too.

A destination with nothing held is remembered, window and all, for IDLE_MEMORY seconds
(the monotonic `clock`), then forgotten: its window starts over, as qmgr's does. Not at
once: the queue is claimed just in time (a window running and one waiting), so under a
steady backlog a destination often empties for a moment between claims, and starting
the window over at each such moment kept a relay at 5 to 10 deliveries at once. At
most IDLE_LIMIT are remembered (the longest idle forgotten first): every dispatcher
round walks them all, and mail to many domains each seen once would keep thousands.

Each destination can hold a window's worth of batches beyond those running
(`capacity`): enough to start the next ones the moment others finish, not so many that
a stalled destination fills the active set. The claim query takes at most `room()` more
messages for it; a destination that was full asks for more once it has drained to half
(`wants_more`), so a long backlog is claimed in chunks rather than one row per delivery.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from gsmtp.spool import Claim, ClaimedRecipient

INITIAL_WINDOW = 5  # Postfix: initial_destination_concurrency
IDLE_MEMORY = 10.0  # seconds an idle destination keeps its window
IDLE_LIMIT = 1000  # idle destinations remembered at most
SHARED_LANE = ""  # the lane of every transport without a full window (remote delivery)

Key = tuple[str, str]  # (transport, destination domain)


@dataclass(eq=False, slots=True)
class Batch:
    """Recipients of one message for one destination: what one delivery takes."""

    claim: Claim
    key: Key
    recipients: tuple[ClaimedRecipient, ...]

    @property
    def size(self) -> int:
        return self.claim.size


@dataclass(eq=False, slots=True)
class Destination:
    key: Key
    window: float
    cap: int  # the largest the window grows to
    running: int = 0
    waiting: deque[Batch] = field(default_factory=deque)
    dead_until: float | None = None
    dead_reason: str = ""
    was_full: bool = False
    in_ready: bool = False
    idle_since: float | None = None  # monotonic: nothing held since

    @property
    def allowed(self) -> int:
        """Deliveries that may run at once."""
        return max(1, math.floor(self.window))

    @property
    def capacity(self) -> int:
        """Batches held at once: the running window and one more window waiting."""
        return self.allowed + math.ceil(self.window)

    @property
    def held(self) -> int:
        return self.running + len(self.waiting)

    def room(self) -> int:
        return max(0, self.capacity - self.held)

    def can_start(self) -> bool:
        return self.dead_until is None and bool(self.waiting) and self.running < self.allowed


class Destinations:
    def __init__(
        self,
        *,
        max_window: int,
        initial_window: int = INITIAL_WINDOW,
        full_window: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_memory: float = IDLE_MEMORY,
        idle_limit: int = IDLE_LIMIT,
    ) -> None:
        self._clock = clock
        self._idle_memory = idle_memory
        self._idle_limit = idle_limit
        self._idle: dict[Key, None] = {}  # the idle ones remembered, longest idle first
        self._max = max(1, max_window)
        self._initial = min(initial_window, self._max)
        # Transports whose destinations start at a full window of their own, and keep
        # it: slow start probes a remote server's capacity, and max_per_domain is
        # politeness towards it; a local destination (the Maildir) is our own disk,
        # whose files are written in batches that grow with the deliveries running at
        # once. Capped by max_per_domain (20), one local domain ran at half the speed
        # of the whole pool (local end to end, 30,000 messages: 1,094 against 2,045
        # msg/s). Postfix's local(8) likewise counts its destination per recipient.
        # Such a transport is a lane of its own, too (`lane`): its destinations wait in
        # a ready line of their own, which the queue manager serves within a limit of
        # their own, so they can start while every sender is busy elsewhere.
        self._full_window = dict(full_window or {})
        self._all: dict[Key, Destination] = {}
        self._ready: dict[str, deque[Destination]] = defaultdict(deque)

    def __iter__(self) -> Iterator[Destination]:
        return iter(list(self._all.values()))

    def __len__(self) -> int:
        return len(self._all)

    def get(self, key: Key) -> Destination:
        destination = self._all.get(key)
        if destination is None:
            full = self._full_window.get(key[0])
            if full is None:
                cap, window = self._max, self._initial
            else:
                cap = window = max(1, full)
            destination = self._all[key] = Destination(key, float(window), cap)
        return destination

    @property
    def default_room(self) -> int:
        """What a claim may take for a destination not seen yet."""
        return Destination(("", ""), float(self._initial), self._max).capacity

    def add(self, batch: Batch) -> Destination:
        destination = self.get(batch.key)
        destination.idle_since = None
        self._idle.pop(batch.key, None)
        destination.waiting.append(batch)
        self._mark_ready(destination)
        return destination

    def lane(self, key: Key) -> str:
        """The lane of a destination: its transport's own if it has a full window (see
        `__init__`), else SHARED_LANE."""
        return key[0] if key[0] in self._full_window else SHARED_LANE

    def ready(self, lane: str) -> Iterator[Destination]:
        """Round-robin over the lane's destinations that can start a delivery: each turn
        yields the next one; the caller starts at most one batch of it before asking
        again."""
        line = self._ready[lane]
        while line:
            destination = line.popleft()
            destination.in_ready = False
            if not destination.can_start():
                continue
            yield destination
            self._mark_ready(destination)

    def put_back(self, destination: Destination) -> None:
        """The caller could not start it (no body budget yet): first in line next time."""
        if not destination.in_ready:
            destination.in_ready = True
            self._ready[self.lane(destination.key)].appendleft(destination)

    def started(self, destination: Destination) -> Batch:
        batch = destination.waiting.popleft()
        destination.running += 1
        return batch

    def finished(self, destination: Destination, *, reached: bool | None) -> bool:
        """A delivery to it ended: `reached` True (some host answered), False (none
        could be reached) or None (nothing learned). True when the destination, full
        before, has drained to half: time to claim more for it."""
        destination.running -= 1
        if reached is True:
            destination.window = min(destination.cap, destination.window + 1 / destination.window)
            destination.dead_until = None
        elif reached is False:
            destination.window = max(1.0, destination.window - 1 / destination.window)
        self._mark_ready(destination)
        drained = destination.was_full and destination.held <= destination.capacity // 2
        if drained:
            destination.was_full = False
        self._forget_if_idle(destination)
        return drained

    def note_full(self) -> None:
        """After a claim: remember which destinations are at capacity."""
        for destination in self._all.values():
            if destination.room() == 0:
                destination.was_full = True

    def kill(self, destination: Destination, until: float, reason: str) -> None:
        destination.dead_until = until
        destination.dead_reason = reason

    def revive(self, now: float, longest_wait: float) -> list[Destination]:
        """Dead destinations whose time has come (or whose time lies impossibly far
        ahead: the clock was set back) may be tried again."""
        revived = []
        for destination in list(self._all.values()):
            until = destination.dead_until
            if until is not None and (until <= now or until > now + longest_wait):
                destination.dead_until = None
                revived.append(destination)
                self._mark_ready(destination)
                self._forget_if_idle(destination)
        return revived

    def forget_dead(self, domain: str | None = None) -> int:
        """`gsmtp queue flush [--domain D]`: every destination (those of `domain`) may be
        tried at once."""
        dead = [
            d
            for d in self._all.values()
            if d.dead_until is not None and (domain is None or d.key[1] == domain)
        ]
        for destination in dead:
            destination.dead_until = None
            self._mark_ready(destination)
            self._forget_if_idle(destination)
        return len(dead)

    def drop_waiting(self, message_id: str) -> list[Batch]:
        """`gsmtp queue hold`: take a message's batches that have not started out of line
        (the caller gives their recipients back to the spool)."""
        dropped: list[Batch] = []
        for destination in list(self._all.values()):
            mine = [b for b in destination.waiting if b.claim.message_id == message_id]
            if mine:
                dropped += mine
                destination.waiting = deque(
                    b for b in destination.waiting if b.claim.message_id != message_id
                )
                self._forget_if_idle(destination)
        return dropped

    def dead_count(self) -> int:
        return sum(1 for d in self._all.values() if d.dead_until is not None)

    def next_revival(self) -> float | None:
        times = [d.dead_until for d in self._all.values() if d.dead_until is not None]
        return min(times) if times else None

    def caps(self, lane: str | None = None) -> dict[str, int]:
        """Per domain, how many more messages a claim may take (0: none now). Forgets
        first what has been idle for longer than the memory (a claim comes often).
        With `lane`, a claim for that lane alone (the queue manager's lanes take turns):
        the living destinations of every other lane count as full, so the claim looks
        past their due rows."""
        self._forget_idle()
        caps: dict[str, int] = {}
        for key, destination in self._all.items():
            if destination.dead_until is not None:
                room = destination.cap  # claimed to be deferred at once, no delivery
            elif lane is not None and self.lane(key) != lane:
                room = 0
            else:
                room = destination.room()
            domain = key[1]
            caps[domain] = min(room, caps.get(domain, room))
        return caps

    def _mark_ready(self, destination: Destination) -> None:
        if not destination.in_ready and destination.can_start():
            destination.in_ready = True
            self._ready[self.lane(destination.key)].append(destination)

    def _forget_if_idle(self, destination: Destination) -> None:
        """An idle, living destination: remembered from now for the idle memory."""
        if destination.held == 0 and destination.dead_until is None:
            destination.idle_since = self._clock()
            self._idle.pop(destination.key, None)
            self._idle[destination.key] = None  # the most recently idle, last
            if self._idle_memory <= 0:
                self._forget(destination.key)
            while len(self._idle) > self._idle_limit:
                self._forget(next(iter(self._idle)))

    def _forget(self, key: Key) -> None:
        """Forget an idle destination (one busy or dead again is only no longer idle)."""
        self._idle.pop(key, None)
        destination = self._all.get(key)
        if destination is not None and destination.held == 0 and destination.dead_until is None:
            del self._all[key]

    def _forget_idle(self) -> None:
        """Forget the destinations idle (and alive) for longer than the memory: their
        windows start over, as qmgr's do."""
        before = self._clock() - self._idle_memory
        for key in list(self._idle):  # longest idle first: stops at the first kept
            destination = self._all.get(key)
            since = destination.idle_since if destination is not None else None
            if since is not None and since > before:
                break
            self._forget(key)
