"""The sans-I/O session fed bytes: the reliability catalogue's protocol rows (P-xx)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsmtp.policy import client_from_ip
from gsmtp.protocol import replies
from gsmtp.protocol.session import NEED_DATA, Limits, LocalProtocolError, MailFrom, SmtpSession
from tests.unit import session_driver

ENV = b"EHLO c.example\r\n"


def SessionWire(
    limits: Limits | None = None, *, trusted: bool = False
) -> session_driver.SessionWire:
    """A wire whose greeting was already read."""
    return session_driver.SessionWire(limits, trusted=trusted, greeted=True)


def open_data(wire: session_driver.SessionWire, rcpt: bytes = b"jones@foo.com") -> None:
    wire.send(ENV)
    wire.send(b"MAIL FROM:<bob@remote.example>\r\n")
    wire.send(b"RCPT TO:<" + rcpt + b">\r\n")
    wire.send(b"DATA\r\n")
    replies = wire.all_replies()
    assert replies[-1].startswith("354"), replies


SMUGGLED = (
    b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<brown@foo.com>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
)


@pytest.mark.parametrize(
    "eod",
    [
        b"\n.\n",
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\n.\r",
        b"\r.\n",
        b"\n\n.\r\n",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
    ],
)
def test_smuggled_end_of_data_is_content_and_refused(eod: bytes) -> None:
    """P-01..P-05: one reply after the real end, 550 5.5.2; nothing stored."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b"Subject: outer\r\n\r\nfirst" + eod + SMUGGLED)
    assert wire.all_replies() == ["550 5.5.2 Bare <CR> or <LF> in message data, message refused"]
    assert wire.stored == []
    wire.send(b"NOOP\r\n")
    assert wire.all_replies()[0].startswith("250")


