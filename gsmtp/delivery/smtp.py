"""Remote delivery over SMTP: the domain's MX hosts (or a smarthost), one transaction per
(message, domain) carrying all its recipients, a result per recipient.

The I/O shell around `protocol.client`: connect to each MX host in turn on the
configured port; a refused connection, a time-out or a 4xx/5xx greeting moves on to the
next host. EHLO, falling back to HELO; STARTTLS whenever offered (opportunistic: no
certificate check, and any plaintext the peer pushed before the handshake is dropped,
D-29); MAIL/RCPT/DATA pipelined when the peer offers PIPELINING. 2xx → delivered,
4xx or a broken connection → deferred, 5xx → failed. RFC 5321 §4.5.3.2 time-outs.
Once the final dot is sent, a lost connection or a time-out defers the attempt and
never moves on to the next host (the first may have taken the message).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gsmtp.delivery.base import Outcome, QueuedMessage, RecipientResult, results_for_all
from gsmtp.delivery.mx import DnsPermanentError, DnsTemporaryError, Resolver
from gsmtp.protocol import client
from gsmtp.protocol.client import Extensions, ReplyError, ReplyParser, ServerReply

RECV_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0
    command: float = 300.0  # RFC 5321 §4.5.3.2: 5 minutes for most replies
    data: float = 600.0  # 10 minutes for the reply to the final dot


class _PeerUnusable(Exception):
    """This host cannot take the message now; try the next one."""


class _TransactionBroken(Exception):
    """The connection failed mid-transaction: what is not confirmed is deferred."""


class _Connection:
    """One SMTP client connection: send bytes, read replies with a deadline each."""

    def __init__(self, sock: socket.socket, timeouts: Timeouts) -> None:
        self._sock: Any = sock
        self._parser = ReplyParser()
        self._pending: list[ServerReply] = []
        self._timeouts = timeouts

    def send(self, data: bytes) -> None:
        try:
            self._sock.settimeout(self._timeouts.command)
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as error:
            raise _TransactionBroken(f"connection lost while sending: {error}") from None

    def read(self, timeout: float | None = None) -> ServerReply:
        while not self._pending:
            try:
                self._sock.settimeout(timeout or self._timeouts.command)
                data = self._sock.recv(RECV_SIZE)
            except (OSError, ssl.SSLError) as error:
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
        try:
            self._sock.settimeout(self._timeouts.command)
            self._sock = context.wrap_socket(self._sock, server_hostname=server_name)
        except (OSError, ssl.SSLError) as error:
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
    """The `smtp` transport: all recipients of one call share one destination domain."""

    def __init__(
        self,
        *,
        resolver: Resolver,
        helo_name: str,
        port: int = 25,
        smarthost: tuple[str, int] | None = None,
        timeouts: Timeouts = Timeouts(),
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self._resolver = resolver
        self._helo_name = helo_name
        self._port = port
        self._smarthost = smarthost
        self._timeouts = timeouts
        self._tls = tls_context or _opportunistic_tls()

    def deliver(self, message: QueuedMessage, recipients: Sequence[str]) -> list[RecipientResult]:
        domain = recipients[0].rpartition("@")[2]
        try:
            targets = self._targets(domain)
        except DnsPermanentError as error:
            return results_for_all(recipients, Outcome.FAILED, error.status, str(error))
        except DnsTemporaryError as error:
            return results_for_all(recipients, Outcome.DEFERRED, "4.4.3", f"451 4.4.3 {error}")
        last_error = f"451 4.4.1 No mail host for {domain} could be reached"
        for host, address, port in targets:
            try:
                return self._deliver_via(host, address, port, message, recipients)
            except _PeerUnusable as error:
                last_error = f"451 4.4.1 {host}[{address}]: {error}"
        return results_for_all(recipients, Outcome.DEFERRED, "4.4.1", last_error)

    def _targets(self, domain: str) -> list[tuple[str, str, int]]:
        if self._smarthost is not None:
            host, port = self._smarthost
            hosts = [host]
        else:
            hosts, port = self._resolver.mail_hosts(domain), self._port
        targets = []
        for host in hosts:
            addresses = [host] if _is_ip(host) else self._resolver.addresses(host)
            targets += [(host, address, port) for address in addresses]
        if not targets and self._smarthost is None:
            raise DnsTemporaryError(f"no address for the mail hosts of {domain}")
        return targets

    def _connect(self, address: str, port: int) -> _Connection:
        try:
            sock = socket.create_connection((address, port), timeout=self._timeouts.connect)
        except OSError as error:
            raise _PeerUnusable(f"connect failed: {error.strerror or error}") from None
        return _Connection(sock, self._timeouts)

    def _deliver_via(
        self, host: str, address: str, port: int, message: QueuedMessage, recipients: Sequence[str]
    ) -> list[RecipientResult]:
        connection = self._connect(address, port)
        try:
            extensions = self._open_session(connection, host)
            return _Transaction(
                connection, extensions, message, recipients, host, self._timeouts
            ).run()
        except _TransactionBroken as error:
            raise _PeerUnusable(str(error)) from None
        finally:
            connection.close()

    def _open_session(self, connection: _Connection, host: str) -> Extensions:
        """Greeting, EHLO (or HELO), STARTTLS when offered. Failures: next host."""
        greeting = connection.read()
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
            return client.parse_ehlo(reply)
        reply = connection.command(f"HELO {self._helo_name}\r\n".encode())
        if not reply.is_positive:
            raise _PeerUnusable(f"HELO: {reply.text}")
        return Extensions()


class _Transaction:
    """MAIL, RCPT..., DATA on an open session; a result for every recipient."""

    def __init__(
        self,
        connection: _Connection,
        extensions: Extensions,
        message: QueuedMessage,
        recipients: Sequence[str],
        host: str,
        timeouts: Timeouts,
    ) -> None:
        self._connection = connection
        self._ext = extensions
        self._message = message
        self._recipients = list(recipients)
        self._host = host
        self._timeouts = timeouts

    def _all(self, outcome: Outcome, status: str, text: str) -> list[RecipientResult]:
        return results_for_all(self._recipients, outcome, status, text, self._host)

    def run(self) -> list[RecipientResult]:
        refusal = self._check_capabilities()
        if refusal is not None:
            self._quit()
            return refusal
        return self._send_envelope_and_data()

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
        )
        rcpts = [client.rcpt_command(r) for r in self._recipients]
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
        connection.send(client.encode_data(message.body))
        try:
            final = connection.read(timeout=self._timeouts.data)
        except _TransactionBroken as error:
            # The final dot went out: the peer may have taken the message. Defer this
            # attempt ("may be delivered twice"); the next MX now could deliver it twice.
            for recipient in accepted:
                results[recipient] = RecipientResult(
                    recipient,
                    Outcome.DEFERRED,
                    "4.4.2",
                    f"451 4.4.2 {self._host}: {error}",
                    self._host,
                )
            return [results[r] for r in self._recipients]
        for recipient in accepted:
            results[recipient] = _result(recipient, final, self._host)
        self._quit()
        return [results[r] for r in self._recipients]

    def _envelope_refused(self, reply: ServerReply) -> list[RecipientResult]:
        self._quit()
        return [_result(r, reply, self._host) for r in self._recipients]

    def _quit(self) -> None:
        with contextlib.suppress(_TransactionBroken):
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


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
