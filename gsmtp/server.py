"""The SMTP listener: a gevent StreamServer with a Pool, one greenlet per connection.

This is the I/O shell around `protocol.session`: it reads bytes, feeds the session,
answers its events (the free-space reserve and policy for MAIL, policy for RCPT, the
authenticator for AUTH, the spool for a finished message), and writes the replies — all
replies of a pipelined batch in one send. Low-level errors (OSError, ssl.SSLError,
timeouts) are translated here and nowhere else. Limits enforced here: total
connections, connections and new connections per client network
(`limits.ConnectionLimiter`), early talkers (with greet_wait the greeting is held to
catch them), a delay after each failed AUTH, and the deadlines of a connection blocked
on its peer — the idle timeout (also inside DATA), the command deadline (a whole command
line, however it trickles) and the minimum data rate in DATA — all checked by one
sweeper greenlet rather than a timer per read; each ends the session with 421 4.4.2.
Replies to commands the session counted as errors past its soft limit are held back
`error_sleep` each (the tarpit). A graceful stop closes idle sessions with 421 at once,
lets open transactions run for the grace period, then cuts them with 421 4.3.2; a
session waiting for its message's commit is never cut (its outcome would be unknown),
it gets its answer first.

Three kinds of listener: `listen` (port 25: STARTTLS offered, AUTH only under TLS),
`submission_listen` (587: STARTTLS, then AUTH, then MAIL) and `submission_tls_listen`
(465: TLS from the first byte, RFC 8314).

With `proxy_networks` set (server.proxy_protocol), every connection must begin with a
HAProxy PROXY v1/v2 header from one of those networks, read within
PROXY_HEADER_DEADLINE; otherwise it is closed without a greeting. The client the header
names is the client for everything after: relay rights, limits, logs, Received:.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.auth import Authenticator, AuthOutcome
from gsmtp.diskspace import SpaceReserve
from gsmtp.dkim import DkimSigner
from gsmtp.intake import MIN_READ, SPOOL_THRESHOLD, DataMemory, SpooledBody
from gsmtp.limits import Admitted, ConnectionLimiter, Refused
from gsmtp.log import get_logger, printable
from gsmtp.message import MessageId
from gsmtp.policy import Client, IPNetwork, Policy, client_from_ip
from gsmtp.protocol import replies
from gsmtp.protocol.proxy import V2_MAX_LENGTH, NeedMore, ProxyError, ProxyHeaderParser
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
from gsmtp.sockets import bind_listener, send_all, take_bound
from gsmtp.spool import Spool
from gsmtp.tls import ServerTls

RECV_SIZE = 256 * 1024
# Connections past max_connections still get a prompt 421 instead of waiting in the
# kernel backlog; this many extra greenlets may exist to say it.
_OVERFLOW_SLOTS = 256
_NEVER = float("inf")
# At the end of the grace, sessions cut with 421 get this long to have it written.
CUT_SECONDS = 0.5
EARLY_TALKER = Reply(554, "5.5.0", "SMTP synchronization error: talked before the greeting")
# The PROXY header must arrive within this (or server.timeout if shorter). A balancer
# sends it at once; anything slower is not a balancer.
PROXY_HEADER_DEADLINE = 5.0
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
# Connections one worker accepts per turn of its loop from a listener it shares.
SHARED_MAX_ACCEPT = 4
# Seconds since the last byte from any client after which none counts as being served
# (`SmtpServer.clients_served`): several of the pacer's probes, well under a human's
# pause between commands, and a busy client's gap between two reads is far shorter.
SERVED_WINDOW = 0.5


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


class _OutcomeUnknown(Exception):
    """Interrupted while the spool committed the message: the client gets no reply."""


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
        limiter: ConnectionLimiter,
        policy: Policy,
        spool: Spool,
        acceptor: Acceptor,
        on_queued: Callable[[], None],
        proxy_networks: Sequence[IPNetwork] | None = None,
        reserve: SpaceReserve | None = None,
        spawn: Callable[..., gevent.Greenlet] | None = None,
        greet_wait: float = 0.0,
        tls: ServerTls | None = None,
        deadlines: Deadlines = Deadlines(),
        error_sleep: float = 1.0,
        submission_listen: tuple[tuple[str, int], ...] = (),
        submission_tls_listen: tuple[tuple[str, int], ...] = (),
        plaintext_auth: bool = False,
        authenticator: Authenticator | None = None,
        auth_failure_delay: float = 1.0,
        max_data_memory: int = 256 * 1024 * 1024,
        inherited: Sequence[socket.socket] = (),
        sockets: Mapping[tuple[str, int], socket.socket] | None = None,
        dkim: Callable[[], DkimSigner] | None = None,
    ) -> None:
        # Listening sockets bound by the workers' supervisor, by address; the others
        # are bound here.
        self._sockets = dict(sockets or {})
        auth = authenticator is not None
        self._listen = [_Listener(host, port, ListenerRules(auth=auth)) for host, port in listen]
        submission = ListenerRules(auth=auth, plaintext_auth=plaintext_auth, submission=True)
        self._listen += [_Listener(host, port, submission) for host, port in submission_listen]
        self._listen += [
            _Listener(host, port, submission, implicit_tls=True)
            for host, port in submission_tls_listen
        ]
        # Listening sockets systemd passed (socket activation), used instead of binding
        # the listener with the same address.
        self._inherited = list(inherited)
        self._authenticator = authenticator
        self._auth_failure_delay = auth_failure_delay
        self._hostname = hostname
        self._limits = limits
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._limiter = limiter
        self._proxy_networks = None if proxy_networks is None else tuple(proxy_networks)
        self._proxy_deadline = min(PROXY_HEADER_DEADLINE, idle_timeout)
        self._policy = policy
        self._spool = spool
        self._acceptor = acceptor
        self._on_queued = on_queued
        self._reserve = reserve
        # Long-lived greenlets are started through `spawn(name, fn)`: the supervisor's,
        # which notices their death.
        self._spawn = spawn or (lambda name, function, *args: gevent.spawn(function, *args))
        self._greet_wait = greet_wait
        self._tls = tls
        self._deadlines = deadlines
        self._error_sleep = error_sleep
        # The DKIM signer now (a reload replaces it); None: nothing is signed.
        self._dkim = dkim
        # Bodies in memory, all connections together (see gsmtp.intake).
        self.data_memory = DataMemory(max_data_memory)
        # One process: connections past max_connections are accepted to be told 421.
        # A worker of several (its listeners shared with the others) stops accepting at
        # its share instead, as Postfix's master does at a service's process limit: the
        # workers with room take the waiting connections (gevent's StreamServer stops
        # while the pool is full and starts again when a slot frees), and only when
        # every worker is full do connections wait in the kernel's backlog.
        shared = bool(self._sockets)
        self._pool = Pool(max_connections if shared else max_connections + _OVERFLOW_SLOTS)
        self._servers: list[StreamServer] = []
        self._active = 0
        # When a client last sent anything (or connected), and how many wait for the
        # spool to commit their message: see `clients_served`.
        self.last_read_at = time.monotonic()
        self.clients_storing = 0
        self._connections: dict[gevent.Greenlet, _Connection] = {}
        self._sweeper: gevent.Greenlet | None = None
        self._stopping = Event()
        self._ids = itertools.count(1)
        self._log = get_logger(component="server")

    def reconfigure(
        self,
        *,
        limits: Limits,
        idle_timeout: float,
        deadlines: Deadlines,
        greet_wait: float,
        error_sleep: float,
        proxy_networks: Sequence[IPNetwork] | None,
        max_data_memory: int,
    ) -> None:
        """A reload: sessions that start from now on get these limits and deadlines
        (EHLO advertises the new SIZE); open sessions keep the limits they began with.
        Whether PROXY headers are required at all is fixed at start."""
        self._limits = limits
        self._idle_timeout = idle_timeout
        self._proxy_deadline = min(PROXY_HEADER_DEADLINE, idle_timeout)
        self._deadlines = deadlines
        self._greet_wait = greet_wait
        self._error_sleep = error_sleep
        if self._proxy_networks is not None and proxy_networks is not None:
            self._proxy_networks = tuple(proxy_networks)
        self.data_memory.limit = max_data_memory

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context for handshakes starting now (replaced by a certificate reload)."""
        return self._tls.context if self._tls is not None else None

    @property
    def connections(self) -> int:
        """Connections open now (systemd STATUS=, a worker's heartbeat)."""
        return self._active

    @property
    def clients_served(self) -> int:
        """Connections open now if a client sent anything (or connected) in the last
        SERVED_WINDOW seconds or waits for its message's commit, else 0: the delivery
        pacer makes way only for clients being served. An idle connection held open (a
        client's pool, a monitor's probe) waits on nobody; counted as a client, it held
        a whole drain of deliveries to the pacer's floor of 2 senders, halved for the
        deliveries' own lag."""
        if not self._active:
            return 0  # the burst's last client gone: every sender at once, no window
        if not self.clients_storing and time.monotonic() - self.last_read_at > SERVED_WINDOW:
            return 0
        return self._active

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.address[:2] for server in self._servers]

    def start(self) -> None:
        for kind in self._listen:
            host, port = kind.host, kind.port
            listener = self._take_inherited(host, port)  # systemd's socket activation
            shared = self._sockets.get((host, port))  # the workers' supervisor's
            inherited = listener is not None or shared is not None
            if listener is None:
                listener = shared if shared is not None else bind_listener(host, port)

            def handle(sock: socket.socket, address: Any, kind: _Listener = kind) -> None:
                self._handle(sock, address, kind)

            server = StreamServer(listener, handle, spawn=self._pool)
            if shared is not None:
                # Shared with the other workers: take a few connections per turn of the
                # loop, so the first worker to wake does not take a whole burst.
                server.max_accept = SHARED_MAX_ACCEPT
            server.start()
            self._servers.append(server)
            self._log.info(
                "listener_started",
                host=host,
                port=port,
                submission=kind.rules.submission,
                implicit_tls=kind.implicit_tls,
                inherited=inherited,
            )
        for unused in self._inherited:
            self._log.warning("inherited_socket_unused", address=str(unused.getsockname()))
            unused.close()
        self._inherited.clear()
        self._sweeper = self._spawn("sweeper", self._sweep_idle)
        memory = self.data_memory
        metrics.DATA_MEMORY.set_function(lambda: memory.used)

    def _take_inherited(self, host: str, port: int) -> socket.socket | None:
        """The socket systemd passed for this address, if any (matched by the address
        it is bound to: ListenStream= must name the address `listen` names)."""
        return take_bound(self._inherited, host, port)

    def health(self) -> str | None:
        """None while every listener accepts; else which one stopped (a supervisor's
        health check: a listener has no greenlet of its own whose death would show)."""
        if self._stopping.is_set():
            return None
        for server in self._servers:
            if server.closed or not server.started:
                return f"listener {server.address} stopped accepting"
        return None

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
        """Stop accepting; idle sessions get 421 now, transactions get `grace` seconds,
        then 421 4.3.2 too. Returns within grace + 2 × CUT_SECONDS."""
        self._stopping.set()
        for server in self._servers:
            server.close()
        for greenlet, connection in list(self._connections.items()):
            if connection.idle:
                greenlet.kill(_ShutdownRequested, block=False)
        self._pool.join(timeout=grace)
        self._cut_open_sessions()
        self._pool.join(timeout=CUT_SECONDS)
        self._pool.kill(block=True, timeout=CUT_SECONDS)
        if self._sweeper is not None:
            self._sweeper.kill()

    def _cut_open_sessions(self) -> None:
        """The grace is over: 421 4.3.2 to every session still open, except one waiting
        for its commit (it is answered as soon as the spool is; a cut there would leave
        the client guessing whether its message was accepted)."""
        for greenlet, connection in list(self._connections.items()):
            if not connection.storing:
                greenlet.kill(_ShutdownRequested, block=False)

    # -- one connection ---------------------------------------------------------------

    def _handle(self, sock: socket.socket, address: Any, kind: _Listener) -> None:
        peer_ip = str(address[0])
        conn_id = next(self._ids)
        log = self._log.bind(conn_id=conn_id, peer=peer_ip)
        metrics.CONNECTIONS.inc()
        self._active += 1
        metrics.CONNECTIONS_ACTIVE.inc()
        admitted: Admitted | None = None
        summary: dict[str, object] = {}
        try:
            client_ip = peer_ip
            if self._proxy_networks is not None:
                proxied = self._read_proxy_header(sock, peer_ip, log)
                if proxied is None:
                    metrics.CONNECTIONS_REFUSED.labels("proxy").inc()
                    metrics.reject("proxy_denied")
                    return  # closed without a greeting
                if proxied != peer_ip:
                    client_ip = proxied
                    log = log.bind(peer=client_ip, proxy=peer_ip)
            verdict = self._admit(client_ip)
            if isinstance(verdict, Reply):
                log.info("connection_refused", reply=verdict.text)
                if not kind.implicit_tls:  # a TLS client could not read it
                    _send_quietly(sock, verdict.to_bytes())
                return
            admitted = verdict
            log.info("connection_opened")
            connection = _Connection(self, sock, client_ip, log, kind)
            current = gevent.getcurrent()
            self._connections[current] = connection
            try:
                connection.run()
            finally:
                del self._connections[current]
                connection.close()
                summary = connection.summary()
        except Exception:
            metrics.INTERNAL_ERRORS.labels("connection").inc()
            log.exception("connection_crashed")
            _send_quietly(sock, b"421 4.3.0 Internal error, closing connection\r\n")
        finally:
            self._active -= 1
            if admitted is not None:
                self._limiter.release(admitted)
            metrics.CONNECTIONS_ACTIVE.dec()
            _close_quietly(sock)
            log.info("connection_closed", **summary)

    def _admit(self, client_ip: str) -> Admitted | Reply:
        if self._stopping.is_set():
            return replies.SHUTTING_DOWN
        if self._active > self._max_connections:
            metrics.CONNECTIONS_REFUSED.labels("total").inc()
            metrics.reject("connection_limit")
            return replies.TOO_MANY_CONNECTIONS
        verdict = self._limiter.admit(client_from_ip(client_ip).ip)
        if isinstance(verdict, Refused):
            metrics.CONNECTIONS_REFUSED.labels(verdict.reason).inc()
            metrics.reject("rate_limit" if verdict.reason == "rate" else "connection_limit")
            network = verdict.network
            name = (
                str(network.network_address)
                if network.prefixlen == network.max_prefixlen
                else str(network)
            )
            if verdict.reason == "rate":
                return replies.too_many_new_connections_from(name)
            return replies.too_many_connections_from(name)
        return verdict

    def _read_proxy_header(self, sock: socket.socket, peer_ip: str, log: Any) -> str | None:
        """The client address the PROXY header names (the peer's own for LOCAL and
        UNKNOWN), or None when the connection must be closed: the peer is not one of
        proxy_networks, or no valid header arrived within the deadline. The socket is
        peeked and then exactly the header is read, so the bytes after it stay for the
        early-talker check (the header itself is not early talk) and for TLS."""
        assert self._proxy_networks is not None
        peer = client_from_ip(peer_ip).ip
        if not any(peer in network for network in self._proxy_networks):
            log.info("proxy_peer_refused")
            return None
        parser = ProxyHeaderParser()
        deadline = time.monotonic() + self._proxy_deadline
        taken = 0  # header bytes already read off the socket
        previous_timeout = sock.gettimeout()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(V2_MAX_LENGTH, socket.MSG_PEEK)
                if not chunk:
                    log.info("proxy_header_missing", error="connection closed")
                    return None
                result = parser.feed(chunk)
                if isinstance(result, ProxyError):
                    log.info("proxy_header_refused", error=result.reason)
                    return None
                wanted = len(chunk) if isinstance(result, NeedMore) else result.length - taken
                _recv_exactly(sock, wanted)
                taken += wanted
                if isinstance(result, NeedMore):
                    continue
                if result.source is None:
                    return peer_ip
                return str(result.source.ip)
        except TimeoutError:
            log.info("proxy_header_missing", error=f"none within {self._proxy_deadline:g}s")
            return None
        except OSError as error:
            log.info("connection_lost", error=printable(str(error)))
            return None
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous_timeout)


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
        self.limit = _IDLE  # the deadline's kind, for the reply when it passes
        self.idle = False  # waiting for a command outside a transaction
        self.storing = False  # waiting for the spool to commit a message
        # A new client counts as served (`clients_served`) while it greets, and sends
        # its PROXY header or its TLS handshake: reads `_receive` does not see.
        self._last_read_at = server.last_read_at = time.monotonic()
        self._line_started: float | None = None  # first byte of an unfinished command line
        self._read_ended_line = False  # the last read held a line end (LF)
        self._data_started: float | None = None  # the 354 of the DATA being received
        self._data_bytes = 0
        self._memory = server.data_memory.account()  # what this connection's body holds
        self._body: SpooledBody | None = None  # parts of a large message written so far
        self._tarpitted = False
        # For the summary line at disconnect (Postfix's "disconnect from ...").
        self.started = time.monotonic()
        self.messages = 0
        self.rejects = 0
        self.tls_version: str | None = None
        self._session = SmtpSession(
            server._limits,
            hostname=server._hostname,
            tls_available=server._tls is not None and not kind.implicit_tls,
            tls_active=kind.implicit_tls,
            rules=kind.rules,
        )

    def run(self) -> None:
        session = self._session
        # With implicit TLS the client speaks first (its ClientHello): not an early talker.
        if not self._implicit_tls and self._talked_early():
            self._log.info("early_talker_dropped")
            self._reject("early_talker")
            _send_quietly(self._sock, EARLY_TALKER.to_bytes())
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
        except _IdleTimeout:
            limit = self.limit
            self._log.info("connection_timed_out", limit=limit.name)
            metrics.SLOW_CLIENTS.labels(limit.name).inc()
            self._reject("timeout")
            session.close_with(limit.reply)
            self._flush_quietly()
        except _ShutdownRequested:
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
        _close_quietly(self._sock)
        self._discard_body()
        self._memory.set(0)

    def _talked_early(self) -> bool:
        """RFC 5321 §4.3.1: the client waits for the greeting; bytes before it mean a
        spam engine that does not listen (Postfix postscreen PREGREET). With greet_wait
        the greeting is held that long while watching for such bytes; without it, only
        bytes already here count: a non-blocking peek on the OS socket (select() cannot
        take descriptors past 1023)."""
        wait = self._server._greet_wait
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
        server = self._server
        if server._stopping.is_set() and not session.in_transaction:
            raise _ShutdownRequested
        self.idle = not session.in_transaction
        receiving = session.receiving_data
        size = RECV_SIZE
        if receiving:
            # The most this read may bring is charged before it (gsmtp.intake).
            size = server.data_memory.read_size(RECV_SIZE)
            self._memory.set(session.data_buffered + size)
        self._arm_deadline(time.monotonic())
        try:
            data = self._sock.recv(size)
        finally:
            self.idle = False
            self.deadline = _NEVER
        self._last_read_at = server.last_read_at = time.monotonic()
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
        elif held >= SPOOL_THRESHOLD or (self._server.data_memory.exceeded and held >= MIN_READ):
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
                self._server._spool, self._server._acceptor.new_id(time.time())
            )
        if body.failed:
            return
        started = time.monotonic()
        try:
            body.write(content)
        except (_IdleTimeout, _ShutdownRequested):
            raise
        except Exception as error:
            body.failed = True
            self._log.error(
                "body_part_not_stored", msg_id=body.message_id, error=printable(str(error))
            )
        else:
            metrics.BODY_PARTS.inc()
            if self._server._reserve is not None:
                self._server._reserve.spend(len(content))
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
        except (_IdleTimeout, _ShutdownRequested):
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
        server = self._server
        deadline, limit = now + server._idle_timeout, _IDLE
        if session.awaiting_line_end:
            if self._line_started is None or self._read_ended_line:
                self._line_started = self._last_read_at
            self._read_ended_line = False
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
            self._note_reply(reply)
        for limit in self._session.limits_hit():
            self._reject(limit)
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
                send_all(self._sock, data)
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
            reserve = self._server._reserve
            if reserve is not None and not reserve.has_room(event.size):
                self._log.info("sender_rejected", reply=replies.INSUFFICIENT_STORAGE.text)
                self._note_reply(replies.INSUFFICIENT_STORAGE)
                session.respond(event, replies.INSUFFICIENT_STORAGE)
                return
            reply = self._server._policy.check_sender(event.sender, self._current_client())
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
            reply = self._server._policy.check_recipient(event.address, self._current_client())
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
        gevent.sleep(self._server._auth_failure_delay)  # Postfix smtpd_error_sleep_time
        return replies.AUTH_FAILED

    def _start_tls(self, event: StartTlsRequested) -> None:
        self._session.respond(event, replies.READY_FOR_TLS)
        self._flush()
        self._wrap_tls()
        self._user = None

    def _wrap_tls(self) -> None:
        """The TLS handshake, within the idle timeout."""
        context = self._server.tls_context
        assert context is not None
        self.deadline = time.monotonic() + self._server._idle_timeout
        self.limit = _IDLE
        try:
            self._sock = context.wrap_socket(self._sock, server_side=True)
        finally:
            self.deadline = _NEVER
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
        signer = self._server._dkim() if self._server._dkim is not None else None
        if signer is None or not signer.active:
            return b""
        if not (client.authenticated or self._server._policy.is_trusted(client)):
            return b""
        parts = None
        if body is not None:
            parts = functools.partial(self._server._spool.read_parts, body.message_id, body.count)
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
        message_id = body.message_id if body is not None else self._server._acceptor.new_id(now)
        message = self._server._acceptor.accept(
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
        self._server.clients_storing += 1
        self._memory.set(len(envelope.content) + len(message.body))
        try:
            self._server._spool.enqueue(message)
        except (_IdleTimeout, _ShutdownRequested):
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
            self._server.clients_storing -= 1
            self._memory.set(0)
        self._body = None  # its parts are the stored message's now
        metrics.ACCEPT_SECONDS.observe(time.monotonic() - started)
        size = message.size
        metrics.MESSAGE_SIZE.observe(size)
        if self._server._reserve is not None:
            self._server._reserve.spend(size - (body.size if body is not None else 0))
        metrics.MESSAGES_QUEUED.inc()
        self._log.info(
            "message_queued",
            msg_id=message_id,
            sender=printable(message.sender),
            rcpt_count=len(message.recipients),
            size=size,
        )
        self._server._on_queued()
        return replies.queued(message_id)


def _recv_exactly(sock: Any, size: int) -> None:
    """Read and drop `size` bytes already seen with MSG_PEEK (they are in the kernel
    buffer, so this does not wait)."""
    while size > 0:
        data = sock.recv(size)
        if not data:
            raise ConnectionResetError("connection closed inside the PROXY header")
        size -= len(data)


def _send_quietly(sock: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _close_quietly(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
