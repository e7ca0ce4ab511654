"""Connection limits per client network (IPv4 /32, IPv6 /64) and per minute, with a
hand-moved clock."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from gsmtp.limits import Admitted, ConnectionLimiter, Refused
from gsmtp.policy import client_network


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "network"),
    [
        ("192.0.2.7", 32, 64, "192.0.2.7/32"),
        ("192.0.2.7", 24, 64, "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 32, 48, "2001:db8:1::/48"),
        ("2001:db8::1", 32, 128, "2001:db8::1/128"),
        ("::ffff:192.0.2.7", 32, 64, "192.0.2.7/32"),  # IPv4-mapped counts as IPv4
        ("::ffff:192.0.2.7", 24, 64, "192.0.2.0/24"),
        ("::1", 32, 64, "::/64"),
    ],
)
def test_client_network(ip: str, v4: int, v6: int, network: str) -> None:
    assert client_network(ip_address(ip), v4, v6) == ip_network(network)


def test_client_network_defaults_are_v4_32_and_v6_64() -> None:
    assert client_network(ip_address("2001:db8::9")) == ip_network("2001:db8::/64")
    assert client_network(ip_address("192.0.2.9")) == ip_network("192.0.2.9/32")


def test_one_ipv6_64_shares_the_cap() -> None:
    """Addresses anywhere in one /64 are one client; the next /64 is another."""
    limiter = ConnectionLimiter(max_per_network=2)
    first = limiter.admit(ip_address("2001:db8::1"))
    second = limiter.admit(ip_address("2001:db8::ffff:ffff:ffff:2"))
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    assert limiter.admit(ip_address("2001:db8::3")) == Refused(
        ip_network("2001:db8::/64"), "connections"
    )
    assert isinstance(limiter.admit(ip_address("2001:db8:0:1::1")), Admitted)
    limiter.release(first)
    assert isinstance(limiter.admit(ip_address("2001:db8::4")), Admitted)
    assert limiter.open_connections(ip_network("2001:db8::/64")) == 2


def test_ipv4_counts_per_address_by_default_and_per_prefix_when_set() -> None:
    per_address = ConnectionLimiter(max_per_network=1)
    assert isinstance(per_address.admit(ip_address("192.0.2.1")), Admitted)
    assert isinstance(per_address.admit(ip_address("192.0.2.2")), Admitted)
    per_24 = ConnectionLimiter(max_per_network=1, v4_prefix=24)
    assert isinstance(per_24.admit(ip_address("192.0.2.1")), Admitted)
    assert isinstance(per_24.admit(ip_address("192.0.2.2")), Refused)


def test_ipv4_mapped_and_plain_ipv4_are_one_client() -> None:
    limiter = ConnectionLimiter(max_per_network=1)
    assert isinstance(limiter.admit(ip_address("192.0.2.7")), Admitted)
    assert limiter.admit(ip_address("::ffff:192.0.2.7")) == Refused(
        ip_network("192.0.2.7/32"), "connections"
    )


def test_release_forgets_a_network_with_nothing_open() -> None:
    limiter = ConnectionLimiter(max_per_network=3)
    admitted = [limiter.admit(ip_address(f"192.0.2.{i}")) for i in range(1, 4)]
    for entry in admitted:
        assert isinstance(entry, Admitted)
        limiter.release(entry)
    assert limiter._open == {}


def test_rate_limit_per_network_in_a_60_second_window() -> None:
    clock = FakeClock()
    limiter = ConnectionLimiter(max_per_network=100, max_rate=3, clock=clock)
    client = ip_address("192.0.2.7")
    for _ in range(3):
        admitted = limiter.admit(client)
        assert isinstance(admitted, Admitted)
        limiter.release(admitted)  # closed at once: only the rate can refuse
        clock.now += 1
    assert limiter.admit(client) == Refused(ip_network("192.0.2.7/32"), "rate")
    assert isinstance(limiter.admit(ip_address("192.0.2.8")), Admitted)  # that client only
    clock.now = 1000.0 + 59.9
    assert isinstance(limiter.admit(client), Refused)
    clock.now = 1000.0 + 60.0  # the window that began at the first attempt is over
    assert isinstance(limiter.admit(client), Admitted)


def test_refused_attempts_count_towards_the_rate() -> None:
    """As anvil: a client hammering the port while refused stays refused."""
    clock = FakeClock()
    limiter = ConnectionLimiter(max_per_network=1, max_rate=3, clock=clock)
    client = ip_address("192.0.2.7")
    held = limiter.admit(client)
    assert isinstance(held, Admitted)
    assert limiter.admit(client) == Refused(ip_network("192.0.2.7/32"), "connections")
    assert limiter.admit(client) == Refused(ip_network("192.0.2.7/32"), "connections")
    limiter.release(held)
    assert limiter.admit(client) == Refused(ip_network("192.0.2.7/32"), "rate")


def test_rate_zero_is_no_limit() -> None:
    limiter = ConnectionLimiter(max_per_network=1, max_rate=0, clock=FakeClock())
    for _ in range(1000):
        admitted = limiter.admit(ip_address("192.0.2.7"))
        assert isinstance(admitted, Admitted)
        limiter.release(admitted)
    assert limiter.tracked_networks == 0


def test_trusted_networks_are_exempt_from_both_limits() -> None:
    limiter = ConnectionLimiter(
        max_per_network=1,
        max_rate=1,
        exempt=[ip_network("192.0.2.0/28"), ip_network("2001:db8::/64")],
        clock=FakeClock(),
    )
    for ip in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::5"):
        results = [limiter.admit(ip_address(ip)) for _ in range(5)]
        assert results == [Admitted(None)] * 5
    assert isinstance(limiter.admit(ip_address("192.0.2.17")), Admitted)
    assert isinstance(limiter.admit(ip_address("192.0.2.17")), Refused)


def test_rate_windows_expire_and_the_table_stays_bounded() -> None:
    clock = FakeClock()
    limiter = ConnectionLimiter(max_per_network=10, max_rate=5, clock=clock, max_tracked=50)
    for i in range(200):
        admitted = limiter.admit(ip_address(f"2001:db8:{i:x}::1"))
        assert isinstance(admitted, Admitted)
        limiter.release(admitted)
    assert limiter.tracked_networks <= 50
    clock.now += 61
    limiter.admit(ip_address("192.0.2.1"))
    assert limiter.tracked_networks == 1
