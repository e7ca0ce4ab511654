"""Periodic upkeep on one greenlet: write out log lines, checkpoint the WAL, vacuum.

Each task runs every `interval` seconds. An expected failure of one round (an OSError
such as a log that cannot be written or a full disk, an SQLite error) is logged as
`housekeeping_failed` with the task's name and counted in
`gsmtp_internal_errors_total{where="housekeeping"}`; the other tasks run, and the next
round tries again. Anything else is a bug: it ends the loop, whose owner (the
supervisor) ends the process. Time comes in through `clock` and `sleep`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import apsw
import gevent

from gsmtp import metrics
from gsmtp.db import DatabaseError
from gsmtp.log import get_logger

EXPECTED_ERRORS = (OSError, apsw.Error, DatabaseError)


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    interval: float
    run: Callable[[], object]


class Housekeeping:
    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        tick: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = gevent.sleep,
    ) -> None:
        self._tasks = tuple(tasks)
        self._tick = tick
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._due = {task.name: now + task.interval for task in self._tasks}
        self._log = get_logger(component="housekeeping")

    def run(self) -> None:
        """Forever (the owner kills it at shutdown)."""
        while True:
            self._sleep(self._tick)
            self.run_due()

    def run_due(self) -> None:
        """One round: every task whose time has come."""
        for task in self._tasks:
            now = self._clock()
            if now < self._due[task.name]:
                continue
            self._due[task.name] = now + task.interval
            try:
                task.run()
            except EXPECTED_ERRORS as error:
                metrics.INTERNAL_ERRORS.labels("housekeeping").inc()
                # A warning is not flushed at once: the failing task may be the flush.
                self._log.warning("housekeeping_failed", task=task.name, error=str(error))
