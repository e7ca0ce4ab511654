"""Owners for the long-lived greenlets and threads: a component that dies ends the process.

A greenlet that raises dies alone: gevent prints the traceback and the process goes on
half alive (a queue runner gone silent, a writer thread gone and every client waiting
forever for its 250). So each long-lived greenlet and thread is watched here. Its end,
any end before `stop()`, is a death: logged as `component_died` with the component's
name and the traceback, counted in `gsmtp_internal_errors_total{where=<component>}`, and
`died` is set; the composition root then ends the process with EXIT_COMPONENT_DIED and
systemd starts a fresh one. A component also dies by stalling: work pending and no
progress for longer than its limit (a writer hung on a dead disk), or by failing a
health check (a listener whose socket is gone).

What a death costs is what a crash costs: whatever was answered 250 is on disk; clients
waiting for a reply lose their connection without one and send again; deliveries in
flight are repeated. Expected failures (a full disk, a failed checkpoint) are handled
where they happen and never reach this module: death is for bugs and hangs.

No I/O but the log line; time comes from the injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.threadpool import ThreadPool

from gsmtp.log import get_logger
from gsmtp.metrics import INTERNAL_ERRORS

EXIT_COMPONENT_DIED = 70  # EX_SOFTWARE (sysexits.h): an internal error, restart me
STALL_SECONDS = 60.0  # work pending and no progress for this long: the component is dead
CHECK_SECONDS = 1.0

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Death:
    """Which component died, and how (for the log and the exit)."""

    component: str
    reason: str


class Progress:
    """Requests a component has not answered yet, and when it last answered one.

    `begin()` when a request is handed over, `end()` when its answer is back. While any
    request is outstanding, `stalled_for(now)` is the time since the last answer (or
    since work arrived at an idle component); with none outstanding it is zero. Called
    from the event loop only."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._outstanding = 0
        self._progress_at = clock()

    def begin(self) -> None:
        if self._outstanding == 0:
            self._progress_at = self._clock()
        self._outstanding += 1

    def end(self) -> None:
        self._outstanding -= 1
        self._progress_at = self._clock()

    @contextmanager
    def track(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def stalled_for(self, now: float) -> float:
        return now - self._progress_at if self._outstanding else 0.0


class Supervisor:
    """Watches components by name; the first death sets `died` (see module docstring).

    Register with `spawn(name, fn, *args)` (spawns and watches a greenlet),
    `watch_greenlet(name, greenlet)`, `watch_thread(name, done)` (the AsyncResult a
    ThreadPool.spawn returns, set when the thread's loop returns or raises),
    `watch_progress(name, progress, limit)` and `watch_health(name, check)`."""

    def __init__(self, *, clock: Clock = time.monotonic, check_seconds: float = CHECK_SECONDS):
        self._clock = clock
        self._check_seconds = check_seconds
        self._checks: list[tuple[str, Callable[[float], str | None]]] = []
        self._progress: list[tuple[str, Progress]] = []
        self._names: list[str] = []
        self._stopping = False
        self._checker: gevent.Greenlet | None = None
        self._log = get_logger(component="supervisor")
        self.died = Event()
        self.death: Death | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every component watched, in the order registered."""
        return tuple(self._names)

    # -- registering ------------------------------------------------------------------

    def spawn(self, name: str, function: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Start a long-lived greenlet owned by this supervisor."""
        greenlet = gevent.spawn(function, *args)
        self.watch_greenlet(name, greenlet)
        return greenlet

    def watch_greenlet(self, name: str, greenlet: gevent.Greenlet) -> None:
        self._names.append(name)
        greenlet.link(lambda ended: self._ended(name, ended.exc_info))

    def watch_thread(self, name: str, done: AsyncResult) -> None:
        self._names.append(name)
        done.rawlink(lambda ended: self._ended(name, ended.exc_info))

    def watch_progress(self, name: str, progress: Progress, limit: float = STALL_SECONDS) -> None:
        def check(now: float) -> str | None:
            stalled = progress.stalled_for(now)
            if stalled <= limit:
                return None
            return f"no progress for {stalled:.0f}s with {progress.outstanding} request(s) pending"

        self._add_check(name, check)
        self._progress.append((name, progress))

    def watch_health(self, name: str, check: Callable[[], str | None]) -> None:
        """`check()` returns None while all is well, else what is wrong."""
        self._add_check(name, lambda now: check())

    def _add_check(self, name: str, check: Callable[[float], str | None]) -> None:
        if name not in self._names:
            self._names.append(name)
        self._checks.append((name, check))

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        """Run the periodic checks (stalls, health) on a greenlet of their own."""
        self._checker = self.spawn("supervisor", self._check_forever)

    def check(self) -> None:
        """Run every check once; the first one failing is a death."""
        if self.death is not None:
            return  # said once; the process is on its way out
        now = self._clock()
        for name, check in self._checks:
            reason = check(now)
            if reason is not None:
                self._die(name, reason, None)

    def liveness(self, stall_limit: float) -> str | None:
        """None while every component is alive: none has died, and none with work
        pending has gone `stall_limit` without progress (stricter than the limit that
        kills: this is for the systemd watchdog, which stops pinging first). Else what
        is wrong, naming the component."""
        if self.death is not None:
            return f"{self.death.component} died: {self.death.reason}"
        now = self._clock()
        for name, progress in self._progress:
            stalled = progress.stalled_for(now)
            if stalled > stall_limit:
                pending = progress.outstanding
                return f"{name}: no progress for {stalled:.0f}s with {pending} request(s) pending"
        return None

    def _check_forever(self) -> None:
        while True:
            gevent.sleep(self._check_seconds)
            self.check()

    def stop(self) -> None:
        """From now on components end because they are told to: no more deaths."""
        self._stopping = True
        if self._checker is not None:
            self._checker.kill(block=False)

    def _ended(self, name: str, exc_info: Any) -> None:
        if self._stopping:
            return
        if exc_info:
            self._die(name, f"{type(exc_info[1]).__name__}: {exc_info[1]}", exc_info)
        else:
            self._die(name, "ended without an error (a long-lived loop returned)", None)

    def _die(self, name: str, reason: str, exc_info: ExcInfo | None) -> None:
        INTERNAL_ERRORS.labels(name).inc()
        self._log.error("component_died", component=name, reason=reason, exc_info=exc_info)
        if self.death is None:
            self.death = Death(name, reason)
            self.died.set()


def stop_thread_pools(pools: Mapping[str, ThreadPool], timeout: float) -> list[str]:
    """Stop the pools' threads, waiting at most `timeout` seconds; the names of the
    pools whose tasks were still running then. gevent's `ThreadPool.kill` waits for every
    running task, without a limit: a Maildir write on a hung disk would hold a stop past
    the deadline it promises. What still runs is left to the process's exit."""
    killers = {name: gevent.spawn(pool.kill) for name, pool in pools.items()}
    gevent.joinall(list(killers.values()), timeout=max(timeout, 0.0))
    left = [name for name, killer in killers.items() if not killer.ready()]
    for name in left:
        killers[name].kill(block=False)
    return left
