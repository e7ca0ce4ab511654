"""What an operator watches: metrics to alert on, log lines for journald, per-session
summaries and delivery delays, against a real gsmtp driven into real refusals."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gsmtp import __version__
from gsmtp.metrics import REJECT_REASONS
from tests.integration.harness import (
    GsmtpProcess,
    SmtpWire,
    environment,
    free_port,
    self_signed_certificate,
    wait_for,
)
from tests.integration.remote import SinkBehaviour, start_sink

PASSWORD = "Corr3ct-Horse-Battery"
Factory = Callable[..., GsmtpProcess]


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def greeted(port: int, source: str | None = None) -> SmtpWire:
    wire = SmtpWire(port, source=source)
    assert wire.read_reply()[0].startswith("220")
    return wire


def scrape(gsmtp: GsmtpProcess) -> str:
    url = f"http://127.0.0.1:{gsmtp.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as page:
        return str(page.read().decode())


def not_after(cert: Path) -> float:
    """The certificate's notAfter as openssl prints it, as Unix time."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return float(ssl.cert_time_to_seconds(out.strip().partition("=")[2]))


def rejects(samples: dict[str, float]) -> dict[str, float]:
    return {
        reason: samples[f'gsmtp_rejects_total{{reason="{reason}"}}'] for reason in REJECT_REASONS
    }


@pytest.fixture
def strict_gsmtp(gsmtp_factory: Factory, tmp_path: Path) -> GsmtpProcess:
    """A server with small limits, TLS, a submission listener and jones's password."""
    cert, key = self_signed_certificate(tmp_path, "mx.foo.com")
    gsmtp = gsmtp_factory(
        {
            "server": {
                "max_recipients": 2,
                "max_message_size": "10KB",
                "junk_command_limit": 2,
                "error_sleep": "0s",
                "max_connections_per_ip": 3,
                "timeout": "3s",
                "greet_wait": "0.2s",
            },
            "tls": {"cert": str(cert), "key": str(key)},
            "submission": {"listen": [f"127.0.0.1:{free_port()}"]},
        },
        start=False,
    )
    gsmtp.cli("user", "passwd", "jones@foo.com", stdin=PASSWORD + "\n")
    gsmtp.start()
    gsmtp.cert = cert  # type: ignore[attr-defined]
    return gsmtp


def submission_port(gsmtp: GsmtpProcess) -> int:
    text = gsmtp.config.read_text()
    section = text[text.index("[submission]") :]
    return int(section.split("127.0.0.1:", 1)[1].split('"', 1)[0])


