"""Inbound STARTTLS (offered when [tls] cert and key are set): RFC 3207."""

from __future__ import annotations

import smtplib
import socket
import ssl
from pathlib import Path

import pytest

from tests.integration.harness import GsmtpProcess, self_signed_certificate, wait_for


@pytest.fixture
def tls_gsmtp(gsmtp_factory, tmp_path: Path) -> GsmtpProcess:  # type: ignore[no-untyped-def]
    cert, key = self_signed_certificate(tmp_path, "mx.foo.com")
    return gsmtp_factory({"tls": {"cert": str(cert), "key": str(key)}})  # type: ignore[no-any-return]


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_starttls_is_offered_and_mail_flows_over_it(tls_gsmtp: GsmtpProcess) -> None:
    with smtplib.SMTP("127.0.0.1", tls_gsmtp.port, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_context())
        client.ehlo()
        assert not client.has_extn("starttls")  # not offered twice
        client.sendmail("a@remote.example", ["jones@foo.com"], "Subject: tls\r\n\r\nsecret\r\n")
    (file,) = wait_for(lambda: tls_gsmtp.maildir_files("jones@foo.com"), what="delivery")
    assert b"with ESMTPS id" in file.read_bytes()


def test_plaintext_sent_with_starttls_is_discarded(tls_gsmtp: GsmtpProcess) -> None:
    """P-57 (CVE-2011-0411): commands pipelined behind STARTTLS never run inside TLS,
    and P-58: the session starts over (MAIL before EHLO is refused)."""
    raw = socket.create_connection(("127.0.0.1", tls_gsmtp.port), timeout=10)
    raw.recv(1024)
    raw.sendall(b"EHLO c.example\r\n")
    assert b"STARTTLS" in raw.recv(4096)
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.example>\r\n")
    assert raw.recv(1024).startswith(b"220")
    tls = client_context().wrap_socket(raw)
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(1024).startswith(b"250 2.0.0")  # the first reply is the NOOP's
    tls.sendall(b"MAIL FROM:<a@remote.example>\r\n")
    assert tls.recv(1024).startswith(b"503 5.5.1")
    tls.close()


def test_starttls_inside_a_transaction_and_a_second_starttls_get_503(
    tls_gsmtp: GsmtpProcess,
) -> None:
    """RFC 3207 §4: STARTTLS only outside a transaction (503, and the transaction
    stands), and only once: under TLS it is neither offered nor accepted."""
    with smtplib.SMTP("127.0.0.1", tls_gsmtp.port, timeout=10) as client:
        client.ehlo()
        assert client.docmd("MAIL FROM:<a@remote.example>")[0] == 250
        code, text = client.docmd("STARTTLS")
        assert (code, text[:5]) == (503, b"5.5.1")
        assert client.docmd("RCPT TO:<jones@foo.com>")[0] == 250  # still in the transaction
        assert client.docmd("RSET")[0] == 250
        client.starttls(context=client_context())
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS") == (503, b"5.5.1 TLS already active")
        client.sendmail("a@remote.example", ["jones@foo.com"], "Subject: once\r\n\r\nx\r\n")
    (file,) = wait_for(lambda: tls_gsmtp.maildir_files("jones@foo.com"), what="delivery")
    assert b"with ESMTPS id" in file.read_bytes()
