"""Outbound SMTP against peers that behave in particular ways: pipelining, refusals that
depend on the peer's extensions, EHLO refused, plaintext injected behind the STARTTLS
reply, a failed TLS handshake, replies withheld, DNS that fails. The peers are raw
scripted servers (ScriptedPeer) or aiosmtpd sinks on 127.0.0.x; the DNS is dnsmasq, or
a server that answers SERVFAIL or nothing."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import Factory
from tests.integration.harness import SmtpWire, wait_for
from tests.integration.remote import (
    BrokenDns,
    Conversation,
    accept_transaction,
    bounce_for,
    delivery_status,
    ehlo_reply,
    first_attempt,
    recipient_row,
    self_signed_context,
    send,
    start_peer,
    start_sink,
    wait_received,
)

GREETING = "220 peer.test ESMTP\r\n"


def greet(conversation: Conversation, *extensions: str) -> None:
    conversation.reply(GREETING)
    assert conversation.read_line().startswith("EHLO ")
    conversation.reply(ehlo_reply(*extensions))


def test_pipelined_envelope_when_the_peer_offers_pipelining(relay, peers, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 2920: MAIL, every RCPT and DATA go out in one write. This peer answers none of
    them before it has the DATA line, so a client that waited for each reply would
    stall. A recipient refused inside the batch fails alone."""
    batches: list[bytes] = []

    def script(conversation: Conversation) -> None:
        greet(conversation, "PIPELINING", "8BITMIME")
        batches.append(conversation.read_until(b"DATA\r\n"))
        conversation.reply("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No such user\r\n354 Go\r\n")
        conversation.data = conversation.read_until(b"\r\n.\r\n")
        conversation.reply("250 2.0.0 Stored\r\n")
        accept_transaction(conversation)  # QUIT

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay(command_timeout="2s")
    send(gsmtp, "jones@foo.com", ["a@remote.test", "gone@remote.test"], subject="piped")
    (block,) = delivery_status(bounce_for(gsmtp))
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; gone@remote.test", "5.1.1")
    assert batches == [
        b"MAIL FROM:<jones@foo.com>\r\nRCPT TO:<a@remote.test>\r\n"
        b"RCPT TO:<gone@remote.test>\r\nDATA\r\n"
    ]
    assert b"Subject: piped" in peer.conversations[0].data
    assert peer.errors == []
    wait_for(
        lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="empty spool"
    )


def test_a_message_over_the_peers_size_fails_5_3_4_without_sending(
    relay, peers, mx_port: int
) -> None:  # type: ignore[no-untyped-def]
    """RFC 1870: the peer's SIZE is smaller than the message: a permanent 5.3.4 before
    MAIL, nothing sent."""

    def script(conversation: Conversation) -> None:
        greet(conversation, "SIZE 100", "8BITMIME")
        accept_transaction(conversation)

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test"])
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.3.4"
    assert block["Diagnostic-Code"] == "smtp; 552 5.3.4 Message too big for mx.remote.test"
    wait_for(lambda: peer.conversations[0].finished.is_set(), what="the peer's connection closed")
    assert [c[:4] for c in peer.conversations[0].commands] == ["EHLO", "QUIT"]


