"""What a worker process is given, and the pipe on which it tells its supervisor how it is.

Each worker writes JSON lines to its own pipe: `{"state": "ready"}` once its listeners
accept and its spool is open, then `{"state": "alive", "status": {...}, "problem": ...}`
every HEARTBEAT_SECONDS (the line being written at all shows its event loop turns).
`problem` is None while its writer, queue runner and every other long-lived part
watched by its `supervision.Supervisor` are alive and making progress, else what is
wrong (the systemd watchdog's test, run in the worker). `status` holds a few counts
(connections, queued recipients) the supervisor sums for the node. After a SIGHUP
reload, finished or failed, `{"state": "reloaded"}`. The supervisor reads them
(`Lines`) in `gsmtp.workers`.

Writes never block the worker: the pipe is non-blocking and a line that does not fit
is dropped (the next heartbeat says the same). A write that fails otherwise means the
supervisor is gone: `Reporter` says so and the worker stops.

Standard library only: the supervisor imports this without gevent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

HEARTBEAT_SECONDS = 1.0
READY = "ready"
ALIVE = "alive"
RELOADED = "reloaded"
_MAX_LINE = 4096
_MAX_PROBLEM = 512  # a line always fits in _MAX_LINE


@dataclass(frozen=True, slots=True)
class Role:
    """Which worker this process is. The single process (`workers = 1`) is worker 0 of
    1, binds its own listeners and reports to no one."""

    index: int = 0
    count: int = 1
    # Listening sockets the supervisor bound, by (host, port): descriptors inherited.
    listeners: Mapping[tuple[str, int], int] = field(default_factory=dict)
    metrics: int | None = None  # the /metrics listener's descriptor, shared likewise
    report: int | None = None  # the write end of this worker's pipe
    # The node's WatchdogSec= (the supervisor's $WATCHDOG_USEC): how long a component
    # may go without progress before this worker's heartbeat reports it.
    watchdog_seconds: float | None = None
    # This worker replaces one that died (or hung and was killed): it counts itself in
    # gsmtp_worker_restarts_total once it has started.
    restart: bool = False


SINGLE_PROCESS = Role()


@dataclass(frozen=True, slots=True)
class Report:
    state: str
    status: Mapping[str, int] = field(default_factory=dict)
    problem: str | None = None  # None: every component of the worker alive


class Reporter:
    """The worker's end of the pipe."""

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        os.set_blocking(descriptor, False)
        self.closed = False

    def send(
        self, state: str, status: Mapping[str, int] | None = None, problem: str | None = None
    ) -> bool:
        """False once the supervisor is gone (its end of the pipe closed)."""
        if self.closed:
            return False
        reason = problem[:_MAX_PROBLEM] if problem is not None else None
        fields = {"state": state, "status": dict(status or {}), "problem": reason}
        line = json.dumps(fields).encode() + b"\n"
        try:
            os.write(self._descriptor, line)
        except BlockingIOError:
            return True  # the supervisor is busy: this heartbeat is dropped
        except OSError:
            self.closed = True
        return not self.closed


class Lines:
    """The supervisor's end: bytes in, complete reports out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Report]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            self._buffer = b""  # not from our worker: never let it grow
        reports = []
        for line in lines:
            try:
                raw = json.loads(line)
                state = raw["state"]
                status = {str(k): int(v) for k, v in raw.get("status", {}).items()}
                problem = raw.get("problem")
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            if isinstance(state, str):
                reports.append(Report(state, status, str(problem) if problem else None))
        return reports
