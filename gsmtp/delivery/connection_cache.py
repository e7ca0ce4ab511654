"""Idle outbound SMTP sessions kept for the next message to the same place, as Postfix's
connection cache does: bounded, keyed by what a session can carry, expired when idle.

No I/O. Time comes in as an argument and the sessions are opaque here: whatever leaves
the cache (taken, pushed out, expired, drained at close) is the caller's to use or to
close with QUIT. One event loop uses it; no method yields, so a session taken is taken
by one delivery only.

A session is filed under its destination (the recipient domain, or the smarthost) and
described by a `SessionKey`: the MX host name and the address and port it is connected
to, and whether it runs TLS. A delivery asks for its destination and says which keys it
accepts (an address still among the domain's current MX targets; a TLS policy adds its
level and verified name to the key and to the test). The most recently returned session
is handed out first, so that when traffic drops the extra sessions go unused and idle
out instead of all being kept barely alive.

Bounds: at most `per_destination` idle sessions per destination (a destination never
has more deliveries at once than its window, `delivery.max_per_domain`) and `limit` in
all; past either, the oldest idle session is pushed out. A session idle for `idle`
seconds is neither handed out nor kept: `expired(now)` returns it for a QUIT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class SessionKey:
    """What an open session can carry. `destination` is the recipient domain (lower
    case) or "[host]:port" of the smarthost; `host` the MX host name it connected to."""

    destination: str
    host: str
    address: str
    port: int
    tls: bool  # STARTTLS done; a TLS policy adds its level and the verified name here
    verified: bool = False  # the certificate was verified for `host` (MTA-STS enforce)

    @property
    def endpoint(self) -> tuple[str, str, int]:
        return (self.host, self.address, self.port)


@dataclass(slots=True)
class _Idle(Generic[S]):
    key: SessionKey
    session: S
    since: float


class SessionCache(Generic[S]):
    """Idle sessions by destination, oldest first (see the module docstring)."""

    def __init__(self, *, idle: float, per_destination: int, limit: int) -> None:
        self.idle = idle
        self._per_destination = per_destination
        self._limit = limit
        self._by_destination: dict[str, list[_Idle[S]]] = {}
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def put(self, key: SessionKey, session: S, now: float) -> list[S]:
        """Keep `session` idle from `now`. Returns what must be closed instead: the
        oldest idle sessions pushed out by the bounds, or `session` itself once the
        cache is closed."""
        if self._closed or self._per_destination < 1 or self._limit < 1:
            return [session]
        entries = self._by_destination.setdefault(key.destination, [])
        entries.append(_Idle(key, session, now))
        self._count += 1
        out: list[S] = []
        if len(entries) > self._per_destination:
            out.append(self._remove(key.destination, 0))
        while self._count > self._limit:
            out.append(self._remove(self._oldest_destination(), 0))
        return out

    def take(self, destination: str, accept: Callable[[SessionKey], bool], now: float) -> S | None:
        """The most recently returned session for `destination` whose key `accept`s,
        not idle for `idle` seconds yet; None if there is none."""
        entries = self._by_destination.get(destination, [])
        for index in range(len(entries) - 1, -1, -1):
            entry = entries[index]
            if now - entry.since >= self.idle:
                break  # this one and every older one are due for a QUIT
            if accept(entry.key):
                return self._remove(destination, index)
        return None

    def expired(self, now: float) -> list[S]:
        """Take out every session idle for `idle` seconds or more, to be closed."""
        out: list[S] = []
        for destination in list(self._by_destination):
            entries = self._by_destination[destination]
            while entries and now - entries[0].since >= self.idle:
                out.append(self._remove(destination, 0))
        return out

    def next_expiry(self) -> float | None:
        """When the oldest idle session is due for a QUIT; None with none idle."""
        heads = [entries[0].since for entries in self._by_destination.values()]
        return min(heads) + self.idle if heads else None

    def close(self) -> list[S]:
        """Keep nothing from now on; returns every idle session, to be closed."""
        self._closed = True
        out = [entry.session for entries in self._by_destination.values() for entry in entries]
        self._by_destination.clear()
        self._count = 0
        return out

    def _remove(self, destination: str, index: int) -> S:
        entries = self._by_destination[destination]
        entry = entries.pop(index)
        if not entries:
            del self._by_destination[destination]
        self._count -= 1
        return entry.session

    def _oldest_destination(self) -> str:
        return min(self._by_destination, key=lambda d: self._by_destination[d][0].since)
