"""One SMTP connection: the I/O shell around `protocol.session` for one socket.

`Connection` reads bytes, feeds the session, answers its events (the free-space
reserve and policy for MAIL, policy for RCPT, the authenticator for AUTH, the spool for
a finished message), and writes the replies — all replies of a pipelined batch in one
send. Low-level errors (OSError, ssl.SSLError, timeouts) are translated here and
nowhere else. Held here for one connection: early talkers (with greet_wait the greeting
is held to catch them), a delay after each failed AUTH, the tarpit (replies to commands
the session counted as errors past its soft limit are held back `error_sleep` each),
and which deadline the connection is held to now — the idle timeout (also inside
DATA), the command deadline (a whole command line, however it trickles) or the minimum
data rate in DATA. The server's one sweeper greenlet checks every connection's deadline
and raises `IdleTimeout` into one past it; each ends the session with 421 4.4.2.

What a connection needs from its server (collaborators, the settings a reload
replaces, and the server's live counters) is one `ServerContext`, shared by the server
and all its connections: gsmtp.server owns the listeners, admission and the stop.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
from gevent.event import Event

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.auth import Authenticator, AuthOutcome
from gsmtp.diskspace import SpaceReserve
from gsmtp.dkim import DkimSigner
from gsmtp.intake import MIN_READ, SPOOL_THRESHOLD, DataMemory, SpooledBody
from gsmtp.log import printable
from gsmtp.message import MessageId
from gsmtp.policy import Client, Policy, client_from_ip
from gsmtp.protocol import replies
from gsmtp.protocol.replies import Reply
from gsmtp.protocol.session import (
    AuthRequested,
    Envelope,
    Limits,
    ListenerRules,
    MailFrom,
    MessageReceived,
    NeedData,
    RcptTo,
    SmtpSession,
    StartTlsRequested,
    VerifyRequested,
)
from gsmtp.protocol.session import (
    Event as SessionEvent,
)
from gsmtp.sockets import send_all
from gsmtp.spool import Spool
from gsmtp.tls import ServerTls

RECV_SIZE = 256 * 1024
NEVER = float("inf")  # a deadline that never passes
EARLY_TALKER = Reply(554, "5.5.0", "SMTP synchronization error: talked before the greeting")

# The refusals gsmtp_rejects_total counts, by the reply that says so (metrics.REJECT_REASONS).
# Syntax and sequence errors are the client's bugs, not refusals: not counted.
_REJECT_REASONS: dict[Reply, str] = {
    replies.RELAY_DENIED: "relay_denied",
    replies.NO_SUCH_USER: "unknown_user",
    replies.MESSAGE_TOO_BIG: "size",
    replies.BARE_LINE_ENDING: "bare_lf",
    replies.BARE_LINE_ENDING_IN_DATA: "bare_lf",
    replies.MAIL_LOOP: "loop",
    replies.TOO_MANY_RECIPIENTS: "too_many_recipients",
    replies.INSUFFICIENT_STORAGE: "storage",
    replies.SPOOL_ERROR: "storage",
    replies.AUTH_REQUIRED: "auth_required",
    replies.AUTH_FAILED: "auth_failed",
    replies.AUTH_TOO_MANY_FAILURES: "auth_failed",
    replies.SENDER_NOT_OWNED: "sender_not_owned",
}


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long a client may take (Postfix smtpd_per_request_deadline and
    smtpd_min_data_rate). `min_data_rate` is in bytes per second over the whole of DATA,
    measured once `data_rate_grace` has passed since the 354; 0 turns it off."""

    command: float = 300.0
    min_data_rate: int = 1024
    data_rate_grace: float = 30.0


@dataclass(frozen=True, slots=True)
class _Limit:
    """Which deadline a connection is held to now: its name (logs, metrics) and reply."""

    name: str
    reply: Reply


