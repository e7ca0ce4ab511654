"""The SMTP listener: a gevent StreamServer with a Pool, one greenlet per connection.

This module owns the listeners and what happens before and after a session: admission
(total connections, connections and new connections per client network,
`limits.ConnectionLimiter`), the PROXY header, the one sweeper greenlet that ends
connections blocked on their peer past their deadline (cheaper than a timer per read;
which deadline applies is the connection's business), and the stop. Each admitted
socket is driven by a `connection.Connection`, the I/O shell around the session; what
every connection shares with the server is one `connection.ServerContext`, which a
reload updates. A graceful stop closes idle sessions with 421 at once, lets open
transactions run for the grace period, then cuts them with 421 4.3.2; a session waiting
for its message's commit is never cut (its outcome would be unknown), it gets its
answer first.

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
import itertools
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from gsmtp import metrics
from gsmtp.acceptance import Acceptor
from gsmtp.auth import Authenticator
from gsmtp.connection import (
    NEVER,
    Connection,
    Deadlines,
    IdleTimeout,
    Listener,
    ServerContext,
    ShutdownRequested,
    close_quietly,
    send_quietly,
)
from gsmtp.diskspace import SpaceReserve
from gsmtp.dkim import DkimSigner
from gsmtp.intake import DataMemory
from gsmtp.limits import Admitted, ConnectionLimiter, Refused
from gsmtp.log import get_logger, printable
from gsmtp.policy import IPNetwork, Policy, client_from_ip
from gsmtp.protocol import replies
from gsmtp.protocol.proxy import V2_MAX_LENGTH, NeedMore, ProxyError, ProxyHeaderParser
from gsmtp.protocol.replies import Reply
from gsmtp.protocol.session import Limits, ListenerRules
from gsmtp.sockets import bind_listener, take_bound
from gsmtp.spool import Spool
from gsmtp.tls import ServerTls

__all__ = ["CUT_SECONDS", "Deadlines", "ListenError", "SmtpServer"]

# Connections past max_connections still get a prompt 421 instead of waiting in the
# kernel backlog; this many extra greenlets may exist to say it.
_OVERFLOW_SLOTS = 256
# At the end of the grace, sessions cut with 421 get this long to have it written.
CUT_SECONDS = 0.5
# The PROXY header must arrive within this (or server.timeout if shorter). A balancer
# sends it at once; anything slower is not a balancer.
PROXY_HEADER_DEADLINE = 5.0
# Connections one worker accepts per turn of its loop from a listener it shares.
SHARED_MAX_ACCEPT = 4
# Seconds since the last byte from any client after which none counts as being served
# (`SmtpServer.clients_served`): several of the pacer's probes, well under a human's
# pause between commands, and a busy client's gap between two reads is far shorter.
SERVED_WINDOW = 0.5
DEFAULT_DEADLINES = Deadlines()  # frozen: one default for every server


class ListenError(Exception):
    """A listener could not be bound; the message names its address and why."""


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
        deadlines: Deadlines = DEFAULT_DEADLINES,
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
        self._listen = [Listener(host, port, ListenerRules(auth=auth)) for host, port in listen]
        submission = ListenerRules(auth=auth, plaintext_auth=plaintext_auth, submission=True)
        self._listen += [Listener(host, port, submission) for host, port in submission_listen]
        self._listen += [
            Listener(host, port, submission, implicit_tls=True)
            for host, port in submission_tls_listen
        ]
        # Listening sockets systemd passed (socket activation), used instead of binding
        # the listener with the same address.
        self._inherited = list(inherited)
        self._max_connections = max_connections
        self._limiter = limiter
        self._proxy_networks = None if proxy_networks is None else tuple(proxy_networks)
        self._proxy_deadline = min(PROXY_HEADER_DEADLINE, idle_timeout)
        # Long-lived greenlets are started through `spawn(name, fn)`: the supervisor's,
        # which notices their death.
        self._spawn = spawn or (lambda name, function, *args: gevent.spawn(function, *args))
        self.context = ServerContext(
            hostname=hostname,
            limits=limits,
            idle_timeout=idle_timeout,
            deadlines=deadlines,
            greet_wait=greet_wait,
            error_sleep=error_sleep,
            policy=policy,
            spool=spool,
            acceptor=acceptor,
            on_queued=on_queued,
            data_memory=DataMemory(max_data_memory),
            reserve=reserve,
            tls=tls,
            dkim=dkim,
            authenticator=authenticator,
            auth_failure_delay=auth_failure_delay,
        )
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
        self._connections: dict[gevent.Greenlet, Connection] = {}
        self._sweeper: gevent.Greenlet | None = None
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
        context = self.context
        context.limits = limits
        context.idle_timeout = idle_timeout
        self._proxy_deadline = min(PROXY_HEADER_DEADLINE, idle_timeout)
        context.deadlines = deadlines
        context.greet_wait = greet_wait
        context.error_sleep = error_sleep
        if self._proxy_networks is not None and proxy_networks is not None:
            self._proxy_networks = tuple(proxy_networks)
        self.data_memory.limit = max_data_memory

    @property
    def data_memory(self) -> DataMemory:
        """Bodies in memory, all connections together (the context's)."""
        return self.context.data_memory

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
        context = self.context
        if not context.clients_storing and time.monotonic() - context.last_read_at > SERVED_WINDOW:
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
                try:
                    listener = shared if shared is not None else bind_listener(host, port)
                except OSError as error:
                    raise ListenError(f"cannot listen on {host}:{port}: {error.strerror}") from None

            def handle(sock: socket.socket, address: Any, kind: Listener = kind) -> None:
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
        if self.context.stopping.is_set():
            return None
        for server in self._servers:
            if server.closed or not server.started:
                return f"listener {server.address} stopped accepting"
        return None

    def _sweep_idle(self) -> None:
        """One timer for all connections: end those blocked on the peer past their
        deadline (idle between commands, inside DATA, or not reading our replies).
        Cheaper than arming a timeout around every read."""
        tick = min(1.0, self.context.idle_timeout / 4, self.context.deadlines.command / 4)
        while True:
            gevent.sleep(tick)
            now = time.monotonic()
            for greenlet, connection in list(self._connections.items()):
                if connection.deadline < now:
                    connection.deadline = NEVER
                    greenlet.kill(IdleTimeout, block=False)

    def stop(self, grace: float) -> None:
        """Stop accepting; idle sessions get 421 now, transactions get `grace` seconds,
        then 421 4.3.2 too. Returns within grace + 2 × CUT_SECONDS."""
        self.context.stopping.set()
        for server in self._servers:
            server.close()
        for greenlet, connection in list(self._connections.items()):
            if connection.idle:
                greenlet.kill(ShutdownRequested, block=False)
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
                greenlet.kill(ShutdownRequested, block=False)

    # -- one connection ---------------------------------------------------------------

    def _handle(self, sock: socket.socket, address: Any, kind: Listener) -> None:
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
                    send_quietly(sock, verdict.to_bytes())
                return
            admitted = verdict
            log.info("connection_opened")
            connection = Connection(self.context, sock, client_ip, log, kind)
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
            send_quietly(sock, b"421 4.3.0 Internal error, closing connection\r\n")
        finally:
            self._active -= 1
            if admitted is not None:
                self._limiter.release(admitted)
            metrics.CONNECTIONS_ACTIVE.dec()
            close_quietly(sock)
            log.info("connection_closed", **summary)

    def _admit(self, client_ip: str) -> Admitted | Reply:
        if self.context.stopping.is_set():
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


def _recv_exactly(sock: Any, size: int) -> None:
    """Read and drop `size` bytes already seen with MSG_PEEK (they are in the kernel
    buffer, so this does not wait)."""
    while size > 0:
        data = sock.recv(size)
        if not data:
            raise ConnectionResetError("connection closed inside the PROXY header")
        size -= len(data)
