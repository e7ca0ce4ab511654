"""The server side of an SMTP session as a sans-I/O state machine.

Theory of operation. The I/O shell feeds received bytes with `receive_data` and asks
`next_event` what happened. Commands the session can answer alone (syntax, sequence,
NOOP, RSET, HELP, QUIT, EHLO) are answered into the output buffer at once; commands that
need a decision from outside (a sender to admit, a recipient to check, a message to
store, a VRFY, a TLS switch, credentials to verify) come back as an event, and the shell
answers each with exactly one `respond`. `NEED_DATA` means: flush `data_to_send()` (all
pipelined replies in one write, RFC 2920) and feed more bytes. The session owns the
three buffers of the original design (sender, recipients, data) and resets them on
RSET, on HELO/EHLO and after each message. The data need not be held whole: while it
arrives the shell may `take_data()` what came so far (to write a large body out), and
the message event then carries only the rest; the checks at the end (size, bare CR/LF,
Received: count) still cover all of it.

Errors are counted here, as Postfix smtpd counts them: every error reply, and past
`junk_command_limit` every NOOP/RSET/VRFY/HELP (still answered normally). Past
`soft_error_limit` each one adds to `error_delays()`, which the shell turns into a wait
before it sends (the tarpit: time is not the session's business); at `max_errors` the
session answers 421 and closes before reading another command. An accepted message
forgives both counts.

AUTH (RFC 4954) runs as a state of its own: while a SASL exchange is open every line is
a response for `protocol.sasl`, never a command. What a listener demands (TLS before
AUTH, AUTH before MAIL on submission, RFC 6409) comes in as `ListenerRules` and is
checked in `_handle_command` against the tables below. Authentication survives RSET and
EHLO, and is forgotten with everything else at STARTTLS (RFC 3207 §4.2).

No I/O, no clock, no randomness. A peer's mistake becomes a reply; a caller's misuse of
this class (`LocalProtocolError`) is a bug and raises.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from gsmtp.protocol import replies
from gsmtp.protocol.address import Address, AddressError, parse_path
from gsmtp.protocol.commands import (
    Command,
    Foreign,
    PathArgument,
    Verb,
    parse_command,
    split_path_argument,
)
from gsmtp.protocol.data import DataReader, DataResult
from gsmtp.protocol.dsnparams import (
    MAIL_KEYWORDS,
    MailDsn,
    RecipientDsn,
    Ret,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from gsmtp.protocol.replies import Reply
from gsmtp.protocol.sasl import MAX_RESPONSE_LINE, Challenge, Credentials, SaslExchange, Step

MAX_COMMAND_LINE = 512  # octets including CRLF, RFC 5321 §4.5.3.1.4
# RFC 3461 §4: DSN raises the limit for MAIL (RET, ENVID of up to 100) and RCPT (NOTIFY,
# ORCPT of up to 500); RFC 5321 §4.5.3.1.4 lets extensions do so.
MAX_MAIL_RCPT_LINE = 1024
_LONG_LINE_VERBS = (b"MAIL ", b"RCPT ")


class LocalProtocolError(Exception):
    """The caller used the session out of order: a bug in gsmtp, never the peer's fault."""


class State(enum.Enum):
    CONNECTED = "connected"  # greeted, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, collecting recipients
    DATA = "data"  # reading message content
    AUTH = "auth"  # in a SASL exchange: lines are responses, not commands
    CLOSED = "closed"


