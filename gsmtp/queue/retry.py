"""When to try again, and when to give up.

No I/O; time comes in as an argument. After the n-th failed attempt a recipient waits the
n-th retry step (the last step repeats) plus up to 10 % jitter, so a restart does not
retry everything at once (D-14). Retry times are stored as wall time; because the clock
can be set back, nothing may wait longer than `longest_wait` from now (D-43), and the
queue manager pulls anything scheduled beyond that forward. A message expires
`max_age` after its arrival (`received_at`), never counted from its last attempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

JITTER_FRACTION = 0.1
Clock = Callable[[], float]  # wall time in seconds (time.time, or a test's fake)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    steps: tuple[float, ...]
    max_age: float
    jitter: Callable[[], float] = field(default=random.random)

    def next_attempt_at(self, attempts_made: int, now: float) -> float:
        """After the n-th failed attempt wait steps[n-1]; the last step repeats."""
        step = self.steps[min(max(attempts_made, 1), len(self.steps)) - 1]
        return now + step * (1.0 + JITTER_FRACTION * self.jitter())

    @property
    def longest_wait(self) -> float:
        """No retry is ever scheduled further ahead than this."""
        return max(self.steps) * (1.0 + JITTER_FRACTION)

    def expired(self, received_at: float, now: float) -> bool:
        return now - received_at >= self.max_age
