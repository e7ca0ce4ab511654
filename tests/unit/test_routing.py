"""routing.address_of: the stored wire form of a recipient back as an Address, once per
address (every local delivery asks for it twice: its route, then its mailbox); and the
domains routed LOCAL, for a claim of the local lane alone."""

from __future__ import annotations

from gsmtp.protocol.address import Address
from gsmtp.routing import LOCAL, SMTP, Router, address_of
from tests.unit.session_driver import SNAPSHOT, make_policy


def test_a_stored_recipient_comes_back_as_the_address_it_was() -> None:
    assert address_of("Jones@Example.ORG") == Address("Jones", "example.org")
    assert address_of('"john doe"@example.org') == Address("john doe", "example.org")
    assert address_of("jörg@bücher.example") == Address("jörg", "xn--bcher-kva.example")


def test_a_damaged_stored_address_still_splits_at_the_last_at_sign() -> None:
    assert address_of("a b@c@example.org") == Address("a b@c", "example.org")


def test_the_same_address_is_parsed_once_and_the_memory_of_them_is_bounded() -> None:
    address_of.cache_clear()
    first = address_of("someone@example.org")
    assert address_of("someone@example.org") is first
    assert address_of.cache_info().hits == 1
    for number in range(5000):
        address_of(f"user{number}@example.org")
    assert address_of.cache_info().currsize == address_of.cache_info().maxsize == 4096


def test_the_local_domains_are_those_routed_to_the_maildir() -> None:
    """What a claim for the local lane alone looks for: every domain `route` sends to
    the Maildir (the accounts' domains and the host name), and no other."""
    router = Router(make_policy())
    local = router.local_domains()
    assert local == SNAPSHOT.domains | {"mx.foo.com"}
    assert router.local_domains() is local  # made again only when the accounts change
    for domain in local:
        assert router.route(f"someone@{domain}").transport == LOCAL
    assert router.route("someone@elsewhere.example").transport == SMTP