def test_8bit_mail_to_a_peer_without_8bitmime_fails_5_6_3(relay, peers, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 6152: 8-bit content is never sent to a peer that does not offer 8BITMIME (and
    never silently re-encoded): 5.6.3, nothing sent."""

    def script(conversation: Conversation) -> None:
        greet(conversation, "SIZE 1000000")
        accept_transaction(conversation)

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay()
    with SmtpWire(gsmtp.port) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<jones@foo.com> BODY=8BITMIME")
        wire.command("RCPT TO:<a@remote.test>")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: caf\xc3\xa9\r\n\r\n\xc3\xbcber\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250 2.0.0")
    (block,) = delivery_status(bounce_for(gsmtp))
    assert block["Status"] == "5.6.3"
    wait_for(lambda: peer.conversations[0].finished.is_set(), what="the peer's connection closed")
    assert [c[:4] for c in peer.conversations[0].commands] == ["EHLO", "QUIT"]


def test_552_to_rcpt_is_temporary(relay, peers, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 5321 §4.5.3.1.10: 552 to RCPT means too many recipients (or a full mailbox):
    that recipient is deferred, not bounced; the others are delivered."""

    def script(conversation: Conversation) -> None:
        greet(conversation, "8BITMIME")
        accept_transaction(conversation, {"full@remote.test": "552 5.2.2 Mailbox full"})

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay(retry=["1h"])
    send(gsmtp, "jones@foo.com", ["ok@remote.test", "full@remote.test"], subject="partly")
    status, attempts, error = first_attempt(gsmtp, "full@remote.test")
    assert (status, attempts, error) == ("queued", 1, "552 5.2.2 Mailbox full")
    assert recipient_row(gsmtp, "ok@remote.test") == ("delivered", 1, "250 2.0.0 Stored")
    assert b"Subject: partly" in peer.conversations[0].data
    wait_for(lambda: gsmtp.events("message_deferred", rcpt="full@remote.test"), what="the log line")
    assert gsmtp.events("bounce_queued") == [] and gsmtp.events("message_failed") == []


def test_helo_when_the_peer_refuses_ehlo(relay, peers, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 5321 §3.2: a peer that does not know EHLO gets HELO, and plain SMTP (no
    ESMTP parameters on MAIL)."""

    def script(conversation: Conversation) -> None:
        conversation.reply(GREETING)
        assert conversation.read_line().startswith("EHLO ")
        conversation.reply("502 5.5.1 EHLO not implemented\r\n")
        assert conversation.read_line() == "HELO mx.foo.com"
        conversation.reply("250 peer.test\r\n")
        accept_transaction(conversation)

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test"], subject="old school")
    wait_for(lambda: gsmtp.spool_rows("SELECT COUNT(*) FROM messages") == [(0,)], what="delivered")
    (conversation,) = peer.conversations
    assert b"Subject: old school" in conversation.data
    assert conversation.commands[:4] == [
        "EHLO mx.foo.com",
        "HELO mx.foo.com",
        "MAIL FROM:<jones@foo.com>",
        "RCPT TO:<a@remote.test>",
    ]
    assert peer.errors == []


def test_plaintext_behind_the_starttls_reply_is_refused(relay, peers, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """D-29 (the client side of CVE-2011-0411): a peer that pushes a plaintext reply
    behind its 220 to STARTTLS could answer for the TLS session; gsmtp drops the host
    before the handshake and sends nothing more to it."""

    def script(conversation: Conversation) -> None:
        greet(conversation, "STARTTLS", "8BITMIME")
        assert conversation.read_line() == "STARTTLS"
        conversation.reply("220 2.0.0 Ready\r\n250 2.0.0 injected\r\n")
        conversation.after_starttls = conversation.drain()

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay(retry=["1h"], command_timeout="2s")
    send(gsmtp, "jones@foo.com", ["a@remote.test"])
    status, _, error = first_attempt(gsmtp, "a@remote.test")
    assert status == "queued"
    assert "plaintext sent after the STARTTLS reply (injection)" in error
    conversation = peer.conversations[0]
    wait_for(conversation.finished.is_set, what="the peer's connection closed")
    assert conversation.after_starttls == b""  # no ClientHello, no MAIL
    assert conversation.commands == ["EHLO mx.foo.com", "STARTTLS"]


def fail_the_handshake(conversation: Conversation) -> None:
    """Offer STARTTLS, answer 220, then send garbage for the ClientHello."""
    greet(conversation, "STARTTLS", "8BITMIME")
    assert conversation.read_line() == "STARTTLS"
    conversation.reply("220 2.0.0 Ready\r\n")
    conversation.after_starttls = conversation.read_until(b"\x16\x03")  # a ClientHello
    conversation.reply("this is not TLS\r\n")


def test_a_failed_tls_handshake_under_encrypt_moves_to_the_next_mx(  # type: ignore[no-untyped-def]
    relay, peers, sinks, mx_port: int, tmp_path: Path
) -> None:
    """`encrypt`: the first MX offers STARTTLS and then fails the handshake: the message
    goes to the next MX over TLS (pref.test: 127.0.0.2 at 10, 127.0.0.3 at 20), never in
    plaintext to the first."""
    first = start_peer(peers, "127.0.0.2", mx_port, fail_the_handshake)
    second = start_sink(sinks, "127.0.0.3", mx_port, tls_context=self_signed_context(tmp_path))
    gsmtp = relay(tls="encrypt")
    send(gsmtp, "jones@foo.com", ["a@pref.test"], subject="tls or next")
    (received,) = wait_received(second)
    assert b"Subject: tls or next" in received.data
    assert received.tls is True
    (conversation,) = first.conversations
    assert conversation.commands == ["EHLO mx.foo.com", "STARTTLS"]
    assert first.errors == []


def test_a_failed_tls_handshake_under_may_is_retried_in_plaintext_on_a_new_connection(  # type: ignore[no-untyped-def]
    relay, peers, mx_port: int
) -> None:
    """`may` (the default), as Postfix: the handshake fails, the connection is dropped
    and the same MX gets the message in plaintext on a new one, without STARTTLS."""

    def script(conversation: Conversation) -> None:
        if conversation is peer.conversations[0]:
            fail_the_handshake(conversation)
            return
        greet(conversation, "STARTTLS", "8BITMIME")
        accept_transaction(conversation)

    peer = start_peer(peers, "127.0.0.2", mx_port, script)
    gsmtp = relay()
    send(gsmtp, "jones@foo.com", ["a@remote.test"], subject="plain after all")
    wait_for(lambda: gsmtp.events("message_delivered"), what="the delivery")
    first, second = peer.conversations
    assert first.commands == ["EHLO mx.foo.com", "STARTTLS"]
    assert second.commands[:2] == ["EHLO mx.foo.com", "MAIL FROM:<jones@foo.com>"]
    assert b"Subject: plain after all" in second.data
    assert peer.errors == []
    (delivered,) = gsmtp.events("message_delivered")
    assert delivered["tls_version"] is None and delivered["tls_verified"] is False
    metrics = gsmtp.metrics()
    assert metrics['gsmtp_tls_policy_failures_total{reason="handshake_failed"}'] == 1.0
    assert metrics['gsmtp_outbound_tls_total{level="none"}'] == 1.0


def test_a_command_timeout_moves_to_the_next_mx(relay, peers, sinks, mx_port: int) -> None:  # type: ignore[no-untyped-def]
    """RFC 5321 §4.5.3.2: a peer that never answers EHLO is given command_timeout, then
    the next MX gets the message."""

    def script(conversation: Conversation) -> None:
        conversation.reply(GREETING)
        conversation.read_line()
        conversation.hold()

    first = start_peer(peers, "127.0.0.2", mx_port, script)
    second = start_sink(sinks, "127.0.0.3", mx_port)
    gsmtp = relay(command_timeout="1s")
    send(gsmtp, "jones@foo.com", ["a@pref.test"], subject="slow first")
    (received,) = wait_received(second)
    assert b"Subject: slow first" in received.data
    assert first.conversations[0].commands == ["EHLO mx.foo.com"]


def test_a_data_timeout_defers_and_never_tries_the_next_mx_at_once(
    relay,  # type: ignore[no-untyped-def]
    peers,
    sinks,
    mx_port: int,
) -> None:
    """After the final dot the first MX may have taken the message: when its reply
    does not come within data_timeout the attempt is deferred ("may be delivered
    twice"), and the next MX is not tried at once, which could deliver it twice now."""

    def script(conversation: Conversation) -> None:
        greet(conversation, "8BITMIME")
        assert conversation.read_line().startswith("MAIL")
        conversation.reply("250 2.1.0 Ok\r\n")
        assert conversation.read_line().startswith("RCPT")
        conversation.reply("250 2.1.5 Ok\r\n")
        assert conversation.read_line() == "DATA"
        conversation.reply("354 Go\r\n")
        conversation.data = conversation.read_until(b"\r\n.\r\n")
        conversation.hold()

    first = start_peer(peers, "127.0.0.2", mx_port, script)
    second = start_sink(sinks, "127.0.0.3", mx_port)
    gsmtp = relay(data_timeout="1s", retry=["1h"])
    send(gsmtp, "jones@foo.com", ["a@pref.test"], subject="dot sent")
    wait_for(
        lambda: second.received or ((row := recipient_row(gsmtp, "a@pref.test")) and row[1] >= 1),
        what="the first attempt's end",
    )
    assert second.received == [], "the next MX was tried at once after the final dot"
    status, attempts, error = first_attempt(gsmtp, "a@pref.test")
    assert (status, attempts) == ("queued", 1)
    assert error.startswith("451 4.4.2 conversation with mx1.pref.test[127.0.0.2] timed out")
    assert "may be delivered twice" in error
    assert b"Subject: dot sent" in first.conversations[0].data
    assert second.received == [] and second.attempts == 0


def test_dns_servfail_and_timeout_defer_with_4_4_3(gsmtp_factory: Factory) -> None:
    """SERVFAIL and a resolver that never answers are temporary: deferred with 4.4.3,
    no bounce, no connection. (The time-out takes the resolver's 10 s lifetime.)"""
    dns_server = BrokenDns(servfail="servfail.test")
    try:
        gsmtp = gsmtp_factory(
            {
                "server": {"trusted_networks": ["127.0.0.1/32"]},
                "delivery": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "retry": ["1h"]},
            }
        )
        send(gsmtp, "jones@foo.com", ["a@servfail.test", "b@silent.test"])
        for address, domain in (
            ("a@servfail.test", "servfail.test"),
            ("b@silent.test", "silent.test"),
        ):
            status, attempts, error = first_attempt(gsmtp, address, timeout=30)
            assert (status, attempts) == ("queued", 1)
            assert error.startswith(f"451 4.4.3 DNS lookup of {domain} MX failed"), error
        assert {"servfail.test", "silent.test"} <= set(dns_server.queries)
        assert gsmtp.events("bounce_queued") == []
    finally:
        dns_server.stop()
