"""MTA-STS (RFC 8461) end to end: dnsmasq serves the MX, `_mta-sts` TXT and
`mta-sts.<domain>` A records, an HTTPS server on 127.0.0.9 serves the policy with a
certificate from a test CA (`delivery.ca_file`), aiosmtpd sinks with certificates from
the same CA are the MX hosts. sts.test has two MX hosts: other.elsewhere.test
(127.0.0.2, preference 10, never in a policy unless a test puts it there) and
mx.sts.test (127.0.0.3, preference 20)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gsmtp.delivery.mta_sts import POLICY_PATH, FetchError, HttpsFetcher
from gsmtp.delivery.tls_client import verified_context
from tests.integration.harness import (
    CountingClock,
    GsmtpProcess,
    TestCertificateAuthority,
    environment_has,
    free_port,
    wait_for,
)
from tests.integration.remote import (
    Dnsmasq,
    Sink,
    WellKnownServer,
    send,
    start_sink,
    tls_context_for,
    txt_record,
    wait_received,
)

DOMAIN = "sts.test"
POLICY_HOST = f"mta-sts.{DOMAIN}"
WEB_ADDRESS = "127.0.0.9"
ZONE = [
    f"--mx-host={DOMAIN},other.elsewhere.test,10",
    f"--mx-host={DOMAIN},mx.{DOMAIN},20",
    "--host-record=other.elsewhere.test,127.0.0.2",
    f"--host-record=mx.{DOMAIN},127.0.0.3",
    f"--host-record={POLICY_HOST},{WEB_ADDRESS}",
]


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines).encode() + b"\r\n"


@dataclass
class World:
    ca: TestCertificateAuthority
    dns: Dnsmasq
    web: WellKnownServer
    web_port: int

    def publish(self, policy: bytes) -> None:
        self.web.files[(POLICY_HOST, POLICY_PATH)] = policy

    def announce(self, policy_id: str) -> None:
        """Serve the TXT record with a new id (dnsmasq restarted on its port)."""
        self.dns.stop()
        self.dns = Dnsmasq(
            [*ZONE, txt_record(f"_mta-sts.{DOMAIN}", f"v=STSv1; id={policy_id}")],
            port=self.dns.port,
        )

    def sink(self, sinks: dict[str, Sink], address: str, port: int, name: str | None) -> Sink:
        """An MX sink on `address`, offering STARTTLS with a certificate for `name`
        (None: no STARTTLS at all)."""
        context = tls_context_for(*self.ca.issue(name)) if name else None
        return start_sink(sinks, address, port, tls_context=context)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    if not environment_has("dnsmasq"):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    ca = TestCertificateAuthority(tmp_path / "ca")
    web_port = free_port(WEB_ADDRESS)
    web = WellKnownServer(WEB_ADDRESS, web_port, *ca.issue(POLICY_HOST))
    dns = Dnsmasq([*ZONE, txt_record(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1")])
    state = World(ca, dns, web, web_port)
    yield state
    state.dns.stop()
    state.web.stop()


@pytest.fixture
def sts_relay(gsmtp_factory, world: World, mx_port: int) -> Callable[..., GsmtpProcess]:  # type: ignore[no-untyped-def]
    def make(**delivery: Any) -> GsmtpProcess:
        settings = {
            "server": {"trusted_networks": ["127.0.0.1/32"]},
            "delivery": {
                "nameservers": [f"127.0.0.1:{world.dns.port}"],
                "port": mx_port,
                "retry": ["1s"],
                "connect_timeout": "2s",
                "mta_sts_port": world.web_port,
                "ca_file": str(world.ca.ca),
                **delivery,
            },
        }
        return gsmtp_factory(settings)  # type: ignore[no-any-return]

    return make


def last_error(gsmtp: GsmtpProcess) -> str:
    rows = gsmtp.spool_rows("SELECT last_error FROM recipients")
    return rows[0][0] if rows and rows[0][0] else ""


def connections(sink: Sink) -> int:
    return len(sink.transcripts)


def test_enforce_skips_an_mx_the_policy_does_not_list(sts_relay, world, sinks, mx_port) -> None:  # type: ignore[no-untyped-def]
    unlisted = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    listed = world.sink(sinks, "127.0.0.3", mx_port, f"mx.{DOMAIN}")
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    (received,) = wait_received(listed)
    assert received.tls
    assert connections(unlisted) == 0
    assert world.web.requests == [(POLICY_HOST, POLICY_PATH)]
    wait_for(lambda: gsmtp.events("mta_sts_policy_fetched", domain=DOMAIN, mode="enforce"))


def test_enforce_defers_when_no_mx_matches(sts_relay, world, sinks, mx_port) -> None:  # type: ignore[no-untyped-def]
    first = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    second = world.sink(sinks, "127.0.0.3", mx_port, f"mx.{DOMAIN}")
    world.publish(policy_text("enforce", f"*.mail.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    error = wait_for(lambda: last_error(gsmtp), what="the deferral")
    assert error.startswith(f"451 4.7.5 no MX host of {DOMAIN} (")
    assert error.endswith("matches its mta-sts policy (*.mail.sts.test)")
    assert connections(first) == connections(second) == 0
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(1,)]


def test_enforce_defers_a_certificate_for_another_name(sts_relay, world, sinks, mx_port) -> None:  # type: ignore[no-untyped-def]
    unlisted = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    impostor = world.sink(sinks, "127.0.0.3", mx_port, "impostor.test")
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    error = wait_for(lambda: last_error(gsmtp), what="the deferral")
    assert error.startswith(f"451 4.7.5 mx.{DOMAIN}[127.0.0.3]: certificate not trusted")
    assert "Hostname mismatch" in error
    wait_for(lambda: connections(impostor) >= 2, what="a retry")  # still queued, retried
    assert impostor.received == [] and connections(unlisted) == 0


def test_enforce_defers_an_mx_without_starttls(sts_relay, world, sinks, mx_port) -> None:  # type: ignore[no-untyped-def]
    plain = world.sink(sinks, "127.0.0.3", mx_port, None)
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    error = wait_for(lambda: last_error(gsmtp), what="the deferral")
    assert error == (
        f"451 4.7.4 mx.{DOMAIN}[127.0.0.3]: STARTTLS not offered; TLS is required (verify, mta-sts)"
    )
    assert plain.received == []


def test_testing_mode_delivers_and_logs_what_would_have_failed(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    unlisted = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    world.publish(policy_text("testing", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    wait_received(unlisted)
    (event,) = wait_for(lambda: gsmtp.events("mta_sts_testing_failure", domain=DOMAIN))
    assert event["hosts"] == ["other.elsewhere.test"] and event["level"] == "warning"


def session_failures(gsmtp: GsmtpProcess) -> list[dict[str, Any]]:
    """The `mta_sts_testing_failure` lines about an MX session (not the MX-name check)."""
    return [e for e in gsmtp.events("mta_sts_testing_failure", domain=DOMAIN) if "mx" in e]


def test_testing_mode_delivers_past_a_wrong_certificate_and_logs_it(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    impostor = world.sink(sinks, "127.0.0.3", mx_port, "impostor.test")
    world.publish(policy_text("testing", "other.elsewhere.test", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    (received,) = wait_received(impostor)
    assert received.tls  # `may` as usual: encrypted, certificate unchecked
    (event,) = wait_for(lambda: session_failures(gsmtp), what="the testing failure")
    assert event["mx"] == f"mx.{DOMAIN}[127.0.0.3]"
    assert event["failure"].startswith(f"certificate not trusted for mx.{DOMAIN}")
    assert "Hostname mismatch" in event["failure"]
    assert gsmtp.events("tls_failed") == []  # not a failure of the delivery's own level


def test_testing_mode_delivers_without_starttls_and_logs_it(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    plain = world.sink(sinks, "127.0.0.3", mx_port, None)
    world.publish(policy_text("testing", "other.elsewhere.test", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    (received,) = wait_received(plain)
    assert not received.tls
    (event,) = wait_for(lambda: session_failures(gsmtp), what="the testing failure")
    assert event["mx"] == f"mx.{DOMAIN}[127.0.0.3]"
    assert event["failure"].startswith("STARTTLS not offered")


def test_testing_mode_with_a_good_certificate_logs_nothing(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    good = world.sink(sinks, "127.0.0.3", mx_port, f"mx.{DOMAIN}")
    world.publish(policy_text("testing", "other.elsewhere.test", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"])
    (received,) = wait_received(good)
    assert received.tls
    (delivered,) = wait_for(lambda: gsmtp.events("message_delivered"), what="the delivery")
    assert delivered["tls_verified"] is True  # the verified probe session carried it
    wait_for(lambda: gsmtp.events("mta_sts_policy_fetched", domain=DOMAIN, mode="testing"))
    assert gsmtp.events("mta_sts_testing_failure") == []


def test_a_new_id_fetches_the_policy_again(sts_relay, world, sinks, mx_port) -> None:  # type: ignore[no-untyped-def]
    unlisted = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    listed = world.sink(sinks, "127.0.0.3", mx_port, f"mx.{DOMAIN}")
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    gsmtp = sts_relay()
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"], subject="one")
    send(gsmtp, "jones@foo.com", [f"b@{DOMAIN}"], subject="two")
    wait_received(listed, 2)
    assert len(world.web.requests) == 1  # the same id: the cached policy
    world.publish(policy_text("enforce", "other.elsewhere.test"))
    world.announce("2")
    send(gsmtp, "jones@foo.com", [f"c@{DOMAIN}"], subject="three")
    (received,) = wait_received(unlisted)
    assert received.recipients == [f"c@{DOMAIN}"]
    assert len(world.web.requests) == 2 and len(listed.received) == 2


def test_the_cached_policy_holds_while_the_policy_server_is_down(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    unlisted = world.sink(sinks, "127.0.0.2", mx_port, "other.elsewhere.test")
    listed = world.sink(sinks, "127.0.0.3", mx_port, f"mx.{DOMAIN}")
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    gsmtp = sts_relay(connection_reuse=1)  # no idle session to mx.sts.test to fall back on
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"], subject="one")
    wait_received(listed)
    world.web.stop()
    world.announce("2")  # a new id, and its policy cannot be fetched
    send(gsmtp, "jones@foo.com", [f"b@{DOMAIN}"], subject="two")
    wait_received(listed, 2)
    assert connections(unlisted) == 0
    (failed,) = wait_for(lambda: gsmtp.events("mta_sts_fetch_failed", domain=DOMAIN))
    assert failed["id"] == "2" and failed["cached_id"] == "1"


# -- the HTTPS fetch on its own ---------------------------------------------------------------


class Addresses:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def addresses(self, host: str) -> list[str]:
        return self.table.get(host, [])


@pytest.fixture
def fetcher(world: World) -> HttpsFetcher:
    resolver = Addresses({POLICY_HOST: [WEB_ADDRESS], "mta-sts.other.test": [WEB_ADDRESS]})
    return HttpsFetcher(
        resolver, verified_context(str(world.ca.ca)), port=world.web_port, timeout=5
    )


def test_fetch_returns_the_policy(world: World, fetcher: HttpsFetcher) -> None:
    world.publish(b"version: STSv1\r\n")
    assert fetcher.fetch(DOMAIN) == b"version: STSv1\r\n"


def test_fetch_follows_no_redirect(world: World, fetcher: HttpsFetcher) -> None:
    world.web.redirect = f"https://{POLICY_HOST}/elsewhere.txt"
    with pytest.raises(FetchError, match="HTTP 301"):
        fetcher.fetch(DOMAIN)
    assert len(world.web.requests) == 1


def test_fetch_wants_text_plain(world: World, fetcher: HttpsFetcher) -> None:
    world.publish(b"version: STSv1\r\n")
    world.web.content_type = "text/html"
    with pytest.raises(FetchError, match="text/html"):
        fetcher.fetch(DOMAIN)


def test_fetch_refuses_more_than_64_kib(world: World, fetcher: HttpsFetcher) -> None:
    world.publish(b"x" * (64 * 1024 + 1))
    with pytest.raises(FetchError, match="larger than 65536 bytes"):
        fetcher.fetch(DOMAIN)
    world.publish(b"x" * (64 * 1024))
    assert len(fetcher.fetch(DOMAIN)) == 64 * 1024


def test_fetch_verifies_the_certificate_name(world: World, fetcher: HttpsFetcher) -> None:
    world.web.files[("mta-sts.other.test", POLICY_PATH)] = b"version: STSv1\r\n"
    with pytest.raises(FetchError, match="certificate verify failed"):
        fetcher.fetch("other.test")  # served with mta-sts.sts.test's certificate


def test_a_session_opened_without_verification_is_not_reused_under_enforce(
    sts_relay, world, sinks, mx_port
) -> None:  # type: ignore[no-untyped-def]
    # Only mx.sts.test answers, with a certificate for another name: fine under mode
    # none (opportunistic TLS), and its session stays open for reuse...
    impostor = world.sink(sinks, "127.0.0.3", mx_port, "impostor.test")
    world.publish(policy_text("none"))
    gsmtp = sts_relay(connection_idle="1m")
    send(gsmtp, "jones@foo.com", [f"a@{DOMAIN}"], subject="one")
    wait_received(impostor)
    # ...but once the domain enforces, that session must not carry its mail.
    world.publish(policy_text("enforce", f"mx.{DOMAIN}"))
    world.announce("2")
    send(gsmtp, "jones@foo.com", [f"b@{DOMAIN}"], subject="two")
    error = wait_for(lambda: last_error(gsmtp), what="the deferral")
    assert "certificate not trusted" in error
    assert len(impostor.received) == 1


def trickling_policy_server(
    ca: TestCertificateAuthority, port: int, *, tls: bool
) -> threading.Thread:
    """One connection on WEB_ADDRESS:port: with `tls`, a complete handshake and then a
    response head trickled a byte at a time before a good policy; without, a handshake
    record trickled a byte at a time and then the end of the connection."""
    listener = socket.create_server((WEB_ADDRESS, port))
    context = tls_context_for(*ca.issue(POLICY_HOST))

    def serve() -> None:
        with listener:
            raw, _ = listener.accept()
        with raw, contextlib.suppress(OSError):  # the client hangs up when its time is up
            if not tls:
                raw.sendall(b"\x16\x03\x03\x40\x00")
                for _ in range(100):
                    raw.sendall(b"\x00")
                    time.sleep(0.02)
                return
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(100):
                    conn.sendall(b"a")
                    time.sleep(0.02)
                conn.sendall(b"\r\nContent-Type: text/plain\r\n\r\n" + policy_text("none"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("tls", [True, False], ids=["slow-response-head", "slow-handshake"])
def test_the_fetch_timeout_bounds_the_whole_fetch(tmp_path: Path, tls: bool) -> None:
    """A policy server sending a byte at a time cannot hold the fetch (and the domain's
    lock, and a delivery slot) past its timeout: every read of the handshake and the
    response is given what is left of it, not a fresh per-read timeout. (Without that,
    the slow head here ends in a good policy, the slow handshake in an EOF.)"""
    ca = TestCertificateAuthority(tmp_path / "ca")
    port = free_port(WEB_ADDRESS)
    server = trickling_policy_server(ca, port, tls=tls)
    fetcher = HttpsFetcher(
        Addresses({POLICY_HOST: [WEB_ADDRESS]}),
        verified_context(str(ca.ca)),
        port=port,
        timeout=30,
        clock=CountingClock(),
    )
    with pytest.raises(FetchError, match="timed out"):
        fetcher.fetch(DOMAIN)
    server.join(timeout=10)
