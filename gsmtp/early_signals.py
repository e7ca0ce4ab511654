"""SIGHUP and SIGUSR1 that arrive while a process starts, before its real handlers.

Their default action ends the process, and they can come at any moment: `systemctl
reload` or a certbot hook (SIGHUP), any `gsmtp queue` command (SIGUSR1 to the PID in
the lock file), each forwarded by a supervisor to a worker it has just forked. From
`defer()` until the process's own handlers are installed they are only remembered;
`take()` then says which came, so the process can act on them once started (a SIGHUP:
read the file again, it may have changed since this process read it; a SIGUSR1: look
at the queue). Signals are the process's, so the memory is too (module state). No
gevent here: the supervisor runs without it.
"""

from __future__ import annotations

import signal
from types import FrameType

DEFERRED = (signal.SIGHUP, signal.SIGUSR1)
_arrived: set[int] = set()


def defer(*, forget: bool = False) -> None:
    """From now on SIGHUP and SIGUSR1 are remembered, not fatal, until the caller
    installs its own handlers. Called again, it keeps what arrived, unless `forget`
    (a forked child: what its parent had remembered is not its own)."""
    if forget:
        _arrived.clear()
    for signum in DEFERRED:
        signal.signal(signum, _remember)


def _remember(signum: int, frame: FrameType | None) -> None:
    _arrived.add(signum)


def take() -> frozenset[int]:
    """The deferred signals that arrived since `defer()` (each once); call it after
    installing the real handlers, which see every later one."""
    arrived = frozenset(_arrived)
    _arrived.clear()
    return arrived
