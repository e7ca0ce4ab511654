"""Relay to the world: real DNS (dnsmasq), real remote MTAs (aiosmtpd on 127.0.0.x)."""

from __future__ import annotations

import threading
from pathlib import Path

from tests.integration.harness import SmtpWire, wait_for
from tests.integration.remote import (
    SinkBehaviour,
    bounce_for,
    delivery_status,
    self_signed_context,
    send,
    start_sink,
    wait_received,
)


def test_lowest_preference_mx_is_chosen(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    first = start_sink(sinks, "127.0.0.2", mx_port)
    second = start_sink(sinks, "127.0.0.3", mx_port)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@pref.test"])
    (received,) = wait_received(first)
    assert received.recipients == ["a@pref.test"] and received.sender == "jones@foo.com"
    assert b"Subject: hello" in received.data
    assert second.received == []
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )


def test_next_mx_when_the_first_is_down(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    alive = start_sink(sinks, "127.0.0.3", mx_port)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@down.test"])
    wait_received(alive)


def test_implicit_mx(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    sink = start_sink(sinks, "127.0.0.4", mx_port)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@implicit.test"])
    wait_received(sink)


def test_null_mx_bounces_without_connecting(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    trap = start_sink(sinks, "127.0.0.2", mx_port)  # null.test's A record points here
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@null.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.1.10"
    assert trap.attempts == 0 and trap.received == []


def test_451_twice_then_250_is_delivered_on_the_third_attempt(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    sink = start_sink(sinks, "127.0.0.2", mx_port, behaviour=SinkBehaviour(fail_first=2))
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test"])
    error = wait_for(
        lambda: (rows := gsmtp.spool_rows("SELECT last_error FROM recipients")) and rows[0][0],
        what="last_error while deferred",
    )
    assert error.startswith("451 4.3.0")
    wait_received(sink)
    assert sink.attempts == 3
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )
    assert gsmtp.maildir_files("jones@foo.com") == []  # no bounce


def test_550_bounces_with_the_right_dsn(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    behaviour = SinkBehaviour(
        rcpt_replies={"gone@remote.test": "550 5.1.1 <gone@remote.test>: no such user"}
    )
    sink = start_sink(sinks, "127.0.0.2", mx_port, behaviour=behaviour)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["ok@remote.test", "gone@remote.test"], subject="partial")
    (received,) = wait_received(sink)
    assert received.recipients == ["ok@remote.test"]
    bounce = bounce_for(gsmtp)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["From"] == "Mail Delivery System <MAILER-DAEMON@mx.foo.com>"
    assert bounce["To"] == "<jones@foo.com>"
    assert bounce["Auto-Submitted"] == "auto-replied"
    (block,) = delivery_status(bounce)
    assert block["Final-Recipient"] == "rfc822; gone@remote.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@remote.test>: no such user"
    headers = [p for p in bounce.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert b"Subject: partial" in headers[0].get_payload(decode=True)
    text = gsmtp.maildir_files("jones@foo.com")[0].read_bytes()
    assert text.startswith(b"Return-Path: <>\n")


def test_max_age_expiry_bounces(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    start_sink(sinks, "127.0.0.2", mx_port, behaviour=SinkBehaviour(fail_first=1000))
    gsmtp = relay(max_age="3s")
    send(gsmtp, "jones@foo.com", ["a@remote.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert "451 4.3.0" in block["Diagnostic-Code"]
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )


def test_null_sender_never_gets_a_bounce(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    behaviour = SinkBehaviour(rcpt_replies={"gone@remote.test": "550 5.1.1 no such user"})
    start_sink(sinks, "127.0.0.2", mx_port, behaviour=behaviour)
    gsmtp = relay()
    send(gsmtp, "", ["gone@remote.test"])
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)],
        what="failure recorded",
    )
    wait_for(lambda: "message_failed" in gsmtp.log(), what="the failure in the log")
    gsmtp.stop()  # flushes the log: nothing more was going to be written
    assert "bounce_queued" not in gsmtp.log()


def test_smarthost_takes_everything(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    smarthost = start_sink(sinks, "127.0.0.5", mx_port)
    gsmtp = relay(smarthost=f"127.0.0.5:{mx_port}")
    send(gsmtp, "jones@foo.com", ["a@pref.test", "b@nx.test"])
    received = wait_received(smarthost, count=2)
    assert sorted(r for m in received for r in m.recipients) == ["a@pref.test", "b@nx.test"]


def test_three_recipients_at_one_domain_share_one_transaction(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    sink = start_sink(sinks, "127.0.0.2", mx_port)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test", "b@remote.test", "c@remote.test"])
    (received,) = wait_received(sink)
    assert sorted(received.recipients) == ["a@remote.test", "b@remote.test", "c@remote.test"]
    assert sink.attempts == 1


def test_starttls_peer_gets_the_message_over_tls(
    relay, sinks, mx_port: int, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sink = start_sink(sinks, "127.0.0.6", mx_port, tls_context=self_signed_context(tmp_path))
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@tls.test"])
    (received,) = wait_received(sink)
    assert received.tls is True


def test_utf8_mail_to_a_peer_without_smtputf8_fails_with_5_6_7(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 6531: no SMTPUTF8 at the next hop → bounce, never a downgrade."""
    sink = start_sink(sinks, "127.0.0.2", mx_port, smtputf8=False)
    gsmtp = relay()
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO client.example")
        assert wire.command("MAIL FROM:<jones@foo.com> SMTPUTF8").startswith("250")
        assert wire.command("RCPT TO:<jörg@remote.test>").startswith("250")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: utf8\r\n\r\nbody\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250")
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.6.7"
    assert sink.received == []


def test_nxdomain_bounces_at_once(relay) -> None:  # type: ignore[no-untyped-def]
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@nx.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.1.2"


def test_kill9_mid_delivery_is_delivered_after_restart(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    hold = threading.Event()
    sink = start_sink(sinks, "127.0.0.2", mx_port, behaviour=SinkBehaviour(hold_data=hold))
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test"], subject="crash")
    wait_for(lambda: sink.attempts >= 1, what="delivery in progress")
    gsmtp.kill9()  # mid-DATA at the remote: its transaction dies with the connection
    hold.set()
    gsmtp.start()
    (received,) = wait_received(sink, timeout=20)
    assert b"Subject: crash" in received.data
    assert sink.attempts >= 2  # the copy that landed came from the restarted process
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )


def test_queue_bounce_during_a_delivery_bounces_once_it_defers(relay, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """Red-team finding: `gsmtp queue bounce ID` while the message was being delivered
    answered "no such message (or nothing queued)" and recorded nothing. Now the
    request is recorded; the delivery, held at the dot, ends 451; the recipient is due
    at once (not after the 1 h retry step) and bounced without another attempt."""
    hold = threading.Event()
    sink = start_sink(
        sinks, "127.0.0.2", mx_port, behaviour=SinkBehaviour(hold_data=hold, fail_first=99)
    )
    gsmtp = relay(retry=["1h"])
    message_id = send(gsmtp, "jones@foo.com", ["u@remote.test"])
    wait_for(lambda: sink.attempts == 1, what="the delivery running")
    try:
        bounced = gsmtp.cli("queue", "bounce", message_id, check=False)
    finally:
        hold.set()
    assert (bounced.returncode, bounced.stdout) == (0, f"bouncing: {message_id}\n"), bounced.stderr
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Final-Recipient"] == "rfc822; u@remote.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.0.0 Bounced by the administrator"
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )
    assert sink.attempts == 1 and sink.received == []