# Legal moves: which verbs each state accepts. Anything else is a sequence error.
ALLOWED: dict[State, frozenset[Verb]] = {
    State.CONNECTED: frozenset(
        {Verb.EHLO, Verb.HELO, Verb.NOOP, Verb.RSET, Verb.QUIT, Verb.HELP, Verb.VRFY, Verb.STARTTLS}
    ),
    State.READY: frozenset(
        {
            Verb.EHLO,
            Verb.HELO,
            Verb.MAIL,
            Verb.NOOP,
            Verb.RSET,
            Verb.QUIT,
            Verb.HELP,
            Verb.VRFY,
            Verb.STARTTLS,
            Verb.AUTH,
        }
    ),
    State.MAIL: frozenset(
        {
            Verb.EHLO,
            Verb.HELO,
            Verb.RCPT,
            Verb.DATA,
            Verb.NOOP,
            Verb.RSET,
            Verb.QUIT,
            Verb.HELP,
            Verb.VRFY,
        }
    ),
    State.AUTH: frozenset(),
}

# The reply when a verb arrives in a state that does not accept it.
_OUT_OF_SEQUENCE: dict[tuple[State, Verb], Reply] = {
    (State.CONNECTED, Verb.MAIL): replies.HELO_FIRST,
    (State.CONNECTED, Verb.RCPT): replies.HELO_FIRST,
    (State.CONNECTED, Verb.DATA): replies.HELO_FIRST,
    (State.READY, Verb.RCPT): replies.NEED_MAIL,
    (State.READY, Verb.DATA): replies.NEED_MAIL,
    (State.MAIL, Verb.MAIL): replies.NESTED_MAIL,
    (State.MAIL, Verb.STARTTLS): replies.NESTED_MAIL.with_text("STARTTLS inside a transaction"),
    # RFC 4954 §4: "The AUTH command is not permitted during a mail transaction."
    (State.MAIL, Verb.AUTH): replies.AUTH_IN_TRANSACTION,
}

# A listener that requires TLS (submission without allow_plaintext_auth) answers every
# other verb with 530 5.7.0 until STARTTLS (RFC 3207 §4; RFC 6409 §4.3). AUTH is let
# through so that it gets its own 538 5.7.11 (RFC 4954 §4).
BEFORE_TLS: frozenset[Verb] = frozenset(
    {
        Verb.EHLO,
        Verb.HELO,
        Verb.STARTTLS,
        Verb.NOOP,
        Verb.RSET,
        Verb.QUIT,
        Verb.HELP,
        Verb.AUTH,
    }
)
# On submission these need an authenticated session first (RFC 6409 §4.3: 530 5.7.0).
NEED_AUTH_ON_SUBMISSION: frozenset[Verb] = frozenset({Verb.MAIL})


# Postfix smtpd_junk_command_limit: commands that cost the server little and give a
# client a way to hold a connection; past the limit each one counts as an error.
_JUNK_VERBS = frozenset({Verb.NOOP, Verb.RSET, Verb.VRFY, Verb.HELP})


@dataclass(frozen=True, slots=True)
class Limits:
    """Postfix's defaults: smtpd_hard_error_limit 20 (then 421 and close),
    smtpd_soft_error_limit 10 (then each error reply is delayed, see `error_delays`),
    smtpd_junk_command_limit 100. Both counts are forgiven when a message is accepted."""

    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_errors: int = 20
    max_received_headers: int = 100
    soft_error_limit: int = 10
    junk_command_limit: int = 100


@dataclass(frozen=True, slots=True)
class ListenerRules:
    """What the listener a session arrived on offers and demands.

    `auth`: AUTH can be verified here (offered under TLS only, unless
    `plaintext_auth`). `submission`: a message submission listener (RFC 6409): AUTH
    before MAIL and, unless `plaintext_auth`, TLS before anything else."""

    auth: bool = False
    plaintext_auth: bool = False
    submission: bool = False

    @property
    def requires_tls(self) -> bool:
        return self.submission and not self.plaintext_auth


