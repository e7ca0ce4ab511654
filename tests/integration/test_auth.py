"""AUTH (RFC 4954) and submission (RFC 6409, RFC 8314) against a real gsmtp with real TLS.

The harness trusts 127.0.0.2/32 only; these clients connect from 127.0.0.1, so relaying
needs AUTH. Relayed mail goes to an aiosmtpd sink set as the smarthost."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest

from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment_has,
    free_port,
    self_signed_certificate,
    wait_for,
)
from tests.integration.remote import Sink, wait_received

PASSWORD = "Corr3ct-Horse-Battery"
WRONG = "Tr0ub4dor-and-3-wrong"


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.fixture
def sink() -> Iterator[Sink]:
    started = Sink("127.0.0.3", free_port("127.0.0.3"))
    yield started
    started.stop()


class AuthServer:
    """A started gsmtp with [tls], a 587-style and a 465-style submission listener, and
    jones@foo.com with PASSWORD."""

    def __init__(self, process: GsmtpProcess, submission: int, implicit: int) -> None:
        self.process = process
        self.port = process.port
        self.submission = submission
        self.implicit = implicit


@pytest.fixture
def make_server(
    gsmtp_factory: Callable[..., GsmtpProcess], sink: Sink, tmp_path: Path
) -> Callable[..., AuthServer]:
    cert, key = self_signed_certificate(tmp_path, "mx.foo.com")

    def make(**server: Any) -> AuthServer:
        submission, implicit = free_port(), free_port()
        process = gsmtp_factory(
            {
                "server": server,
                "tls": {"cert": str(cert), "key": str(key)},
                "submission": {
                    "listen": [f"127.0.0.1:{submission}"],
                    "tls_listen": [f"127.0.0.1:{implicit}"],
                },
                "delivery": {"smarthost": f"127.0.0.3:{sink.controller.port}"},
            },
            start=False,
        )
        process.cli("user", "passwd", "jones@foo.com", stdin=PASSWORD + "\n")
        process.start()
        return AuthServer(process, process.port_of(submission), process.port_of(implicit))

    return make


@pytest.fixture
def server(make_server: Callable[..., AuthServer]) -> AuthServer:
    return make_server()


def tls_wire(port: int) -> SmtpWire:
    """A raw client, after EHLO, STARTTLS and EHLO again."""
    wire = SmtpWire(port)
    assert wire.read_reply()[0].startswith("220")
    wire.command("EHLO c.example")
    assert wire.command("STARTTLS").startswith("220")
    wire.sock = client_context().wrap_socket(wire.sock)
    wire.command("EHLO c.example")
    return wire


def logged(process: GsmtpProcess, text: str) -> str:
    """The log once it contains `text` (lines are written out every 0.1 s)."""
    return wait_for(lambda: text in (log := process.log()) and log, what=f"{text} logged")  # type: ignore[no-any-return]


def plain(username: str, password: str) -> str:
    return base64.b64encode(f"\x00{username}\x00{password}".encode()).decode()


def starttls_client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    client.starttls(context=client_context())
    client.ehlo()
    return client


def test_relay_after_auth_from_an_untrusted_address(server: AuthServer, sink: Sink) -> None:
    """R-16 and issue item 5: an authenticated session relays; Received says ESMTPSA."""
    with starttls_client(server.port) as client:
        assert client.has_extn("auth") and "PLAIN" in client.esmtp_features["auth"]
        client.login("jones@foo.com", PASSWORD)
        client.sendmail("jones@foo.com", ["x@remote.example"], "Subject: out\r\n\r\nhi\r\n")
        client.rset()  # RSET keeps the authentication
        client.sendmail("jones@foo.com", ["y@remote.example"], "Subject: again\r\n\r\nhi\r\n")
    received = wait_received(sink, 2)
    assert sorted(r.recipients[0] for r in received) == ["x@remote.example", "y@remote.example"]
    assert all(b"(gsmtp) with ESMTPSA id " in r.data for r in received)
    log = logged(server.process, '"event":"auth_succeeded"')
    assert '"user":"jones@foo.com"' in log and PASSWORD not in log


def test_relay_is_refused_without_auth(server: AuthServer) -> None:
    with SmtpWire(server.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        assert wire.command("MAIL FROM:<jones@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<x@remote.example>").startswith("554 5.7.1")
    with tls_wire(server.port) as wire:
        assert wire.command("MAIL FROM:<jones@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<x@remote.example>").startswith("554 5.7.1")


def test_auth_is_not_offered_without_tls_on_port_25(server: AuthServer) -> None:
    """P-59: no AUTH in EHLO in cleartext, AUTH → 538 5.7.11 unchecked and unlogged;
    MAIL without AUTH still works on port 25 (RFC 3207 §4)."""
    with SmtpWire(server.port) as wire:
        wire.read_reply()
        wire.send(b"EHLO c.example\r\n")
        ehlo = wire.read_reply()
        assert any("STARTTLS" in line for line in ehlo)
        assert not any("AUTH" in line for line in ehlo)
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith(
            "538 5.7.11"
        )
        assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
        assert wire.command("RCPT TO:<brown@foo.com>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: plain\r\n\r\nno tls\r\n.\r\n")
        assert wire.read_reply()[-1].startswith("250")
    (file,) = wait_for(lambda: server.process.maildir_files("brown@foo.com"), what="delivery")
    assert b"with ESMTP id" in file.read_bytes()
    log = logged(server.process, '"event":"message_queued"')  # written after the AUTH
    assert "auth_failed" not in log and PASSWORD not in log


def test_wrong_password_is_535_and_logged_without_the_password(server: AuthServer) -> None:
    """P-60, S-09, S-12: 535 5.7.8, one `auth_failed` line with peer and username,
    never the password (neither in clear nor as the base64 the client sent)."""
    with tls_wire(server.port) as wire:
        started = time.monotonic()
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", WRONG)).startswith("535 5.7.8")
        assert time.monotonic() - started >= 1.0  # the tarpit after a failure (at least 1 s)
        assert wire.command("AUTH LOGIN").startswith("334")
        assert wire.command(base64.b64encode(b"ghost\x1b[2J@foo.com").decode()).startswith("334")
        assert wire.command(base64.b64encode(WRONG.encode()).decode()).startswith("535 5.7.8")
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
    log = wait_for(
        lambda: (text := server.process.log()).count('"event":"auth_failed"') == 2 and text,
        what="two auth_failed lines",
    )
    failed = [line for line in log.splitlines() if '"event":"auth_failed"' in line]
    # README's fail2ban failregex, with <HOST> as fail2ban fills it in.
    assert all(re.search(r'"peer":"127\.0\.0\.1".*"event":"auth_failed"', f) for f in failed)
    assert '"username":"jones@foo.com"' in failed[0]
    assert '"username":"ghost\\\\x1b[2J@foo.com"' in failed[1]  # escaped, one line
    for secret in (WRONG, PASSWORD, base64.b64encode(WRONG.encode()).decode()):
        assert secret not in log
    assert plain("jones@foo.com", WRONG) not in log


def test_the_failure_limit_gives_421_and_closes(make_server: Callable[..., AuthServer]) -> None:
    """S-09: past server.auth_failure_limit failures from the network in an hour, AUTH
    gets 421 4.7.0 and the connection closes, even with the right password."""
    server = make_server(auth_failure_limit=2)
    with tls_wire(server.port) as wire:
        for _ in range(2):
            assert wire.command("AUTH PLAIN " + plain("jones@foo.com", WRONG)).startswith("535")
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith(
            "421 4.7.0"
        )
        assert wire.read_reply() == []  # closed
    with tls_wire(server.submission) as wire:  # the limit is per network, every listener
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith(
            "421 4.7.0"
        )
    logged(server.process, '"event":"auth_blocked"')


def test_a_disabled_user_cannot_log_in_until_enabled(server: AuthServer) -> None:
    server.process.cli("user", "disable", "jones@foo.com")
    with tls_wire(server.port) as wire:
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith(
            "535 5.7.8"
        )
    logged(server.process, '"reason":"account disabled"')
    assert "disabled" in server.process.cli("user", "list").stdout
    server.process.cli("user", "enable", "jones@foo.com")
    with tls_wire(server.port) as wire:
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")


def test_disabling_cuts_an_open_session_off(server: AuthServer) -> None:
    with tls_wire(server.port) as wire:
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
        assert wire.command("MAIL FROM:<jones@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<x@remote.example>").startswith("250")
        server.process.cli("user", "disable", "jones@foo.com")
        assert wire.command("RCPT TO:<y@remote.example>").startswith("554 5.7.1")


def test_submission_rules(server: AuthServer, sink: Sink) -> None:
    """S-11 / RFC 6409: before STARTTLS only greeting verbs (530 5.7.0); after it, MAIL
    needs AUTH (530 5.7.0); after AUTH a foreign MAIL FROM gets 553 5.7.1 (R-17)."""
    with SmtpWire(server.submission) as wire:
        wire.read_reply()
        wire.send(b"EHLO c.example\r\n")
        assert not any("AUTH" in line for line in wire.read_reply())
        assert wire.command("MAIL FROM:<jones@foo.com>") == (
            "530 5.7.0 Must issue a STARTTLS command first"
        )
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("538")
    with tls_wire(server.submission) as wire:
        assert wire.command("MAIL FROM:<jones@foo.com>") == "530 5.7.0 Authentication required"
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
        assert wire.command("MAIL FROM:<brown@foo.com>").startswith("553 5.7.1")
        assert wire.command("MAIL FROM:<ceo@bank.example>").startswith("553 5.7.1")
        assert wire.command("MAIL FROM:<Jones@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<x@remote.example>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: submitted\r\n\r\nbody\r\n.\r\n")
        assert wire.read_reply()[-1].startswith("250")
    (received,) = wait_received(sink)
    assert received.sender == "Jones@foo.com" and b"with ESMTPSA" in received.data
    wait_for(lambda: "sender_rejected" in server.process.log(), what="sender_rejected logged")


def test_may_send_as(server: AuthServer) -> None:
    result = server.process.cli(
        "user", "modify", "jones@foo.com", "--may-send-as", "sales@foo.com",
        "--may-send-as", "@jones.example",
    )  # fmt: skip
    assert "sales@foo.com" in result.stdout
    with tls_wire(server.submission) as wire:
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
        for sender, code in [
            ("sales@foo.com", "250"),
            ("anyone@jones.example", "250"),
            ("brown@foo.com", "553 5.7.1"),
        ]:
            assert wire.command(f"MAIL FROM:<{sender}>").startswith(code), sender
            wire.command("RSET")
    server.process.cli("user", "modify", "jones@foo.com", "--no-may-send-as")
    with tls_wire(server.submission) as wire:
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
        assert wire.command("MAIL FROM:<sales@foo.com>").startswith("553 5.7.1")


def test_implicit_tls_submission(server: AuthServer) -> None:
    """RFC 8314: TLS from the first byte on the 465-style listener; LOGIN works too."""
    with smtplib.SMTP_SSL(
        "127.0.0.1", server.implicit, context=client_context(), timeout=10
    ) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.mail("jones@foo.com")[0] == 530
        client.user, client.password = "jones@foo.com", PASSWORD
        assert client.auth("LOGIN", client.auth_login)[0] == 235
        client.sendmail("jones@foo.com", ["brown@foo.com"], "Subject: 465\r\n\r\nhi\r\n")
    (file,) = wait_for(lambda: server.process.maildir_files("brown@foo.com"), what="delivery")
    assert b"with ESMTPSA id" in file.read_bytes()


def test_a_plaintext_submission_listener_is_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    process = GsmtpProcess(tmp_path, {"submission": {"listen": [f"127.0.0.1:{port}"]}})
    for command in (["serve"], ["check-config"]):
        result = subprocess.run(
            [sys.executable, "-m", "gsmtp.cli", *command, "-c", str(process.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert "[submission] listen: without [tls]" in result.stderr
        assert "allow_plaintext_auth" in result.stderr and "Traceback" not in result.stderr


def test_a_taken_submission_port_is_moved_by_the_harness(
    gsmtp_factory: Callable[..., GsmtpProcess],
) -> None:
    """CI failure: free_port() chose the implicit-TLS port, another process took it
    before gsmtp bound it, and the harness moved only the SMTP and metrics ports, so all
    three starts failed. Now every listening port moves and `port_of` says where."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = gsmtp_factory(
            {"submission": {"listen": [f"127.0.0.1:{port}"], "allow_plaintext_auth": True}}
        )
        moved = process.port_of(port)
        assert moved != port
        with smtplib.SMTP("127.0.0.1", moved, timeout=10) as client:
            client.ehlo()
            assert "PLAIN" in client.esmtp_features.get("auth", "")