def test_every_kind_of_refusal_is_counted_by_reason(strict_gsmtp: GsmtpProcess) -> None:
    gsmtp = strict_gsmtp
    before = gsmtp.metrics()
    assert set(rejects(before).values()) == {0}, "every reason is a series from the start"

    # connection_limit: a fourth connection from one address while three are open.
    held = [greeted(gsmtp.port) for _ in range(3)]
    with SmtpWire(gsmtp.port) as fourth:
        assert fourth.read_reply()[0].startswith("421 4.7.0")
    for wire in held:
        wire.close()
    wait_for(lambda: gsmtp.metrics()["gsmtp_connections_active"] == 0, what="connections closed")

    # timeout: a connection that says nothing is cut after server.timeout.
    idle = greeted(gsmtp.port)

    # early_talker: bytes before the greeting.
    with SmtpWire(gsmtp.port) as talker:
        talker.send(b"EHLO too.early\r\n")
        assert talker.read_reply()[0].startswith("554 5.5.0")

    # One session: size, relay_denied, unknown_user, too_many_recipients, bare_lf, loop.
    with greeted(gsmtp.port) as wire:
        assert wire.command("EHLO client.example").startswith("250")
        assert wire.command("MAIL FROM:<a@remote.example> SIZE=20000").startswith("552")
        assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
        assert wire.command("RCPT TO:<x@elsewhere.example>").startswith("554 5.7.1")
        assert wire.command("RCPT TO:<nobody@foo.com>").startswith("550 5.1.1")
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<brown@foo.com>").startswith("250")
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("452 4.5.3")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: bare\nLF\r\n.\r\n")
        assert wire.read_reply()[0].startswith("550 5.5.2")
        assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Received: from a by b; now\r\n" * 101 + b"\r\nloop\r\n.\r\n")
        assert wire.read_reply()[0].startswith("554 5.4.6")
        assert wire.command("QUIT").startswith("221")

    # junk_commands (two NOOPs past the limit of 2), then too_many_errors at 20 errors.
    with greeted(gsmtp.port) as wire:
        for _ in range(4):
            assert wire.command("NOOP").startswith("250")
        for _ in range(17):
            assert wire.command("XYZZY").startswith("500")
        assert wire.command("XYZZY").startswith("500")  # the 20th error ...
        assert wire.read_reply()[0].startswith("421 4.7.0")  # ... and the session ends

    # auth_required, auth_failed, sender_not_owned on the submission listener, in TLS.
    with greeted(submission_port(gsmtp)) as wire:
        wire.command("EHLO client.example")
        assert wire.command("STARTTLS").startswith("220")
        wire.sock = client_context().wrap_socket(wire.sock)
        wire.command("EHLO client.example")
        assert wire.command("MAIL FROM:<jones@foo.com>").startswith("530 5.7.0")
        wrong = base64.b64encode(b"\0jones@foo.com\0wrong-password").decode()
        assert wire.command(f"AUTH PLAIN {wrong}").startswith("535")
        right = base64.b64encode(f"\0jones@foo.com\0{PASSWORD}".encode()).decode()
        assert wire.command(f"AUTH PLAIN {right}").startswith("235")
        assert wire.command("MAIL FROM:<brown@foo.com>").startswith("553 5.7.1")
        wire.command("QUIT")

    assert idle.read_reply()[0].startswith("421 4.4.2")
    idle.close()

    expected = dict.fromkeys(REJECT_REASONS, 0.0)
    expected.update(
        connection_limit=1,
        timeout=1,
        early_talker=1,
        size=1,
        relay_denied=1,
        unknown_user=1,
        too_many_recipients=1,
        bare_lf=1,
        loop=1,
        junk_commands=2,
        too_many_errors=1,
        auth_required=1,
        auth_failed=1,
        sender_not_owned=1,
    )
    seen: dict[str, float] = {}

    def counted() -> dict[str, float] | None:
        samples = gsmtp.metrics()
        seen.update(rejects(samples))
        return samples if seen == expected else None

    try:
        samples = wait_for(counted, what="every refusal counted")
    except AssertionError:
        assert seen == expected
        raise
    assert samples['gsmtp_tls_sessions_total{version="TLSv1.3"}'] == 1
    assert samples['gsmtp_tls_sessions_total{version="TLSv1.2"}'] == 0


def test_the_disconnect_line_sums_up_each_session(strict_gsmtp: GsmtpProcess) -> None:
    """Postfix's `disconnect from ... commands=N`: one line per session."""
    gsmtp = strict_gsmtp
    with greeted(gsmtp.port) as wire:
        wire.command("EHLO client.example")
        assert wire.command("STARTTLS").startswith("220")
        wire.sock = client_context().wrap_socket(wire.sock)
        wire.command("EHLO client.example")
        wire.command("MAIL FROM:<a@remote.example>")
        assert wire.command("RCPT TO:<x@elsewhere.example>").startswith("554")
        assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250")
        wire.command("QUIT")
    (line,) = wait_for(
        lambda: [e for e in gsmtp.events("connection_closed") if e.get("messages")],
        what="the summary line (the harness's probe before it had none)",
    )
    # EHLO STARTTLS | EHLO MAIL RCPT RCPT DATA QUIT: the content is not a command.
    assert line["commands"] == 8
    assert line["messages"] == 1
    assert line["rejects"] == 1
    assert line["tls"] == "TLSv1.3"
    assert 0 <= line["duration"] < 30


