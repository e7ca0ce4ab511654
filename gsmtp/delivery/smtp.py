"""Remote delivery over SMTP: the domain's MX hosts (or a smarthost), one transaction per
(message, domain) carrying all its recipients, a result per recipient.

The I/O shell around `protocol.client`: connect to the addresses of the MX hosts in turn
(at most `mx.MAX_MX_ADDRESSES` over all hosts, `mx.mail_targets`); a refused connection,
a time-out or a 4xx/5xx greeting moves on to the next one. EHLO, falling back to HELO;
STARTTLS whenever offered (opportunistic: no certificate check, and any plaintext the
peer pushed before the handshake is dropped, D-29); MAIL/RCPT/DATA pipelined when the
peer offers PIPELINING. 2xx → delivered, 4xx or a broken connection → deferred, 5xx →
failed.

Time limits, three layers (RFC 5321 §4.5.3.2):
- each reply must be complete within `command` (the whole reply, not each received
  byte, so a peer trickling a byte at a time cannot stretch it); the body is written in
  SEND_CHUNK pieces, each within `command`, so a large body to a slow but working peer
  gets through, however long it takes in total;
- the whole attempt, from the first connect to the last byte of the body and over every
  address tried, must fit in `attempt`: an MX trickling one byte per 299 s cannot hold
  one attempt for 10 addresses × 300 s;
- the reply to the final dot has its own `data` limit and is not cut by `attempt`.

After the final dot the peer may already have taken the message (RFC 5321 §3.8,
§4.1.1.4, §6.1): a lost connection or a time-out there defers the recipients for this
attempt, saying "message may be delivered twice", and never tries the next MX, which
would make one copy per MX host on every retry.

Loops: an MX that is one of our own listeners (cut out by `mx.mail_targets`), or a peer
that greets us with our own host name, is "mail loops back to myself": 554 5.4.6, as
Postfix. When no address answered SMTP at all (every one refused, timed out, or failed
before or at the greeting), the results are marked `unreachable` so that the queue
manager can treat the destination as dead.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gsmtp.delivery.mx import (
    DnsPermanentError,
    DnsTemporaryError,
    OwnListeners,
    Resolver,
    Target,
    Targets,
    mail_targets,
)
from gsmtp.log import get_logger
from gsmtp.message import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.protocol import client
from gsmtp.protocol.client import Extensions, ReplyError, ReplyParser, ServerReply

RECV_SIZE = 65536
SEND_CHUNK = 65536  # the body is written in pieces of this size, each within `command`
MAY_BE_DELIVERED_TWICE = "message may be delivered twice"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0  # RFC 5321 §4.5.3.2: 5 minutes for most replies
    data: float = 600.0  # 10 minutes for the reply to the final dot
    attempt: float = 1800.0  # one attempt: first connect to the last byte of the body


class _PeerUnusable(Exception):
    """This address cannot take the message now; try the next one."""


class _TransactionBroken(Exception):
    """The connection failed mid-transaction: what is not confirmed is deferred."""

    def __init__(self, reason: str, *, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


class _AttemptExpired(Exception):
    """The attempt's overall deadline passed: no further address is tried."""


class _LoopsBack(Exception):
    """The peer named itself with our own host name: it is this server."""


