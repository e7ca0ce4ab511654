"""RFC 3461 parameters on the server side: xtext, MAIL RET/ENVID, RCPT NOTIFY/ORCPT, fed
to a bare session as bytes; the Envelope carries what was accepted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gsmtp.protocol import dsnparams
from gsmtp.protocol.dsnparams import Notify, RecipientDsn, Ret
from gsmtp.protocol.session import Envelope, Limits
from tests.unit import session_driver

EHLO = b"EHLO c.example\r\n"


def wire() -> session_driver.SessionWire:
    return session_driver.SessionWire(Limits(), greeted=True)


def transaction(mail: bytes, *rcpts: bytes) -> tuple[list[str], Envelope]:
    """Run MAIL, the RCPTs and a message; the replies to MAIL and RCPT, and the envelope."""
    w = wire()
    w.send(EHLO)
    w.read_reply()
    w.send(b"MAIL FROM:<bob@remote.example>" + mail + b"\r\n")
    for rcpt in rcpts:
        w.send(b"RCPT TO:" + rcpt + b"\r\n")
    replies = w.all_replies()
    w.send(b"DATA\r\n")
    w.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert w.all_replies()[-1].startswith("250 2.0.0 Ok: queued")
    (envelope,) = w.stored
    return replies, envelope


# -- xtext (RFC 3461 §4) ------------------------------------------------------------------


def test_xtext_encodes_plus_equals_and_anything_outside_bang_to_tilde() -> None:
    assert dsnparams.xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+E9"
    assert dsnparams.xtext_encode("user@example.com") == "user@example.com"


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("abc", "abc"),
        ("a+2Bb", "a+b"),
        ("a+2bb", "a+b"),  # lower-case hex is read too (be liberal in what you accept)
        ("+20", " "),
        ("", ""),
        ("a+2", None),
        ("a+", None),
        ("a+ZZ", None),
        ("a=b", None),
        ("a b", None),
        ("caf\u00e9", None),
    ],
)
def test_xtext_decode(text: str, decoded: str | None) -> None:
    assert dsnparams.xtext_decode(text) == decoded


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255)))
def test_xtext_round_trip(text: str) -> None:
    encoded = dsnparams.xtext_encode(text)
    assert encoded.isascii() and " " not in encoded
    assert dsnparams.xtext_decode(encoded) == text


# -- the session --------------------------------------------------------------------------


def test_ehlo_advertises_dsn() -> None:
    w = wire()
    w.send(EHLO)
    assert "250-DSN" in w.read_reply()


def test_accepted_parameters_reach_the_envelope_decoded() -> None:
    replies, envelope = transaction(
        b" RET=full ENVID=QQ+2B1+3D2",
        b"<jones@foo.com> NOTIFY=success,DELAY ORCPT=rfc822;Jones+2Bx@foo.com",
        b"<brown@foo.com>",
        b"<postmaster> NOTIFY=NEVER",
    )
    assert replies == ["250 2.1.0 Sender ok"] + ["250 2.1.5 Recipient ok"] * 3
    assert envelope.ret is Ret.FULL
    assert envelope.envid == "QQ+1=2"
    assert envelope.dsn == {
        "jones@foo.com": RecipientDsn(
            frozenset({Notify.SUCCESS, Notify.DELAY}), "rfc822;Jones+x@foo.com"
        ),
        "postmaster@mx.foo.com": RecipientDsn(dsnparams.NEVER, None),
    }


def test_without_parameters_the_envelope_says_nothing_was_asked() -> None:
    _, envelope = transaction(b"", b"<jones@foo.com>")
    assert (envelope.ret, envelope.envid, envelope.dsn) == (None, None, {})


def test_a_refused_recipient_leaves_no_dsn_and_a_repeated_one_keeps_the_first() -> None:
    _, envelope = transaction(
        b"",
        b"<nobody@foo.com> NOTIFY=SUCCESS",
        b"<jones@foo.com> NOTIFY=FAILURE",
        b"<jones@foo.com> NOTIFY=SUCCESS",
    )
    assert envelope.dsn == {"jones@foo.com": RecipientDsn(frozenset({Notify.FAILURE}))}


def test_rset_and_a_new_transaction_forget_the_parameters() -> None:
    w = wire()
    w.send(EHLO)
    w.send(b"MAIL FROM:<a@b.example> RET=FULL ENVID=x\r\nRCPT TO:<jones@foo.com> NOTIFY=NEVER\r\n")
    w.send(b"RSET\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<jones@foo.com>\r\n")
    w.send(b"DATA\r\n")
    w.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    (envelope,) = w.stored
    assert (envelope.ret, envelope.envid, envelope.dsn) == (None, None, {})


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        (b"RET=FULLY", "501 5.5.4 Bad RET parameter: must be FULL or HDRS"),
        (b"RET", "501 5.5.4 Bad RET parameter: must be FULL or HDRS"),
        (b"ENVID", "501 5.5.4 Bad ENVID parameter: a value is required"),
        (b"ENVID=", "501 5.5.4 Bad ENVID parameter: a value is required"),
        (b"ENVID=a+2", "501 5.5.4 Bad ENVID parameter: not valid xtext"),
        (b"ENVID=a=b", "501 5.5.4 Bad ENVID parameter: not valid xtext"),
        (
            b"ENVID=x+0D+0AX-Injected:+20yes",
            "501 5.5.4 Bad ENVID parameter: must decode to printable US-ASCII",
        ),
        (b"ENVID=" + b"x" * 101, "501 5.5.4 Bad ENVID parameter: longer than 100 characters"),
        (b"RET=FULL RET=HDRS", "501 5.5.4 Duplicate RET parameter"),
        (b"ENVID=a envid=b", "501 5.5.4 Duplicate ENVID parameter"),
    ],
)
def test_bad_mail_parameters_are_named(mail: bytes, reply: str) -> None:
    w = wire()
    w.send(EHLO)
    w.read_reply()
    w.send(b"MAIL FROM:<a@b.example> " + mail + b"\r\nMAIL FROM:<a@b.example>\r\n")
    assert w.all_replies() == [reply, "250 2.1.0 Sender ok"]


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        (b"NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter: NEVER must stand alone"),
        (b"NOTIFY=FAILURE,NEVER", "501 5.5.4 Bad NOTIFY parameter: NEVER must stand alone"),
        (
            b"NOTIFY=SUCCESS,SOMETIMES",
            "501 5.5.4 Bad NOTIFY parameter: must be NEVER or a list of SUCCESS, FAILURE, DELAY",
        ),
        (
            b"NOTIFY=SUCCESS,",
            "501 5.5.4 Bad NOTIFY parameter: must be NEVER or a list of SUCCESS, FAILURE, DELAY",
        ),
        (b"NOTIFY=DELAY,delay", "501 5.5.4 Bad NOTIFY parameter: DELAY is given twice"),
        (b"NOTIFY", "501 5.5.4 Bad NOTIFY parameter: a value is required"),
        (b"NOTIFY=NEVER NOTIFY=NEVER", "501 5.5.4 Duplicate NOTIFY parameter"),
        (
            b"ORCPT=a@b.example",
            "501 5.5.4 Bad ORCPT parameter: must be addr-type;xtext, e.g. rfc822;a@b",
        ),
        (
            b"ORCPT=rfc822;",
            "501 5.5.4 Bad ORCPT parameter: must be addr-type;xtext, e.g. rfc822;a@b",
        ),
        (
            b"ORCPT=rfc(822);a",
            "501 5.5.4 Bad ORCPT parameter: must be addr-type;xtext, e.g. rfc822;a@b",
        ),
        (b"ORCPT=rfc822;a+4", "501 5.5.4 Bad ORCPT parameter: not valid xtext"),
        (
            b"ORCPT=rfc822;a+0A@b",
            "501 5.5.4 Bad ORCPT parameter: must decode to printable US-ASCII",
        ),
        (
            b"ORCPT=rfc822;" + b"a" * 494,
            "501 5.5.4 Bad ORCPT parameter: longer than 500 characters",
        ),
        (b"ORCPT=rfc822;a ORCPT=rfc822;b", "501 5.5.4 Duplicate ORCPT parameter"),
        (b"NOTIFY=NEVER FOO=1", "555 5.5.4 Unsupported option"),
        (b"RET=FULL", "555 5.5.4 Unsupported option"),  # a MAIL parameter, not RCPT's
    ],
)
def test_bad_rcpt_parameters_are_named(rcpt: bytes, reply: str) -> None:
    w = wire()
    w.send(EHLO)
    w.read_reply()
    w.send(b"MAIL FROM:<a@b.example>\r\n")
    w.send(b"RCPT TO:<jones@foo.com> " + rcpt + b"\r\nRCPT TO:<jones@foo.com>\r\n")
    assert w.all_replies() == [
        "250 2.1.0 Sender ok",
        reply,
        "250 2.1.5 Recipient ok",
    ]


def test_the_longest_orcpt_fits_the_longer_rcpt_line() -> None:
    """RFC 3461 §4: ORCPT may be 500 characters, so RCPT lines may pass 512 octets; other
    commands keep the 512 cap and MAIL/RCPT have a cap of their own."""
    orcpt = b"rfc822;" + b"a" * 493
    line = b"RCPT TO:<jones@foo.com> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" + orcpt
    assert len(line) + 2 > 512
    w = wire()
    w.send(EHLO)
    w.read_reply()
    w.send(b"MAIL FROM:<a@b.example> RET=HDRS ENVID=" + b"e" * 100 + b"\r\n")
    w.send(line + b"\r\n")
    w.send(b"NOOP " + b"a" * 600 + b"\r\n")
    w.send(b"RCPT TO:<brown@foo.com> ORCPT=rfc822;" + b"a" * 1000 + b"\r\n")
    assert w.all_replies() == [
        "250 2.1.0 Sender ok",
        "250 2.1.5 Recipient ok",
        "500 5.5.2 Command line too long",
        "500 5.5.2 Command line too long",
    ]


# -- the client side: what goes to a next hop that offers DSN -----------------------------


def test_ehlo_reply_says_whether_the_peer_offers_dsn() -> None:
    from gsmtp.protocol.client import ServerReply, parse_ehlo

    assert parse_ehlo(ServerReply(250, ("mx greets us", "PIPELINING", "DSN"))).dsn
    assert not parse_ehlo(ServerReply(250, ("mx greets us", "PIPELINING"))).dsn


def test_mail_and_rcpt_carry_the_parameters_xtext_encoded() -> None:
    from gsmtp.protocol import client

    mail = client.mail_command(
        "a@b.example", size=10, eightbit=False, smtputf8=False, ret=Ret.HDRS, envid="QQ+1=2 x"
    )
    assert mail == b"MAIL FROM:<a@b.example> SIZE=10 RET=HDRS ENVID=QQ+2B1+3D2+20x\r\n"
    rcpt = client.rcpt_command(
        "c@d.example", RecipientDsn(frozenset({Notify.DELAY, Notify.SUCCESS}), "rfc822;c+x@d")
    )
    assert rcpt == b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c+2Bx@d\r\n"
    assert client.rcpt_command("c@d", RecipientDsn(dsnparams.NEVER)) == (
        b"RCPT TO:<c@d> NOTIFY=NEVER\r\n"
    )
    assert client.rcpt_command("c@d", RecipientDsn()) == b"RCPT TO:<c@d>\r\n"
    assert client.mail_command("a@b", size=None, eightbit=False, smtputf8=False) == (
        b"MAIL FROM:<a@b>\r\n"
    )


@given(
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1),
    st.sets(st.sampled_from(list(Notify))),
)
def test_what_the_client_sends_the_server_reads_back(envid: str, notify: set[Notify]) -> None:
    """The next hop (a gsmtp session here) decodes exactly what we were given."""
    from gsmtp.protocol import client

    envid = envid[:40]
    orcpt = "rfc822;" + envid
    mail = client.mail_command("a@b", size=None, eightbit=False, smtputf8=False, envid=envid)
    rcpt = client.rcpt_command("jones@foo.com", RecipientDsn(frozenset(notify), orcpt))
    w = wire()
    w.send(EHLO)
    w.send(mail + rcpt)
    w.send(b"DATA\r\n")
    w.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    (envelope,) = w.stored
    assert envelope.envid == envid
    assert envelope.dsn["jones@foo.com"] == RecipientDsn(frozenset(notify), orcpt)
