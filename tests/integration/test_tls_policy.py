"""Inbound TLS policy (S-10): Mozilla "intermediate" (AEAD only on TLS 1.2),
`tls.min_version`, and a renewed certificate loaded by SIGHUP for new handshakes."""

from __future__ import annotations

import hashlib
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment_has,
    self_signed_certificate,
    wait_for,
)


def client_context(
    ciphers: str | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if ciphers:
        context.set_ciphers(f"{ciphers}:@SECLEVEL=0")  # offer exactly this suite
    if maximum:
        context.maximum_version = maximum
    return context


def starttls(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    """EHLO, STARTTLS, handshake; raises ssl.SSLError / OSError if it is refused."""
    wire = SmtpWire(port)
    wire.read_reply()
    wire.send(b"EHLO c.example\r\n")
    assert any("STARTTLS" in line for line in wire.read_reply())
    wire.send(b"STARTTLS\r\n")
    assert wire.read_reply()[0].startswith("220")
    return context.wrap_socket(wire.sock)


def fingerprint_of(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def served_fingerprint(port: int) -> str:
    with starttls(port, client_context()) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()


def make_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    directory = tmp_path / name
    directory.mkdir()
    return self_signed_certificate(directory, "mx.foo.com")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """The files the server is configured with (copies of pair "a")."""
    cert, key = make_pair(tmp_path, "a")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(cert, live / "cert.pem")
    shutil.copy(key, live / "key.pem")
    return live / "cert.pem", live / "key.pem"


def tls_server(gsmtp_factory, pair: tuple[Path, Path], **tls: str) -> GsmtpProcess:  # type: ignore[no-untyped-def]
    cert, key = pair
    return gsmtp_factory({"tls": {"cert": str(cert), "key": str(key), **tls}})  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def intermediate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GsmtpProcess]:
    """One server with the default TLS settings for the cipher tests (read-only)."""
    directory = tmp_path_factory.mktemp("intermediate")
    cert, key = self_signed_certificate(directory, "mx.foo.com")
    gsmtp = GsmtpProcess(directory, {"tls": {"cert": str(cert), "key": str(key)}})
    gsmtp.start()
    yield gsmtp
    gsmtp.stop()


CBC_SUITES = [
    "ECDHE-RSA-AES128-SHA256",  # accepted by Python's default server list before
    "ECDHE-RSA-AES256-SHA384",
    "ECDHE-RSA-AES128-SHA",
    "AES128-SHA",
    "AES256-GCM-SHA384",  # AEAD, but static RSA key exchange (no forward secrecy)
]


@pytest.mark.parametrize("suite", CBC_SUITES)
def test_tls12_without_aead_and_ecdhe_is_refused(intermediate: GsmtpProcess, suite: str) -> None:
    gsmtp = intermediate
    with pytest.raises((ssl.SSLError, OSError)):
        starttls(gsmtp.port, client_context(suite, ssl.TLSVersion.TLSv1_2)).close()
    with SmtpWire(gsmtp.port) as wire:  # the server lives on
        assert wire.read_reply()[0].startswith("220")


@pytest.mark.parametrize(
    "suite",
    ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"],
)
def test_tls12_with_an_aead_suite_works(intermediate: GsmtpProcess, suite: str) -> None:
    gsmtp = intermediate
    with starttls(gsmtp.port, client_context(suite, ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"
        assert tls.cipher()[0] == suite  # type: ignore[index]
        tls.sendall(b"NOOP\r\n")
        assert tls.recv(100).startswith(b"250")


@pytest.mark.skipif(not environment_has("openssl"), reason="openssl is not installed")
def test_openssl_s_client_with_a_cbc_suite_is_refused(intermediate: GsmtpProcess) -> None:
    gsmtp = intermediate

    def s_client(*options: str) -> str:
        address = f"127.0.0.1:{gsmtp.port}"
        result = subprocess.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect", address, *options],
            input=b"",
            capture_output=True,
            timeout=30,
        )
        return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")

    assert "Cipher is (NONE)" in s_client("-tls1_2", "-cipher", "AES128-SHA")
    assert "Cipher is (NONE)" in s_client("-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA256")
    assert "Cipher is ECDHE-RSA-AES128-GCM-SHA256" in s_client(
        "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"
    )
    assert "Cipher is (NONE)" in s_client("-tls1_1")


def test_min_version_tls13_refuses_a_tls12_client(gsmtp_factory, pair) -> None:  # type: ignore[no-untyped-def]
    gsmtp = tls_server(gsmtp_factory, pair, min_version="TLSv1.3")
    with pytest.raises((ssl.SSLError, OSError)):
        starttls(gsmtp.port, client_context(maximum=ssl.TLSVersion.TLSv1_2)).close()
    with starttls(gsmtp.port, client_context()) as tls:
        assert tls.version() == "TLSv1.3"


def test_sighup_loads_a_renewed_certificate_for_new_handshakes(
    gsmtp_factory, pair, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gsmtp = tls_server(gsmtp_factory, pair)
    cert, key = pair
    old = fingerprint_of(cert)
    assert served_fingerprint(gsmtp.port) == old
    with starttls(gsmtp.port, client_context()) as before:  # a session already in TLS
        renewed_cert, renewed_key = make_pair(tmp_path, "b")
        shutil.copy(renewed_cert, cert)  # certbot-style renewal in place
        shutil.copy(renewed_key, key)
        gsmtp.signal(signal.SIGHUP)
        wait_for(lambda: "tls_reloaded" in gsmtp.log(), what="the reload in the log")
        assert served_fingerprint(gsmtp.port) == fingerprint_of(renewed_cert) != old
        before.sendall(b"NOOP\r\n")  # keeps working on its old certificate
        assert before.recv(100).startswith(b"250")
    assert fingerprint_of(renewed_cert) in gsmtp.log()


def test_sighup_with_a_broken_pair_keeps_the_old_certificate(
    gsmtp_factory, pair, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    gsmtp = tls_server(gsmtp_factory, pair)
    cert, _ = pair
    old = fingerprint_of(cert)
    other_cert, _ = make_pair(tmp_path, "other")
    shutil.copy(other_cert, cert)  # the certificate renewed, the key not: a mismatch
    gsmtp.signal(signal.SIGHUP)
    (failed,) = wait_for(lambda: gsmtp.events("reload_failed"), what="the failure in the log")
    assert failed["level"] == "error"
    assert served_fingerprint(gsmtp.port) == old
    metrics = wait_for(lambda: _scrape(gsmtp), what="/metrics")
    assert 'gsmtp_reloads_total{outcome="failed"} 1.0' in metrics
    assert "gsmtp_config_last_reload_successful 0.0" in metrics


def _scrape(gsmtp: GsmtpProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{gsmtp.metrics_port}/metrics") as response:
        return str(response.read().decode())
