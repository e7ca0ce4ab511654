"""An open outbound SMTP session: the connection with its time limits, and the
transactions run on it (MAIL, RCPT..., DATA), a result per recipient.

The I/O boundary of remote delivery: `Connection` turns socket and TLS errors and
time-outs into `TransactionBroken` (the connection failed: what is not confirmed is
deferred), `PeerUnusable` (this address cannot take the message now) or
`AttemptExpired`; `Transaction` turns replies into results. Choosing addresses and
keeping sessions for reuse is `smtp.SmtpDeliverer`'s job.

Time limits, three layers (RFC 5321 §4.5.3.2):
- each reply must be complete within `command` (the whole reply, not each received
  byte, so a peer trickling a byte at a time cannot stretch it); the body is written in
  SEND_CHUNK pieces, each within `command`, so a large body to a slow but working peer
  gets through, however long it takes in total;
- the whole attempt, from the first connect to the last byte of the body and over every
  address tried, must fit in `attempt` (`Deadline`; a cached session is given the
  deadline of each attempt that takes it): an MX trickling one byte per 299 s cannot
  hold one attempt for 10 addresses × 300 s;
- the reply to the final dot has its own `data` limit and is not cut by `attempt`.

After the final dot the peer may already have taken the message (RFC 5321 §3.8,
§4.1.1.4, §6.1): a lost connection or a time-out there defers the recipients for this
attempt, saying "message may be delivered twice"; the transaction returns those results
rather than raising, so that nothing else (the next MX, a fresh connection) is tried,
which would make one copy per try on every retry.

How a transaction leaves its session (`Transaction.end`): reusable when every reply was
read, none was 421 and no DATA was left open; QUIT otherwise; broken after the dot.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gsmtp.delivery.connection_cache import SessionKey
from gsmtp.delivery.mx import Target
from gsmtp.delivery.tls_client import handshake
from gsmtp.delivery.tls_policy import CERTIFICATE_UNVERIFIED, HANDSHAKE_FAILED
from gsmtp.message import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.protocol import client
from gsmtp.protocol.client import Extensions, ReplyError, ReplyParser, ServerReply
from gsmtp.sockets import send_all

RECV_SIZE = 65536
SEND_CHUNK = 65536  # the body is written in pieces of this size, each within `command`
MAY_BE_DELIVERED_TWICE = "message may be delivered twice"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0  # RFC 5321 §4.5.3.2: 5 minutes for most replies
    data: float = 600.0  # 10 minutes for the reply to the final dot
    attempt: float = 1800.0  # one attempt: first connect to the last byte of the body
    rset: float = 20.0  # RSET on a cached session (Postfix: smtp_rset_timeout)


class PeerUnusable(Exception):
    """This address cannot take the message now; try the next one."""


class TlsFailed(PeerUnusable):
    """STARTTLS or the handshake failed at this address; `reason` is one of
    `tls_policy.FAILURE_REASONS` (for the metric), the message says what happened."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class TransactionBroken(Exception):
    """The connection failed mid-transaction: what is not confirmed is deferred."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class AttemptExpired(Exception):
    """The attempt's overall deadline passed: no further address is tried."""


