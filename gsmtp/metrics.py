"""Prometheus collectors and the /metrics endpoint.

Metric names are part of the outside (DESIGN.md); labels come from small fixed sets,
never an address or a domain. The endpoint is a gevent WSGI server with a bounded pool
(while it is full no more connections are accepted) and a deadline for each connection,
so a scraper that stalls, or a stranger trickling a request, cannot pile up greenlets.
Two more bounds keep a few idle sockets from taking every slot: the request line and
headers must arrive within HEADER_TIMEOUT (a scraper sends them at once), and one client
address holds at most MAX_PER_PEER connections (more are closed as soon as accepted, so
they never wait in the backlog in front of another client's scrape).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

# A scrape takes milliseconds; a connection still open after this is cut.
REQUEST_TIMEOUT = 10.0
# The request line and headers of each request (keep-alive ones too) must arrive within
# this; the response then has the rest of REQUEST_TIMEOUT.
HEADER_TIMEOUT = 2.0
# Connections served at once (Prometheus uses one per scrape), and from one address.
MAX_CONNECTIONS = 16
MAX_PER_PEER = 4

CONNECTIONS = Counter("gsmtp_connections_total", "SMTP connections accepted")
CONNECTIONS_REFUSED = Counter(
    "gsmtp_connections_refused",
    "SMTP connections refused before the greeting, by reason: total, connections (per "
    "client network), rate (per client network), proxy (no valid PROXY header)",
    ["reason"],
)
CONNECTIONS_ACTIVE = Gauge("gsmtp_connections_active", "SMTP connections open now")
MESSAGES_RECEIVED = Counter(
    "gsmtp_messages_received", "Messages at the end of DATA, by outcome", ["outcome"]
)
DELIVERIES = Counter(
    "gsmtp_deliveries", "Delivery attempts per recipient", ["transport", "outcome"]
)
MESSAGES_QUEUED = MESSAGES_RECEIVED.labels("queued")  # the hot path's child, looked up once
QUEUE_SIZE = Gauge("gsmtp_queue_size", "Recipients in the spool by status", ["status"])
OLDEST_QUEUED = Gauge("gsmtp_oldest_queued_seconds", "Age of the oldest queued message")
ACCEPT_SECONDS = Histogram(
    "gsmtp_accept_seconds",
    "End of DATA to the reply: storing the message durably",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DELIVERY_SECONDS = Histogram(
    "gsmtp_delivery_seconds",
    "One delivery attempt (a message to one destination)",
    ["transport"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
OUTBOUND_SESSIONS = Counter(
    "gsmtp_outbound_sessions",
    "Outbound SMTP sessions a delivery ran on: opened (a new connection), reused (an idle "
    "cached session that answered RSET), stale (a cached session that failed; a new "
    "connection was made instead)",
    ["how"],
)
DELIVERY_CONCURRENCY_ALLOWED = Gauge(
    "gsmtp_delivery_concurrency_allowed",
    "Concurrent deliveries the pacer allows now (delivery.concurrency when the loop is idle)",
)
AUTH_ATTEMPTS = Counter("gsmtp_auth", "AUTH attempts by outcome", ["outcome"])
INTERNAL_ERRORS = Counter("gsmtp_internal_errors", "Unexpected exceptions caught", ["where"])
DELIVERIES_IN_FLIGHT = Gauge("gsmtp_deliveries_in_flight", "Deliveries running now")
DEAD_DESTINATIONS = Gauge(
    "gsmtp_dead_destinations", "Destinations none of whose hosts could be reached, for now"
)
NOTICES = Counter("gsmtp_notices", "Notices queued (bounce, delay, postmaster)", ["kind"])
RELOADS = Counter(
    "gsmtp_reloads", "SIGHUP reloads, by outcome (failed: config or TLS pair)", ["outcome"]
)
SLOW_CLIENTS = Counter(
    "gsmtp_slow_clients",
    "Connections closed with 421 4.4.2, by limit (idle, command_deadline, min_data_rate)",
    ["limit"],
)
TARPIT_DELAYS = Counter(
    "gsmtp_tarpit_delays", "Replies delayed by error_sleep past soft_error_limit"
)
DATA_MEMORY = Gauge(
    "gsmtp_data_memory_bytes",
    "Bytes of message bodies held in memory by connections receiving them (max_data_memory)",
)
BODY_PARTS = Counter(
    "gsmtp_body_parts_written", "Parts of large message bodies written to the spool as they arrived"
)

DKIM_SIGNATURES = Counter(
    "gsmtp_dkim_signatures",
    "Messages DKIM signing was tried for (from trusted networks or authenticated sessions, "
    "and our notices), by outcome: signed, no_key (no key for the From: or sender domain), "
    "error (not signed; accepted unsigned)",
    ["outcome"],
)
for _outcome in ("signed", "no_key", "error"):
    DKIM_SIGNATURES.labels(_outcome)


def make_app(refresh: Callable[[], None]) -> Callable[..., object]:
    """The WSGI /metrics app; `refresh` updates the spool gauges on each scrape."""
    inner = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> object:
        refresh()
        return inner(environ, start_response)

    return app


class _DeadlineHandler(WSGIHandler):  # type: ignore[misc]
    """One connection, keep-alive requests included, gets `server.request_timeout`;
    the head of each request (request line and headers) `server.header_timeout`."""

    _head_deadline = 0.0

    def handle(self) -> None:
        with gevent.Timeout(self.server.request_timeout, False):
            super().handle()

    def read_requestline(self) -> str:
        """The request line, or "" (the connection closes) if it is not here in time."""
        self._head_deadline = time.monotonic() + self.server.header_timeout
        with gevent.Timeout(self.server.header_timeout, False):
            return str(super().read_requestline())
        return ""

    def read_request(self, raw_requestline: str) -> bool:
        """The headers, by the same deadline as the request line; past it the request
        is answered 400 and the connection closed."""
        remaining = max(self._head_deadline - time.monotonic(), 0.001)
        with gevent.Timeout(remaining, False):
            return bool(super().read_request(raw_requestline))
        self.close_connection = True
        return False


class _MetricsServer(WSGIServer):  # type: ignore[misc]
    """A WSGIServer that serves at most `max_per_peer` connections of one address."""

    def __init__(self, *args: Any, max_per_peer: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_per_peer = max_per_peer
        self._peers: dict[str, int] = {}

    def handle(self, sock: Any, address: Any) -> None:
        peer = str(address[0])
        held = self._peers.get(peer, 0)
        if held >= self.max_per_peer:
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._peers[peer] = held + 1
        try:
            super().handle(sock, address)
        finally:
            left = self._peers[peer] - 1
            if left:
                self._peers[peer] = left
            else:
                del self._peers[peer]


def start_server(
    host: str,
    port: int,
    refresh: Callable[[], None],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    max_per_peer: int = MAX_PER_PEER,
) -> Any:
    """Serve /metrics on host:port; returns the started WSGIServer (stop() it).
    Raises OSError when the address cannot be bound."""
    server = _MetricsServer(
        (host, port),
        make_app(refresh),
        spawn=Pool(max_connections),
        handler_class=_DeadlineHandler,
        log=None,
        max_per_peer=max_per_peer,
    )
    server.request_timeout = request_timeout
    server.header_timeout = header_timeout
    server.start()
    return server