@pytest.mark.parametrize("eod", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
def test_nul_next_to_the_dot_is_not_an_end(eod: bytes) -> None:
    """P-06: never two messages; the whole thing is one message."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b"Subject: outer\r\n\r\nfirst" + eod + SMUGGLED)
    assert [r[:3] for r in wire.all_replies()] == ["250"]
    (envelope,) = wire.stored
    assert b"smuggled" in envelope.content


def test_oversize_message_is_read_to_the_real_end_then_refused() -> None:
    """P-07 / P-22: the size error never ends DATA early; the HELPs are never answered."""
    wire = SessionWire(Limits(max_message_size=1000))
    open_data(wire)
    wire.send(b"a" * 78 + b"\r\n")
    for _ in range(20):
        wire.send(b"b" * 78 + b"\r\n")
    wire.send(b".\nHELP\r\nHELP\r\n")
    assert wire.all_replies() == []
    wire.send(b".\r\n")
    assert wire.all_replies() == ["552 5.3.4 Message size exceeds fixed limit"]
    assert wire.stored == []
    wire.send(b"MAIL FROM:<x@remote.example>\r\n")
    assert wire.all_replies()[0].startswith("250")


def test_message_exactly_at_the_limit_is_accepted() -> None:
    wire = SessionWire(Limits(max_message_size=100))
    open_data(wire)
    wire.send(b"x" * 98 + b"\r\n.\r\n")
    assert [r[:3] for r in wire.all_replies()] == ["250"]


def test_dot_stuffing_is_undone() -> None:
    """P-51."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b".From: x\r\n\r\n.y\r\n..x\r\n..\r\n.\r\n")
    assert wire.stored[0].content == b"From: x\r\n\r\ny\r\n.x\r\n.\r\n"


def test_empty_message_is_accepted() -> None:
    """P-50: decided: an empty message is accepted (RFC 5321 §4.1.1.4)."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b".\r\n")
    assert wire.all_replies()[0].startswith("250")
    assert wire.stored[0].content == b""


def test_binary_and_8bit_content_is_kept_byte_exact() -> None:
    """P-48/P-49: invalid UTF-8 and 8-bit bytes in DATA are stored as they came."""
    body = b"Subject: caf\xe9\r\nFrom: \xff\r\n\r\n\xc3\x28 \x00 \x7f\r\n"
    wire = SessionWire()
    open_data(wire)
    wire.send(body + b".\r\n")
    assert wire.stored[0].content == body


@pytest.mark.parametrize(("count", "code"), [(100, "250"), (101, "554")])
def test_received_header_loop_limit(count: int, code: str) -> None:
    """D-40: over 100 Received: headers is a loop; 100 is fine."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b"Received: from x by y; date\r\n" * count + b"\r\nbody\r\n.\r\n")
    assert wire.all_replies()[0][:3] == code


def test_received_lines_in_the_body_do_not_count() -> None:
    wire = SessionWire()
    open_data(wire)
    wire.send(b"Subject: x\r\n\r\n" + b"Received: quoted\r\n" * 150 + b".\r\n")
    assert wire.all_replies()[0].startswith("250")


def test_bare_lf_in_a_command_gets_one_refusal() -> None:
    """P-11: at most one reply per CRLF line; never two 250s."""
    wire = SessionWire()
    wire.send(b"NOOP\nNOOP\r\n")
    assert wire.all_replies() == ["500 5.5.2 Line must end in <CR><LF>"]


def test_bare_lf_line_alone_is_answered_promptly() -> None:
    wire = SessionWire()
    wire.send(b"EHLO x\n")
    assert wire.all_replies() == ["500 5.5.2 Line must end in <CR><LF>"]


def test_bare_cr_in_a_command() -> None:
    """P-12."""
    wire = SessionWire()
    wire.send(b"NOOP\rNOOP\r\n")
    assert wire.all_replies() == ["500 5.5.2 Line must end in <CR><LF>"]


def test_nul_in_a_command() -> None:
    """P-14: 501 and the session goes on."""
    wire = SessionWire()
    wire.send(b"HELO \x00x\r\nNOOP\r\n")
    assert [r[:9] for r in wire.all_replies()] == ["501 5.5.2", "250 2.0.0"]


def test_command_line_of_512_octets_is_fine_513_is_too_long() -> None:
    """P-15: the cap counts the CRLF; the session stays in sync."""
    wire = SessionWire()
    wire.send(b"NOOP " + b"a" * 505 + b"\r\n")
    wire.send(b"NOOP " + b"a" * 506 + b"\r\n")
    wire.send(b"NOOP\r\n")
    assert [r[:9] for r in wire.all_replies()] == ["250 2.0.0", "500 5.5.2", "250 2.0.0"]


def test_endless_command_line_is_discarded_with_bounded_memory() -> None:
    """P-16: 10 MiB without CRLF, then CRLF → one 500, and the buffer never grows."""
    wire = SessionWire()
    chunk = b"A" * 65536
    for _ in range(160):
        wire.send(chunk)
        assert len(wire.session._input) <= 65536 + 512
    wire.send(b"\r\nNOOP\r\n")
    assert [r[:9] for r in wire.all_replies()] == ["500 5.5.2", "250 2.0.0"]


def test_too_many_recipients() -> None:
    """P-33: the first max get 250, the rest 452 4.5.3; DATA goes to the accepted ones."""
    wire = SessionWire(Limits(max_recipients=3), trusted=True)
    wire.send(ENV + b"")
    wire.send(b"MAIL FROM:<a@remote.example>\r\n")
    for index in range(5):
        wire.send(f"RCPT TO:<user{index}@remote.example>\r\n".encode())
    replies = [r[:9] for r in wire.all_replies()]
    assert replies[-5:] == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2
    wire.send(b"DATA\r\n")
    wire.send(b"x\r\n.\r\n")
    assert len(wire.stored[0].recipients) == 3


def test_duplicate_recipient_is_stored_once() -> None:
    """P-32."""
    wire = SessionWire()
    open_data(wire)
    wire.send(b"x\r\n.\r\n")
    wire2 = SessionWire()
    wire2.send(ENV + b"")
    wire2.send(b"MAIL FROM:<a@remote.example>\r\n")
    wire2.send(b"RCPT TO:<jones@foo.com>\r\n")
    wire2.send(b"RCPT TO:<jones@foo.com>\r\n")
    wire2.send(b"DATA\r\n")
    wire2.send(b"x\r\n.\r\n")
    assert [r[:3] for r in wire2.all_replies()][-4:] == ["250", "250", "354", "250"]
    assert len(wire2.stored[0].recipients) == 1


def test_too_many_errors_closes_with_421() -> None:
    """P-30: after 20 errors, 421 4.7.0 and close."""
    wire = SessionWire()
    wire.send(b"XYZZY\r\n" * 25)
    replies = wire.all_replies()
    assert replies[:20] == ["500 5.5.1 Command unrecognized"] * 20
    assert replies[20].startswith("421 4.7.0")
    assert len(replies) == 21
    assert wire.session.closed


def test_utf8_address_needs_smtputf8() -> None:
    """P-47: MAIL → 550 5.6.7, RCPT → 553 5.6.7; with SMTPUTF8 it is accepted."""
    wire = SessionWire()
    wire.send(ENV)
    wire.send("MAIL FROM:<jörg@remote.example>\r\n".encode())
    wire.send(b"MAIL FROM:<a@remote.example>\r\n")
    wire.send("RCPT TO:<jörg@foo.com>\r\n".encode())
    wire.send(b"RSET\r\n")
    wire.send("MAIL FROM:<jörg@remote.example> SMTPUTF8\r\n".encode())
    replies = [r[:9] for r in wire.all_replies()]
    assert replies[-5:] == ["550 5.6.7", "250 2.1.0", "553 5.6.7", "250 2.0.0", "250 2.1.0"]


def test_invalid_utf8_in_a_command() -> None:
    """P-48."""
    wire = SessionWire()
    wire.send(ENV)
    wire.send(b"MAIL FROM:<\xff\xfe@remote.example> SMTPUTF8\r\n")
    assert wire.all_replies()[-1].startswith("500 5.5.2")


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"Host: a\r\n"])
def test_cross_protocol_lines_close_at_once(line: bytes) -> None:
    """P-31: close, nothing echoed."""
    wire = SessionWire()
    wire.send(line + b"NOOP\r\n")
    replies = wire.all_replies()
    assert len(replies) == 1 and replies[0].startswith("554 5.7.0")
    assert wire.session.closed