def test_certificate_expiry_follows_the_certificate_served(strict_gsmtp: GsmtpProcess) -> None:
    gsmtp = strict_gsmtp
    cert: Path = gsmtp.cert  # type: ignore[attr-defined]
    samples = gsmtp.metrics()
    assert samples["gsmtp_tls_cert_not_after_timestamp_seconds"] == not_after(cert)
    assert samples[f'gsmtp_build_info{{version="{__version__}"}}'] == 1
    # A renewed certificate (three days instead of one) at the same paths, then SIGHUP.
    renewed = cert.parent / "renewed"
    renewed.mkdir()
    new_cert, new_key = renewed / "cert.pem", renewed / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
            "-subj", "/CN=mx.foo.com", "-keyout", str(new_key), "-out", str(new_cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.replace(new_key, cert.parent / "key.pem")
    os.replace(new_cert, cert)
    expected = not_after(cert)
    assert expected > samples["gsmtp_tls_cert_not_after_timestamp_seconds"] + 86400
    gsmtp.signal(signal.SIGHUP)
    wait_for(
        lambda: gsmtp.metrics()["gsmtp_tls_cert_not_after_timestamp_seconds"] == expected,
        what="the renewed certificate's expiry",
    )


def test_a_scrape_has_no_created_series(gsmtp: GsmtpProcess) -> None:
    text = scrape(gsmtp)
    assert "gsmtp_rejects_total" in text
    assert "_created" not in text


def test_queue_gauges_histograms_and_delivery_lines(
    gsmtp_factory: Factory, sinks: dict[str, Any]
) -> None:
    """A message waiting for a retry counts as deferred, with its bytes; a local delivery
    fills the time-in-queue histogram; a rejected recipient counts as a bounce; delivery
    log lines carry delay and the attempt number."""
    port = free_port("127.0.0.3")
    behaviour = SinkBehaviour(
        rcpt_replies={
            "later@remote.test": "451 4.3.0 try later",
            "gone@remote.test": "550 5.1.1 no such user",
        }
    )
    start_sink(sinks, "127.0.0.3", port, behaviour=behaviour)
    gsmtp = gsmtp_factory({"delivery": {"smarthost": f"127.0.0.3:{port}", "retry": ["1s"]}})
    samples = gsmtp.metrics()
    for state in ("active", "deferred", "held"):
        assert samples[f'gsmtp_queue_messages{{state="{state}"}}'] == 0
        assert samples[f'gsmtp_queue_bytes{{state="{state}"}}'] == 0
    assert samples["gsmtp_deliveries_in_flight"] == 0

    def send(recipient: str) -> int:
        """Sent from the trusted 127.0.0.2; the size the server stored."""
        with greeted(gsmtp.port, source="127.0.0.2") as wire:
            wire.command("EHLO client.example")
            assert wire.command("MAIL FROM:<sender@remote.example>").startswith("250")
            assert wire.command(f"RCPT TO:<{recipient}>").startswith("250")
            assert wire.command("DATA").startswith("354")
            wire.send(b"Subject: s\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n")
            reply = wire.read_reply()[0]
            assert reply.startswith("250"), reply
        message_id = reply.rsplit(" ", 1)[1]
        (event,) = wait_for(lambda: gsmtp.events("message_queued", msg_id=message_id))
        return int(event["size"])

    size = send("later@remote.test")
    wait_for(
        lambda: (
            (s := gsmtp.metrics())['gsmtp_queue_messages{state="deferred"}'] == 1
            and s['gsmtp_queue_bytes{state="deferred"}'] == size
        ),
        what="one deferred message of its size",
    )
    attempts = wait_for(
        lambda: (
            [e["attempt"] for e in gsmtp.events("message_deferred")][:2]
            if len(gsmtp.events("message_deferred")) >= 2
            else None
        ),
        what="two deferrals",
    )
    assert attempts == [1, 2]

    local_size = send("jones@foo.com")
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="local delivery")
    (delivered,) = wait_for(lambda: gsmtp.events("message_delivered", rcpt="jones@foo.com"))
    assert delivered["attempt"] == 1
    assert 0 <= delivered["delay"] < 30

    send("gone@remote.test")
    (failed,) = wait_for(lambda: gsmtp.events("message_failed", rcpt="gone@remote.test"))
    assert failed["attempt"] == 1

    samples = wait_for(
        lambda: (s := gsmtp.metrics())['gsmtp_bounces_total{reason="rejected"}'] == 1 and s,
        what="the bounce counted",
    )
    assert samples["gsmtp_time_in_queue_seconds_count"] >= 1
    assert samples["gsmtp_message_size_bytes_count"] >= 3
    assert samples['gsmtp_bounces_total{reason="expired"}'] == 0
    assert samples['gsmtp_message_size_bytes_bucket{le="1024.0"}'] == 0
    assert samples["gsmtp_message_size_bytes_sum"] >= size + local_size


