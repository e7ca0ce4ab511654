"""The Authenticator: verification off the event loop, no user enumeration, failures
per client network in a sliding hour, disabled users, rehash on login (S-07..S-09)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import threading
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from gsmtp import accounts
from gsmtp.accounts import AccountsSnapshot, Login
from gsmtp.auth import Authenticator, AuthOutcome, FailureCounter
from gsmtp.policy import IPAddress, client_network
from gsmtp.protocol.sasl import Credentials

IP = ipaddress.ip_address("198.51.100.7")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHasher:
    """Passwords "hashed" as "h:<password>"; records every verification."""

    def __init__(self) -> None:
        self.verified: list[str] = []  # the stored hashes verified against
        self.threads: list[int] = []

    def verify(self, password: str, stored: str) -> bool:
        self.verified.append(stored)
        self.threads.append(threading.get_ident())
        return stored == f"h:{password}"


def snapshot_of(logins: dict[str, Login]) -> Callable[..., AccountsSnapshot]:
    snapshot = AccountsSnapshot(1, frozenset({"foo.com"}), frozenset(logins), logins)
    return lambda fresh=False: snapshot


LOGINS = {
    "jones@foo.com": Login("h:right"),
    "off@foo.com": Login("h:right", disabled=True),
    "nopass@foo.com": Login(None),
}


def make(
    hasher: FakeHasher,
    *,
    limit: int = 3,
    clock: FakeClock | None = None,
    exempt: Callable[[IPAddress], bool] = lambda ip: False,
    logins: dict[str, Login] | None = None,
    **kwargs: Any,
) -> Authenticator:
    return Authenticator(
        snapshot=snapshot_of(LOGINS if logins is None else logins),
        store_hash=lambda user, old, new: True,
        failure_limit=limit,
        is_exempt=exempt,
        run_blocking=kwargs.pop("run_blocking", lambda work: work()),
        verify=hasher.verify,
        needs_rehash=kwargs.pop("needs_rehash", lambda stored: False),
        clock=clock or FakeClock(),
        **kwargs,
    )


def creds(username: str, password: str, authzid: str = "") -> Credentials:
    return Credentials("PLAIN", username, password, authzid)


def test_success_gives_the_normalised_user() -> None:
    result = make(FakeHasher()).authenticate(creds("Jones@FOO.com", "right"), IP)
    assert result.outcome is AuthOutcome.SUCCEEDED
    assert result.user == "jones@foo.com"


def test_every_failure_costs_exactly_one_verification() -> None:
    """S-08: an unknown user, one without a password and a disabled one are verified
    (against a dummy hash with today's parameters) just like a wrong password."""
    hasher = FakeHasher()
    authenticator = make(hasher, limit=100)
    reasons = []
    for username, password in [
        ("jones@foo.com", "wrong"),
        ("nobody@foo.com", "right"),
        ("not an address", "right"),
        ("nopass@foo.com", "right"),
        ("off@foo.com", "right"),
    ]:
        result = authenticator.authenticate(creds(username, password), IP)
        assert result.outcome is AuthOutcome.FAILED
        reasons.append(result.reason)
    assert reasons == [
        "wrong password",
        "unknown user",
        "unknown user",
        "no password set",
        "account disabled",
    ]
    assert len(hasher.verified) == 5
    dummies = hasher.verified[1:4]
    assert len(set(dummies)) == 1 and dummies[0].startswith("$scrypt$ln=15,r=8,p=3$")
    assert not accounts.needs_rehash(dummies[0])


def test_another_authorization_identity_fails() -> None:
    """P-60: authzid ≠ authcid → 535 (nobody has proxy rights); the same identity in
    another spelling is fine."""
    authenticator = make(FakeHasher())
    other = authenticator.authenticate(creds("jones@foo.com", "right", "brown@foo.com"), IP)
    assert other.outcome is AuthOutcome.FAILED
    assert other.reason == "authorization identity differs"
    same = authenticator.authenticate(creds("jones@foo.com", "right", "JONES@foo.com"), IP)
    assert same.outcome is AuthOutcome.SUCCEEDED


def test_failures_are_limited_per_network_in_a_sliding_hour() -> None:
    hasher = FakeHasher()
    clock = FakeClock()
    authenticator = make(hasher, limit=3, clock=clock)
    first, second = (ipaddress.ip_address(f"2001:db8:1:2::{n}") for n in (1, 2))
    for ip in (first, second, first):
        clock.now += 10
        assert authenticator.authenticate(creds("jones@foo.com", "x"), ip).failures > 0
    verified = len(hasher.verified)
    # The /64 used up its failures: even the right password is not checked now.
    blocked = authenticator.authenticate(creds("jones@foo.com", "right"), second)
    assert blocked.outcome is AuthOutcome.BLOCKED
    assert len(hasher.verified) == verified
    # Another /64, and another IPv4 /32, are not affected.
    other = ipaddress.ip_address("2001:db8:1:3::1")
    assert authenticator.authenticate(creds("jones@foo.com", "right"), other).user
    assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user
    # An hour after the first failure one slot is free again.
    clock.now += 3600 - 20
    assert authenticator.authenticate(creds("jones@foo.com", "right"), first).user


def test_ipv4_counts_each_address() -> None:
    authenticator = make(FakeHasher(), limit=1)
    authenticator.authenticate(creds("jones@foo.com", "x"), ipaddress.ip_address("192.0.2.1"))
    one = authenticator.authenticate(
        creds("jones@foo.com", "right"), ipaddress.ip_address("192.0.2.1")
    )
    two = authenticator.authenticate(
        creds("jones@foo.com", "right"), ipaddress.ip_address("192.0.2.2")
    )
    assert (one.outcome, two.outcome) == (AuthOutcome.BLOCKED, AuthOutcome.SUCCEEDED)


def test_exempt_networks_are_never_blocked() -> None:
    authenticator = make(FakeHasher(), limit=1, exempt=lambda ip: True)
    for _ in range(3):
        result = authenticator.authenticate(creds("jones@foo.com", "x"), IP)
        assert result.outcome is AuthOutcome.FAILED
    assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user


def test_failure_counter_window_and_bound() -> None:
    counter = FailureCounter(limit=2, window=60)
    network = client_network(IP)
    assert counter.record(network, 0) == 1
    assert not counter.blocked(network, 1)
    assert counter.record(network, 30) == 2
    assert counter.blocked(network, 59)
    assert not counter.blocked(network, 61)
    assert counter.count(network, 91) == 0


def test_client_network_prefixes() -> None:
    assert str(client_network(ipaddress.ip_address("192.0.2.9"))) == "192.0.2.9/32"
    assert str(client_network(ipaddress.ip_address("192.0.2.9"), v4_prefix=24)) == "192.0.2.0/24"
    assert str(client_network(ipaddress.ip_address("2001:db8:0:1:2:3:4:5"))) == "2001:db8:0:1::/64"
    mapped = ipaddress.ip_address("::ffff:192.0.2.9")
    assert str(client_network(mapped)) == "192.0.2.9/32"


def weak_hash(password: str) -> str:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**10, r=8, p=1, dklen=32)
    encode = lambda data: base64.b64encode(data).decode().rstrip("=")  # noqa: E731
    return f"$scrypt$ln=10,r=8,p=1${encode(salt)}${encode(digest)}"


