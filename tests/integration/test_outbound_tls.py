"""Outbound TLS policy and smarthost AUTH against real parts: dnsmasq for MX and A
records, aiosmtpd sinks with certificates from a throw-away CA (trusted through
`delivery.ca_file`), and scripted peers that strip or refuse STARTTLS.

`verify` never sends in plaintext nor to a certificate not valid for the MX host name,
`encrypt` takes any certificate but not plaintext, the per-domain table overrides
`delivery.tls`; a smarthost gets AUTH over STARTTLS or implicit TLS, a wrong password
defers naming the smarthost and the destination backs off; a credentials file others
may read stops the start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Factory
from tests.integration.harness import GsmtpProcess, TestCertificateAuthority, wait_for
from tests.integration.remote import (
    Conversation,
    Dnsmasq,
    ScriptedPeer,
    Sink,
    accept_transaction,
    ehlo_reply,
    first_attempt,
    password_authenticator,
    recipient_row,
    self_signed_context,
    send,
    start_peer,
    start_sink,
    wait_received,
)

MX = "mx.verify.test"
SMARTHOST = "smtp.relay.test"
RECORDS = [
    f"--mx-host=verify.test,{MX},10",
    f"--host-record={MX},127.0.0.2",
    "--mx-host=plain.test,mx.plain.test,10",
    "--host-record=mx.plain.test,127.0.0.3",
    f"--host-record={SMARTHOST},127.0.0.5",
]
USER, PASSWORD = "relay-user", "s3cret:with colon"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[Dnsmasq]:
    """This module's zones (overrides conftest's, which the `relay` fixture uses)."""
    server = Dnsmasq(RECORDS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCertificateAuthority:
    return TestCertificateAuthority(tmp_path_factory.mktemp("ca"))


def plaintext_peer(peers: list[ScriptedPeer], host: str, port: int, starttls: str) -> ScriptedPeer:
    """A peer that never does TLS: STARTTLS stripped from EHLO ("stripped"), or offered
    and answered 454 ("refused"); it takes a message in plaintext from anyone."""

    def script(conversation: Conversation) -> None:
        conversation.reply("220 peer.test ESMTP\r\n")
        assert conversation.read_line().startswith("EHLO ")
        offered = ["STARTTLS"] if starttls == "refused" else []
        conversation.reply(ehlo_reply(*offered, "8BITMIME"))
        if starttls == "refused":
            assert conversation.read_line() == "STARTTLS"
            conversation.reply("454 4.7.0 TLS not available now\r\n")
        accept_transaction(conversation)

    return start_peer(peers, host, port, script)


def failures(gsmtp: GsmtpProcess, reason: str) -> float | None:
    return gsmtp.metrics().get(f'gsmtp_tls_policy_failures_total{{reason="{reason}"}}')


# -- per-destination levels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("starttls", "reason", "text"),
    [
        (
            "stripped",
            "starttls_not_offered",
            "451 4.7.4 mx.verify.test[127.0.0.2]: STARTTLS not offered",
        ),
        (
            "refused",
            "starttls_refused",
            "451 4.7.4 mx.verify.test[127.0.0.2]: STARTTLS refused (454",
        ),
    ],
)
@pytest.mark.parametrize("level", ["verify", "encrypt"])
def test_tls_required_never_falls_back_to_plaintext(  # type: ignore[no-untyped-def]
    relay, peers, mx_port: int, level: str, starttls: str, reason: str, text: str
) -> None:
    """A peer (or a man in the middle) strips STARTTLS or refuses it: under `verify` and
    `encrypt` nothing but EHLO is sent, the message stays queued with a reason that
    says why, and the failure is counted."""
    peer = plaintext_peer(peers, "127.0.0.2", mx_port, starttls)
    gsmtp = relay(tls=level, retry=["1h"])
    send(gsmtp, "jones@foo.com", ["a@verify.test"])
    status, _, error = first_attempt(gsmtp, "a@verify.test")
    assert status == "queued"
    assert error.startswith(text), error
    assert f"TLS is required ({level}, default)" in error
    (conversation,) = peer.conversations
    wait_for(conversation.finished.is_set, what="the peer's connection closed")
    expected = ["EHLO mx.foo.com", *(["STARTTLS"] if starttls == "refused" else [])]
    assert conversation.commands == expected  # no MAIL, no data: never in plaintext
    assert failures(gsmtp, reason) == 1.0
    assert gsmtp.events("message_delivered") == []


@pytest.mark.parametrize(
    ("certificate", "why"),
    [("wrong name", "Hostname mismatch"), ("unknown CA", "self-signed certificate")],
)
def test_verify_refuses_a_certificate_not_valid_for_the_mx_name(  # type: ignore[no-untyped-def]
    relay,
    sinks,
    mx_port: int,
    ca: TestCertificateAuthority,
    tmp_path: Path,
    certificate: str,
    why: str,
) -> None:
    """`verify`: a certificate from the trusted CA but for another name, or one for the
    right name from an unknown issuer: deferred, and the sink never sees MAIL."""
    if certificate == "wrong name":
        context = ca.server_context("wrong.test")
    else:
        context = self_signed_context(tmp_path)  # CN sink.test, no CA we trust
    sink = start_sink(sinks, "127.0.0.2", mx_port, tls_context=context)
    gsmtp = relay(tls="verify", ca_file=str(ca.ca), retry=["1h"])
    send(gsmtp, "jones@foo.com", ["a@verify.test"])
    status, _, error = first_attempt(gsmtp, "a@verify.test")
    assert status == "queued"
    assert error.startswith(f"451 4.7.5 {MX}[127.0.0.2]: certificate not trusted for {MX}"), error
    assert why in error
    assert sink.received == [] and sink.commands == []
    assert failures(gsmtp, "certificate_unverified") == 1.0


def test_verify_delivers_to_a_certificate_valid_for_the_mx_name(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int, ca: TestCertificateAuthority
) -> None:
    sink = start_sink(sinks, "127.0.0.2", mx_port, tls_context=ca.server_context(MX))
    gsmtp = relay(tls="verify", ca_file=str(ca.ca))
    send(gsmtp, "jones@foo.com", ["a@verify.test"])
    (received,) = wait_received(sink)
    assert received.tls is True
    (delivered,) = wait_for(lambda: gsmtp.events("message_delivered"), what="the log")
    assert delivered["tls_verified"] is True
    assert delivered["tls_version"] in ("TLSv1.2", "TLSv1.3")
    metrics = gsmtp.metrics()
    assert metrics['gsmtp_outbound_tls_total{level="verified"}'] == 1.0
    assert metrics['gsmtp_outbound_tls_total{level="none"}'] == 0.0  # pre-initialised
    assert failures(gsmtp, "handshake_failed") == 0.0


def test_encrypt_takes_any_certificate(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int, tmp_path: Path
) -> None:
    sink = start_sink(sinks, "127.0.0.2", mx_port, tls_context=self_signed_context(tmp_path))
    gsmtp = relay(tls="encrypt")
    send(gsmtp, "jones@foo.com", ["a@verify.test"])
    (received,) = wait_received(sink)
    assert received.tls is True
    (delivered,) = wait_for(lambda: gsmtp.events("message_delivered"), what="the log")
    assert delivered["tls_verified"] is False and delivered["tls_version"]
    assert gsmtp.metrics()['gsmtp_outbound_tls_total{level="tls"}'] == 1.0


def test_the_policy_table_overrides_delivery_tls_per_domain(  # type: ignore[no-untyped-def]
    relay, peers, sinks, mx_port: int, tmp_path: Path
) -> None:
    """`tls = "may"`; the table raises verify.test to `verify` (its peer strips
    STARTTLS: deferred) and lowers plain.test to `none` (its peer offers STARTTLS, which
    is not used)."""
    plaintext_peer(peers, "127.0.0.2", mx_port, "stripped")
    sink = start_sink(sinks, "127.0.0.3", mx_port, tls_context=self_signed_context(tmp_path))
    gsmtp = relay(tls_policy={"verify.test": "verify", "Plain.Test": "none"}, retry=["1h"])
    send(gsmtp, "jones@foo.com", ["a@verify.test", "b@plain.test"])
    (received,) = wait_received(sink)
    assert received.tls is False and received.recipients == ["b@plain.test"]
    status, _, error = first_attempt(gsmtp, "a@verify.test")
    assert status == "queued"
    assert "TLS is required (verify, policy table)" in error


# -- the smarthost ----------------------------------------------------------------------


def auth_file(directory: Path, password: str = PASSWORD, mode: int = 0o600) -> Path:
    path = directory / "smarthost.auth"
    path.write_text(f"{USER}:{password}\n")
    path.chmod(mode)
    return path


def auth_sink(
    sinks: dict[str, Sink], port: int, ca: TestCertificateAuthority, *, implicit: bool = False
) -> Sink:
    """A smarthost on 127.0.0.5 that refuses MAIL before AUTH and AUTH before TLS, with
    a certificate for its name from the test CA."""
    context = ca.server_context(SMARTHOST)
    tls: dict[str, Any] = {"ssl_context": context} if implicit else {"tls_context": context}
    return start_sink(
        sinks,
        "127.0.0.5",
        port,
        auth_required=True,
        # aiosmtpd counts only STARTTLS as TLS; on implicit TLS every command is over TLS.
        auth_require_tls=not implicit,
        authenticator=password_authenticator(USER, PASSWORD),
        **tls,
    )


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_smarthost_auth_over_verified_tls(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int, ca: TestCertificateAuthority, tmp_path: Path, implicit: bool
) -> None:
    sink = auth_sink(sinks, mx_port, ca, implicit=implicit)
    settings: dict[str, Any] = {"smarthost_tls": "implicit"} if implicit else {}
    gsmtp = relay(
        smarthost=f"{SMARTHOST}:{mx_port}",
        smarthost_auth_file=str(auth_file(tmp_path)),
        ca_file=str(ca.ca),
        **settings,
    )
    send(gsmtp, "jones@foo.com", ["a@verify.test", "b@plain.test"])
    received = wait_received(sink, count=2)
    assert all(r.tls and r.login == USER for r in received)
    # Log lines are written in batches: the sink can have both before the log does.
    (delivered, _) = wait_for(
        lambda: len(found := gsmtp.events("message_delivered")) == 2 and found,
        what="both deliveries in the log",
    )
    assert delivered["tls_verified"] is True
    assert PASSWORD not in gsmtp.log()


def test_smarthost_wrong_password_defers_naming_it_and_backs_off(  # type: ignore[no-untyped-def]
    relay, sinks, mx_port: int, ca: TestCertificateAuthority, tmp_path: Path
) -> None:
    """535: deferred with a reason naming the smarthost; the destination is dead until
    its retry time, so the next message for it is deferred without logging in again,
    and so is one for another domain (the same smarthost, the same password)."""
    sink = auth_sink(sinks, mx_port, ca)
    gsmtp = relay(
        smarthost=f"{SMARTHOST}:{mx_port}",
        smarthost_auth_file=str(auth_file(tmp_path, password="wr0ng-Pa55")),
        ca_file=str(ca.ca),
        retry=["1h"],
    )
    send(gsmtp, "jones@foo.com", ["a@verify.test"], subject="first")
    status, _, error = first_attempt(gsmtp, "a@verify.test")
    assert status == "queued"
    assert error.startswith(
        f"451 4.7.8 smarthost [{SMARTHOST}]:{mx_port} refused our credentials: 535"
    ), error
    wait_for(lambda: gsmtp.events("destination_dead"), what="the destination declared dead")
    send(gsmtp, "jones@foo.com", ["b@verify.test"], subject="second")
    _, _, second = wait_for(
        lambda: (row := recipient_row(gsmtp, "b@verify.test")) and row[2] and row,
        what="the second message deferred",
    )
    assert "delivery temporarily suspended" in second and "refused our credentials" in second
    send(gsmtp, "jones@foo.com", ["c@plain.test"], subject="third")
    _, _, third = first_attempt(gsmtp, "c@plain.test")
    assert third.startswith(f"451 4.7.8 smarthost [{SMARTHOST}]:{mx_port} refused our"), third
    assert sum(verbs.count("AUTH") for verbs in sink.verbs()) == 1
    assert sink.received == []
    assert "wr0ng-Pa55" not in gsmtp.log()  # the password is never logged


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_an_auth_file_others_may_read_stops_the_start(  # type: ignore[no-untyped-def]
    gsmtp_factory: Factory, tmp_path: Path, mode: int
) -> None:
    path = auth_file(tmp_path, mode=mode)
    gsmtp = gsmtp_factory(
        {"delivery": {"smarthost": "127.0.0.5:2525", "smarthost_auth_file": str(path)}},
        start=False,
    )
    for command in ("serve", "check-config"):
        result = gsmtp.cli(command, check=False)
        assert result.returncode == 1, (command, result)
        assert f"[delivery] smarthost_auth_file: {path}: mode 0{mode:o}" in result.stderr
        assert "chmod 600" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_ca_file_that_does_not_load_stops_the_start(
    gsmtp_factory: Factory, tmp_path: Path
) -> None:
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate\n")
    gsmtp = gsmtp_factory({"delivery": {"ca_file": str(path)}}, start=False)
    for command in ("serve", "check-config"):
        result = gsmtp.cli(command, check=False)
        assert result.returncode == 1, (command, result)
        assert f"[delivery] ca_file: {path}: cannot load CA certificates" in result.stderr
        assert "Traceback" not in result.stderr