def test_plaintext_auth_when_allowed(gsmtp_factory: Callable[..., GsmtpProcess]) -> None:
    """Behind a TLS-terminating proxy: allow_plaintext_auth offers AUTH without TLS on
    submission listeners only (port 25 still refuses it); check-config warns."""
    port = free_port()
    process = gsmtp_factory(
        {"submission": {"listen": [f"127.0.0.1:{port}"], "allow_plaintext_auth": True}},
        start=False,
    )
    process.cli("user", "passwd", "jones@foo.com", stdin=PASSWORD + "\n")
    assert "# warning: [submission] listen without [tls]" in process.cli("check-config").stdout
    process.start()
    with smtplib.SMTP("127.0.0.1", process.port_of(port), timeout=10) as client:
        client.ehlo()
        assert "PLAIN" in client.esmtp_features.get("auth", "")
        client.login("jones@foo.com", PASSWORD)
        client.sendmail("jones@foo.com", ["brown@foo.com"], "Subject: a\r\n\r\nb\r\n")
    (file,) = wait_for(lambda: process.maildir_files("brown@foo.com"), what="delivery")
    assert b"with ESMTPA id" in file.read_bytes()
    with SmtpWire(process.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("538")


def weak_hash(password: str) -> str:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**10, r=8, p=1, dklen=32)
    encode = lambda data: base64.b64encode(data).decode().rstrip("=")  # noqa: E731
    return f"$scrypt$ln=10,r=8,p=1${encode(salt)}${encode(digest)}"