@dataclass(frozen=True, slots=True)
class Envelope:
    """A complete, accepted-for-storage message: what the spool stores."""

    helo: str
    sender: Address
    recipients: tuple[Address, ...]
    # Unstuffed, CRLF line endings; only what followed the content the shell took with
    # `SmtpSession.take_data` while it arrived (all of it when the shell took none).
    content: bytes
    smtputf8: bool
    esmtp: bool
    # RFC 3461: RET and ENVID of MAIL; NOTIFY/ORCPT by recipient (keyed by the address
    # as str), only for recipients that gave any.
    ret: Ret | None = None
    envid: str | None = None
    dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class MailFrom:
    """A syntactically valid MAIL; the shell answers SENDER_OK, or a refusal such as
    INSUFFICIENT_STORAGE (the free-space reserve, which the session cannot see), or
    SENDER_NOT_OWNED (an authenticated user's sender, decided by policy).
    `size` is the client's SIZE= announcement (RFC 1870), None without one."""

    sender: Address
    smtputf8: bool
    size: int | None
    dsn: MailDsn = field(default_factory=MailDsn)  # RFC 3461 RET/ENVID


@dataclass(frozen=True, slots=True)
class AuthRequested:
    """Credentials to verify (the password is left out of the repr). Answer
    AUTH_SUCCEEDED, AUTH_FAILED, AUTH_TEMPORARY_FAILURE or AUTH_TOO_MANY_FAILURES
    (421: the session closes)."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class RcptTo:
    """A syntactically valid recipient; the shell answers with the policy's reply."""

    address: Address
    dsn: RecipientDsn = field(default_factory=RecipientDsn)


@dataclass(frozen=True, slots=True)
class VerifyRequested:
    argument: str


@dataclass(frozen=True, slots=True)
class StartTlsRequested:
    """Answer READY_FOR_TLS, flush, then wrap the socket; the session has forgotten
    everything said before (RFC 3207 §4.2) and discards unread plaintext (CVE-2011-0411)."""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """Store it, then answer `replies.queued(id)` or a 4xx/5xx reply."""

    envelope: Envelope


Event = MailFrom | RcptTo | VerifyRequested | StartTlsRequested | MessageReceived | AuthRequested


