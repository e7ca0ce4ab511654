"""Connection limits per client network: how many at once, and how many new per minute.

A client is counted by its network (`policy.client_network`: IPv4 /32, IPv6 /64 by
default), not its exact address, so one IPv6 host with a /64 cannot take every slot.
The rate limit works like Postfix's anvil(8): a fixed 60 s window per network that
starts at the network's first connection attempt; every attempt counts, refused ones
too, so a client hammering the port stays refused until it slows down for a window.
Trusted networks are exempt from both limits (they are ours: a submission host, a
monitoring probe).

No I/O; the clock is a parameter, so the unit tests move time by hand.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Literal

from gsmtp.policy import IPAddress, IPNetwork, client_network

RATE_WINDOW = 60.0
# At most this many networks' rate windows are remembered; past it the oldest windows
# are forgotten (those networks start afresh), so a flood from countless /64s cannot
# grow the table without bound. Anvil keeps no bound; this is a safety net.
MAX_TRACKED_NETWORKS = 100_000


@dataclass(frozen=True, slots=True)
class Admitted:
    """A connection let in; hand it back to `release` when it ends. `network` is None
    for an exempt (trusted) client, which is not counted."""

    network: IPNetwork | None


@dataclass(frozen=True, slots=True)
class Refused:
    network: IPNetwork
    reason: Literal["connections", "rate"]  # too many at once / too many new per minute


@dataclass(slots=True)
class _Window:
    started: float
    count: int


class ConnectionLimiter:
    """Counts open connections and recent connection attempts per client network."""

    def __init__(
        self,
        *,
        max_per_network: int,
        max_rate: int = 0,
        v4_prefix: int = 32,
        v6_prefix: int = 64,
        exempt: Sequence[IPNetwork] = (),
        clock: Callable[[], float] = time.monotonic,
        window: float = RATE_WINDOW,
        max_tracked: int = MAX_TRACKED_NETWORKS,
    ) -> None:
        self._max_per_network = max_per_network
        self._max_rate = max_rate  # 0: no rate limit
        self._v4_prefix = v4_prefix
        self._v6_prefix = v6_prefix
        self._exempt = tuple(exempt)
        self._clock = clock
        self._window = window
        self._max_tracked = max_tracked
        self._open: dict[IPNetwork, int] = defaultdict(int)
        # Oldest window first: a renewed window moves to the end.
        self._windows: OrderedDict[IPNetwork, _Window] = OrderedDict()

    def reconfigure(
        self, *, max_per_network: int, max_rate: int, exempt: Sequence[IPNetwork]
    ) -> None:
        """A reload: new limits for the next connection; counts already kept stay."""
        self._max_per_network = max_per_network
        self._max_rate = max_rate
        self._exempt = tuple(exempt)

    def network_of(self, ip: IPAddress) -> IPNetwork:
        return client_network(ip, self._v4_prefix, self._v6_prefix)

    def admit(self, ip: IPAddress) -> Admitted | Refused:
        """Count a new connection from `ip`, or say why it is refused."""
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ffff:a.b.c.d is matched as IPv4
        if any(ip in network for network in self._exempt):
            return Admitted(None)
        network = self.network_of(ip)
        attempts = self._count_attempt(network)
        if self._open[network] >= self._max_per_network:
            self._forget_if_closed(network)
            return Refused(network, "connections")
        if self._max_rate and attempts > self._max_rate:
            self._forget_if_closed(network)
            return Refused(network, "rate")
        self._open[network] += 1
        return Admitted(network)

    def release(self, admitted: Admitted) -> None:
        """The connection `admit` let in has ended."""
        network = admitted.network
        if network is None:
            return
        self._open[network] -= 1
        self._forget_if_closed(network)

    def open_connections(self, network: IPNetwork) -> int:
        return self._open.get(network, 0)

    @property
    def tracked_networks(self) -> int:
        """Networks with a rate window (for tests: the table stays bounded)."""
        return len(self._windows)

    def _forget_if_closed(self, network: IPNetwork) -> None:
        if self._open.get(network, 0) <= 0:
            self._open.pop(network, None)

    def _count_attempt(self, network: IPNetwork) -> int:
        """Attempts from `network` in its current window, this one included."""
        if not self._max_rate:
            return 0
        now = self._clock()
        self._expire(now)
        window = self._windows.get(network)
        if window is None or now - window.started >= self._window:
            window = _Window(now, 0)
            self._windows.pop(network, None)
            self._windows[network] = window
        window.count += 1
        return window.count

    def _expire(self, now: float) -> None:
        windows = self._windows
        while windows:
            network, window = next(iter(windows.items()))
            if now - window.started < self._window and len(windows) < self._max_tracked:
                break
            del windows[network]
