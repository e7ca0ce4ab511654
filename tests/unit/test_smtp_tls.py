"""The SMTP deliverer's TLS against real sockets: aiosmtpd sinks on 127.0.1.x with
certificates from a throw-away CA, the deliverer called directly with a requirement
source the test changes between messages (as an MTA-STS policy appears).

What is checked here needs a requirement that changes while sessions are cached, or
MX patterns, which a gsmtp process cannot be given without MTA-STS: a session opened
under `may` never carries mail that needs `verify`; only MX hosts matching the
patterns are used; AUTH (PLAIN or LOGIN) only over TLS."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult
from prometheus_client import REGISTRY

from gsmtp.delivery.smarthost import Credentials, Smarthost
from gsmtp.delivery.smtp import SmtpDeliverer, Timeouts
from gsmtp.delivery.smtp_session import AttemptExpired, Connection, Deadline
from gsmtp.delivery.tls_client import ClientTls, unverified_context
from gsmtp.delivery.tls_levels import TlsLevel, TlsRequirement
from gsmtp.delivery.tls_policy import TlsPolicy
from gsmtp.message import MessageId, Outcome, QueuedMessage, RecipientResult
from tests.integration.harness import CountingClock, TestCertificateAuthority
from tests.integration.remote import Sink, password_authenticator
from tests.unit.test_smtp_deliverer import StaticResolver

MESSAGE = QueuedMessage(
    MessageId("M1"), "bob@here.example", b"Subject: hi\r\n\r\nbody\r\n", 0.0, False
)
MX1, MX2 = "mx1.dest.example", "mx2.dest.example"
RESOLVER = StaticResolver({"dest.example": [MX1, MX2]}, {MX1: ["127.0.1.1"], MX2: ["127.0.1.2"]})


class Switch:
    """A requirement source whose answer the test sets."""

    def __init__(self) -> None:
        self.answer: TlsRequirement | None = None

    def requirement(self, domain: str) -> TlsRequirement | None:
        return self.answer


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCertificateAuthority:
    return TestCertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def sinks() -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        sink.stop()


def tls_sink(
    sinks: list[Sink],
    host: str,
    port: int,
    ca: TestCertificateAuthority,
    name: str,
    **options: object,
) -> Sink:
    sink = Sink(host, port, tls_context=ca.server_context(name), **options)  # type: ignore[arg-type]
    sinks.append(sink)
    return sink


def make(
    port: int, ca: TestCertificateAuthority, source: Switch, **kwargs: object
) -> SmtpDeliverer:
    return SmtpDeliverer(
        resolver=RESOLVER,
        helo_name="mx.here.example",
        port=port,
        timeouts=Timeouts(connect=2, command=5, data=5),
        tls_policy=TlsPolicy(TlsLevel.MAY, sources=[source]),
        client_tls=ClientTls(str(ca.ca)),
        connection_reuse=100,
        connection_idle=30.0,
        **kwargs,  # type: ignore[arg-type]
    )


def deliver(deliverer: SmtpDeliverer, recipient: str = "a@dest.example") -> RecipientResult:
    (result,) = deliverer.deliver(MESSAGE, [recipient])
    return result


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_may_session_is_not_reused_for_mail_that_needs_verify(
    sinks: list[Sink], port: int, ca: TestCertificateAuthority
) -> None:
    """Opened under `may` (TLS, nothing verified), the idle session is passed over once
    the destination demands `verify`: a new, verified session carries that message.
    The verified one then carries later mail, `verify` or `may` (stricter is fine)."""
    sink = tls_sink(sinks, "127.0.1.1", port, ca, MX1)
    switch = Switch()
    deliverer = make(port, ca, switch)
    first = deliver(deliverer)
    assert (first.outcome, first.tls_verified) == (Outcome.DELIVERED, False)
    assert first.tls_version  # TLS, but unverified
    switch.answer = TlsRequirement(TlsLevel.VERIFY, "mta-sts", (MX1,))
    second = deliver(deliverer)
    assert (second.outcome, second.tls_verified) == (Outcome.DELIVERED, True)
    assert len(sink.transcripts) == 2  # a new connection for the verify mail
    assert deliver(deliverer).tls_verified is True  # reused: verified carries verify
    switch.answer = None
    assert deliver(deliverer).tls_verified is True  # and may mail too
    assert len(sink.transcripts) == 2
    assert [v.count("DATA") for v in sink.verbs()] == [1, 3]
    deliverer.close()


def test_only_mx_hosts_matching_the_patterns_are_used(
    sinks: list[Sink], port: int, ca: TestCertificateAuthority
) -> None:
    first = tls_sink(sinks, "127.0.1.1", port, ca, MX1)
    second = tls_sink(sinks, "127.0.1.2", port, ca, MX2)
    switch = Switch()
    switch.answer = TlsRequirement(TlsLevel.VERIFY, "mta-sts", (MX2,))
    result = deliver(make(port, ca, switch))
    assert (result.outcome, result.remote_mta) == (Outcome.DELIVERED, MX2)
    assert first.transcripts == [] and len(second.received) == 1
    switch.answer = TlsRequirement(TlsLevel.VERIFY, "mta-sts", ("*.dest.example",))
    assert deliver(make(port, ca, switch)).remote_mta == MX1  # the best MX matches now


def test_no_matching_mx_host_defers_without_connecting(
    sinks: list[Sink], port: int, ca: TestCertificateAuthority
) -> None:
    sink = tls_sink(sinks, "127.0.1.1", port, ca, MX1)
    switch = Switch()
    switch.answer = TlsRequirement(TlsLevel.VERIFY, "mta-sts", ("mx.elsewhere.example",))
    before = counted("gsmtp_tls_policy_failures_total", reason="mx_not_allowed")
    result = deliver(make(port, ca, switch))
    assert (result.outcome, result.status) == (Outcome.DEFERRED, "4.7.5")
    assert result.reply == (
        f"451 4.7.5 no MX host of dest.example ({MX1}, {MX2}) matches its mta-sts "
        "policy (mx.elsewhere.example)"
    )
    assert sink.transcripts == []
    assert counted("gsmtp_tls_policy_failures_total", reason="mx_not_allowed") == before + 1


def smarthost(port: int, level: TlsLevel, password: str = "secret") -> Smarthost:
    return Smarthost(MX1, port, level, credentials=Credentials("user", password))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_at_the_smarthost_with_plain_or_login(
    sinks: list[Sink], port: int, ca: TestCertificateAuthority, mechanism: str
) -> None:
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    sink = tls_sink(
        sinks,
        "127.0.1.1",
        port,
        ca,
        MX1,
        auth_required=True,
        authenticator=password_authenticator("user", "secret"),
        auth_exclude_mechanism=[other],
    )
    deliverer = make(port, ca, Switch(), smarthost=smarthost(port, TlsLevel.VERIFY))
    result = deliver(deliverer, "a@anywhere.example")
    assert result.outcome is Outcome.DELIVERED, result
    (received,) = sink.received
    assert received.login == "user" and received.tls


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_credentials_never_go_in_plaintext(sinks: list[Sink], port: int, tmp_path: Path) -> None:
    """`smarthost_tls = "may"` and a smarthost without STARTTLS that would take AUTH in
    plaintext: gsmtp does not send it, and defers."""
    sink = Sink(
        "127.0.1.1",
        port,
        auth_required=True,
        auth_require_tls=False,
        authenticator=password_authenticator("user", "secret"),
    )
    sinks.append(sink)
    deliverer = SmtpDeliverer(
        resolver=RESOLVER,
        helo_name="mx.here.example",
        timeouts=Timeouts(connect=2, command=5, data=5),
        smarthost=smarthost(port, TlsLevel.MAY),
    )
    result = deliver(deliverer, "a@anywhere.example")
    assert result.outcome is Outcome.DEFERRED
    assert "no TLS, so no AUTH" in result.reply
    assert [v for v in sink.verbs()[0] if v == "AUTH"] == []


def test_the_attempt_deadline_bounds_the_whole_tls_handshake() -> None:
    """A peer trickling its ServerHello a byte at a time gets no more than the attempt's
    time for the whole handshake: each wait is given what is left, not a fresh timeout.
    (Without that, the handshake runs until the peer gives up: here, an EOF.)"""
    ours, theirs = socket.socketpair()

    def trickle() -> None:
        with theirs, contextlib.suppress(OSError):  # we hang up when time is up
            theirs.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record announced
            for _ in range(100):
                theirs.sendall(b"\x00")
                time.sleep(0.02)

    peer = threading.Thread(target=trickle, daemon=True)
    peer.start()
    clock = CountingClock()
    connection = Connection(ours, Timeouts(command=1000), Deadline(clock, 30), clock)
    try:
        with pytest.raises(AttemptExpired):
            connection.start_tls(unverified_context(), "peer.example")
    finally:
        connection.close()
        peer.join(timeout=10)


def test_a_wrong_password_is_tried_once_by_deliveries_in_flight(
    sinks: list[Sink], port: int, ca: TestCertificateAuthority
) -> None:
    """Deliveries started together before any refusal (as `concurrency` sender greenlets
    do): until the credentials have worked, one session at a time logs in; when the
    smarthost refuses, the others defer with the same reason without trying."""
    logins: list[bytes] = []

    def refuse(
        server: object, session: object, envelope: object, mechanism: str, data: Any
    ) -> AuthResult:
        logins.append(data.password)
        return AuthResult(success=False, handled=False)

    tls_sink(sinks, "127.0.1.1", port, ca, MX1, auth_required=True, authenticator=refuse)
    deliverer = make(port, ca, Switch(), smarthost=smarthost(port, TlsLevel.VERIFY, "wrong"))
    start = threading.Barrier(5)
    results: list[RecipientResult] = []

    def one(number: int) -> None:
        start.wait()
        results.append(deliver(deliverer, f"a@d{number}.example"))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert logins == [b"wrong"]
    assert len(results) == 5
    assert {(r.outcome, r.status) for r in results} == {(Outcome.DEFERRED, "4.7.8")}
    assert all("refused our credentials" in r.reply and r.unreachable for r in results)