def test_bdat_without_chunking_closes() -> None:
    """P-09: the chunk is never run as commands."""
    wire = SessionWire()
    wire.send(ENV)
    wire.send(b"BDAT 60 LAST\r\nMAIL FROM:<ceo@bank.example>\r\nRCPT TO:<jones@foo.com>\r\n")
    replies = wire.all_replies()
    assert replies[-1].startswith("521 5.5.1")
    assert wire.session.closed


def test_ehlo_must_end_a_pipelined_group() -> None:
    """P-55."""
    wire = SessionWire()
    wire.send(b"EHLO c.example\r\nMAIL FROM:<b@remote.example>\r\n")
    assert wire.all_replies() == ["554 5.5.0 Protocol synchronization error, closing connection"]
    assert wire.session.closed


def test_second_ehlo_resets_the_transaction() -> None:
    """P-27: after a second EHLO a new MAIL is no nested MAIL, and DATA needs a new RCPT."""
    wire = SessionWire()
    wire.send(ENV)
    wire.send(b"MAIL FROM:<a@remote.example>\r\n")
    wire.send(b"RCPT TO:<jones@foo.com>\r\n")
    wire.send(ENV)
    wire.send(b"MAIL FROM:<b@remote.example>\r\n")
    assert wire.all_replies()[-1].startswith("250 2.1.0")
    wire.send(b"DATA\r\n")
    assert wire.all_replies() == ["503 5.5.1 Need RCPT command"]


@pytest.mark.parametrize(
    "clear",
    [(b"RSET\r\n",), (b"EHLO again.example\r\n",), (b"DATA\r\n", b"first\r\n.\r\n")],
    ids=["rset", "second-ehlo", "after-a-message"],
)
def test_the_envelope_is_cleared_for_the_next_transaction(clear: tuple[bytes, ...]) -> None:
    """The session's three buffers (sender, recipients, data) start empty again after
    RSET, after a second EHLO and after each message: the next message carries only its
    own sender and recipients."""
    wire = SessionWire()
    wire.send(ENV)
    wire.send(b"MAIL FROM:<first@remote.example> SMTPUTF8\r\n")
    wire.send(b"RCPT TO:<jones@foo.com>\r\n")
    for write in clear:
        wire.send(write)
    wire.send(b"MAIL FROM:<second@remote.example>\r\n")
    wire.send(b"RCPT TO:<brown@foo.com>\r\n")
    wire.send(b"DATA\r\n")
    wire.send(b"second\r\n.\r\n")
    assert wire.all_replies()[-1].startswith("250 2.0.0 Ok: queued as")
    last = wire.stored[-1]
    assert str(last.sender) == "second@remote.example"
    assert [str(r) for r in last.recipients] == ["brown@foo.com"]
    assert last.smtputf8 is False
    assert last.content == b"second\r\n"


