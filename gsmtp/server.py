"""The SMTP listener: a gevent StreamServer with a Pool, one greenlet per connection.

This is the I/O shell around `protocol.session`: it reads bytes, feeds the session,
answers its events (policy for MAIL and RCPT, the authenticator for AUTH, the spool for
a finished message), and writes the replies — all replies of a pipelined batch in one
send. Low-level errors (OSError, ssl.SSLError, timeouts) are translated here and nowhere
else. Limits enforced here: idle timeout (also inside DATA), total and per-IP
connections, early talkers, a delay after each failed AUTH. A graceful stop closes idle
sessions with 421 at once and lets open transactions finish.

Three kinds of listener: `listen` (port 25: STARTTLS offered, AUTH only under TLS),
`submission_listen` (587: STARTTLS, then AUTH, then MAIL) and `submission_tls_listen`
(465: TLS from the first byte, RFC 8314).
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.auth import Authenticator, AuthOutcome
from gsmtp.log import get_logger, printable
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
from gsmtp.spool import Spool

RECV_SIZE = 256 * 1024
# Connections past max_connections still get a prompt 421 instead of waiting in the
# kernel backlog; this many extra greenlets may exist to say it.
_OVERFLOW_SLOTS = 256
_NEVER = float("inf")
EARLY_TALKER = Reply(554, "5.5.0", "SMTP synchronization error: talked before the greeting")


class _IdleTimeout(Exception):
    pass


class _ShutdownRequested(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Listener:
    host: str
    port: int
    rules: ListenerRules
    implicit_tls: bool = False


class SmtpServer:
    def __init__(
        self,
        *,
        listen: tuple[tuple[str, int], ...],
        hostname: str,
        limits: Limits,
        idle_timeout: float,
        max_connections: int,
        max_connections_per_ip: int,
        policy: Policy,
        spool: Spool,
        acceptor: Acceptor,
        on_queued: Callable[[], None],
        tls_context: ssl.SSLContext | None = None,
        submission_listen: tuple[tuple[str, int], ...] = (),
        submission_tls_listen: tuple[tuple[str, int], ...] = (),
        plaintext_auth: bool = False,
        authenticator: Authenticator | None = None,
        auth_failure_delay: float = 1.0,
    ) -> None:
        auth = authenticator is not None
        self._listen = [_Listener(host, port, ListenerRules(auth=auth)) for host, port in listen]
        submission = ListenerRules(auth=auth, plaintext_auth=plaintext_auth, submission=True)
        self._listen += [_Listener(host, port, submission) for host, port in submission_listen]
        self._listen += [
            _Listener(host, port, submission, implicit_tls=True)
            for host, port in submission_tls_listen
        ]
        self._authenticator = authenticator
        self._auth_failure_delay = auth_failure_delay
        self._hostname = hostname
        self._limits = limits
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_per_ip = max_connections_per_ip
        self._policy = policy
        self._spool = spool
        self._acceptor = acceptor
        self._on_queued = on_queued
        self._tls_context = tls_context
        self._pool = Pool(max_connections + _OVERFLOW_SLOTS)
        self._servers: list[StreamServer] = []
        self._per_ip: dict[str, int] = defaultdict(int)
        self._active = 0
        self._connections: dict[gevent.Greenlet, _Connection] = {}
        self._sweeper: gevent.Greenlet | None = None
        self._stopping = Event()
        self._ids = itertools.count(1)
        self._log = get_logger(component="server")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.address[:2] for server in self._servers]

    def start(self) -> None:
        for kind in self._listen:
            host, port = kind.host, kind.port
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((host, port))
            listener.listen(1024)

            def handle(sock: socket.socket, address: Any, kind: _Listener = kind) -> None:
                self._handle(sock, address, kind)

            server = StreamServer(listener, handle, spawn=self._pool)
            server.start()
            self._servers.append(server)
            self._log.info(
                "listener_started",
                host=host,
                port=port,
                submission=kind.rules.submission,
                implicit_tls=kind.implicit_tls,
            )
        self._sweeper = gevent.spawn(self._sweep_idle)

    def _sweep_idle(self) -> None:
        """One timer for all connections: end those blocked on the peer past their
        deadline (idle between commands, inside DATA, or not reading our replies).
        Cheaper than arming a timeout around every read."""
        tick = min(1.0, self._idle_timeout / 4)
        while True:
            gevent.sleep(tick)
            now = time.monotonic()
            for greenlet, connection in list(self._connections.items()):
                if connection.deadline < now:
                    connection.deadline = _NEVER
                    greenlet.kill(_IdleTimeout, block=False)

    def stop(self, grace: float) -> None:
        """Stop accepting; idle sessions get 421 now, transactions get `grace` seconds."""
        self._stopping.set()
        for server in self._servers:
            server.close()
        for greenlet, connection in list(self._connections.items()):
            if connection.idle:
                greenlet.kill(_ShutdownRequested, block=False)
        self._pool.join(timeout=grace)
        self._pool.kill(block=True, timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.kill()

    # -- one connection ---------------------------------------------------------------

    def _handle(self, sock: socket.socket, address: Any, kind: _Listener) -> None:
        peer_ip = str(address[0])
        conn_id = next(self._ids)
        log = self._log.bind(conn_id=conn_id, peer=peer_ip)
        metrics.CONNECTIONS.inc()
        self._active += 1
        self._per_ip[peer_ip] += 1
        metrics.CONNECTIONS_ACTIVE.inc()
        try:
            limit_reply = self._limit_reply(peer_ip)
            if limit_reply is not None:
                log.info("connection_refused", reply=limit_reply.text)
                if not kind.implicit_tls:  # a TLS client could not read it
                    _send_quietly(sock, limit_reply.to_bytes())
                return
            log.info("connection_opened")
            connection = _Connection(self, sock, peer_ip, log, kind)
            current = gevent.getcurrent()
            self._connections[current] = connection
            try:
                connection.run()
            finally:
                del self._connections[current]
                connection.close()
        except Exception:
            metrics.INTERNAL_ERRORS.labels("connection").inc()
            log.exception("connection_crashed")
            _send_quietly(sock, b"421 4.3.0 Internal error, closing connection\r\n")
        finally:
            self._active -= 1
            self._per_ip[peer_ip] -= 1
            if self._per_ip[peer_ip] <= 0:
                del self._per_ip[peer_ip]
            metrics.CONNECTIONS_ACTIVE.dec()
            _close_quietly(sock)
            log.info("connection_closed")

    def _limit_reply(self, peer_ip: str) -> Reply | None:
        if self._stopping.is_set():
            return replies.SHUTTING_DOWN
        if self._active > self._max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if self._per_ip[peer_ip] > self._max_per_ip:
            return replies.TOO_MANY_CONNECTIONS_FROM_IP
        return None


class _Connection:
    """Drives one SmtpSession over one socket."""

    def __init__(
        self, server: SmtpServer, sock: socket.socket, peer_ip: str, log: Any, kind: _Listener
    ) -> None:
        self._server = server
        self._sock: Any = sock
        self._peer_ip = peer_ip
        self._client: Client = client_from_ip(peer_ip)
        self._user: str | None = None  # whom AUTH verified; valid while the session agrees
        self._log = log
        self._tls = False
        self._implicit_tls = kind.implicit_tls
        self.deadline = _NEVER  # monotonic time by which the peer must have acted
        self.idle = False  # waiting for a command outside a transaction
        self._session = SmtpSession(
            server._limits,
            hostname=server._hostname,
            tls_available=server._tls_context is not None and not kind.implicit_tls,
            tls_active=kind.implicit_tls,
            rules=kind.rules,
        )

    def run(self) -> None:
        session = self._session
        # With implicit TLS the client speaks first (its ClientHello): not an early talker.
        if not self._implicit_tls and self._talked_early():
            self._log.info("early_talker_dropped")
            _send_quietly(self._sock, EARLY_TALKER.to_bytes())
            return
        try:
            if self._implicit_tls:
                self._wrap_tls()
            self._sock.sendall(session.start())
            while not session.closed:
                event = session.next_event()
                if isinstance(event, NeedData):
                    self._flush()
                    if session.closed:
                        break
                    self._receive()
                else:
                    self._answer(event)
            self._flush()
        except _IdleTimeout:
            self._log.info("connection_timed_out")
            session.close_with(replies.IDLE_TIMEOUT)
            self._flush_quietly()
        except _ShutdownRequested:
            session.close_with(replies.SHUTTING_DOWN)
            self._flush_quietly()
        except (OSError, ssl.SSLError) as error:
            self._log.info("connection_lost", error=printable(str(error)))

    def close(self) -> None:
        """Close the socket as it is now: after a TLS handshake the original socket
        object no longer owns the descriptor, the TLS one does."""
        _close_quietly(self._sock)

    def _talked_early(self) -> bool:
        """RFC 5321 §4.3.1: the client waits for the greeting; bytes already here mean a
        spam engine that does not listen (Postfix postscreen PREGREET). A non-blocking
        peek on the OS socket (select() cannot take descriptors past 1023)."""
        raw = getattr(self._sock, "_sock", self._sock)
        try:
            return bool(raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False

    def _receive(self) -> None:
        session = self._session
        server = self._server
        if server._stopping.is_set() and not session.in_transaction:
            raise _ShutdownRequested
        self.idle = not session.in_transaction
        self.deadline = time.monotonic() + server._idle_timeout
        try:
            data = self._sock.recv(RECV_SIZE)
        finally:
            self.idle = False
            self.deadline = _NEVER
        session.receive_data(data)

    def _flush(self) -> None:
        for verb, reply in self._session.rejected_commands():
            self._log.info("command_rejected", verb=verb, reply=f"{reply.code} {reply.enhanced}")
        data = self._session.data_to_send()
        if data:
            self.deadline = time.monotonic() + self._server._idle_timeout
            try:
                self._sock.sendall(data)
            finally:
                self.deadline = _NEVER

    def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, _IdleTimeout):
            self._flush()

    def _current_client(self) -> Client:
        """The client with the user it authenticated as, while the session still says
        so (STARTTLS makes it forget, RFC 3207 §4.2)."""
        if self._session.authenticated and self._user is not None:
            return replace(self._client, user=self._user)
        return self._client

    def _answer(self, event: SessionEvent) -> None:
        session = self._session
        if isinstance(event, MailFrom):
            reply = self._server._policy.check_sender(event.sender, self._current_client())
            if not reply.is_positive:
                self._log.info(
                    "sender_rejected",
                    sender=printable(str(event.sender)),
                    user=self._user,
                    reply=reply.text,
                )
            session.respond(event, reply)
        elif isinstance(event, AuthRequested):
            session.respond(event, self._authenticate(event))
        elif isinstance(event, RcptTo):
            reply = self._server._policy.check_recipient(event.address, self._current_client())
            if not reply.is_positive:
                self._log.info(
                    "recipient_rejected", rcpt=printable(str(event.address)), reply=reply.text
                )
            session.respond(event, reply)
        elif isinstance(event, MessageReceived):
            session.respond(event, self._store(event.envelope))
        elif isinstance(event, VerifyRequested):
            session.respond(event, self._server._policy.verify(event.argument))
        elif isinstance(event, StartTlsRequested):
            self._start_tls(event)

    def _authenticate(self, event: AuthRequested) -> Reply:
        """Verify off the event loop; log every failure with the peer (bound) and the
        username, never the password; make the client wait before a 535."""
        authenticator = self._server._authenticator
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
        self._log.warning(
            "auth_failed",
            username=username,
            mechanism=credentials.mechanism,
            reason=result.reason,
            failures=result.failures,
        )
        gevent.sleep(self._server._auth_failure_delay)  # Postfix smtpd_error_sleep_time
        return replies.AUTH_FAILED

    def _start_tls(self, event: StartTlsRequested) -> None:
        self._session.respond(event, replies.READY_FOR_TLS)
        self._flush()
        self._wrap_tls()
        self._user = None

    def _wrap_tls(self) -> None:
        """The TLS handshake, within the idle timeout."""
        context = self._server._tls_context
        assert context is not None
        self.deadline = time.monotonic() + self._server._idle_timeout
        try:
            self._sock = context.wrap_socket(self._sock, server_side=True)
        finally:
            self.deadline = _NEVER
        self._tls = True
        self._log.info("tls_started", version=self._sock.version())

    def _store(self, envelope: Envelope) -> Reply:
        started = time.monotonic()
        message = self._server._acceptor.accept(
            envelope,
            client_ip=self._peer_ip,
            tls=self._tls,
            authenticated=self._current_client().authenticated,
            now=time.time(),
        )
        message_id = message.id
        try:
            self._server._spool.enqueue(message)
        except Exception as error:
            metrics.MESSAGES_RECEIVED.labels("spool_error").inc()
            self._log.error("message_not_stored", msg_id=message_id, error=printable(str(error)))
            return replies.SPOOL_ERROR
        metrics.ACCEPT_SECONDS.observe(time.monotonic() - started)
        metrics.MESSAGES_QUEUED.inc()
        self._log.info(
            "message_queued",
            msg_id=message_id,
            sender=printable(message.sender),
            rcpt_count=len(message.recipients),
            size=len(message.body),
        )
        self._server._on_queued()
        return replies.queued(message_id)


def _send_quietly(sock: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _close_quietly(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
