"""Slow clients, harvesting and junk against a live server (L-07, L-08, P-21, P-30):
Postfix's smtpd_per_request_deadline, smtpd_min_data_rate, smtpd_soft_error_limit with
smtpd_error_sleep_time, and smtpd_junk_command_limit."""

from __future__ import annotations

import contextlib
import socket
import time

from tests.integration.harness import GsmtpProcess, SmtpWire, wait_for

COMMAND_TIMEOUT = "421 4.4.2 Command not completed in time, closing transmission channel"
DATA_TOO_SLOW = "421 4.4.2 Data rate too low, closing transmission channel"


def trickle(wire: SmtpWire, data: bytes, every: float) -> list[str]:
    """Send `data` a byte at a time, `every` seconds apart, until the server answers;
    the reply (or [] if the whole of `data` went without one)."""
    for index in range(len(data)):
        try:
            wire.send(data[index : index + 1])
        except OSError:
            break  # closed under us: the reply is in the receive buffer
        wire.sock.settimeout(every)
        try:
            chunk = wire.sock.recv(4096, socket.MSG_PEEK)
        except TimeoutError:
            continue
        if chunk:
            break
    wire.sock.settimeout(10)
    try:
        return wire.read_reply()
    except TimeoutError:
        return []


def test_a_command_line_trickled_a_byte_at_a_time_is_cut_at_the_deadline(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """L-07: never idle (a byte every 0.5 s, the idle timeout is 30 s), yet the line
    must be whole within command_deadline."""
    gsmtp: GsmtpProcess = gsmtp_factory({"server": {"command_deadline": "2s"}})
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        assert wire.command("EHLO c.example").startswith("250")
        started = time.monotonic()
        reply = trickle(wire, b"NOOP " + b"x" * 60 + b"\r\n", every=0.5)
        assert reply == [COMMAND_TIMEOUT], f"after {time.monotonic() - started:.1f}s"
        assert wire.read_reply() == []  # closed
    wait_for(lambda: '"limit":"command_deadline"' in gsmtp.log(), what="the log line")


def test_a_whole_line_within_the_deadline_passes_and_the_next_starts_afresh(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    gsmtp: GsmtpProcess = gsmtp_factory({"server": {"command_deadline": "2s"}})
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        for _ in range(3):  # 3 × 1.2 s of trickling: longer than the deadline in all
            assert trickle(wire, b"NOOP\r\n", every=0.2) == ["250 2.0.0 Ok"]


def test_reads_that_end_one_line_and_begin_the_next_are_held_to_each_line(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """The deadline runs from the first byte of the line being received: a client whose
    every read finishes one line and starts the next (`NOOP\\r\\nNO`, then every 2 s
    `OP\\r\\nNO`) completes each line in 2 s of a 3 s deadline, 6 lines over 10 s, and
    is never cut (a line trickled past the deadline is: the test above)."""
    gsmtp: GsmtpProcess = gsmtp_factory({"server": {"command_deadline": "3s"}})
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()

        def send(data: bytes) -> list[str]:
            with contextlib.suppress(OSError):  # if cut, its 421 is already here
                wire.send(data)
            return wire.read_reply()

        answers = [send(b"NOOP\r\nNO")]
        for _ in range(5):
            time.sleep(2)  # the client's pace: each line is 2 s old when it ends
            answers.append(send(b"OP\r\nNO"))
        answers.append(send(b"OP\r\n"))
        assert answers == [["250 2.0.0 Ok"]] * 7
        assert wire.command("QUIT").startswith("221")
    log = wait_for(lambda: '"connection_closed"' in (text := gsmtp.log()) and text, what="close")
    assert "connection_timed_out" not in log


def open_data(wire: SmtpWire) -> None:
    wire.read_reply()
    wire.command("EHLO c.example")
    assert wire.command("MAIL FROM:<a@remote.example>").startswith("250")
    assert wire.command("RCPT TO:<jones@foo.com>").startswith("250")
    assert wire.command("DATA").startswith("354")


def test_data_below_the_minimum_rate_is_cut_and_nothing_stored(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """L-08: 10 bytes every 0.5 s (20 B/s) against 100 B/s after a 1 s grace."""
    gsmtp: GsmtpProcess = gsmtp_factory(
        {"server": {"min_data_rate": "100", "min_data_rate_grace": "1s"}}
    )
    with SmtpWire(gsmtp.port) as wire:
        open_data(wire)
        wire.sock.settimeout(0.5)
        reply: list[str] = []
        for _ in range(60):  # 30 s at most: well past any deadline
            try:
                wire.send(b"x" * 8 + b"\r\n")
                reply = wire.read_reply()
                break
            except TimeoutError:
                continue
            except OSError:
                wire.sock.settimeout(10)
                reply = wire.read_reply()
                break
        assert reply == [DATA_TOO_SLOW]
    wait_for(lambda: '"limit":"min_data_rate"' in gsmtp.log(), what="the log line")
    assert gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)]


def test_data_above_the_minimum_rate_is_accepted(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """400 B/s against 50 B/s for 2.5 s, with the grace (1 s) long past."""
    gsmtp: GsmtpProcess = gsmtp_factory(
        {"server": {"min_data_rate": "50", "min_data_rate_grace": "1s"}}
    )
    with SmtpWire(gsmtp.port) as wire:
        open_data(wire)
        wire.send(b"Subject: slow but fine\r\n\r\n")
        for _ in range(10):
            wire.send(b"y" * 98 + b"\r\n")
            time.sleep(0.25)
        wire.send(b".\r\n")
        assert wire.read_reply()[0].startswith("250 2.0.0")


def test_harvesting_recipients_is_tarpitted_after_ten_errors(
    gsmtp_factory,  # type: ignore[no-untyped-def]
) -> None:
    """After soft_error_limit (10) unknown recipients each further 550 waits error_sleep
    (default 1 s): the 11th reply does not come within a window far shorter than that."""
    gsmtp: GsmtpProcess = gsmtp_factory()
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<a@remote.example>")
        for number in range(10):
            assert wire.command(f"RCPT TO:<nobody{number}@foo.com>").startswith("550 5.1.1")
        wire.send(b"RCPT TO:<nobody10@foo.com>\r\n")
        wire.sock.settimeout(0.3)
        try:
            early = wire.sock.recv(4096)
        except TimeoutError:
            early = b""
        assert early == b"", "the 11th error reply was not delayed"
        wire.sock.settimeout(10)
        assert wire.read_reply()[0].startswith("550 5.1.1")
    wait_for(lambda: "client_tarpitted" in gsmtp.log(), what="the tarpit in the log")


def test_ten_thousand_junk_noops_end_with_421_and_close(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """P-30 / junk: 100 NOOPs are free, then each counts as an error: the 20th error
    closes the connection long before the 10,000th NOOP."""
    gsmtp: GsmtpProcess = gsmtp_factory({"server": {"error_sleep": "10ms"}})
    answered: list[str] = []
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        for _ in range(200):  # 200 batches of 50 = 10,000 NOOPs, unless closed first
            wire.send(b"NOOP\r\n" * 50)
            for _ in range(50):
                reply = wire.read_reply()
                if not reply:
                    break
                answered.append(reply[-1])
                if reply[-1].startswith("421"):
                    break
            if answered and answered[-1].startswith("421"):
                break
        assert wire.read_reply() == []
    assert answered == ["250 2.0.0 Ok"] * 120 + [
        "421 4.7.0 Too many errors, closing transmission channel"
    ]