def test_a_weak_hash_is_replaced_at_login(server: AuthServer) -> None:
    """S-07: a hash with older, weaker parameters is rehashed (N=2^15, r=8, p=3) after
    the next successful login, and the same password keeps working."""
    weak = weak_hash(PASSWORD)
    connection = apsw.Connection(str(server.process.spool_path))
    connection.set_busy_timeout(5000)
    connection.execute(
        "UPDATE users SET password_hash = ? WHERE address = 'jones@foo.com'", (weak,)
    )
    connection.close()

    def stored() -> str:
        rows = server.process.spool_rows(
            "SELECT password_hash FROM users WHERE address = 'jones@foo.com'"
        )
        return str(rows[0][0])

    for _ in range(2):
        with tls_wire(server.port) as wire:
            assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith("235")
        new = wait_for(lambda: stored() != weak and stored(), what="the rehash")
        assert new.startswith("$scrypt$ln=15,r=8,p=3$")
    logged(server.process, '"event":"password_rehashed"')


@pytest.mark.skipif(not environment_has("swaks"), reason="swaks is not installed")
def test_swaks_auth_plain_over_starttls(server: AuthServer, sink: Sink) -> None:
    result = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{server.port}", "--tls",
            "--auth", "PLAIN", "--auth-user", "jones@foo.com", "--auth-password", PASSWORD,
            "--from", "jones@foo.com", "--to", "far@remote.example",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    (received,) = wait_received(sink)
    assert received.recipients == ["far@remote.example"]