def test_journald_gets_a_priority_before_each_line(
    gsmtp_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr connected to the journal (JOURNAL_STREAM names its device:inode),
    each line starts with its syslog priority; a failed reload is an error, <3>."""
    gsmtp = gsmtp_factory(start=False)
    gsmtp.log_path.touch()
    status = os.stat(gsmtp.log_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    gsmtp.start()
    gsmtp.config.write_text(gsmtp.config.read_text() + "\n[nonsense\n")
    gsmtp.signal(signal.SIGHUP)
    lines = wait_for(
        lambda: (
            (log := gsmtp.log().splitlines()) and any('"reload_failed"' in x for x in log) and log
        ),
        what="the failed reload logged",
    )
    for line in lines:
        priority, _, rest = line.partition(">")
        assert priority in ("<3", "<4", "<6", "<7"), line
        record = json.loads(rest)
        assert (
            int(priority[1:]) == {"error": 3, "warning": 4, "info": 6, "debug": 7}[record["level"]]
        )
    assert any(line.startswith('<6>{"') and "server_started" in line for line in lines)
    assert any(line.startswith("<3>") and "reload_failed" in line for line in lines)


def test_no_priority_prefix_when_stderr_is_not_the_journal(
    gsmtp_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inherited JOURNAL_STREAM that is not our stderr (output sent to a file)."""
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    gsmtp = gsmtp_factory()
    wait_for(lambda: "server_started" in gsmtp.log(), what="start-up logged")
    lines = gsmtp.log().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines[:3]


def test_proxy_and_storage_refusals_are_counted(gsmtp_factory: Factory) -> None:
    """proxy_denied: a peer that is not one of proxy_networks; storage: MAIL while the
    free-space reserve is not there (spool.min_free larger than any disk)."""
    gsmtp = gsmtp_factory(
        {
            "server": {"proxy_protocol": True, "proxy_networks": ["127.0.0.1/32"]},
            "spool": {"min_free": "100000000GB"},
        }
    )
    with SmtpWire(gsmtp.port, source="127.0.0.3") as stranger:
        assert stranger.read_reply() == []  # closed without a greeting
    with SmtpWire(gsmtp.port) as wire:
        wire.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 25\r\n")
        assert wire.read_reply()[0].startswith("220")
        wire.command("EHLO client.example")
        assert wire.command("MAIL FROM:<a@remote.example>").startswith("452 4.3.1")
    wait_for(
        lambda: (
            (s := gsmtp.metrics())['gsmtp_rejects_total{reason="proxy_denied"}'] == 1
            and s['gsmtp_rejects_total{reason="storage"}'] == 1
        ),
        what="proxy_denied and storage counted",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_start_under_journald_is_an_error_line(tmp_path: Path, workers: int) -> None:
    """The plain-text `gsmtp: cannot listen …` written to stderr (by the single process,
    or by the supervisor of several workers) carries `<3>` under journald, as the JSON
    lines carry theirs: `journalctl -p err` shows why the start failed."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    config = tmp_path / "gsmtp.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{busy.getsockname()[1]}"]\nworkers = {workers}\n'
        f'[spool]\npath = "{tmp_path}/spool/spool.sqlite"\n[maildir]\nroot = "{tmp_path}/mail"\n'
        f'[metrics]\nlisten = ""\n'
    )
    journal = tmp_path / "journal"
    with busy, journal.open("w") as stream:
        status = os.fstat(stream.fileno())
        subprocess.run(
            [sys.executable, "-m", "gsmtp", "serve", "-c", str(config)],
            stdout=stream,
            stderr=stream,
            timeout=60,
            env={**environment(), "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
            check=False,
        )
    lines = journal.read_text().splitlines()
    plain = [
        line
        for line in lines
        if "gsmtp: " in line and not line.lstrip("<0123456789>").startswith("{")
    ]
    assert plain, lines
    assert all(line.startswith("<3>gsmtp: ") for line in plain), plain
    assert all(line.startswith("<") for line in lines), lines