@pytest.mark.parametrize(
    ("peer", "reply"),
    [
        ("::ffff:192.0.2.7", "250 2.1.5"),
        ("192.0.2.7", "250 2.1.5"),
        ("::ffff:198.51.100.7", "554 5.7.1"),
        ("2001:db8::c000:207", "554 5.7.1"),
    ],
)
def test_ipv4_mapped_client_is_matched_against_ipv4_trusted_networks(peer: str, reply: str) -> None:
    """R-15: a dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d; the IPv4
    trusted networks (here 192.0.2.0/24) must apply to it, and to nothing else."""
    wire = SessionWire(trusted=True)
    wire.client = client_from_ip(peer)
    wire.send(ENV)
    wire.send(b"MAIL FROM:<a@remote.example>\r\n")
    wire.send(b"RCPT TO:<someone@elsewhere.example>\r\n")
    assert wire.all_replies()[-1].startswith(reply)


def test_lower_case_verbs_are_accepted() -> None:
    wire = SessionWire()
    wire.send(b"ehlo c.example\r\n")
    wire.send(b"mail from:<b@remote.example>\r\n")
    assert wire.all_replies()[-1].startswith("250 2.1.0")


def test_idle_close_reply_is_final() -> None:
    session = SmtpSession(Limits(), hostname="h")
    from gsmtp.protocol import replies

    session.close_with(replies.IDLE_TIMEOUT)
    assert session.data_to_send() == b"421 4.4.2 Timeout exceeded, closing transmission channel\r\n"
    assert session.closed


def test_answering_out_of_turn_is_our_bug() -> None:
    from gsmtp.protocol import replies
    from gsmtp.protocol.address import Address
    from gsmtp.protocol.session import RcptTo

    session = SmtpSession(Limits(), hostname="h")
    with pytest.raises(LocalProtocolError):
        session.respond(RcptTo(Address("a", "b")), replies.OK)


def test_ehlo_advertises_the_extensions() -> None:
    wire = SessionWire(Limits(max_message_size=1234))
    wire.send(ENV)
    lines = wire.read_reply()
    keywords = [line[4:] for line in lines[1:]]
    assert keywords == [
        "PIPELINING",
        "SIZE 1234",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "DSN",
        "HELP",
    ]


def test_the_ehlo_echo_escapes_what_is_not_printable_ascii() -> None:
    """S-12 on the wire: the client's name in "greets" carries no terminal escape, bell
    or C1 control to whoever reads the transcript; printable ASCII is unchanged."""
    wire = SessionWire()
    wire.send(b"EHLO evil\x1b[31mhost\x07\xc2\x9b2J\\x\r\n")
    assert wire.read_reply()[0] == "250-mx.foo.com greets evil\\x1b[31mhost\\x07\\x9b2J\\\\x"
    wire.send(b"EHLO " + b"\x1b" * 255 + b"\r\n")
    greets = wire.read_reply()[0]
    assert "\x1b" not in greets and len(greets) <= 512 - 2
    wire.send(b"EHLO [192.0.2.7] mail-1.c.example\r\n")
    assert wire.read_reply()[0] == "250-mx.foo.com greets [192.0.2.7] mail-1.c.example"


_REPLY_LINE = rb"[2-5][0-9][0-9][ -][^\r\n]*\r\n"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=12))
def test_any_byte_stream_yields_only_well_formed_replies(chunks: list[bytes]) -> None:
    """P-53: never an exception; every output line is a well-formed reply."""
    import re

    wire = SessionWire(Limits(max_message_size=2000))
    for chunk in chunks:
        if wire.session.closed:
            break
        wire.send(chunk)
    output = wire._output
    assert re.fullmatch(rb"(?:" + _REPLY_LINE + rb")*", bytes(output)), output


