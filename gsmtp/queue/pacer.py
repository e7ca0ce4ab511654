"""Acceptance before delivery: how many deliveries may run while clients wait.

Clients wait on the event loop for every reply, deliveries can wait for the next retry;
when both compete for the one core a Python process gets, the loop's lag (how late a
short sleep wakes) says which is losing. Additive increase, multiplicative decrease on
the number of concurrent deliveries: above `high` lag it halves (never below `minimum`,
so mail keeps moving under any load), below `low` it grows back to the configured
concurrency. The queue manager owns the probing greenlet and reads `allowed`.

Only clients are protected: while no client is being served (`clients` says how many
are: the server counts its connections only while one of them sent something in the
last half second or waits for its message's commit, `SmtpServer.clients_served`),
every delivery the configuration allows may run, whatever the lag. The lag is then the
deliveries' own (a claim routed, a log flush), and halving for it held the backlog left
by a burst to 40-60 senders of 100 for most of its drain (local end to end, 30,000
messages: the drain ran at 1,600-1,800 msg/s until the allowance crept back); one idle
connection held open through the drain (a client's pool, a monitor) held it to the
floor of 2. Nor does it probe then, every 20 ms for nothing: with no client it looks
every `idle_interval` (100 ms) for one, so an idle worker wakes about 30 times a second
instead of 70 (idle CPU measured in section "idle" of bench/notes.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
        idle_interval: float = 0.1,
        clients: Callable[[], int] = lambda: 1,
        sleep: Callable[[float], object] = gevent.sleep,
    ) -> None:
        self.maximum = maximum
        self._clients = clients
        self.minimum = min(minimum, maximum)
        self.allowed = maximum
        self.serving = False  # a client was being served at the last probe
        self._high = high
        self._low = low
        self.interval = interval
        self.idle_interval = idle_interval
        self._sleep = sleep

    def share(self, limit: int) -> int:
        """The allowance of a lane of `limit` deliveries (local deliveries have a limit of
        their own beside the senders'): all of it while no client is being served, else
        no more than the senders' allowance. Not the same fraction of it: 2 of 50 senders
        gave the local lane 21 of 512, and a burst was acknowledged 15 % slower for the
        same end to end (C=100 M=100, 30,000 messages to 100 mailboxes, three alternated
        rounds: 1,700-1,860 against 2,020-2,270 msg/s acknowledged; all in the Maildirs
        at 1,030-1,070 against 980-1,090 msg/s). Nor all of it whenever the allowance is
        full: clients are served then too, and the lane would leap from 49 to 512 and
        back with each probe."""
        return min(limit, self.allowed) if self.serving else limit

    @property
    def holding_back(self) -> bool:
        """Deliveries are held below what the configuration allows, for clients being
        served: what the queue manager may put off (the claims of a lane not in use) is
        put off then."""
        return self.serving and self.allowed < self.maximum

    def observe(self, lag: float) -> None:
        self.serving = bool(self._clients())
        if not self.serving:
            self.allowed = self.maximum
        elif lag > self._high:
            self.allowed = max(self.minimum, self.allowed // 2)
        elif lag < self._low:
            self.allowed = min(self.maximum, self.allowed + 1)

    def run(self) -> None:
        """Probe the loop forever (the queue manager owns and kills this greenlet); the
        allowance is exported as gsmtp_delivery_concurrency_allowed."""
        while True:
            metrics.DELIVERY_CONCURRENCY_ALLOWED.set(self.allowed)
            if not self._clients():
                self.allowed = self.maximum  # as `observe` would: nobody to protect
                self.serving = False
                self._sleep(self.idle_interval)
                continue
            started = time.monotonic()
            self._sleep(self.interval)
            self.observe(time.monotonic() - started - self.interval)