def test_a_weak_hash_is_replaced_after_a_successful_login() -> None:
    stored = weak_hash("right")
    assert accounts.verify_password("right", stored) and accounts.needs_rehash(stored)
    written: list[tuple[str, str, str]] = []
    authenticator = Authenticator(
        snapshot=snapshot_of({"jones@foo.com": Login(stored)}),
        store_hash=lambda *args: written.append(args) or True,
        failure_limit=3,
        run_blocking=lambda work: work(),
    )
    assert authenticator.authenticate(creds("jones@foo.com", "wrong"), IP).user is None
    assert written == []
    assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user
    ((user, old, new),) = written
    assert (user, old) == ("jones@foo.com", stored)
    assert new.startswith("$scrypt$ln=15,r=8,p=3$") and not accounts.needs_rehash(new)
    assert accounts.verify_password("right", new)


def test_a_failed_rehash_does_not_fail_the_login() -> None:
    def broken(*args: object) -> bool:
        raise RuntimeError("database is locked")

    authenticator = make(
        FakeHasher(), needs_rehash=lambda stored: True, rehash=lambda pw: "h:" + pw
    )
    authenticator._store_hash = broken
    assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user


def test_verification_runs_in_the_pool_never_on_the_hub() -> None:
    """The default runs checks in the authenticator's own threads: the hub's thread
    never hashes, and other greenlets keep running while a real scrypt check runs."""
    hasher = FakeHasher()
    authenticator = Authenticator(
        snapshot=snapshot_of(LOGINS),
        store_hash=lambda *a: True,
        failure_limit=3,
        verify=hasher.verify,
    )
    try:
        assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user
        assert hasher.threads and threading.get_ident() not in hasher.threads
        real = Authenticator(
            snapshot=snapshot_of({"jones@foo.com": Login(accounts.dummy_hash())}),
            store_hash=lambda *a: True,
            failure_limit=3,
        )
        ticks = []

        def tick() -> None:
            while True:
                ticks.append(1)
                gevent.sleep(0.001)

        ticker = gevent.spawn(tick)
        gevent.sleep(0)
        before = len(ticks)
        real.authenticate(creds("jones@foo.com", "x"), IP)  # ~0.1-0.2 s of scrypt
        during = len(ticks) - before
        ticker.kill()
        real.close()
        assert during >= 1
    finally:
        authenticator.close()


