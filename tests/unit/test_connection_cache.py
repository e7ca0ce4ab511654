"""The idle-session cache on its own: keyed, bounded, expiring; time is an argument."""

from __future__ import annotations

from gsmtp.delivery.connection_cache import SessionCache, SessionKey


def key(
    destination: str = "dest.example", address: str = "192.0.2.1", tls: bool = False
) -> SessionKey:
    return SessionKey(destination, f"mx.{destination}", address, 25, tls)


def anything(_key: SessionKey) -> bool:
    return True


def cache(idle: float = 2.0, per_destination: int = 3, limit: int = 10) -> SessionCache[str]:
    return SessionCache(idle=idle, per_destination=per_destination, limit=limit)


def test_a_session_is_taken_once_and_only_for_its_destination() -> None:
    sessions = cache()
    assert sessions.put(key("a.example"), "A", now=0.0) == []
    assert sessions.take("b.example", anything, now=0.5) is None
    assert sessions.take("a.example", anything, now=0.5) == "A"
    assert sessions.take("a.example", anything, now=0.5) is None
    assert len(sessions) == 0


def test_the_key_decides_what_a_delivery_may_take() -> None:
    """A delivery accepts only addresses still among its targets (and, later, a TLS
    level): another address of the same destination is left where it is."""
    sessions = cache()
    sessions.put(key(address="192.0.2.1"), "old MX", now=0.0)
    sessions.put(key(address="192.0.2.2", tls=True), "current MX", now=0.1)
    wanted = {("mx.dest.example", "192.0.2.1", 25)}
    assert sessions.take("dest.example", lambda k: k.endpoint in wanted, now=0.2) == "old MX"
    assert sessions.take("dest.example", lambda k: not k.tls, now=0.2) is None
    assert sessions.take("dest.example", lambda k: k.tls, now=0.2) == "current MX"


def test_the_most_recently_returned_session_goes_first() -> None:
    """So that when traffic drops, the extra sessions idle out instead of all being
    kept barely alive."""
    sessions = cache()
    for index, name in enumerate(["first", "second", "third"]):
        sessions.put(key(), name, now=float(index))
    assert sessions.take("dest.example", anything, now=2.5) == "third"
    assert sessions.take("dest.example", anything, now=2.5) == "second"


def test_per_destination_bound_pushes_out_the_oldest() -> None:
    sessions = cache(per_destination=2)
    assert sessions.put(key(), "s1", now=0.0) == []
    assert sessions.put(key(), "s2", now=0.1) == []
    assert sessions.put(key("other.example"), "o1", now=0.15) == []
    assert sessions.put(key(), "s3", now=0.2) == ["s1"]  # the caller QUITs it
    assert len(sessions) == 3
    assert sessions.take("dest.example", anything, now=0.3) == "s3"
    assert sessions.take("dest.example", anything, now=0.3) == "s2"
    assert sessions.take("dest.example", anything, now=0.3) is None


def test_global_bound_pushes_out_the_oldest_of_any_destination() -> None:
    sessions = cache(per_destination=5, limit=3)
    sessions.put(key("a.example"), "a1", now=0.0)
    sessions.put(key("b.example"), "b1", now=0.1)
    sessions.put(key("a.example"), "a2", now=0.2)
    assert sessions.put(key("c.example"), "c1", now=0.3) == ["a1"]
    assert sessions.put(key("c.example"), "c2", now=0.4) == ["b1"]
    assert len(sessions) == 3
    assert sessions.take("b.example", anything, now=0.5) is None


def test_idle_sessions_expire_after_the_idle_time() -> None:
    sessions = cache(idle=2.0)
    sessions.put(key("a.example"), "a", now=10.0)
    sessions.put(key("b.example"), "b", now=11.0)
    assert sessions.next_expiry() == 12.0
    assert sessions.expired(now=11.9) == []
    assert sessions.expired(now=12.0) == ["a"]
    assert sessions.next_expiry() == 13.0
    # Past its idle time a session is never handed out, even before the sweep.
    assert sessions.take("b.example", anything, now=13.5) is None
    assert sessions.expired(now=13.5) == ["b"]
    assert sessions.next_expiry() is None and len(sessions) == 0


def test_a_closed_cache_keeps_nothing() -> None:
    sessions = cache()
    sessions.put(key(), "idle", now=0.0)
    assert sessions.close() == ["idle"]
    assert sessions.put(key(), "late", now=1.0) == ["late"]
    assert len(sessions) == 0 and sessions.take("dest.example", anything, now=1.0) is None