class _Deadline:
    """The attempt's overall deadline, shared by every address the attempt tries."""

    def __init__(self, clock: Callable[[], float], seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._end = clock() + seconds

    def limit(self, timeout: float) -> tuple[float, bool]:
        """`timeout`, or what is left of the attempt if that is shorter (then True)."""
        remaining = self._end - self._clock()
        if remaining <= 0:
            raise _AttemptExpired
        return (remaining, True) if remaining < timeout else (timeout, False)


@dataclass(slots=True)
class _Progress:
    """What one attempt learnt about the destination so far."""

    answered: bool = False  # some address sent a complete greeting: SMTP is there


class _Connection:
    """One SMTP client connection: send bytes, read replies, each with its deadline."""

    def __init__(
        self,
        sock: socket.socket,
        timeouts: Timeouts,
        deadline: _Deadline,
        clock: Callable[[], float],
    ) -> None:
        self._sock: Any = sock
        self._parser = ReplyParser()
        self._pending: list[ServerReply] = []
        self._timeouts = timeouts
        self._deadline = deadline
        self._clock = clock

    def send(self, data: bytes) -> None:
        """Write `data` in SEND_CHUNK pieces, each within `command` (and the attempt):
        a total limit on one sendall would cut off a large body to a slow peer."""
        view = memoryview(data)
        for start in range(0, len(view), SEND_CHUNK):
            wait, by_deadline = self._deadline.limit(self._timeouts.command)
            try:
                self._sock.settimeout(wait)
                self._sock.sendall(view[start : start + SEND_CHUNK])
            except TimeoutError:
                if by_deadline:
                    raise _AttemptExpired from None
                raise _TransactionBroken(
                    f"timed out after {wait:g}s while sending", timed_out=True
                ) from None
            except OSError as error:  # ssl.SSLError included
                raise _TransactionBroken(f"connection lost while sending: {error}") from None

    def read(self, timeout: float | None = None, *, after_dot: bool = False) -> ServerReply:
        """The next reply, complete within `timeout` (default `command`) and, unless it
        answers the final dot, within the attempt's deadline."""
        limit = self._timeouts.command if timeout is None else timeout
        end = self._clock() + limit
        while not self._pending:
            wait, by_deadline = end - self._clock(), False
            if not after_dot:
                wait, by_deadline = self._deadline.limit(wait)
            try:
                if wait <= 0:
                    raise TimeoutError
                self._sock.settimeout(wait)
                data = self._sock.recv(RECV_SIZE)
            except TimeoutError:
                if by_deadline:
                    raise _AttemptExpired from None
                raise _TransactionBroken(
                    f"timed out after {limit:g}s waiting for a reply", timed_out=True
                ) from None
            except OSError as error:
                raise _TransactionBroken(f"connection lost: {error}") from None
            if not data:
                raise _TransactionBroken("connection closed by the remote host")
            try:
                self._pending += self._parser.feed(data)
            except ReplyError as error:
                raise _TransactionBroken(f"bad reply from the remote host: {error}") from None
        return self._pending.pop(0)

    def command(self, data: bytes) -> ServerReply:
        self.send(data)
        return self.read()

    def start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        if self._pending or self._parser.discard_buffered():
            raise _PeerUnusable("plaintext sent after the STARTTLS reply (injection)")
        wait, by_deadline = self._deadline.limit(self._timeouts.command)
        try:
            self._sock.settimeout(wait)
            self._sock = context.wrap_socket(self._sock, server_hostname=server_name)
        except TimeoutError:
            if by_deadline:
                raise _AttemptExpired from None
            raise _PeerUnusable("TLS handshake timed out") from None
        except OSError as error:
            raise _PeerUnusable(f"TLS handshake failed: {error}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _opportunistic_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # opportunistic: encryption without authentication
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SmtpDeliverer:
    """The `smtp` transport: all recipients of one call share one destination domain.
    `listeners` are this server's own (address, port) pairs, to recognise an MX that is
    ourselves; `clock` (monotonic seconds) measures the attempt's deadlines."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        helo_name: str,
        port: int = 25,
        smarthost: tuple[str, int] | None = None,
        timeouts: Timeouts = Timeouts(),
        tls_context: ssl.SSLContext | None = None,
        listeners: Sequence[tuple[str, int]] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolver = resolver
        self._helo_name = helo_name
        self._port = port
        self._smarthost = smarthost
        self._timeouts = timeouts
        self._tls = tls_context or _opportunistic_tls()
        self._own = OwnListeners(listeners)
        self._clock = clock
        self._log = get_logger(component="smtp")

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        domain = recipients[0].rpartition("@")[2]
        try:
            targets = self._targets(domain)
        except DnsPermanentError as error:
            return results_for_all(recipients, Outcome.FAILED, error.status, str(error))
        except DnsTemporaryError as error:
            return results_for_all(recipients, Outcome.DEFERRED, "4.4.3", f"451 4.4.3 {error}")
        if targets.loops_back and not targets.addresses:
            return self._loops_back(message, recipients, domain, "an MX host is this server")
        deadline = _Deadline(self._clock, self._timeouts.attempt)
        progress = _Progress()
        status, last_error = "4.4.1", f"451 4.4.1 No mail host for {domain} could be reached"
        for target in targets.addresses:
            where = f"{target.host}[{target.address}]"
            try:
                return self._deliver_via(target, message, recipients, deadline, progress)
            except _PeerUnusable as error:
                status, last_error = "4.4.1", f"451 4.4.1 {where}: {error}"
            except _AttemptExpired:
                status = "4.4.2"
                last_error = (
                    f"451 4.4.2 {where}: delivery attempt time limit "
                    f"({deadline.seconds:g}s) reached; no further host tried"
                )
                break
            except _LoopsBack:
                return self._loops_back(message, recipients, domain, f"{where} greeted us as us")
        results = results_for_all(recipients, Outcome.DEFERRED, status, last_error)
        if targets.addresses and not progress.answered:
            results = [replace(r, unreachable=True) for r in results]
        return results

    def _targets(self, domain: str) -> Targets:
        if self._smarthost is not None:
            host, port = self._smarthost
            return mail_targets(self._resolver, [host], port, self._own)
        hosts = self._resolver.mail_hosts(domain)
        targets = mail_targets(self._resolver, hosts, self._port, self._own)
        if not targets.addresses and not targets.loops_back:
            raise DnsTemporaryError(f"no address for the mail hosts of {domain}")
        return targets

    def _loops_back(
        self, message: QueuedMessage, recipients: Sequence[str], domain: str, why: str
    ) -> list[RecipientResult]:
        self._log.warning("mail_loop_detected", msg_id=message.id, domain=domain, why=why)
        text = f"554 5.4.6 mail for {domain} loops back to myself"
        return results_for_all(recipients, Outcome.FAILED, "5.4.6", text)

    def _connect(self, target: Target, deadline: _Deadline) -> _Connection:
        wait, by_deadline = deadline.limit(self._timeouts.connect)
        try:
            sock = socket.create_connection((target.address, target.port), timeout=wait)
        except TimeoutError:
            if by_deadline:
                raise _AttemptExpired from None
            raise _PeerUnusable(f"connect timed out after {wait:g}s") from None
        except OSError as error:
            raise _PeerUnusable(f"connect failed: {error.strerror or error}") from None
        return _Connection(sock, self._timeouts, deadline, self._clock)

    def _deliver_via(
        self,
        target: Target,
        message: QueuedMessage,
        recipients: Sequence[str],
        deadline: _Deadline,
        progress: _Progress,
    ) -> list[RecipientResult]:
        connection = self._connect(target, deadline)
        try:
            extensions = self._open_session(connection, target.host, progress)
            return _Transaction(
                connection, extensions, message, recipients, target, self._timeouts, self._log
            ).run()
        except _TransactionBroken as error:
            raise _PeerUnusable(str(error)) from None
        finally:
            connection.close()

    def _open_session(self, connection: _Connection, host: str, progress: _Progress) -> Extensions:
        """Greeting, EHLO (or HELO), STARTTLS when offered. Failures: next host."""
        greeting = connection.read()
        progress.answered = True
        self._refuse_myself(greeting)
        if not greeting.is_positive:
            raise _PeerUnusable(f"greeting: {greeting.text}")
        extensions = self._hello(connection)
        if extensions.starttls:
            reply = connection.command(b"STARTTLS\r\n")
            if reply.code == 220:
                connection.start_tls(self._tls, host)
                extensions = self._hello(connection)
        return extensions

    def _hello(self, connection: _Connection) -> Extensions:
        reply = connection.command(f"EHLO {self._helo_name}\r\n".encode())
        if reply.is_positive:
            self._refuse_myself(reply)
            return client.parse_ehlo(reply)
        reply = connection.command(f"HELO {self._helo_name}\r\n".encode())
        if not reply.is_positive:
            raise _PeerUnusable(f"HELO: {reply.text}")
        self._refuse_myself(reply)
        return Extensions()

    def _refuse_myself(self, reply: ServerReply) -> None:
        """A peer whose greeting or EHLO reply begins with our own host name is this
        server (reached through a NAT, a proxy or a name we do not know as ours)."""
        words = reply.lines[0].split() if reply.lines else []
        if words and words[0].rstrip(".").lower() == self._helo_name.rstrip(".").lower():
            raise _LoopsBack


class _Transaction:
    """MAIL, RCPT..., DATA on an open session; a result for every recipient."""

    def __init__(
        self,
        connection: _Connection,
        extensions: Extensions,
        message: QueuedMessage,
        recipients: Sequence[str],
        target: Target,
        timeouts: Timeouts,
        log: Any,
    ) -> None:
        self._connection = connection
        self._ext = extensions
        self._message = message
        self._recipients = list(recipients)
        self._target = target
        self._host = target.host
        self._timeouts = timeouts
        self._log = log

    def _all(self, outcome: Outcome, status: str, text: str) -> list[RecipientResult]:
        return results_for_all(self._recipients, outcome, status, text, self._host)

    def run(self) -> list[RecipientResult]:
        refusal = self._check_capabilities()
        if refusal is not None:
            self._quit()
            return refusal
        return self._with_peer_dsn(self._send_envelope_and_data())

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
            connection.send(mail + b"".join(rcpts) + b"DATA\r\n")
            mail_reply = connection.read()
            rcpt_replies = [connection.read() for _ in rcpts]
            data_reply = connection.read()
        else:
            mail_reply = connection.command(mail)
            if not mail_reply.is_positive:
                return self._envelope_refused(mail_reply)
            rcpt_replies = [connection.command(r) for r in rcpts]
            accepted_any = any(r.is_positive for r in rcpt_replies)
            data_reply = connection.command(b"DATA\r\n") if accepted_any else mail_reply
        if not mail_reply.is_positive:
            return self._envelope_refused(mail_reply)
        results: dict[str, RecipientResult] = {}
        accepted = []
        for recipient, reply in zip(self._recipients, rcpt_replies, strict=True):
            if reply.is_positive:
                accepted.append(recipient)
            else:
                results[recipient] = _result(recipient, reply, self._host, at_rcpt=True)
        if not accepted:
            self._quit()
            return [results[r] for r in self._recipients]
        if data_reply.code != 354:
            outcome = _result("", data_reply, self._host)
            for recipient in accepted:
                results[recipient] = RecipientResult(
                    recipient, outcome.outcome, outcome.status, outcome.reply, self._host
                )
            self._quit()
            return [results[r] for r in self._recipients]
        # A failure while sending the body leaves the peer without a complete final dot:
        # it cannot have taken the message, so the next MX may be tried (raised on).
        for chunk in client.data_chunks(message.body):  # one chunk at a time, no copy
            connection.send(chunk)
        try:
            final = connection.read(timeout=self._timeouts.data, after_dot=True)
        except _TransactionBroken as error:
            final_text = self._unconfirmed(error)
            for recipient in accepted:
                results[recipient] = RecipientResult(
                    recipient, Outcome.DEFERRED, "4.4.2", final_text, self._host
                )
            return [results[r] for r in self._recipients]
        for recipient in accepted:
            results[recipient] = _result(recipient, final, self._host)
        self._quit()
        return [results[r] for r in self._recipients]

    def _unconfirmed(self, error: _TransactionBroken) -> str:
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

    def _envelope_refused(self, reply: ServerReply) -> list[RecipientResult]:
        self._quit()
        return [_result(r, reply, self._host) for r in self._recipients]

    def _quit(self) -> None:
        # Never raises: after the final reply the results are settled, whatever the clock.
        with contextlib.suppress(_TransactionBroken, _AttemptExpired):
            self._connection.send(b"QUIT\r\n")


def _result(
    recipient: str, reply: ServerReply, host: str, *, at_rcpt: bool = False
) -> RecipientResult:
    if reply.is_positive:
        return RecipientResult(recipient, Outcome.DELIVERED, reply.status(), reply.text, host)
    # RFC 5321 §4.5.3.1.10: a 552 to RCPT means "too many recipients": temporary (D-26).
    transient = reply.is_transient or (at_rcpt and reply.code == 552)
    outcome = Outcome.DEFERRED if transient else Outcome.FAILED
    return RecipientResult(recipient, outcome, reply.status(), reply.text, host)