def test_user_commands_for_auth(gsmtp_factory: Callable[..., GsmtpProcess]) -> None:
    process = gsmtp_factory(start=False)
    added = process.cli(
        "user", "add", "sales@foo.com", "--may-send-as", "@Sales.Example",
        "--may-send-as", "Info@foo.com", "--password-stdin", stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert added.stdout.strip() == "user sales@foo.com added"
    process.cli("user", "disable", "SALES@foo.com")
    assert process.cli("user", "list").stdout.splitlines() == [
        "brown@foo.com",
        "jones@foo.com",
        "sales@foo.com  disabled  may-send-as=@sales.example  may-send-as=info@foo.com",
    ]
    for args, message in [
        (("user", "modify", "jones@foo.com"), "nothing to change"),
        (("user", "modify", "ghost@foo.com", "--no-may-send-as"), "no such user: ghost@foo.com"),
        (("user", "disable", "ghost@foo.com"), "no such user"),
        (("user", "modify", "jones@foo.com", "--may-send-as", "@@x"), "not a valid domain"),
    ]:
        result = process.cli(*args, check=False)
        assert result.returncode == 1 and message in result.stderr, result
        assert "Traceback" not in result.stderr


def implicit_tls_wire(port: int, source: str, timeout: float = 30) -> SmtpWire:
    """A raw client on the 465-style listener from `source`, after the greeting and EHLO."""
    wire = SmtpWire(port, source=source, timeout=timeout)
    wire.sock = client_context().wrap_socket(wire.sock)
    assert wire.read_reply()[0].startswith("220")
    wire.command("EHLO c.example")
    return wire


def events(process: GsmtpProcess, name: str) -> list[str]:
    return [line for line in process.log().splitlines() if f'"event":"{name}"' in line]


def test_parallel_guesses_cannot_beat_the_failure_limit(
    make_server: Callable[..., AuthServer],
) -> None:
    """S-09 against parallel connections: 30 connections from one address send a wrong
    AUTH at the same moment, then again on every connection still open, until all are
    closed. auth_failure_limit = 3 means 3 passwords checked (3 `auth_failed`), however
    parallel: a check still running counts against the limit, so the others are refused
    unchecked, 421 4.7.0 (closing) or, while the network's checks run, 454 4.7.0."""
    server = make_server(auth_failure_limit=3)
    wires = [implicit_tls_wire(server.implicit, "127.0.0.9") for _ in range(30)]
    guess = "AUTH PLAIN " + plain("jones@foo.com", WRONG) + "\r\n"
    codes: list[str] = []
    try:
        for _ in range(10):  # rounds; each is 30 attempts at once
            for wire in wires:
                wire.send(guess.encode())
            answers = [wire.read_reply()[-1][:9] for wire in wires]
            codes += answers
            wires = [w for w, a in zip(wires, answers, strict=True) if a != "421 4.7.0"]
            if not wires:
                break
    finally:
        for wire in wires:
            wire.close()
    assert not wires, "connections still open after 10 rounds"
    assert set(codes) <= {"535 5.7.8", "421 4.7.0", "454 4.7.0"}
    assert codes.count("535 5.7.8") == 3
    blocked = wait_for(
        lambda: len(found := events(server.process, "auth_blocked")) == 30 and found,
        what="30 auth_blocked lines",
    )
    assert len(blocked) == codes.count("421 4.7.0") == 30
    assert len(events(server.process, "auth_failed")) == 3  # passwords actually checked


def test_a_flood_of_auth_does_not_hold_up_a_legitimate_login(
    make_server: Callable[..., AuthServer],
) -> None:
    """The checks waiting for the 2-thread pool are bounded (2 per client network, 32 in
    all): 80 connections from 4 addresses keep sending wrong AUTHs, and past the caps
    they get 454 4.7.0 at once (`auth_throttled`) instead of queueing. A login from
    another address meanwhile gets 235 with only the few checks admitted before it
    ahead of it (one queued check per flooding connection without the bound)."""
    server = make_server(auth_failure_limit=10_000, max_connections_per_ip=30)
    stop = threading.Event()
    flood_codes: list[str] = []
    floods: list[SmtpWire] = []

    def flood(source: str) -> None:
        guess = ("AUTH PLAIN " + plain("nobody@foo.com", WRONG) + "\r\n").encode()
        with contextlib.suppress(OSError), implicit_tls_wire(server.implicit, source) as wire:
            floods.append(wire)
            while not stop.is_set():
                wire.send(guess)
                reply = wire.read_reply()
                if not reply:
                    return
                flood_codes.append(reply[-1][:3])
                if reply[-1].startswith("454"):
                    time.sleep(0.05)  # a client retrying, not a spin

    sources = [f"127.0.6.{n}" for n in range(1, 5) for _ in range(20)]
    threads = [threading.Thread(target=flood, args=(source,)) for source in sources]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(floods) == len(sources), what="the flood's connections")
        wait_for(lambda: len(events(server.process, "auth_failed")) >= 4, what="the flood's checks")
        with implicit_tls_wire(server.implicit, "127.0.5.1", timeout=120) as wire:
            assert wire.command("AUTH PLAIN " + plain("jones@foo.com", PASSWORD)).startswith(
                "235 2.7.0"
            )
        flood_running = not stop.is_set() and any(thread.is_alive() for thread in threads)
    finally:
        stop.set()
        for wire in floods:
            with contextlib.suppress(OSError):
                wire.sock.shutdown(socket.SHUT_RDWR)  # ends a flood thread waiting for a reply
        for thread in threads:
            thread.join(30)
    assert flood_running
    assert "454" in flood_codes
    log = wait_for(
        lambda: '"event":"auth_succeeded"' in (text := server.process.log()) and text,
        what="the login in the log",
    )
    assert '"event":"auth_throttled"' in log
    # Checks done between the legitimate client's TLS handshake and its success.
    lines = log.splitlines()
    started = next(
        i for i, line in enumerate(lines) if '"peer":"127.0.5.1"' in line and "tls_started" in line
    )
    succeeded = next(i for i, line in enumerate(lines) if '"event":"auth_succeeded"' in line)
    ahead = sum('"event":"auth_failed"' in line for line in lines[started:succeeded])
    assert ahead <= 20, f"{ahead} checks of the flood ran before the login's"
