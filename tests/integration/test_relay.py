"""Relay to the world: real DNS (dnsmasq), real remote MTAs (aiosmtpd on 127.0.0.x)."""

from __future__ import annotations

import email
import threading
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import GsmtpProcess, SmtpWire, environment_has, free_port, wait_for
from tests.integration.remote import (
    Dnsmasq,
    Sink,
    SinkBehaviour,
    self_signed_context,
    wait_received,
)

pytestmark = pytest.mark.skipif(
    not environment_has("dnsmasq"), reason="dnsmasq is not installed (apt-get install dnsmasq-base)"
)

RECORDS = [
    "--mx-host=pref.test,mx1.pref.test,10",
    "--mx-host=pref.test,mx2.pref.test,20",
    "--host-record=mx1.pref.test,127.0.0.2",
    "--host-record=mx2.pref.test,127.0.0.3",
    "--mx-host=down.test,dead.down.test,10",
    "--mx-host=down.test,alive.down.test,20",
    "--host-record=dead.down.test,127.0.0.7",
    "--host-record=alive.down.test,127.0.0.3",
    "--host-record=implicit.test,127.0.0.4",
    "--dns-rr=null.test,15,000000",
    "--host-record=null.test,127.0.0.2",
    "--mx-host=remote.test,mx.remote.test,10",
    "--host-record=mx.remote.test,127.0.0.2",
    "--mx-host=tls.test,mx.tls.test,10",
    "--host-record=mx.tls.test,127.0.0.6",
]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[Dnsmasq]:
    server = Dnsmasq(RECORDS)
    yield server
    server.stop()


@pytest.fixture
def mx_port() -> int:
    return free_port("127.0.0.2")


@pytest.fixture
def sinks(mx_port: int) -> Iterator[dict[str, Sink]]:
    started: dict[str, Sink] = {}
    yield started
    for sink in started.values():
        sink.stop()


def start_sink(sinks: dict[str, Sink], host: str, port: int, **kwargs: Any) -> Sink:
    sink = Sink(host, port, **kwargs)
    sinks[host] = sink
    return sink


@pytest.fixture
def relay(gsmtp_factory, dns_server: Dnsmasq, mx_port: int):  # type: ignore[no-untyped-def]
    def make(**delivery: Any) -> GsmtpProcess:
        settings = {
            "server": {"trusted_networks": ["127.0.0.1/32"]},
            "delivery": {
                "nameservers": [f"127.0.0.1:{dns_server.port}"],
                "port": mx_port,
                "retry": ["1s"],
                "connect_timeout": "2s",
                **delivery,
            },
        }
        return gsmtp_factory(settings)

    return make


def send(gsmtp: GsmtpProcess, sender: str, recipients: list[str], subject: str = "hello") -> str:
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO client.example")
        assert wire.command(f"MAIL FROM:<{sender}>").startswith("250")
        for recipient in recipients:
            reply = wire.command(f"RCPT TO:<{recipient}>")
            assert reply.startswith("250"), reply
        assert wire.command("DATA").startswith("354")
        headers = f"Subject: {subject}\r\nMessage-ID: <{subject}@client.example>\r\n"
        wire.send(headers.encode() + b"\r\nbody\r\n.\r\n")
        reply = wire.read_reply()[0]
        assert reply.startswith("250 2.0.0"), reply
        return reply.rsplit(" ", 1)[1]


def bounce_for(gsmtp: GsmtpProcess, user: str = "jones@foo.com") -> Message:
    (file,) = wait_for(lambda: gsmtp.maildir_files(user), timeout=20, what="a bounce")
    return email.message_from_bytes(file.read_bytes())


def delivery_status(bounce: Message) -> list[Message]:
    """The per-recipient blocks of the message/delivery-status part."""
    report = [
        part for part in bounce.walk() if part.get_content_type() == "message/delivery-status"
    ]
    assert len(report) == 1
    payload = report[0].get_payload()
    assert isinstance(payload, list)
    return payload[1:]


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
