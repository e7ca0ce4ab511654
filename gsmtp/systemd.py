"""Talking to systemd: sd_notify messages (readiness, reload, stop, status, watchdog) and
the listening sockets socket activation passes (sd_listen_fds).

No library: sd_notify is one datagram of `KEY=value` lines to the AF_UNIX socket named
in $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace), and socket activation
is file descriptors 3… with $LISTEN_FDS and $LISTEN_PID (sd_notify(3), sd_listen_fds(3)).
Without $NOTIFY_SOCKET every message is a no-op, so the server runs the same under
systemd or not.

`SystemdNotifier` is the one place the messages are produced. Whoever is the unit's main
process drives it: the single server process (app.py); with several workers the
supervisor process (gsmtp.workers), through `NodeNotifier`, which turns the node's
health (every worker's, summed up) into the same messages. The environment is read
once, by `from_environment()`, in the composition root or the supervisor, which then
removes the variables so that no worker acts on them.

Standard library only at import (gevent is imported by `run_watchdog` when no `sleep`
is given): the supervisor, which forks its workers before gevent may be imported,
uses this module too.

The watchdog (WatchdogSec=): `run_watchdog(alive)` sends WATCHDOG=1 every half of
$WATCHDOG_USEC, but only while `alive()` returns None. It runs on the event loop, so a
blocked loop stops the pings too; a component that stalls or dies makes `alive()` return
its reason, the pings stop, and systemd kills and restarts the unit.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from gsmtp.log import get_logger

if TYPE_CHECKING:
    from gsmtp.workers import NodeHealth

SD_LISTEN_FDS_START = 3
Liveness = Callable[[], str | None]  # None: every component alive; else what is not
# What systemd's notification variables are: a worker must not act on them.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def status_text(connections: int, queued: int) -> str:
    """STATUS= as `systemctl status` shows it, for one process or the node."""
    return f"{connections} connections open, {queued} recipients queued"


def _socket_address(name: str) -> str | bytes:
    """$NOTIFY_SOCKET as a socket address: "@x" is the abstract name "\\0x"."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class SystemdNotifier:
    """Sends sd_notify messages; every method is a no-op when `address` is None.

    `ready()` once the listeners are bound and the spool is open; `reloading()` /
    `ready()` around a SIGHUP reload; `stopping()` at the start of a graceful stop;
    `status(text)` for `systemctl status`; `run_watchdog(alive)` on a greenlet of its
    own when `watchdog_interval` is not None."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        clock_usec: Callable[[], int] = lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
        sleep: Callable[[float], Any] | None = None,  # None: gevent.sleep
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address else None
        self._clock_usec = clock_usec
        self._sleep = sleep
        self._socket: socket.socket | None = None
        self._log = get_logger(component="systemd")
        self._silent_since: str | None = None  # why the watchdog stopped pinging

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """From $NOTIFY_SOCKET and $WATCHDOG_USEC (honoured only when $WATCHDOG_PID is
        unset or this process, as sd_watchdog_enabled(3) says)."""
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        pid = environ.get("WATCHDOG_PID")
        if not pid or pid == str(os.getpid()):
            try:
                watchdog = int(environ.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                watchdog = None
        return cls(address, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec=), None without a watchdog."""
        return self._watchdog_usec / 2_000_000 if self._watchdog_usec else None

    @property
    def watchdog_seconds(self) -> float | None:
        """WatchdogSec= itself: how long systemd waits for a ping."""
        return self._watchdog_usec / 1_000_000 if self._watchdog_usec else None

    # -- the messages -----------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC is required with Type=notify-reload (systemd 253+).
        return self.send("RELOADING=1", f"MONOTONIC_USEC={self._clock_usec()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def send(self, *lines: str) -> bool:
        """One datagram; False if not under systemd or it could not be sent (systemd
        gone: the server goes on)."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto("\n".join(lines).encode(), _socket_address(self._address))
        except OSError as error:
            self._log.warning("sd_notify_failed", error=str(error), message=lines[0])
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- the watchdog -----------------------------------------------------------------

    def watchdog_tick(self, alive: Liveness) -> bool:
        """One round: WATCHDOG=1 if `alive()` says every component is; True if sent.
        The first silent round and the first after it are logged."""
        reason = alive()
        if reason is None:
            if self._silent_since is not None:
                self._log.info("watchdog_resumed", was=self._silent_since)
                self._silent_since = None
            return self.watchdog()
        if self._silent_since is None:
            self._silent_since = reason
            self._log.error("watchdog_withheld", reason=reason)
        return False

    def run_watchdog(self, alive: Liveness) -> None:
        """Forever (a supervised greenlet): one tick every `watchdog_interval`."""
        interval = self.watchdog_interval
        if interval is None:
            return
        sleep = self._sleep
        if sleep is None:
            import gevent  # here, not at import: see the module docstring

            sleep = gevent.sleep
        while True:
            self.watchdog_tick(alive)
            sleep(interval)


class NodeNotifier:
    """The workers' supervisor speaking for the node (`update` receives every
    `NodeHealth`, gsmtp.workers): READY=1 once every worker is ready (its listeners
    bound, its shard open); RELOADING=1 while a forwarded SIGHUP is being applied and
    READY=1 once every worker has reloaded; STOPPING=1 once the node stops; STATUS= with
    the workers' counts summed, when it changes; WATCHDOG=1 every `watchdog_interval`
    while every worker reports its writer, queue runner and event loop alive. Nothing
    before the first READY=1 but that, nothing after STOPPING=1."""

    def __init__(
        self, notifier: SystemdNotifier, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.notifier = notifier
        self._clock = clock
        self._ready = False
        self._reloading = False
        self._stopping = False
        self._status: str | None = None
        self._next_ping = 0.0

    def update(self, health: NodeHealth) -> None:
        notifier = self.notifier
        if not notifier.enabled or self._stopping:
            return
        if health.stopping:
            self._stopping = True
            notifier.stopping()
            return
        text = status_text(health.status.get("connections", 0), health.status.get("queued", 0))
        if not self._ready:
            if health.ready:
                self._ready = True
                self._status = text
                notifier.ready(text)
            return
        if health.reloading and not self._reloading:
            self._reloading = True
            notifier.reloading()
        elif self._reloading and not health.reloading:
            self._reloading = False
            self._status = text
            notifier.ready(text)
        elif text != self._status:
            self._status = text
            notifier.status(text)
        interval = notifier.watchdog_interval
        now = self._clock()
        if interval is not None and now >= self._next_ping:
            self._next_ping = now + interval
            notifier.watchdog_tick(health.liveness)


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets systemd passed ($LISTEN_FDS, for this PID), as sockets; the
    variables are removed so that no child process takes them for its own."""
    try:
        pid = int(environ.get("LISTEN_PID", ""))
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid():
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
