"""Connection handling: timeouts, connection limits, early talkers, graceful stop."""

from __future__ import annotations

import signal
import smtplib
import socket
import time

from tests.integration.harness import GsmtpProcess, SmtpWire, wait_for

EARLY_TALKER = b"554 5.5.0 SMTP synchronization error: talked before the greeting\r\n"


def test_idle_timeout_answers_421_and_closes(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    gsmtp = gsmtp_factory({"server": {"timeout": "1s"}})
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        assert wire.read_reply() == ["421 4.4.2 Timeout exceeded, closing transmission channel"]
        assert wire.read_reply() == []


def test_idle_timeout_runs_inside_data(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    gsmtp = gsmtp_factory({"server": {"timeout": "1s"}})
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<a@remote.example>")
        wire.command("RCPT TO:<jones@foo.com>")
        wire.command("DATA")
        wire.send(b"Subject: half\r\n")
        assert wire.read_reply()[0].startswith("421 4.4.2")
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)]


def test_per_ip_limit(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    gsmtp = gsmtp_factory({"server": {"max_connections_per_ip": 2}})
    first, second = SmtpWire(gsmtp.port), SmtpWire(gsmtp.port)
    assert first.read_reply()[0].startswith("220") and second.read_reply()[0].startswith("220")
    with SmtpWire(gsmtp.port) as third:
        assert third.read_reply() == ["421 4.7.0 Too many connections from 127.0.0.1"]
        assert third.read_reply() == []
    with SmtpWire(gsmtp.port, source="127.0.0.5") as other:  # another address is served
        assert other.read_reply()[0].startswith("220")
    first.close()
    wait_for(lambda: SmtpWire(gsmtp.port).read_reply()[0].startswith("220"), what="a freed slot")
    second.close()


def test_total_connection_limit(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    gsmtp = gsmtp_factory({"server": {"max_connections": 2}})
    held = [SmtpWire(gsmtp.port, source=f"127.0.0.{10 + i}") for i in range(2)]
    for wire in held:
        assert wire.read_reply()[0].startswith("220")
    with SmtpWire(gsmtp.port, source="127.0.0.20") as extra:
        assert extra.read_reply() == ["421 4.7.0 Too many connections, try again later"]
    for wire in held:
        wire.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a reset counts as a close (the
    server dropped us with our bytes unread)."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection: {received!r}") from None
    return received


def test_client_that_talks_before_the_greeting_is_dropped(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """greet_wait holds the 220: a client that talks before it (a spam engine that does
    not listen, postscreen's PREGREET) gets no greeting, is dropped and logged; one
    that waits is greeted after the wait. The second early talker speaks only once the
    server has taken its connection (its connection_opened is in the log), so only the
    held greeting can catch it."""
    gsmtp = gsmtp_factory({"server": {"greet_wait": "2s"}})
    for source, wait_until_opened in (("127.0.0.8", False), ("127.0.0.9", True)):
        with socket.create_connection(
            ("127.0.0.1", gsmtp.port), timeout=10, source_address=(source, 0)
        ) as sock:
            if wait_until_opened:
                wait_for(
                    lambda s=source: gsmtp.events("connection_opened", peer=s),
                    what="the server to take the connection",
                )
            sock.sendall(b"NOOP\r\n")
            received = read_until_closed(sock)
        assert b"220" not in received and b"250" not in received
        assert received in (b"", EARLY_TALKER)
        wait_for(
            lambda s=source: gsmtp.events("early_talker_dropped", peer=s),
            what=f"the drop of {source} in the log",
        )
    with SmtpWire(gsmtp.port) as patient:
        assert patient.read_reply() == ["220 mx.foo.com ESMTP gsmtp"]
        assert patient.command("EHLO c.example").startswith("250")


def test_sigterm_closes_idle_sessions_finishes_transactions_and_exits_0(
    gsmtp: GsmtpProcess,
) -> None:
    idle = SmtpWire(gsmtp.port)
    idle.read_reply()
    idle.command("EHLO c.example")
    busy = SmtpWire(gsmtp.port)
    busy.read_reply()
    busy.command("EHLO c.example")
    busy.command("MAIL FROM:<a@remote.example>")
    busy.command("RCPT TO:<jones@foo.com>")
    assert busy.command("DATA").startswith("354")
    busy.send(b"Subject: in flight\r\n\r\n")
    gsmtp.signal(signal.SIGTERM)
    assert idle.read_reply() == ["421 4.3.2 Service shutting down, closing transmission channel"]
    time.sleep(0.2)  # the stop is under way; the transaction may still finish
    busy.send(b"body\r\n.\r\n")
    assert busy.read_reply()[0].startswith("250 2.0.0 Ok: queued as")
    assert busy.read_reply()[0].startswith("421 4.3.2")
    assert gsmtp.wait(timeout=15) == 0
    rows = gsmtp.spool_rows("SELECT COUNT(*) FROM messages")
    files = gsmtp.maildir_files("jones@foo.com")
    assert rows == [(1,)] or len(files) == 1  # queued or already delivered: never lost


def test_sighup_reloads_and_does_not_exit(gsmtp: GsmtpProcess) -> None:
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: gsmtp.events("config_reloaded"), what="reload log line")
    with SmtpWire(gsmtp.port) as wire:
        assert wire.read_reply()[0].startswith("220")


def test_sighup_with_a_broken_configuration_logs_and_keeps_serving(gsmtp: GsmtpProcess) -> None:
    """SIGHUP never exits: a configuration that no longer parses is reported
    (reload_failed, naming the file and the key) and the running settings stay."""
    good = gsmtp.config.read_text()
    gsmtp.config.write_text(good.replace('timeout = "30s"', 'timeout = "forever"'))
    gsmtp.signal(signal.SIGHUP)
    (failed,) = wait_for(lambda: gsmtp.events("reload_failed"), what="reload_failed")
    assert f"{gsmtp.config}: [server] timeout: expected a duration" in failed["error"]
    assert gsmtp.events("config_reloaded") == []
    with smtplib.SMTP("127.0.0.1", gsmtp.port, timeout=10) as client:
        client.sendmail("a@remote.example", ["jones@foo.com"], "Subject: after\r\n\r\nx\r\n")
    wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="delivery after the reload")
    assert gsmtp.process is not None and gsmtp.process.poll() is None
    gsmtp.config.write_text(good)
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: gsmtp.events("config_reloaded"), what="a good reload afterwards")


def test_no_traceback_reaches_the_client_or_the_log(gsmtp: GsmtpProcess) -> None:
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.send(
            b"\xff\xfe\x00garbage\r\n" + b"A" * 100000 + b"\r\nEHLO x\r\nMAIL FROM:<\x00>\r\n"
        )
        replies = []
        while reply := wire.read_reply():
            replies.append(reply[-1])
            if reply[-1].startswith("250"):
                break
        assert all("Traceback" not in r for r in replies)
    gsmtp.stop()  # flushes the log
    assert "Traceback" not in gsmtp.log()
