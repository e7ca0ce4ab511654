"""The SMTP listener: a gevent StreamServer with a Pool, one greenlet per connection.

This is the I/O shell around `protocol.session`: it reads bytes, feeds the session,
answers its events (policy for RCPT, the spool for a finished message), and writes the
replies — all replies of a pipelined batch in one send. Low-level errors (OSError,
ssl.SSLError, timeouts) are translated here and nowhere else. Limits enforced here:
total and per-IP connections, early talkers, and the deadlines of a connection blocked
on its peer — the idle timeout (also inside DATA), the command deadline (a whole command
line, however it trickles) and the minimum data rate in DATA — all checked by one
sweeper greenlet rather than a timer per read; each ends the session with 421 4.4.2.
Replies to commands the session counted as errors past its soft limit are held back
`error_sleep` each (the tarpit). A graceful stop closes idle sessions with 421 at once
and lets open transactions finish.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.log import get_logger, printable
from gsmtp.policy import Client, Policy, client_from_ip
from gsmtp.protocol import replies
from gsmtp.protocol.replies import Reply
from gsmtp.protocol.session import (
    Envelope,
    Limits,
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
from gsmtp.tls import ServerTls

RECV_SIZE = 256 * 1024
# Connections past max_connections still get a prompt 421 instead of waiting in the
# kernel backlog; this many extra greenlets may exist to say it.
_OVERFLOW_SLOTS = 256
_NEVER = float("inf")
EARLY_TALKER = Reply(554, "5.5.0", "SMTP synchronization error: talked before the greeting")


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


class _IdleTimeout(Exception):
    """Raised into a connection by the sweeper: its current deadline has passed."""


class _ShutdownRequested(Exception):
    pass


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
        tls: ServerTls | None = None,
        deadlines: Deadlines = Deadlines(),
        error_sleep: float = 1.0,
    ) -> None:
        self._listen = listen
        self._hostname = hostname
        self._limits = limits
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_per_ip = max_connections_per_ip
        self._policy = policy
        self._spool = spool
        self._acceptor = acceptor
        self._on_queued = on_queued
        self._tls = tls
        self._deadlines = deadlines
        self._error_sleep = error_sleep
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
    def tls_context(self) -> ssl.SSLContext | None:
        """The context for handshakes starting now (replaced by a certificate reload)."""
        return self._tls.context if self._tls is not None else None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.address[:2] for server in self._servers]

    def start(self) -> None:
        for host, port in self._listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind((host, port))
            listener.listen(1024)
            server = StreamServer(listener, self._handle, spawn=self._pool)
            server.start()
            self._servers.append(server)
            self._log.info("listener_started", host=host, port=port)
        self._sweeper = gevent.spawn(self._sweep_idle)

    def _sweep_idle(self) -> None:
        """One timer for all connections: end those blocked on the peer past their
        deadline (idle between commands, inside DATA, or not reading our replies).
        Cheaper than arming a timeout around every read."""
        tick = min(1.0, self._idle_timeout / 4, self._deadlines.command / 4)
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

    def _handle(self, sock: socket.socket, address: Any) -> None:
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
                _send_quietly(sock, limit_reply.to_bytes())
                return
            log.info("connection_opened")
            connection = _Connection(self, sock, peer_ip, log)
            current = gevent.getcurrent()
            self._connections[current] = connection
            try:
                connection.run()
            finally:
                del self._connections[current]
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

    def __init__(self, server: SmtpServer, sock: socket.socket, peer_ip: str, log: Any) -> None:
        self._server = server
        self._sock: Any = sock
        self._peer_ip = peer_ip
        self._client: Client = client_from_ip(peer_ip)
        self._log = log
        self._tls = False
        self.deadline = _NEVER  # monotonic time by which the peer must have acted
        self.limit = _IDLE  # the deadline's kind, for the reply when it passes
        self.idle = False  # waiting for a command outside a transaction
        self._last_read_at = time.monotonic()
        self._line_started: float | None = None  # first byte of an unfinished command line
        self._data_started: float | None = None  # the 354 of the DATA being received
        self._data_bytes = 0
        self._tarpitted = False
        self._session = SmtpSession(
            server._limits,
            hostname=server._hostname,
            tls_available=server._tls is not None,
        )

    def run(self) -> None:
        session = self._session
        if self._talked_early():
            self._log.info("early_talker_dropped")
            _send_quietly(self._sock, EARLY_TALKER.to_bytes())
            return
        try:
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
            limit = self.limit
            self._log.info("connection_timed_out", limit=limit.name)
            metrics.SLOW_CLIENTS.labels(limit.name).inc()
            session.close_with(limit.reply)
            self._flush_quietly()
        except _ShutdownRequested:
            session.close_with(replies.SHUTTING_DOWN)
            self._flush_quietly()
        except (OSError, ssl.SSLError) as error:
            self._log.info("connection_lost", error=printable(str(error)))

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
        self._arm_deadline(time.monotonic())
        try:
            data = self._sock.recv(RECV_SIZE)
        finally:
            self.idle = False
            self.deadline = _NEVER
        self._last_read_at = time.monotonic()
        if session.receiving_data:
            self._data_bytes += len(data)
        session.receive_data(data)
        if not session.receiving_data:
            self._data_started = None  # its end was in this chunk; the next DATA is new

    def _arm_deadline(self, now: float) -> None:
        """The earliest of the deadlines that hold while we wait for the peer: the idle
        timeout from now; the command deadline from the first byte of an unfinished
        command line (it arrived in the last read); in DATA, the time by which the bytes
        received so far fall under the minimum rate, never before the grace period."""
        session = self._session
        server = self._server
        deadline, limit = now + server._idle_timeout, _IDLE
        if session.awaiting_line_end:
            if self._line_started is None:
                self._line_started = self._last_read_at
            command = self._line_started + server._deadlines.command
            if command < deadline:
                deadline, limit = command, _COMMAND
        else:
            self._line_started = None
        if session.receiving_data:
            if self._data_started is None:
                self._data_started, self._data_bytes = now, 0
            rate = server._deadlines.min_data_rate
            if rate:
                allowed = max(server._deadlines.data_rate_grace, self._data_bytes / rate)
                if self._data_started + allowed < deadline:
                    deadline, limit = self._data_started + allowed, _DATA_RATE
        self.deadline, self.limit = deadline, limit

    def _flush(self) -> None:
        for verb, reply in self._session.rejected_commands():
            self._log.info("command_rejected", verb=verb, reply=f"{reply.code} {reply.enhanced}")
        delays = self._session.error_delays()
        data = self._session.data_to_send()
        if delays and self._server._error_sleep:
            # The tarpit (Postfix smtpd_error_sleep_time): a client past the soft error
            # limit waits for each error reply, so harvesting and junk cost it time.
            if not self._tarpitted:
                self._tarpitted = True
                self._log.info("client_tarpitted", error_sleep=self._server._error_sleep)
            metrics.TARPIT_DELAYS.inc(delays)
            gevent.sleep(delays * self._server._error_sleep)
        if data:
            self.deadline = time.monotonic() + self._server._idle_timeout
            self.limit = _IDLE
            try:
                self._sock.sendall(data)
            finally:
                self.deadline = _NEVER

    def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, _IdleTimeout):
            self._flush()

    def _answer(self, event: SessionEvent) -> None:
        session = self._session
        if isinstance(event, RcptTo):
            reply = self._server._policy.check_recipient(event.address, self._client)
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

    def _start_tls(self, event: StartTlsRequested) -> None:
        context = self._server.tls_context
        assert context is not None
        self._session.respond(event, replies.READY_FOR_TLS)
        self._flush()
        self.deadline = time.monotonic() + self._server._idle_timeout
        self.limit = _IDLE
        try:
            self._sock = context.wrap_socket(self._sock, server_side=True)
        finally:
            self.deadline = _NEVER
        self._tls = True
        self._log.info("tls_started", version=self._sock.version())

    def _store(self, envelope: Envelope) -> Reply:
        started = time.monotonic()
        message = self._server._acceptor.accept(
            envelope, client_ip=self._peer_ip, tls=self._tls, now=time.time()
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
