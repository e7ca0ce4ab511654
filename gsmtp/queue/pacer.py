"""Acceptance before delivery: how many deliveries may run while clients wait.

Clients wait on the event loop for every reply, deliveries can wait for the next retry;
when both compete for the one core a Python process gets, the loop's lag (how late a
short sleep wakes) says which is losing. Additive increase, multiplicative decrease on
the number of concurrent deliveries: above `high` lag it halves (never below `minimum`,
so mail keeps moving under any load), below `low` it grows back to the configured
concurrency. The queue manager owns the probing greenlet and reads `allowed`.
"""

from __future__ import annotations

import time

import gevent

from gsmtp import metrics


class DeliveryPacer:
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
        """Probe the loop forever (the queue manager owns and kills this greenlet); the
        allowance is exported as gsmtp_delivery_concurrency_allowed."""
        while True:
            metrics.DELIVERY_CONCURRENCY_ALLOWED.set(self.allowed)
            started = time.monotonic()
            gevent.sleep(self.interval)
            self.observe(time.monotonic() - started - self.interval)