class HeldChecks:
    """A `run_blocking` whose checks wait until released: parallel attempts overlap
    exactly as they do behind a busy pool."""

    def __init__(self) -> None:
        self.release = gevent.event.Event()
        self.started = 0

    def __call__(self, work: Callable[[], Any]) -> Any:
        self.started += 1
        self.release.wait()
        return work()


def attempt_all(authenticator: Authenticator, attempts: list[tuple[str, IPAddress]]) -> list[Any]:
    """Start every attempt, let them all reach the pool, then return their greenlets."""
    greenlets = [
        gevent.spawn(authenticator.authenticate, creds("jones@foo.com", password), ip)
        for password, ip in attempts
    ]
    gevent.sleep(0)  # each runs up to its check (or its refusal)
    return greenlets


def test_checks_still_running_count_against_the_failure_limit() -> None:
    """30 parallel wrong AUTHs from one network, limit 3: 3 are checked, the other 27
    are refused unchecked while those run; after them the network stays blocked."""
    hasher = FakeHasher()
    held = HeldChecks()
    authenticator = make(hasher, limit=3, run_blocking=held, max_pending_per_network=100)
    greenlets = attempt_all(authenticator, [(f"guess{n}", IP) for n in range(30)])
    assert held.started == 3
    blocked = [g.value for g in greenlets if g.ready()]
    assert len(blocked) == 27 and {r.outcome for r in blocked} == {AuthOutcome.BLOCKED}
    held.release.set()
    gevent.joinall(greenlets)
    assert [g.value.outcome for g in greenlets].count(AuthOutcome.FAILED) == 3
    assert len(hasher.verified) == 3
    late = authenticator.authenticate(creds("jones@foo.com", "right"), IP)
    assert late.outcome is AuthOutcome.BLOCKED and len(hasher.verified) == 3


def test_a_successful_check_frees_its_pending_place() -> None:
    """A pending check blocks only while it runs: once it succeeds the network has its
    whole allowance again."""
    held = HeldChecks()
    authenticator = make(FakeHasher(), limit=1, run_blocking=held)
    first, second = attempt_all(authenticator, [("right", IP), ("right", IP)])
    assert second.value.outcome is AuthOutcome.BLOCKED
    held.release.set()
    assert first.get().outcome is AuthOutcome.SUCCEEDED
    assert authenticator.authenticate(creds("jones@foo.com", "right"), IP).user


def test_waiting_checks_are_capped_per_network_and_in_all() -> None:
    """Past 2 checks of one network, or 5 in all, running or queued, an attempt is
    THROTTLED at once and costs no check; trusted (exempt) networks are held to the
    caps too. Once the checks end, attempts are checked again."""
    hasher = FakeHasher()
    held = HeldChecks()
    a, b, c, trusted = (ipaddress.ip_address(f"192.0.2.{n}") for n in (1, 2, 3, 4))
    authenticator = make(
        hasher,
        limit=100,
        run_blocking=held,
        exempt=lambda ip: ip == trusted,
        max_pending_per_network=2,
        max_pending=5,
    )
    greenlets = attempt_all(authenticator, [("x", a)] * 3 + [("x", trusted)] * 3)
    outcomes = [g.value.outcome if g.ready() else "pending" for g in greenlets]
    throttled = AuthOutcome.THROTTLED
    assert outcomes == ["pending", "pending", throttled, "pending", "pending", throttled]
    more = attempt_all(authenticator, [("x", b), ("x", c)])  # 4 pending: one more place
    assert [g.ready() for g in more] == [False, True]
    assert more[1].value.outcome is throttled
    assert held.started == 5
    held.release.set()
    gevent.joinall(greenlets + more)
    assert len(hasher.verified) == 5
    assert authenticator.authenticate(creds("jones@foo.com", "right"), c).user