class Deadline:
    """The attempt's overall deadline, shared by every address the attempt tries."""

    def __init__(self, clock: Callable[[], float], seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._end = clock() + seconds

    def limit(self, timeout: float) -> tuple[float, bool]:
        """`timeout`, or what is left of the attempt if that is shorter (then True)."""
        remaining = self._end - self._clock()
        if remaining <= 0:
            raise AttemptExpired
        return (remaining, True) if remaining < timeout else (timeout, False)


class Connection:
    """One SMTP client connection: send bytes, read replies, each with its deadline."""

    def __init__(
        self,
        sock: socket.socket,
        timeouts: Timeouts,
        deadline: Deadline,
        clock: Callable[[], float],
    ) -> None:
        self._sock: Any = sock
        self._parser = ReplyParser()
        self._pending: list[ServerReply] = []
        self._timeouts = timeouts
        # The attempt this connection works for: a cached session gets each new one.
        self.deadline = deadline
        self._clock = clock
        self.tls = False
        self.tls_version = ""  # "TLSv1.3" once the handshake is done
        self.tls_verified = False  # the certificate was checked for the host name

    def send(self, data: bytes) -> None:
        """Write `data` in SEND_CHUNK pieces, each within `command` (and the attempt):
        a total limit on one sendall would cut off a large body to a slow peer."""
        view = memoryview(data)
        for start in range(0, len(view), SEND_CHUNK):
            wait, by_deadline = self.deadline.limit(self._timeouts.command)
            try:
                self._sock.settimeout(wait)
                send_all(self._sock, view[start : start + SEND_CHUNK])
            except TimeoutError:
                if by_deadline:
                    raise AttemptExpired from None
                raise TransactionBroken(
                    f"timed out after {wait:g}s while sending", timed_out=True
                ) from None
            except OSError as error:  # ssl.SSLError included
                raise TransactionBroken(f"connection lost while sending: {error}") from None

    def read(self, timeout: float | None = None, *, after_dot: bool = False) -> ServerReply:
        """The next reply, complete within `timeout` (default `command`) and, unless it
        answers the final dot, within the attempt's deadline."""
        limit = self._timeouts.command if timeout is None else timeout
        end = self._clock() + limit
        while not self._pending:
            wait, by_deadline = end - self._clock(), False
            if not after_dot:
                wait, by_deadline = self.deadline.limit(wait)
            try:
                if wait <= 0:
                    raise TimeoutError
                self._sock.settimeout(wait)
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                if by_deadline:
                    raise AttemptExpired from None
                raise TransactionBroken(
                    f"timed out after {limit:g}s waiting for a reply", timed_out=True
                ) from None
            except OSError as error:
                raise TransactionBroken(f"connection lost: {error}") from None
            if not data:
                raise TransactionBroken("connection closed by the remote host")
            try:
                self._pending += self._parser.feed(data)
            except ReplyError as error:
                raise TransactionBroken(f"bad reply from the remote host: {error}") from None
        return self._pending.pop(0)

    def command(self, data: bytes, timeout: float | None = None) -> ServerReply:
        self.send(data)
        return self.read(timeout)

    def in_sync(self) -> bool:
        """Every reply read and none pending: the next command's reply is the next one."""
        return not self._pending and self._parser.idle

    def start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        """The TLS handshake (after a 220 to STARTTLS, or at once for implicit TLS).
        A certificate that does not verify (when `context` checks it) and any other
        handshake failure raise TlsFailed with their reason."""
        if self._pending or self._parser.discard_buffered():
            raise PeerUnusable("plaintext sent after the STARTTLS reply (injection)")
        # The whole handshake within `command` and the attempt, not each read of it.
        wait, by_deadline = self.deadline.limit(self._timeouts.command)
        end = self._clock() + wait
        try:
            self._sock = handshake(self._sock, context, server_name, lambda: end - self._clock())
        except TimeoutError:
            if by_deadline:
                raise AttemptExpired from None
            raise TlsFailed(HANDSHAKE_FAILED, "TLS handshake timed out") from None
        except ssl.SSLCertVerificationError as error:
            text = f"certificate not trusted for {server_name}: {error.verify_message}"
            raise TlsFailed(CERTIFICATE_UNVERIFIED, text) from None
        except OSError as error:
            raise TlsFailed(HANDSHAKE_FAILED, f"TLS handshake failed: {error}") from None
        self.tls = True
        self.tls_version = self._sock.version() or ""
        self.tls_verified = context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname

    def quit(self) -> None:
        """QUIT and close, without waiting for the 221 (as Postfix's default
        smtp_skip_quit_response): nothing said now changes a result. Never blocks: an
        idle session's send buffer is empty, and a QUIT that does not fit is dropped."""
        with contextlib.suppress(OSError):
            self._sock.settimeout(0.0)
            self._sock.sendall(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


@dataclass(slots=True)
class Session:
    """An open session after the greeting, EHLO and STARTTLS: what it can carry (`key`),
    what the peer offered, and how many transactions it has run."""

    connection: Connection
    extensions: Extensions
    target: Target
    key: SessionKey
    transactions: int = 0

    @property
    def where(self) -> str:
        return f"{self.target.host}[{self.target.address}]"


class SessionEnd(enum.Enum):
    """How a transaction left its session."""

    REUSABLE = "reusable"  # in step, between transactions: may carry another message
    QUIT = "quit"  # settled, but not for reuse (a 421, DATA left open): QUIT and close
    BROKEN = "broken"  # the connection failed after the dot: just close


class Transaction:
    """MAIL, RCPT..., DATA on an open session; a result for every recipient, and in
    `end` how the session was left (reusable, to be ended with QUIT, or broken)."""

    def __init__(
        self,
        session: Session,
        message: QueuedMessage,
        recipients: Sequence[str],
        timeouts: Timeouts,
        log: Any,
        *,
        reset: bool = False,
    ) -> None:
        """`reset`: a cached session's RSET goes first, in the same pipelined group as
        the envelope (RFC 2920 §3.1 lets RSET stand anywhere in a group), so reuse
        costs no round trip of its own; a reply other than 250 raises TransactionBroken
        before anything of the message was sent."""
        self._reset = reset
        self._connection = session.connection
        self._ext = session.extensions
        self._message = message
        self._recipients = list(recipients)
        self._target = session.target
        self._host = session.target.host
        self._timeouts = timeouts
        self._log = log
        self.end = SessionEnd.BROKEN

    def _all(self, outcome: Outcome, status: str, text: str) -> list[RecipientResult]:
        return results_for_all(self._recipients, outcome, status, text, self._host)

    def run(self) -> list[RecipientResult]:
        refusal = self._check_capabilities()
        if refusal is not None:
            self.end = SessionEnd.REUSABLE  # nothing was sent
            return refusal
        return self._with_peer_dsn(self._send_envelope_and_data())

    def _settle(self, replies: Sequence[ServerReply], *, data_open: bool = False) -> None:
        """The transaction is over, every reply read: may the session carry another
        message? Not after a 421 (RFC 5321 §3.8: the server is closing), with DATA
        accepted but no body sent, or with bytes left unread (out of step)."""
        if data_open or any(r.code == 421 for r in replies) or not self._connection.in_sync():
            self.end = SessionEnd.QUIT
        else:
            self.end = SessionEnd.REUSABLE

    def _with_peer_dsn(self, results: list[RecipientResult]) -> list[RecipientResult]:
        """Delivered here means relayed: say whether the peer took the RFC 3461
        parameters (then its notices are its job) or not (we owe a 'relayed' notice)."""
        return [
            replace(r, peer_dsn=self._ext.dsn) if r.outcome is Outcome.DELIVERED else r
            for r in results
        ]

    def _check_capabilities(self) -> list[RecipientResult] | None:
        """A message needing what the peer lacks fails for good, with the right code."""
        body = self._message.body
        ext = self._ext
        if ext.size is not None and len(body) > ext.size:
            return self._all(Outcome.FAILED, "5.3.4", f"552 5.3.4 Message too big for {self._host}")
        needs_utf8 = self._message.smtputf8 or not all(
            a.isascii() for a in (self._message.sender, *self._recipients)
        )
        if needs_utf8 and not ext.smtputf8:
            return self._all(
                Outcome.FAILED, "5.6.7", f"553 5.6.7 {self._host} does not support SMTPUTF8"
            )
        if client.is_8bit(body) and not ext.eightbitmime:
            return self._all(
                Outcome.FAILED, "5.6.3", f"554 5.6.3 {self._host} does not support 8BITMIME"
            )
        return None

    def _send_envelope_and_data(self) -> list[RecipientResult]:
        connection = self._connection
        message = self._message
        ext = self._ext
        mail = client.mail_command(
            message.sender,
            size=len(message.body) if ext.size is not None else None,
            eightbit=client.is_8bit(message.body) and ext.eightbitmime,
            smtputf8=ext.smtputf8
            and not all(a.isascii() for a in (message.sender, *self._recipients)),
            # RFC 3461 §5.2: the DSN parameters go on only to a peer that offers DSN.
            ret=message.ret if ext.dsn else None,
            envid=message.envid if ext.dsn else None,
        )
        rcpts = [
            client.rcpt_command(r, message.recipient_dsn(r) if ext.dsn else None)
            for r in self._recipients
        ]
        if ext.pipelining:
            reset = b"RSET\r\n" if self._reset else b""
            connection.send(reset + mail + b"".join(rcpts) + b"DATA\r\n")
            if self._reset:
                reply = connection.read(self._timeouts.rset)
                if reply.code != 250:
                    raise TransactionBroken(f"RSET: {reply.text}")
            mail_reply = connection.read()
            rcpt_replies = [connection.read() for _ in rcpts]
            data_reply = connection.read()
            replies = [mail_reply, *rcpt_replies, data_reply]
            if self._reset and data_reply.code != 354:
                self._confirm_in_step(data_reply)
        else:
            mail_reply = connection.command(mail)
            if not mail_reply.is_positive:
                self._settle([mail_reply])
                return [_result(r, mail_reply, self._host) for r in self._recipients]
            rcpt_replies = [connection.command(r) for r in rcpts]
            accepted_any = any(r.is_positive for r in rcpt_replies)
            data_reply = connection.command(b"DATA\r\n") if accepted_any else mail_reply
            replies = [mail_reply, *rcpt_replies, data_reply]
        if not mail_reply.is_positive:
            self._settle(replies, data_open=data_reply.code == 354)
            return [_result(r, mail_reply, self._host) for r in self._recipients]
        results: dict[str, RecipientResult] = {}
        accepted = []
        for recipient, reply in zip(self._recipients, rcpt_replies, strict=True):
            if reply.is_positive:
                accepted.append(recipient)
            else:
                results[recipient] = _result(recipient, reply, self._host, at_rcpt=True)
        if not accepted:
            # RFC 2920 §3.1: a peer may still answer the pipelined DATA with 354.
            self._settle(replies, data_open=data_reply.code == 354)
            return [results[r] for r in self._recipients]
        if data_reply.is_positive and data_reply.code != 354:
            # DATA has no positive completion: a 2xx here answers an earlier command
            # (a peer out of step, e.g. two replies to RSET). Nothing of the body was
            # sent, so the message is not delivered: the session is broken, try anew.
            raise TransactionBroken(f"out of step: {data_reply.text} in reply to DATA")
        if data_reply.code != 354:
            outcome = _result("", data_reply, self._host)
            for recipient in accepted:
                results[recipient] = RecipientResult(
                    recipient, outcome.outcome, outcome.status, outcome.reply, self._host
                )
            self._settle(replies)
            return [results[r] for r in self._recipients]
        # A failure while sending the body leaves the peer without a complete final dot:
        # it cannot have taken the message, so the next MX may be tried (raised on).
        for chunk in client.data_chunks(message.body):  # one chunk at a time, no copy
            connection.send(chunk)
        try:
            final = connection.read(timeout=self._timeouts.data, after_dot=True)
        except TransactionBroken as error:
            final_text = self._unconfirmed(error)
            for recipient in accepted:
                results[recipient] = RecipientResult(
                    recipient, Outcome.DEFERRED, "4.4.2", final_text, self._host
                )
            return [results[r] for r in self._recipients]  # self.end stays BROKEN
        for recipient in accepted:
            results[recipient] = _result(recipient, final, self._host)
        self._settle([*replies, final])
        return [results[r] for r in self._recipients]

    def _confirm_in_step(self, data_reply: ServerReply) -> None:
        """Behind a grouped RSET, a peer that answered it twice puts every later reply
        one place off (a refused last RCPT would land on DATA and fail the recipients
        it took): unless DATA got its own 354, nothing here is sure yet. An RSET alone
        settles it: one place off, DATA's own reply lands in its place (354 or a
        refusal, never 250); in step, it gets its 250 and the replies stand (a message
        refused at every RCPT keeps its session: no new connection per refusal).
        Otherwise broken before the body: the message goes over a new session."""
        broken = f"{data_reply.text} in reply to DATA after a grouped RSET"
        try:
            reply = self._connection.command(b"RSET\r\n", timeout=self._timeouts.rset)
        except TransactionBroken:
            raise TransactionBroken(broken) from None
        if reply.code != 250 or not self._connection.in_sync():
            raise TransactionBroken(broken)

    def _unconfirmed(self, error: TransactionBroken) -> str:
        """RFC 5321 §3.8, §4.1.1.4: the dot was sent and no reply came. The peer may have
        the message: defer this attempt (never the next MX, which would make a copy per
        host) and say that a duplicate is possible, as Postfix does."""
        where = f"{self._target.host}[{self._target.address}]"
        if error.timed_out:
            happened = f"conversation with {where} timed out"
        else:
            happened = f"lost connection with {where} ({error})"
        text = f"451 4.4.2 {happened} after the end of data -- {MAY_BE_DELIVERED_TWICE}"
        self._log.warning(
            "delivery_unconfirmed", msg_id=self._message.id, mx=self._host, reply=text
        )
        return text


def _result(
    recipient: str, reply: ServerReply, host: str, *, at_rcpt: bool = False
) -> RecipientResult:
    if reply.is_positive:
        return RecipientResult(recipient, Outcome.DELIVERED, reply.status(), reply.text, host)
    # RFC 5321 §4.5.3.1.10: a 552 to RCPT means "too many recipients": temporary (D-26).
    transient = reply.is_transient or (at_rcpt and reply.code == 552)
    outcome = Outcome.DEFERRED if transient else Outcome.FAILED
    return RecipientResult(recipient, outcome, reply.status(), reply.text, host)