_COMMANDS = st.sampled_from(
    [
        (b"EHLO x\r\n",),
        (b"HELO x\r\n",),
        (b"MAIL FROM:<a@b.example>\r\n",),
        (b"MAIL FROM:<>\r\n",),
        (b"RCPT TO:<jones@foo.com>\r\n",),
        (b"RCPT TO:<nobody@foo.com>\r\n",),
        (b"DATA\r\n",),
        (b"RSET\r\n",),
        (b"NOOP\r\n",),
        (b"x\r\n.\r\n",),
        (b".\r\n",),
        (b"\n.\n",),
        (b"VRFY a\r\n",),
        (b"QUIT\r\n",),
        # Whole transactions as a pipelining client sends them: each tuple item is one
        # write after which the client waits (RFC 2920: DATA ends a group).
        (
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<jones@foo.com>\r\nDATA\r\n",
            b"Subject: x\r\n\r\n..dot\r\n.\r\n",
        ),
        (b"MAIL FROM:<>\r\nRCPT TO:<nobody@foo.com>\r\nRCPT TO:<brown@foo.com>\r\nDATA\r\n",),
        (b"MAIL FROM:<a@b.example>\r\nRCPT TO:<nobody@foo.com>\r\nDATA\r\n", b"x\r\n.\r\n"),
    ]
)


_CLOSING = ("221 ", "554 5.5.0", "554 5.7.0", "521 ")
_END_OF_DATA = ("250 2.0.0 Ok: queued as ", "550 5.5.2", "552 5.3.4", "554 5.4.6")


def _pieces(stream: bytes) -> list[tuple[bytes, int]]:
    """The stream cut after every LF: (piece, offset of its LF). A trailing piece
    without LF is not complete and is left out."""
    pieces, start = [], 0
    while (newline := stream.find(b"\n", start)) >= 0:
        pieces.append((stream[start : newline + 1], newline))
        start = newline + 1
    return pieces


def _check_one_reply_per_command(
    stream: bytes, chunk_ends: list[int], wire: session_driver.SessionWire
) -> None:
    """Walk the input beside the replies: outside DATA every CRLF line gets exactly one
    reply; a line with a bare LF gets one 500 5.5.2 for all of it that had arrived when
    it was read; after a 354 the data up to the real end gets exactly one reply; the
    only reply not caused by input is the 421 after too many errors, and it closes."""
    replies = wire.all_replies()
    pieces = _pieces(stream)
    index, in_data, closed, queued = 0, False, False, 0
    for number, reply in enumerate(replies):
        context = f"reply {number} {reply!r} after {pieces[:index]!r}"
        assert not closed, f"{context}: a reply after the close"
        if reply.startswith("421 4.7.0 Too many errors"):
            closed = True
            continue
        if in_data:
            previous_crlf = True  # the 354 ended a CRLF line
            for end in range(index, len(pieces)):
                piece = pieces[end][0]
                if piece == b".\r\n" and previous_crlf:
                    break
                previous_crlf = piece.endswith(b"\r\n")
            else:
                raise AssertionError(f"{context}: a reply inside DATA before its end")
            assert reply.startswith(_END_OF_DATA), context
            queued += reply.startswith(_END_OF_DATA[0])
            index, in_data = end + 1, False
            continue
        assert index < len(pieces), f"{context}: a reply with no command line left"
        piece, newline = pieces[index]
        assert "queued as" not in reply, f"{context}: 250 for a message outside DATA"
        if piece.endswith(b"\r\n"):
            index += 1
            in_data = reply.startswith("354")
            assert not in_data or piece == b"DATA\r\n", context
            closed = reply.startswith(_CLOSING)
            continue
        # A bare LF: the line runs on to the next CRLF if that had arrived already.
        assert reply == "500 5.5.2 Line must end in <CR><LF>", context
        received = next(end for end in chunk_ends if end > newline)
        index += 1
        for later in range(index, len(pieces)):
            later_piece, later_newline = pieces[later]
            if later_piece.endswith(b"\r\n"):
                if later_newline < received:
                    index = later + 1
                break
    if not closed and not in_data:
        assert index == len(pieces), f"unanswered: {pieces[index:]!r}"
    assert wire.session.closed == closed
    assert queued == len(wire.stored)
    assert all(envelope.recipients for envelope in wire.stored)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([(), (b"EHLO x\r\n",), (b"HELO x\r\n",)]),
    st.lists(_COMMANDS, max_size=25),
    st.integers(min_value=1, max_value=7),
    st.booleans(),
)
def test_grammar_fuzz_one_reply_per_command_and_stores_only_after_250(
    greeting: tuple[bytes, ...],
    commands: list[tuple[bytes, ...]],
    split: int,
    whole_writes: bool,
) -> None:
    """Commands in any order, the stream split every `split` bytes (or each of the
    client's writes split so, as a client that waits for replies sends them): no
    exception, one reply per command line outside DATA and one per message, nothing
    stored but what got its 250 after a 354, and every stored message has a recipient."""
    writes = [write for element in [greeting, *commands] for write in element]
    stream = b"".join(writes)
    chunks = [stream[i : i + split] for i in range(0, len(stream), split)]
    if whole_writes:
        chunks = [w[i : i + split] for w in writes for i in range(0, len(w), split)]
    wire = SessionWire()
    chunk_ends, sent = [], 0
    for chunk in chunks:
        sent += len(chunk)
        chunk_ends.append(sent)
        if not wire.session.closed:
            wire.send(chunk)
    _check_one_reply_per_command(stream, chunk_ends, wire)


