"""Smaller things a server facing the internet must get right, against a live server:
planted delivery headers, IDNA2008 domains on the way to the MX, and terminal escapes
in the CLI's output (S-12)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.harness import GsmtpProcess, SmtpWire, environment_has, free_port, wait_for
from tests.integration.remote import Dnsmasq, Sink, SinkBehaviour, wait_received


def send(gsmtp: GsmtpProcess, mail: str, rcpt: str, content: bytes, helo: str = "c.example") -> str:
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.send(f"EHLO {helo}\r\n".encode())
        wire.read_reply()
        assert wire.command(mail).startswith("250")
        reply = wire.command(rcpt)
        assert reply.startswith("250"), reply
        assert wire.command("DATA").startswith("354")
        wire.send(content + b".\r\n")
        reply = wire.read_reply()[0]
        assert reply.startswith("250 2.0.0"), reply
        return reply.rsplit(" ", 1)[1]


def test_return_path_and_delivered_to_planted_by_the_client_are_not_delivered(
    gsmtp: GsmtpProcess,
) -> None:
    content = (
        b"Return-Path: <ceo@bank.example>\r\n"
        b"Delivered-To: jones@foo.com,\r\n\tboss@foo.com\r\n"
        b"Subject: planted\r\n"
        b"\r\n"
        b"Return-Path: <quoted in the body>\r\n"
    )
    send(gsmtp, "MAIL FROM:<a@remote.example>", "RCPT TO:<jones@foo.com>", content)
    (file,) = wait_for(lambda: gsmtp.maildir_files("jones@foo.com"), what="delivery")
    head, _, body = file.read_bytes().partition(b"\n\n")
    assert head.startswith(b"Return-Path: <a@remote.example>\nDelivered-To: jones@foo.com\n")
    assert head.count(b"Return-Path:") == 1 and head.count(b"Delivered-To:") == 1
    assert b"ceo@bank.example" not in head and b"boss@foo.com" not in head
    assert b"Subject: planted" in head
    assert body == b"Return-Path: <quoted in the body>\n"


@pytest.fixture
def dns_server() -> Iterator[Dnsmasq]:
    if not environment_has("dnsmasq"):
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")
    server = Dnsmasq(
        [
            "--mx-host=xn--fa-hia.test,mx.xn--fa-hia.test,10",
            "--host-record=mx.xn--fa-hia.test,127.0.0.2",
            "--mx-host=fass.test,mx.fass.test,10",  # where IDNA2003 would send it
            "--host-record=mx.fass.test,127.0.0.3",
        ]
    )
    yield server
    server.stop()


def test_a_sharp_s_domain_is_relayed_to_its_idna2008_name(
    gsmtp_factory,  # type: ignore[no-untyped-def]
    dns_server: Dnsmasq,
) -> None:
    """`faß.test` is `xn--fa-hia.test` (IDNA2008, UTS #46 non-transitional), not
    `fass.test` (IDNA2003): the MX looked up and the RCPT sent both say so."""
    port = free_port("127.0.0.2")
    right, wrong = Sink("127.0.0.2", port), Sink("127.0.0.3", port)
    try:
        gsmtp = gsmtp_factory(
            {
                "server": {"trusted_networks": ["127.0.0.1/32"]},
                "delivery": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "port": port},
            }
        )
        send(
            gsmtp,
            "MAIL FROM:<jones@foo.com> SMTPUTF8",
            "RCPT TO:<u@faß.test>",
            b"Subject: idna\r\n\r\nbody\r\n",
        )
        (received,) = wait_received(right)
        assert received.recipients == ["u@xn--fa-hia.test"]
        assert wrong.received == []
    finally:
        right.stop()
        wrong.stop()


def test_queue_list_and_show_escape_what_client_and_peer_wrote(gsmtp_factory) -> None:  # type: ignore[no-untyped-def]
    """A HELO, a header and a remote reply with terminal escapes are printed escaped;
    --json stays JSON (which escapes them itself)."""
    port = free_port("127.0.0.4")
    reply = "450 4.2.0 \x1b[2J\x1b]0;owned\x07mailbox busy"
    sink = Sink("127.0.0.4", port, SinkBehaviour(rcpt_replies={"a@remote.example": reply}))
    try:
        gsmtp = gsmtp_factory(
            {
                "server": {"trusted_networks": ["127.0.0.1/32"]},
                "delivery": {"smarthost": f"127.0.0.4:{port}", "retry": ["1h"]},
            }
        )
        message_id = send(
            gsmtp,
            "MAIL FROM:<jones@foo.com>",
            "RCPT TO:<a@remote.example>",
            b"Subject: \x1b[31mred\x1b[0m\r\n\r\nbody\r\n",
            helo="evil\x1b[8m.example",
        )
        wait_for(
            lambda: gsmtp.spool_rows("SELECT last_error FROM recipients")[0][0],
            what="the deferral",
        )
    finally:
        sink.stop()
    listing = gsmtp.cli("queue", "list").stdout
    assert "\\x1b[2J\\x1b]0;owned\\x07mailbox busy" in listing
    shown = gsmtp.cli("queue", "show", message_id).stdout
    assert "helo: evil\\x1b[8m.example" in shown
    assert "Subject: \\x1b[31mred\\x1b[0m" in shown
    for output in (listing, shown):
        assert "\x1b" not in output and "\x07" not in output
    as_json = gsmtp.cli("queue", "show", message_id, "--json").stdout
    assert "\x1b" not in as_json and '"helo": "evil\\u001b[8m.example"' in as_json