class SmtpSession:
    """One SMTP connection, server side. See the module docstring for the loop."""

    def __init__(
        self,
        limits: Limits,
        *,
        hostname: str,
        tls_available: bool = False,
        tls_active: bool = False,
        rules: ListenerRules = ListenerRules(),
    ) -> None:
        self._limits = limits
        self._hostname = hostname
        self._tls_available = tls_available
        self._tls_active = tls_active
        self._rules = rules
        self._sasl: SaslExchange | None = None
        self._state = State.CONNECTED
        self._input = bytearray()
        self._output: list[bytes] = []
        self._discarding_long_line = False
        self._data_reader: DataReader | None = None
        self._data_result: DataResult | None = None
        self._pending: Event | None = None
        self._errors = 0  # since the last accepted message (Postfix error_count)
        self._junk_commands = 0  # NOOP/RSET/VRFY/HELP since the last accepted message
        self._delays = 0  # replies in the output past the soft error limit
        self._verb = ""  # of the command being answered, for rejected_commands
        self._rejected: list[tuple[str, Reply]] = []
        self._limits_hit: list[str] = []
        # Command lines read (AUTH responses not included), for the disconnect summary.
        self.commands = 0
        self.helo = ""
        self.esmtp = False
        # True after a successful AUTH; who it was the shell knows (it verified them).
        self.authenticated = False
        self._reset_transaction()

    # -- public surface ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def in_transaction(self) -> bool:
        """True between MAIL and the end of DATA: a graceful stop lets these finish."""
        return self._state in (State.MAIL, State.DATA)

    @property
    def awaiting_line_end(self) -> bool:
        """Part of a command line has arrived and its CRLF has not: the shell holds the
        whole line to a deadline (Postfix smtpd_per_request_deadline), so a client
        trickling a byte at a time cannot keep the connection forever."""
        return (
            self._data_reader is None
            and self._state is not State.CLOSED
            and (bool(self._input) or self._discarding_long_line)
        )

    @property
    def receiving_data(self) -> bool:
        """Between the 354 and the end of data: the shell holds the client to a minimum
        data rate (Postfix smtpd_min_data_rate)."""
        return self._data_reader is not None and self._data_result is None

    @property
    def data_buffered(self) -> int:
        """Bytes of the message being received that the session holds in memory (0
        outside DATA): what the shell counts against its memory budget."""
        if self._data_reader is None or self._data_result is not None:
            return 0
        return self._data_reader.buffered

    @property
    def data_doomed(self) -> bool:
        """The message being received will be refused at its end (over the size cap,
        or a bare CR or LF): the session keeps nothing of it from now on, and what the
        shell took of it will never be stored."""
        return self.receiving_data and self._data_reader is not None and self._data_reader.doomed

    def take_data(self) -> bytes:
        """While receiving data: the (unstuffed) content that arrived since the last
        call, for the shell to store as it arrives. What was taken is not repeated in
        the envelope: `Envelope.content` is only what followed it."""
        if not self.receiving_data or self._data_reader is None:
            raise LocalProtocolError("take_data outside DATA")
        return self._data_reader.take_content()

    def error_delays(self) -> int:
        """How many replies waiting in `data_to_send()` answer a command that counted as
        an error past `soft_error_limit` (the tarpit): the shell waits its error sleep
        once for each before sending them. The count starts over at `data_to_send()`."""
        return self._delays

    def start(self) -> bytes:
        """The 220 greeting."""
        return replies.greeting(self._hostname).to_bytes()

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer. An empty chunk means the peer closed."""
        if not data:
            self._state = State.CLOSED
            return
        if self._data_reader is not None:
            self._feed_data(data)
        else:
            self._input += data

    def rejected_commands(self) -> list[tuple[str, Reply]]:
        """(verb, reply) for each command the session itself refused since the last
        call, for the operator's log; decisions answered through `respond` are not
        included (their caller knows them)."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def limits_hit(self) -> list[str]:
        """The session limits a client ran into since the last call, one entry each
        time: "junk_commands" (a NOOP/RSET/VRFY/HELP past junk_command_limit, counted as
        an error though answered normally) and "too_many_errors" (closed at max_errors).
        The names are metrics.REJECT_REASONS."""
        hit, self._limits_hit = self._limits_hit, []
        return hit

    def data_to_send(self) -> bytes:
        out = b"".join(self._output)
        self._output.clear()
        self._delays = 0
        return out

    def close_with(self, reply: Reply) -> None:
        """Answer a final reply (idle timeout, shutdown) and close."""
        self._send(reply, count_error=False)
        self._state = State.CLOSED

    def next_event(self) -> Event | NeedData:
        if self._pending is not None:
            raise LocalProtocolError(f"{self._pending!r} has not been answered")
        while self._state is not State.CLOSED:
            if self._errors >= self._limits.max_errors:
                # Postfix smtpd_hard_error_limit, checked before the next command is read
                # (so the reply that made the last error goes out first).
                self._output.append(replies.TOO_MANY_ERRORS.to_bytes())
                self._limits_hit.append("too_many_errors")
                self._state = State.CLOSED
                break
            if self._data_reader is not None:
                if self._data_result is None:
                    return NEED_DATA
                event = self._finish_data(self._data_result)
            else:
                line = self._next_line()
                if line is None:
                    return NEED_DATA
                event = self._handle_line(line)
            if event is not None:
                self._pending = event
                return event
        return NEED_DATA

    def respond(self, event: Event, reply: Reply) -> None:
        """Answer the event `next_event` returned, with exactly one reply."""
        if event is not self._pending:
            raise LocalProtocolError(f"{event!r} is not the pending event")
        self._pending = None
        if isinstance(event, MailFrom):
            if reply.is_positive:
                self._sender = event.sender
                self._smtputf8 = event.smtputf8
                self._mail_dsn = event.dsn
                self._state = State.MAIL
        elif isinstance(event, AuthRequested):
            self._state = State.READY
            if reply.is_positive:
                self.authenticated = True
            elif reply.code == 421:
                self._send(reply, decided=True)
                self._state = State.CLOSED
                return
        elif isinstance(event, RcptTo):
            self._rcpt_attempted = True
            if reply.is_positive and event.address not in self._recipients:
                self._recipients.append(event.address)
                if event.dsn != RecipientDsn():
                    self._recipient_dsn[str(event.address)] = event.dsn
        elif isinstance(event, MessageReceived):
            self._reset_transaction()
            self._state = State.READY
            if reply.is_positive:
                # Postfix: "Forgive any previous client errors when a message was
                # received successfully" (the junk count too), so a client sending many
                # messages over one connection is never punished for its volume.
                self._errors = 0
                self._junk_commands = 0
        elif isinstance(event, StartTlsRequested) and reply.is_positive:
            self._send(reply, decided=True)
            self._start_tls()
            return
        self._send(reply, decided=True)

    # -- reading lines ----------------------------------------------------------------

    def _next_line(self) -> bytes | Reply | None:
        """The next CRLF-terminated command line, a reply for a broken one, or None."""
        buffer = self._input
        newline = buffer.find(b"\n")
        if self._discarding_long_line:
            if newline < 0:
                buffer.clear()
                return None
            del buffer[: newline + 1]
            self._discarding_long_line = False
            return replies.LINE_TOO_LONG
        if newline < 0:
            if len(buffer) > self._longest_line():
                buffer.clear()
                self._discarding_long_line = True
            return None
        if newline == 0 or buffer[newline - 1] != 0x0D:
            # RFC 5321 §2.3.8: a bare LF ends nothing. Everything up to the next CRLF
            # already received is the same broken line: one reply for all of it.
            crlf = buffer.find(b"\r\n", newline)
            del buffer[: crlf + 2 if crlf >= 0 else newline + 1]
            return replies.BARE_LINE_ENDING
        line = bytes(buffer[: newline - 1])
        del buffer[: newline + 1]
        if self._state is State.AUTH:
            limit = MAX_RESPONSE_LINE
        elif line[:5].upper() in _LONG_LINE_VERBS:
            limit = MAX_MAIL_RCPT_LINE
        else:
            limit = MAX_COMMAND_LINE
        if len(line) + 2 > limit:
            return replies.LINE_TOO_LONG
        if b"\r" in line:
            return replies.BARE_LINE_ENDING
        return line

    def _longest_line(self) -> int:
        return MAX_RESPONSE_LINE if self._state is State.AUTH else MAX_MAIL_RCPT_LINE

    def _handle_line(self, line: bytes | Reply) -> Event | None:
        if self._state is State.AUTH:
            self._verb = "AUTH"
            return self._continue_auth(line)
        parsed = line if isinstance(line, Reply) else parse_command(line)
        self.commands += 1
        self._verb = parsed.verb.value if isinstance(parsed, Command) else "?"
        if isinstance(parsed, Reply):
            self._send(parsed)
            return None
        if isinstance(parsed, Foreign):
            self.close_with(replies.NOT_SMTP)
            return None
        return self._handle_command(parsed)

    # -- commands ---------------------------------------------------------------------

    def _handle_command(self, command: Command) -> Event | None:
        verb = command.verb
        if verb is Verb.BDAT:
            # Postfix: the next input would be raw content; never run it as commands.
            self.close_with(replies.BDAT_NOT_OFFERED)
            return None
        if verb is Verb.EXPN:
            self._send(replies.NOT_IMPLEMENTED)
            return None
        if verb in _JUNK_VERBS:
            self._junk_commands += 1
            if self._junk_commands > self._limits.junk_command_limit:
                self._limits_hit.append("junk_commands")
                self._count_error()  # its own reply is still the normal one (Postfix)
        if self._rules.requires_tls and not self._tls_active and verb not in BEFORE_TLS:
            self._send(replies.TLS_REQUIRED)
            return None
        if verb not in ALLOWED[self._state]:
            self._send(_OUT_OF_SEQUENCE.get((self._state, verb), replies.HELO_FIRST))
            return None
        if self._rules.submission and not self.authenticated and verb in NEED_AUTH_ON_SUBMISSION:
            self._send(replies.AUTH_REQUIRED)
            return None
        handler = _HANDLERS[verb]
        return handler(self, command.argument)

    def _ehlo(self, argument: str) -> Event | None:
        return self._greet(argument, esmtp=True)

    def _helo(self, argument: str) -> Event | None:
        return self._greet(argument, esmtp=False)

    def _greet(self, argument: str, *, esmtp: bool) -> Event | None:
        if not argument or len(argument) > 255:
            self._send(replies.HELO_NEEDS_DOMAIN)
            return None
        if self._input:
            # RFC 2920 §3.1: EHLO ends a group; more input now is a synchronization error.
            self.close_with(replies.PIPELINING_VIOLATION)
            return None
        self._reset_transaction()
        self._state = State.READY
        self.helo = argument
        self.esmtp = esmtp
        if esmtp:
            self._send(replies.ehlo(self._hostname, _echoed(argument), self._extensions()))
        else:
            self._send(replies.helo(self._hostname))
        return None

    def _extensions(self) -> list[str]:
        extensions = [
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",
        ]
        if self._tls_available and not self._tls_active:
            extensions.append("STARTTLS")
        if self._auth_offered():
            extensions.append("AUTH PLAIN LOGIN")
        extensions.append("HELP")
        return extensions

    def _mail(self, argument: str) -> Event | None:
        split = split_path_argument(Verb.MAIL, argument)
        if isinstance(split, Reply):
            self._send(split)
            return None
        problem = self._check_mail_parameters(split)
        if problem is not None:
            self._send(problem)
            return None
        dsn = parse_mail_parameters(split.parameters)
        if isinstance(dsn, Reply):
            self._send(dsn)
            return None
        smtputf8 = "SMTPUTF8" in split.parameters
        if not smtputf8 and not split.path.isascii():
            self._send(replies.UTF8_SENDER_NEEDS_SMTPUTF8)
            return None
        sender = parse_path(split.path, allow_null=True, allow_utf8=smtputf8)
        if isinstance(sender, AddressError):
            self._send(replies.BAD_SENDER.with_text(f"Bad sender address syntax: {sender.reason}"))
            return None
        size = split.parameters.get("SIZE")
        return MailFrom(sender, smtputf8, int(size) if size is not None else None, dsn)

    def _check_mail_parameters(self, split: PathArgument) -> Reply | None:
        for key, value in split.parameters.items():
            if key == "SIZE":
                if value is None or not value.isascii() or not value.isdigit():
                    return replies.BAD_SIZE
                if len(value) > 20 or int(value) > self._limits.max_message_size:
                    return replies.MESSAGE_TOO_BIG
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BAD_BODY
            elif key == "SMTPUTF8":
                if value is not None:
                    return replies.SYNTAX_ERROR
            elif key not in MAIL_KEYWORDS:  # RET, ENVID: parse_mail_parameters
                return replies.UNKNOWN_PARAMETER
        return None

    def _rcpt(self, argument: str) -> Event | None:
        split = split_path_argument(Verb.RCPT, argument)
        if isinstance(split, Reply):
            self._send(split)
            return None
        dsn = parse_rcpt_parameters(split.parameters)
        if isinstance(dsn, Reply):
            self._send(dsn)
            return None
        if not self._smtputf8 and not split.path.isascii():
            self._send(replies.UTF8_RCPT_NEEDS_SMTPUTF8)
            return None
        if len(self._recipients) >= self._limits.max_recipients:
            self._send(replies.TOO_MANY_RECIPIENTS)
            return None
        if split.path.strip("<>").lower() == "postmaster":
            # RFC 5321 §4.1.1.3: <Postmaster> without a domain must be accepted.
            return RcptTo(Address("postmaster", self._hostname.lower()), dsn)
        recipient = parse_path(split.path, allow_null=False, allow_utf8=self._smtputf8)
        if isinstance(recipient, AddressError):
            self._send(
                replies.BAD_RECIPIENT.with_text(f"Bad recipient address syntax: {recipient.reason}")
            )
            return None
        return RcptTo(recipient, dsn)

    def _data(self, argument: str) -> Event | None:
        if argument:
            self._send(replies.NO_ARGUMENTS_ALLOWED)
            return None
        if self._input:
            # RFC 2920 §3.1 / RFC 5321 §3.3: no message data before the 354.
            self.close_with(replies.PIPELINING_VIOLATION)
            return None
        if not self._recipients:
            self._send(replies.NO_VALID_RECIPIENTS if self._rcpt_attempted else replies.NEED_RCPT)
            return None
        self._state = State.DATA
        self._data_reader = DataReader(self._limits.max_message_size)
        self._data_result = None
        self._send(replies.START_MAIL_INPUT)
        return None

    def _rset(self, argument: str) -> Event | None:
        if argument:
            self._send(replies.NO_ARGUMENTS_ALLOWED)
            return None
        self._reset_transaction()
        if self._state is State.MAIL:
            self._state = State.READY
        self._send(replies.RESET_OK)
        return None

    def _noop(self, argument: str) -> Event | None:
        self._send(replies.NOOP_OK)
        return None

    def _quit(self, argument: str) -> Event | None:
        if argument:
            self._send(replies.NO_ARGUMENTS_ALLOWED)
            return None
        self._send(replies.CLOSING)
        self._state = State.CLOSED
        return None

    def _help(self, argument: str) -> Event | None:
        self._send(replies.HELP)
        return None

    def _vrfy(self, argument: str) -> Event | None:
        if not argument:
            self._send(replies.SYNTAX_ERROR)
            return None
        return VerifyRequested(argument)

    def _starttls(self, argument: str) -> Event | None:
        if argument:
            self._send(replies.NO_ARGUMENTS_ALLOWED)
            return None
        if self._tls_active:
            self._send(replies.TLS_ALREADY_ACTIVE)
            return None
        if not self._tls_available:
            self._send(replies.NOT_IMPLEMENTED)
            return None
        return StartTlsRequested()

    # -- AUTH (RFC 4954) ----------------------------------------------------------------

    def _auth_offered(self) -> bool:
        """RFC 4954 §4 / RFC 8314: passwords only over TLS, unless the operator says a
        proxy in front already encrypts (submission.allow_plaintext_auth)."""
        return self._rules.auth and (self._tls_active or self._rules.plaintext_auth)

    def _auth(self, argument: str) -> Event | None:
        if not self._rules.auth:
            self._send(replies.NOT_IMPLEMENTED)
            return None
        if not self.esmtp:
            self._send(replies.AUTH_NEEDS_EHLO)  # AUTH is an EHLO extension
            return None
        if not self._auth_offered():
            # P-59: refused before any credentials are read, so none are checked.
            self._send(replies.AUTH_NEEDS_TLS)
            return None
        if self.authenticated:
            self._send(replies.ALREADY_AUTHENTICATED)  # RFC 4954 §4
            return None
        exchange, step = SaslExchange.begin(argument)
        self._sasl = exchange
        return self._auth_step(step)

    def _continue_auth(self, line: bytes | Reply) -> Event | None:
        assert self._sasl is not None
        if isinstance(line, Reply):
            self._sasl = None
            self._state = State.READY
            self._send(replies.AUTH_LINE_TOO_LONG if line is replies.LINE_TOO_LONG else line)
            return None
        return self._auth_step(self._sasl.feed(line))

    def _auth_step(self, step: Step) -> Event | None:
        if isinstance(step, Challenge):
            self._state = State.AUTH
            self._send(step.reply)
            return None
        self._sasl = None
        if isinstance(step, Credentials):
            self._state = State.AUTH  # until the shell answers
            return AuthRequested(step)
        self._state = State.READY
        self._send(step)
        return None

    # -- DATA -------------------------------------------------------------------------

    def _feed_data(self, data: bytes) -> None:
        assert self._data_reader is not None
        if self._data_result is not None:
            self._input += data
            return
        result, leftover = self._data_reader.feed(data)
        if result is not None:
            self._data_result = result
            self._input += leftover

    def _finish_data(self, result: DataResult) -> Event | None:
        self._data_reader = None
        self._data_result = None
        self._verb = "DATA"
        if result.too_big:
            reply = replies.MESSAGE_TOO_BIG
        elif result.bare_line_ending:
            reply = replies.BARE_LINE_ENDING_IN_DATA
        elif result.received_headers > self._limits.max_received_headers:
            reply = replies.MAIL_LOOP
        else:
            envelope = Envelope(
                helo=self.helo,
                sender=self._sender,
                recipients=tuple(self._recipients),
                content=result.content,
                smtputf8=self._smtputf8,
                esmtp=self.esmtp,
                ret=self._mail_dsn.ret,
                envid=self._mail_dsn.envid,
                dsn=self._recipient_dsn,
            )
            return MessageReceived(envelope)
        self._reset_transaction()
        self._state = State.READY
        self._send(reply)
        return None

    # -- helpers ----------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._sender = Address("", "")
        self._recipients: list[Address] = []
        self._rcpt_attempted = False
        self._smtputf8 = False
        self._mail_dsn = MailDsn()
        self._recipient_dsn: dict[str, RecipientDsn] = {}
        self._data_result = None

    def _start_tls(self) -> None:
        self._input.clear()  # CVE-2011-0411: nothing sent in plaintext survives the switch
        self._tls_active = True
        self._reset_transaction()
        self._state = State.CONNECTED
        self.helo = ""
        self.esmtp = False
        self.authenticated = False

    def _send(self, reply: Reply, *, count_error: bool = True, decided: bool = False) -> None:
        self._output.append(reply.to_bytes())
        if reply.is_error and not decided and len(self._rejected) < 100:
            self._rejected.append((self._verb or "?", reply))
        if count_error and reply.is_error and reply.code != 421:
            self._count_error()

    def _count_error(self) -> None:
        """One more error. Past the soft limit the reply being built is tarpitted; at the
        hard limit `next_event` closes before reading another command."""
        self._errors += 1
        if self._errors > self._limits.soft_error_limit:
            self._delays += 1


def _echoed(name: str) -> str:
    """The client's EHLO name as our reply may repeat it: printable ASCII as is, every
    other character (controls, terminal escapes, non-ASCII) and the backslash escaped,
    capped so the reply line stays within RFC 5321's 512 octets."""
    shown = name.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= _MAX_ECHO else shown[: _MAX_ECHO - 3] + "..."


_MAX_ECHO = 255


_HANDLERS = {
    Verb.EHLO: SmtpSession._ehlo,
    Verb.HELO: SmtpSession._helo,
    Verb.MAIL: SmtpSession._mail,
    Verb.RCPT: SmtpSession._rcpt,
    Verb.DATA: SmtpSession._data,
    Verb.RSET: SmtpSession._rset,
    Verb.NOOP: SmtpSession._noop,
    Verb.QUIT: SmtpSession._quit,
    Verb.HELP: SmtpSession._help,
    Verb.VRFY: SmtpSession._vrfy,
    Verb.STARTTLS: SmtpSession._starttls,
    Verb.AUTH: SmtpSession._auth,
}