def test_rejected_commands_are_reported_for_the_log_but_not_policy_decisions() -> None:
    wire = SessionWire()
    wire.send(ENV)
    wire.send(b"XYZZY\r\nMAIL FROM:<a@b.example> FOO=1\r\nMAIL FROM:<a@b.example>\r\n")
    wire.send(b"RCPT TO:<nobody@foo.com>\r\n")  # refused by policy, answered via respond
    rejected = [(verb, reply.code) for verb, reply in wire.session.rejected_commands()]
    assert rejected == [("?", 500), ("MAIL", 555)]
    assert wire.session.rejected_commands() == []


def test_mail_is_an_event_the_shell_answers() -> None:
    """The free-space reserve is outside the session: MAIL comes back as MailFrom with
    the SIZE= announcement; a refusal leaves the session without a transaction."""
    session = SmtpSession(Limits(), hostname="mx.foo.com")
    session.receive_data(b"EHLO c.example\r\n")
    assert session.next_event() is NEED_DATA
    session.data_to_send()
    session.receive_data(b"MAIL FROM:<b@remote.example> SIZE=1234 SMTPUTF8\r\n")
    event = session.next_event()
    assert isinstance(event, MailFrom)
    assert (str(event.sender), event.size, event.smtputf8) == ("b@remote.example", 1234, True)
    session.respond(event, replies.INSUFFICIENT_STORAGE)
    assert not session.in_transaction
    session.receive_data(b"MAIL FROM:<>\r\n")
    event = session.next_event()
    assert isinstance(event, MailFrom) and event.size is None
    session.respond(event, replies.SENDER_OK)
    assert session.in_transaction
    assert session.data_to_send().split(b"\r\n") == [
        b"452 4.3.1 Insufficient system storage",
        b"250 2.1.0 Sender ok",
        b"",
    ]


def test_content_taken_while_it_arrives_is_not_repeated_in_the_envelope() -> None:
    """The shell may take the content as it arrives (to write it out); the envelope then
    holds only the rest, and the Received: count still sees the whole header."""
    wire = SessionWire()
    open_data(wire)
    session = wire.session
    with pytest.raises(LocalProtocolError):
        SmtpSession(Limits(), hostname="mx.foo.com").take_data()
    wire.send(b"Received: a\r\n" * 60)
    assert session.receiving_data and session.data_buffered > 0
    taken = session.take_data()
    assert taken == b"Received: a\r\n" * 60
    assert session.data_buffered < 10
    wire.send(b"Received: b\r\n" * 41 + b"\r\nbody\r\n.\r\n")
    assert wire.all_replies()[0].startswith("554 5.4.6")  # 101 in all: a loop
    assert session.data_buffered == 0
    open_data(wire)
    wire.send(b"Subject: x\r\n\r\n..first\r\n")
    assert session.take_data() == b"Subject: x\r\n\r\n.first\r\n"
    wire.send(b"second\r\n.\r\n")
    assert wire.all_replies()[0].startswith("250")
    assert wire.stored[-1].content == b"second\r\n"


def test_a_doomed_message_is_known_before_its_end() -> None:
    wire = SessionWire(Limits(max_message_size=1000))
    open_data(wire)
    wire.send(b"a" * 500 + b"\r\n")
    assert not wire.session.data_doomed
    wire.send(b"a" * 600 + b"\r\n")
    assert wire.session.data_doomed and wire.session.take_data() == b""
    wire.send(b".\r\n")
    assert wire.all_replies()[0].startswith("552")
    assert not wire.session.data_doomed
