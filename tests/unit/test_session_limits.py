"""Error and junk limits of the bare session (Postfix smtpd_soft_error_limit,
smtpd_hard_error_limit, smtpd_junk_command_limit): the counting lives in the sans-I/O
session; the shell only sleeps `error_delays()` times its error sleep."""

from __future__ import annotations

from gsmtp.protocol import replies
from gsmtp.protocol.session import (
    NEED_DATA,
    Limits,
    MessageReceived,
    RcptTo,
    SmtpSession,
)

QUEUED = replies.queued("ID")
MESSAGE = (
    b"MAIL FROM:<a@remote.example>\r\n",
    b"RCPT TO:<jones@foo.com>\r\n",
    b"DATA\r\n",
    b"Subject: s\r\n\r\nbody\r\n.\r\n",
)


class Shell:
    """Feeds one line at a time and answers events; remembers the delays per batch."""

    def __init__(self, limits: Limits, stored: replies.Reply = QUEUED) -> None:
        self.session = SmtpSession(limits, hostname="mx.foo.com")
        self._stored = stored
        self.session.start()
        self.replies: list[str] = []
        self.delays: list[int] = []
        self.send(b"EHLO c.example\r\n")

    def send(self, data: bytes) -> None:
        session = self.session
        session.receive_data(data)
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, RcptTo):
                session.respond(event, replies.RECIPIENT_OK)
            elif isinstance(event, MessageReceived):
                session.respond(event, self._stored)
            else:
                session.respond(event, replies.CANNOT_VRFY)  # type: ignore[arg-type]
        self.delays.append(session.error_delays())
        out = session.data_to_send().decode()
        self.replies += [line for line in out.split("\r\n") if line[3:4] == " "]

    def message(self) -> None:
        for line in MESSAGE:
            self.send(line)
        assert self.replies[-1].startswith("250 2.0.0 Ok: queued")


def test_the_101st_noop_counts_as_an_error_but_is_still_answered() -> None:
    shell = Shell(Limits(soft_error_limit=0))  # every error is delayed: the count shows
    for _ in range(100):
        shell.send(b"NOOP\r\n")
    assert sum(shell.delays) == 0
    shell.send(b"NOOP\r\n")
    assert shell.delays[-1] == 1
    assert shell.replies[-1] == "250 2.0.0 Ok"


def test_rset_vrfy_and_help_are_junk_too() -> None:
    shell = Shell(Limits(soft_error_limit=0, junk_command_limit=3))
    for line in (b"RSET\r\n", b"VRFY jones\r\n", b"HELP\r\n"):
        shell.send(line)
    assert sum(shell.delays) == 0
    shell.send(b"VRFY brown\r\n")
    assert shell.delays[-1] == 1
    assert shell.replies[-1].startswith("252")


def test_the_junk_count_starts_over_after_an_accepted_message() -> None:
    shell = Shell(Limits(soft_error_limit=0))
    for _ in range(100):
        shell.send(b"NOOP\r\n")
    shell.message()
    for _ in range(100):
        shell.send(b"NOOP\r\n")
    assert sum(shell.delays) == 0
    shell.send(b"NOOP\r\n")
    assert shell.delays[-1] == 1


def test_junk_past_the_limit_reaches_the_hard_limit_and_closes() -> None:
    """10,000 pipelined NOOPs: 100 free, 20 counted, then 421 4.7.0 and close."""
    shell = Shell(Limits())
    shell.send(b"NOOP\r\n" * 10_000)
    assert shell.replies[1:] == ["250 2.0.0 Ok"] * 120 + [
        "421 4.7.0 Too many errors, closing transmission channel"
    ]
    assert shell.session.closed
    assert shell.delays[-1] == 10  # errors 11 to 20 are tarpitted


def test_error_replies_past_the_soft_limit_are_delayed_one_each() -> None:
    shell = Shell(Limits())
    for _ in range(10):
        shell.send(b"XYZZY\r\n")
    assert sum(shell.delays) == 0
    shell.send(b"XYZZY\r\n")
    assert shell.delays[-1] == 1
    shell.send(b"XYZZY\r\nXYZZY\r\nNOOP\r\n")
    assert shell.delays[-1] == 2  # a batch waits once per error reply in it


def test_an_accepted_message_forgives_earlier_errors() -> None:
    """Postfix: error_count = 0 after a message is received; 19 + 19 errors around a
    message do not reach the hard limit of 20, nor the tarpit after them."""
    shell = Shell(Limits())
    shell.send(b"XYZZY\r\n" * 19)
    shell.message()
    shell.send(b"XYZZY\r\n" * 10)
    assert shell.delays[-1] == 0
    shell.send(b"XYZZY\r\n" * 9)
    assert not shell.session.closed
    shell.send(b"XYZZY\r\n")
    assert shell.replies[-1].startswith("421 4.7.0")
    assert shell.session.closed


def test_a_message_not_stored_forgives_nothing() -> None:
    shell = Shell(Limits(), stored=replies.SPOOL_ERROR)
    shell.send(b"XYZZY\r\n" * 18)
    for line in MESSAGE:
        shell.send(line)
    assert shell.replies[-1].startswith("451 4.3.0")  # the 19th error
    shell.send(b"XYZZY\r\n")
    assert shell.replies[-2:] == [
        "500 5.5.1 Command unrecognized",
        "421 4.7.0 Too many errors, closing transmission channel",
    ]


def test_awaiting_line_end_and_receiving_data() -> None:
    """What the shell's deadlines key on: an unfinished command line, and DATA."""
    shell = Shell(Limits())
    session = shell.session
    assert not session.awaiting_line_end
    shell.send(b"NO")
    assert session.awaiting_line_end
    shell.send(b"OP\r\n")
    assert not session.awaiting_line_end
    shell.send(b"X" * 2000)  # an over-long line being discarded is still unfinished
    assert session.awaiting_line_end
    shell.send(b"\r\n")
    for line in MESSAGE[:3]:
        shell.send(line)
    assert session.receiving_data and not session.awaiting_line_end
    shell.send(b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert not session.receiving_data


def test_limits_hit_name_each_junk_command_past_the_limit_and_the_hard_limit() -> None:
    """What the shell counts in gsmtp_rejects_total; `commands` feeds the summary line."""
    shell = Shell(Limits(junk_command_limit=2, max_errors=4, soft_error_limit=10))
    for _ in range(3):
        shell.send(b"NOOP\r\n")
    assert shell.session.limits_hit() == ["junk_commands"]
    assert shell.session.limits_hit() == []  # each is reported once
    shell.send(b"NOOP\r\nXYZZY\r\nXYZZY\r\n")  # errors 2, 3, 4: the hard limit
    assert shell.session.limits_hit() == ["junk_commands", "too_many_errors"]
    assert shell.replies[-1].startswith("421 4.7.0")
    assert shell.session.commands == 1 + 3 + 3  # EHLO, three NOOPs, NOOP XYZZY XYZZY