_IDLE = _Limit("idle", replies.IDLE_TIMEOUT)
_COMMAND = _Limit("command_deadline", replies.COMMAND_TIMEOUT)
_DATA_RATE = _Limit("min_data_rate", replies.DATA_TOO_SLOW)


class IdleTimeout(Exception):
    """Raised into a connection by the sweeper: its current deadline has passed."""


class ShutdownRequested(Exception):
    pass


class _OutcomeUnknown(Exception):
    """Interrupted while the spool committed the message: the client gets no reply."""


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    rules: ListenerRules
    implicit_tls: bool = False


@dataclass(slots=True, eq=False)
class ServerContext:
    """What every connection shares with its server. The collaborators are fixed at
    start (the policy and the DKIM signer change inside); the settings from `limits`
    to `error_sleep` are replaced by a reload (`SmtpServer.reconfigure`) and read when
    used, so a session begun after a reload gets the new ones; the last three fields are
    the server's live state, kept up by its connections."""

    hostname: str
    limits: Limits
    idle_timeout: float
    deadlines: Deadlines
    greet_wait: float
    error_sleep: float
    policy: Policy
    spool: Spool
    acceptor: Acceptor
    on_queued: Callable[[], None]
    data_memory: DataMemory  # bodies in memory, all connections together (gsmtp.intake)
    reserve: SpaceReserve | None = None
    tls: ServerTls | None = None
    dkim: Callable[[], DkimSigner] | None = None  # the signer now; None: nothing is signed
    authenticator: Authenticator | None = None
    auth_failure_delay: float = 1.0
    stopping: Event = field(default_factory=Event)
    # When a client last sent anything (or connected), and how many wait for the spool
    # to commit their message: see `SmtpServer.clients_served`.
    last_read_at: float = field(default_factory=time.monotonic)
    clients_storing: int = 0

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context for handshakes starting now (replaced by a certificate reload)."""
        return self.tls.context if self.tls is not None else None


class Connection:
    """Drives one SmtpSession over one socket."""

    def __init__(
        self, context: ServerContext, sock: socket.socket, peer_ip: str, log: Any, kind: Listener
    ) -> None:
        self._context = context
        self._sock: Any = sock
        self._peer_ip = peer_ip
        self._client: Client = client_from_ip(peer_ip)
        self._user: str | None = None  # whom AUTH verified; valid while the session agrees
        self._log = log
        self._tls = False
        self._implicit_tls = kind.implicit_tls
        self.deadline = NEVER  # monotonic time by which the peer must have acted
        self.limit = _IDLE  # the deadline's kind, for the reply when it passes
        self.idle = False  # waiting for a command outside a transaction
        self.storing = False  # waiting for the spool to commit a message
        # A new client counts as served (`clients_served`) while it greets, and sends
        # its PROXY header or its TLS handshake: reads `_receive` does not see.
        self._last_read_at = context.last_read_at = time.monotonic()
        self._line_started: float | None = None  # first byte of an unfinished command line
        self._read_ended_line = False  # the last read held a line end (LF)
        self._data_started: float | None = None  # the 354 of the DATA being received
        self._data_bytes = 0
        self._memory = context.data_memory.account()  # what this connection's body holds
        self._body: SpooledBody | None = None  # parts of a large message written so far
        self._tarpitted = False
        # For the summary line at disconnect (Postfix's "disconnect from ...").
        self.started = time.monotonic()
        self.messages = 0
        self.rejects = 0
        self.tls_version: str | None = None
        self._session = SmtpSession(
            context.limits,
            hostname=context.hostname,
            tls_available=context.tls is not None and not kind.implicit_tls,
            tls_active=kind.implicit_tls,
            rules=kind.rules,
        )

    def run(self) -> None:
        session = self._session
        # With implicit TLS the client speaks first (its ClientHello): not an early talker.
        if not self._implicit_tls and self._talked_early():
            self._log.info("early_talker_dropped")
            self._reject("early_talker")
            send_quietly(self._sock, EARLY_TALKER.to_bytes())
            return
        try:
            if self._implicit_tls:
                self._wrap_tls()
            send_all(self._sock, session.start())
            while not session.closed:
                event = session.next_event()
                if (
                    self._body is not None
                    and not session.receiving_data
                    and not isinstance(event, MessageReceived)
                ):
                    self._discard_body()  # its DATA ended, and the session refused it
                if isinstance(event, NeedData):
                    self._flush()
                    if session.closed:
                        break
                    self._receive()
                else:
                    self._answer(event)
            self._flush()
        except IdleTimeout:
            limit = self.limit
            self._log.info("connection_timed_out", limit=limit.name)
            metrics.SLOW_CLIENTS.labels(limit.name).inc()
            self._reject("timeout")
            session.close_with(limit.reply)
            self._flush_quietly()
        except ShutdownRequested:
            session.close_with(replies.SHUTTING_DOWN)
            self._flush_quietly()
        except _OutcomeUnknown:
            pass  # the connection closes without a reply
        except (OSError, ssl.SSLError) as error:
            self._log.info("connection_lost", error=printable(str(error)))

    def summary(self) -> dict[str, object]:
        """The session in a few numbers, for its one closing log line (Postfix's
        `disconnect from ... commands=N`): command lines read, messages accepted,
        refusals (those counted in gsmtp_rejects_total), the TLS version or None, and
        seconds since the connection was admitted."""
        return {
            "commands": self._session.commands,
            "messages": self.messages,
            "rejects": self.rejects,
            "tls": self.tls_version,
            "duration": round(time.monotonic() - self.started, 3),
        }

    def close(self) -> None:
        """Close the socket as it is now: after a TLS handshake the original socket
        object no longer owns the descriptor, the TLS one does. Then drop what is left
        of a message that was not stored, and give back its memory."""
        close_quietly(self._sock)
        self._discard_body()
        self._memory.set(0)

    def _talked_early(self) -> bool:
        """RFC 5321 §4.3.1: the client waits for the greeting; bytes before it mean a
        spam engine that does not listen (Postfix postscreen PREGREET). With greet_wait
        the greeting is held that long while watching for such bytes; without it, only
        bytes already here count: a non-blocking peek on the OS socket (select() cannot
        take descriptors past 1023)."""
        wait = self._context.greet_wait
        if wait > 0:
            previous = self._sock.gettimeout()
            self._sock.settimeout(wait)
            try:
                return bool(self._sock.recv(1, socket.MSG_PEEK))
            except OSError:  # the wait ran out (a time-out is an OSError), or a reset
                return False
            finally:
                self._sock.settimeout(previous)
        raw = getattr(self._sock, "_sock", self._sock)
        try:
            return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def _receive(self) -> None:
        session = self._session
        context = self._context
        if context.stopping.is_set() and not session.in_transaction:
            raise ShutdownRequested
        self.idle = not session.in_transaction
        receiving = session.receiving_data
        size = RECV_SIZE
        if receiving:
            # The most this read may bring is charged before it (gsmtp.intake).
            size = context.data_memory.read_size(RECV_SIZE)
            self._memory.set(session.data_buffered + size)
        self._arm_deadline(time.monotonic())
        try:
            data = self._sock.recv(size)
        finally:
            self.idle = False
            self.deadline = NEVER
        self._last_read_at = context.last_read_at = time.monotonic()
        self._read_ended_line = b"\n" in data
        if receiving:
            self._data_bytes += len(data)
        session.receive_data(data)
        del data  # not held while a part is written
        if not session.receiving_data:
            self._data_started = None  # its end was in this chunk; the next DATA is new
            if receiving:
                self._memory.set(0)  # what is left of the body is charged by _store
        elif receiving:
            self._take_content()

    def _take_content(self) -> None:
        """After a read in DATA: write out what the session holds once it is large or
        the bodies of all connections are over budget; drop at once what was written of
        a message that will be refused (too big, bare CR or LF)."""
        session = self._session
        held = session.data_buffered
        if session.data_doomed:
            self._discard_body()
        elif held >= SPOOL_THRESHOLD or (self._context.data_memory.exceeded and held >= MIN_READ):
            content = session.take_data()
            if content:
                self._memory.set(session.data_buffered + len(content))
                self._write_part(content)
        self._memory.set(session.data_buffered)

    def _write_part(self, content: bytes) -> None:
        """The next part of a large message, under the id it will be stored with. A
        part that cannot be written fails the message (451 at its end); the rest of it
        is read and dropped."""
        body = self._body
        if body is None:
            body = self._body = SpooledBody(
                self._context.spool, self._context.acceptor.new_id(time.time())
            )
        if body.failed:
            return
        started = time.monotonic()
        try:
            body.write(content)
        except (IdleTimeout, ShutdownRequested):
            raise
        except Exception as error:
            body.failed = True
            self._log.error(
                "body_part_not_stored", msg_id=body.message_id, error=printable(str(error))
            )
        else:
            metrics.BODY_PARTS.inc()
            if self._context.reserve is not None:
                self._context.reserve.spend(len(content))
        finally:
            if self._data_started is not None:
                # The server's time, not the client's: the minimum data rate waits.
                self._data_started += time.monotonic() - started

    def _discard_body(self) -> None:
        """Drop the parts written of a message that will not be stored."""
        body, self._body = self._body, None
        if body is None or body.count == 0:
            return
        try:
            body.discard()
        except (IdleTimeout, ShutdownRequested):
            raise
        except Exception as error:
            # Owed: retried by the checkpoint task (SpoolUpkeep.checkpoint), or at the next start.
            self._log.warning(
                "body_parts_not_discarded", msg_id=body.message_id, error=printable(str(error))
            )

    def _arm_deadline(self, now: float) -> None:
        """The earliest of the deadlines that hold while we wait for the peer: the idle
        timeout from now; the command deadline from the first byte of the unfinished
        command line — the time of the last read if that read ended a line (a client
        whose reads each finish one line and begin the next is held to each line, not
        to the first), else of the read that began it; in DATA, the time by which the
        bytes received so far fall under the minimum rate, never before the grace
        period."""
        session = self._session
        context = self._context
        deadline, limit = now + context.idle_timeout, _IDLE
        if session.awaiting_line_end:
            if self._line_started is None or self._read_ended_line:
                self._line_started = self._last_read_at
            self._read_ended_line = False
            command = self._line_started + context.deadlines.command
            if command < deadline:
                deadline, limit = command, _COMMAND
        else:
            self._line_started = None
        if session.receiving_data:
            if self._data_started is None:
                self._data_started, self._data_bytes = now, 0
            rate = context.deadlines.min_data_rate
            if rate:
                allowed = max(context.deadlines.data_rate_grace, self._data_bytes / rate)
                if self._data_started + allowed < deadline:
                    deadline, limit = self._data_started + allowed, _DATA_RATE
        self.deadline, self.limit = deadline, limit

    def _flush(self) -> None:
        for verb, reply in self._session.rejected_commands():
            self._log.info("command_rejected", verb=verb, reply=f"{reply.code} {reply.enhanced}")
            self._note_reply(reply)
        for limit in self._session.limits_hit():
            self._reject(limit)
        delays = self._session.error_delays()
        data = self._session.data_to_send()
        if delays and self._context.error_sleep:
            # The tarpit (Postfix smtpd_error_sleep_time): a client past the soft error
            # limit waits for each error reply, so harvesting and junk cost it time.
            if not self._tarpitted:
                self._tarpitted = True
                self._log.info("client_tarpitted", error_sleep=self._context.error_sleep)
            metrics.TARPIT_DELAYS.inc(delays)
            gevent.sleep(delays * self._context.error_sleep)
        if data:
            self.deadline = time.monotonic() + self._context.idle_timeout
            self.limit = _IDLE
            try:
                send_all(self._sock, data)
            finally:
                self.deadline = NEVER

    def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, IdleTimeout):
            self._flush()

    def _current_client(self) -> Client:
        """The client with the user it authenticated as, while the session still says
        so (STARTTLS makes it forget, RFC 3207 §4.2)."""
        if self._session.authenticated and self._user is not None:
            return replace(self._client, user=self._user)
        return self._client

    def _note_reply(self, reply: Reply) -> None:
        """Count `reply` if it is a refusal (see _REJECT_REASONS)."""
        reason = _REJECT_REASONS.get(reply)
        if reason is not None:
            self._reject(reason)

    def _reject(self, reason: str) -> None:
        """One refusal, for gsmtp_rejects_total and the disconnect summary."""
        metrics.reject(reason)
        self.rejects += 1

    def _answer(self, event: SessionEvent) -> None:
        session = self._session
        if isinstance(event, MailFrom):
            reserve = self._context.reserve
            if reserve is not None and not reserve.has_room(event.size):
                self._log.info("sender_rejected", reply=replies.INSUFFICIENT_STORAGE.text)
                self._note_reply(replies.INSUFFICIENT_STORAGE)
                session.respond(event, replies.INSUFFICIENT_STORAGE)
                return
            reply = self._context.policy.check_sender(event.sender, self._current_client())
            if not reply.is_positive:
                self._log.info(
                    "sender_rejected",
                    sender=printable(str(event.sender)),
                    user=self._user,
                    reply=reply.text,
                )
                self._note_reply(reply)
            session.respond(event, reply)
        elif isinstance(event, AuthRequested):
            reply = self._authenticate(event)
            self._note_reply(reply)
            session.respond(event, reply)
        elif isinstance(event, RcptTo):
            reply = self._context.policy.check_recipient(event.address, self._current_client())
            if not reply.is_positive:
                self._log.info(
                    "recipient_rejected", rcpt=printable(str(event.address)), reply=reply.text
                )
                self._note_reply(reply)
            session.respond(event, reply)
        elif isinstance(event, MessageReceived):
            reply = self._store(event.envelope)
            if reply.is_positive:
                self.messages += 1
            else:
                self._note_reply(reply)
            session.respond(event, reply)
        elif isinstance(event, VerifyRequested):
            session.respond(event, self._context.policy.verify(event.argument))
        elif isinstance(event, StartTlsRequested):
            self._start_tls(event)

    def _authenticate(self, event: AuthRequested) -> Reply:
        """Verify off the event loop; log every failure with the peer (bound) and the
        username, never the password; make the client wait before a 535."""
        authenticator = self._context.authenticator
        assert authenticator is not None  # the session offers AUTH only with one
        credentials = event.credentials
        result = authenticator.authenticate(credentials, self._client.ip)
        metrics.AUTH_ATTEMPTS.labels(result.outcome.value).inc()
        if result.outcome is AuthOutcome.SUCCEEDED:
            self._user = result.user
            self._log.info("auth_succeeded", user=result.user, mechanism=credentials.mechanism)
            return replies.AUTH_SUCCEEDED
        username = printable(credentials.username)
        if result.outcome is AuthOutcome.BLOCKED:
            self._log.warning("auth_blocked", username=username, failures=result.failures)
            return replies.AUTH_TOO_MANY_FAILURES
        if result.outcome is AuthOutcome.THROTTLED:
            # Too many checks of this network (or of all) waiting for the pool: answered
            # at once, nothing checked; a 4xx, so it counts toward the error limits.
            self._log.warning("auth_throttled", username=username, failures=result.failures)
            return replies.AUTH_TEMPORARY_FAILURE
        self._log.warning(
            "auth_failed",
            username=username,
            mechanism=credentials.mechanism,
            reason=result.reason,
            failures=result.failures,
        )
        gevent.sleep(self._context.auth_failure_delay)  # Postfix smtpd_error_sleep_time
        return replies.AUTH_FAILED

    def _start_tls(self, event: StartTlsRequested) -> None:
        self._session.respond(event, replies.READY_FOR_TLS)
        self._flush()
        self._wrap_tls()
        self._user = None

    def _wrap_tls(self) -> None:
        """The TLS handshake, within the idle timeout."""
        tls = self._context.tls_context
        assert tls is not None
        self.deadline = time.monotonic() + self._context.idle_timeout
        self.limit = _IDLE
        try:
            self._sock = tls.wrap_socket(self._sock, server_side=True)
        finally:
            self.deadline = NEVER
        self._tls = True
        self.tls_version = self._sock.version()
        metrics.tls_session(self.tls_version)
        self._log.info("tls_started", version=self.tls_version)

    def _dkim_signature(
        self, envelope: Envelope, message_id: MessageId, body: SpooledBody | None
    ) -> bytes:
        """DKIM-Signature header(s) for mail from a trusted network or an authenticated
        session (b"" for other mail, or none signed). A large body is hashed from its
        parts in the spool, on the reader thread, a part at a time."""
        client = self._current_client()
        signer = self._context.dkim() if self._context.dkim is not None else None
        if signer is None or not signer.active:
            return b""
        if not (client.authenticated or self._context.policy.is_trusted(client)):
            return b""
        parts = None
        if body is not None:
            parts = functools.partial(self._context.spool.read_parts, body.message_id, body.count)
        return signer.sign_message(
            msg_id=message_id, sender=str(envelope.sender), content=envelope.content, parts=parts
        )

    def _store(self, envelope: Envelope) -> Reply:
        started = time.monotonic()
        body = self._body  # discarded by the loop, or at close, unless stored
        if body is not None and body.failed:
            metrics.MESSAGES_RECEIVED.labels("spool_error").inc()
            return replies.SPOOL_ERROR
        now = time.time()
        message_id = body.message_id if body is not None else self._context.acceptor.new_id(now)
        message = self._context.acceptor.accept(
            envelope,
            client_ip=self._peer_ip,
            tls=self._tls,
            authenticated=self._current_client().authenticated,
            now=now,
            message_id=message_id,
            spooled=body.content() if body is not None else None,
            signature=self._dkim_signature(envelope, message_id, body),
        )
        message_id = message.id
        self.storing = True
        self._context.clients_storing += 1
        self._memory.set(len(envelope.content) + len(message.body))
        try:
            self._context.spool.enqueue(message)
        except (IdleTimeout, ShutdownRequested):
            # A timer fired just as the commit began. Whether the message is stored is
            # unknown, so no reply at all: never a 4xx that may be false (the client
            # sends again; at worst a duplicate), never a 250 that may be.
            self._log.warning("message_outcome_unknown", msg_id=message_id)
            raise _OutcomeUnknown from None
        except Exception as error:
            metrics.MESSAGES_RECEIVED.labels("spool_error").inc()
            self._log.error("message_not_stored", msg_id=message_id, error=printable(str(error)))
            return replies.SPOOL_ERROR
        finally:
            self.storing = False
            self._context.clients_storing -= 1
            self._memory.set(0)
        self._body = None  # its parts are the stored message's now
        metrics.ACCEPT_SECONDS.observe(time.monotonic() - started)
        size = message.size
        metrics.MESSAGE_SIZE.observe(size)
        if self._context.reserve is not None:
            self._context.reserve.spend(size - (body.size if body is not None else 0))
        metrics.MESSAGES_QUEUED.inc()
        self._log.info(
            "message_queued",
            msg_id=message_id,
            sender=printable(message.sender),
            rcpt_count=len(message.recipients),
            size=size,
        )
        self._context.on_queued()
        return replies.queued(message_id)


def send_quietly(sock: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def close_quietly(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
