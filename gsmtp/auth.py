"""AUTH decisions: verify credentials off the event loop, count failures per network.

One scrypt check costs ~32 MiB and a tenth of a second or more of one core, so checks
run in a small thread pool of their own (hashlib releases the GIL while scrypt runs),
never on the gevent hub; a burst of AUTH attempts queues for the pool's threads instead
of stalling every other session. An unknown, password-less or disabled user still costs
one check (against a dummy hash), so timing does not tell which users exist (S-08).

Failures are counted per client network (IPv4 /32, IPv6 /64 by default) over a sliding
hour; past `failure_limit` the network's AUTH attempts are refused before any check
(421 4.7.0 in the shell), like Postfix's smtpd_client_auth_rate_limit. A check still
running counts as a failure until it ends (it may become one): otherwise parallel
connections would all pass the test before the first failure was recorded, and one
network could spend any number of checks per hour. Trusted networks are exempt from that
limit (as Postfix exempts $mynetworks), not from the checks.

The work waiting for the pool is bounded too: at most `max_pending_per_network` checks
of one network and `max_pending` in all are running or queued; an attempt past either
is answered at once with a temporary failure (THROTTLED, 454 4.7.0 in the shell) and
costs no check, so a flood from a few networks cannot queue a legitimate login behind
itself for long. Trusted networks are held to these caps like everyone else: they
bound the pool's backlog, which a misbehaving host inside the network can fill too.

A hash made with parameters weaker than today's is replaced after a successful login.
Passwords are never logged, stored in a field that shows in a repr, or kept.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gevent.threadpool import ThreadPool

from gsmtp import accounts
from gsmtp.accounts import AccountsSnapshot
from gsmtp.log import get_logger
from gsmtp.policy import IPAddress, IPNetwork, client_network
from gsmtp.protocol.sasl import Credentials

T = TypeVar("T")
AUTH_THREADS = 2
# Checks of one client network, and of all, running or waiting for the pool at once.
MAX_PENDING_PER_NETWORK = 2
MAX_PENDING = 32
FAILURE_WINDOW = 3600.0
# Networks whose failures are remembered at most (a flood from many networks cannot
# grow the table without bound; the oldest entries go first).
MAX_TRACKED_NETWORKS = 100_000


class AuthOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BLOCKED = "blocked"  # too many failures from this network: not checked at all
    THROTTLED = "throttled"  # too many checks waiting: not checked, try again later


@dataclass(frozen=True, slots=True)
class AuthResult:
    outcome: AuthOutcome
    user: str | None = None  # the normalised address, when SUCCEEDED
    reason: str = ""  # for the operator's log only, never for the client
    failures: int = 0  # failures of this network in the window, this one included


class FailureCounter:
    """Failed AUTH per network in a sliding window. No I/O; time comes in as `now`."""

    def __init__(self, limit: int, window: float = FAILURE_WINDOW) -> None:
        self._limit = limit
        self._window = window
        self._failures: dict[IPNetwork, deque[float]] = {}

    def count(self, network: IPNetwork, now: float) -> int:
        times = self._failures.get(network)
        if times is None:
            return 0
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[network]
            return 0
        return len(times)

    def blocked(self, network: IPNetwork, now: float, pending: int = 0) -> bool:
        """Whether another check would exceed the limit, with `pending` checks of the
        network still running (each may become a failure)."""
        return self.count(network, now) + pending >= self._limit

    def record(self, network: IPNetwork, now: float) -> int:
        """Count one failure; the number in the window now."""
        times = self._failures.get(network)
        if times is None:
            if len(self._failures) >= MAX_TRACKED_NETWORKS:
                del self._failures[next(iter(self._failures))]
            # Only the last `limit` times matter for the decision.
            times = self._failures[network] = deque(maxlen=self._limit)
        times.append(now)
        return self.count(network, now)


class Authenticator:
    """Decides AUTH attempts. `authenticate` blocks only the calling greenlet."""

    def __init__(
        self,
        *,
        snapshot: Callable[..., AccountsSnapshot],
        store_hash: Callable[[str, str, str], object],
        failure_limit: int,
        is_exempt: Callable[[IPAddress], bool] = lambda ip: False,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        run_blocking: Callable[[Callable[[], Any]], Any] | None = None,
        verify: Callable[[str, str], bool] = accounts.verify_password,
        rehash: Callable[[str], str] = accounts.hash_password,
        needs_rehash: Callable[[str], bool] = accounts.needs_rehash,
        clock: Callable[[], float] = time.monotonic,
        max_pending_per_network: int = MAX_PENDING_PER_NETWORK,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._snapshot = snapshot
        self._store_hash = store_hash
        self._failures = FailureCounter(failure_limit)
        self._is_exempt = is_exempt
        self._prefixes = (ipv4_prefix, ipv6_prefix)
        self._pool: ThreadPool | None = None
        if run_blocking is None:
            self._pool = ThreadPool(AUTH_THREADS)
            run_blocking = self._in_pool
        self._run_blocking = run_blocking
        self._verify = verify
        self._rehash = rehash
        self._needs_rehash = needs_rehash
        self._clock = clock
        self._max_pending_per_network = max_pending_per_network
        self._max_pending = max_pending
        self._pending: dict[IPNetwork, int] = {}  # checks running or queued, per network
        self._pending_total = 0
        self._dummy = accounts.dummy_hash()
        self._log = get_logger(component="auth")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.kill()

    def authenticate(self, credentials: Credentials, ip: IPAddress) -> AuthResult:
        network = client_network(ip, *self._prefixes)
        exempt = self._is_exempt(ip)
        now = self._clock()
        pending = self._pending.get(network, 0)
        # Decided and counted without yielding to another greenlet, so parallel
        # attempts see each other's pending checks.
        if not exempt and self._failures.blocked(network, now, pending):
            return AuthResult(AuthOutcome.BLOCKED, failures=self._failures.count(network, now))
        if pending >= self._max_pending_per_network or self._pending_total >= self._max_pending:
            return AuthResult(AuthOutcome.THROTTLED, failures=self._failures.count(network, now))
        self._pending[network] = pending + 1
        self._pending_total += 1
        try:
            return self._check(credentials, network, exempt)
        finally:
            self._pending_total -= 1
            left = self._pending[network] - 1
            if left:
                self._pending[network] = left
            else:
                del self._pending[network]

    def _check(self, credentials: Credentials, network: IPNetwork, exempt: bool) -> AuthResult:
        """One verification (in the pool); a failure is recorded before the check stops
        counting as pending, so the limit never sees a gap."""
        user = accounts.login_name(credentials.username)
        login = self._snapshot(fresh=True).login(user) if user is not None else None
        stored = login.password_hash if login is not None else None
        password = credentials.password
        matched = self._run_blocking(lambda: self._verify(password, stored or self._dummy))
        reason = _refusal(credentials, user, login is not None, stored, matched)
        if reason is None and login is not None and login.disabled:
            reason = "account disabled"
        if reason is None:
            assert user is not None and stored is not None
            if self._needs_rehash(stored):
                self._upgrade(user, stored, password)
            return AuthResult(AuthOutcome.SUCCEEDED, user=user)
        failures = 0 if exempt else self._failures.record(network, self._clock())
        return AuthResult(AuthOutcome.FAILED, reason=reason, failures=failures)

    def _upgrade(self, user: str, stored: str, password: str) -> None:
        """Replace a weaker hash; a failure here never fails the login."""
        try:
            fresh = self._run_blocking(lambda: self._rehash(password))
            if self._store_hash(user, stored, fresh):
                self._log.info("password_rehashed", user=user)
        except Exception as error:
            self._log.warning("password_rehash_failed", user=user, error=str(error))

    def _in_pool(self, work: Callable[[], T]) -> T:
        assert self._pool is not None
        ok, value = self._pool.apply(_capture, (work,))
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]


def _refusal(
    credentials: Credentials, user: str | None, known: bool, stored: str | None, matched: bool
) -> str | None:
    """Why the attempt fails (operator's words), or None when it succeeds so far."""
    if user is None or not known:
        return "unknown user"
    if stored is None:
        return "no password set"
    if not matched:
        return "wrong password"
    # RFC 4616 §2: acting as another identity needs proxy rights, which nobody has.
    if credentials.authzid and accounts.login_name(credentials.authzid) != user:
        return "authorization identity differs"
    return None


def _capture(work: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        return True, work()
    except Exception as error:
        return False, error
