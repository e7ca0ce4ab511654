"""Prometheus collectors and the /metrics endpoint.

Metric names are part of the outside (DESIGN.md); labels come from small fixed sets,
never an address or a domain. The endpoint is a gevent WSGI server with a bounded pool
(while it is full no more connections are accepted) and a deadline for each connection,
so a scraper that stalls, or a stranger trickling a request, cannot pile up greenlets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

# A scrape takes milliseconds; a connection still open after this is cut.
REQUEST_TIMEOUT = 10.0
# Connections served at once (Prometheus uses one per scrape).
MAX_CONNECTIONS = 16

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


def make_app(refresh: Callable[[], None]) -> Callable[..., object]:
    """The WSGI /metrics app; `refresh` updates the spool gauges on each scrape."""
    inner = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> object:
        refresh()
        return inner(environ, start_response)

    return app


class _DeadlineHandler(WSGIHandler):  # type: ignore[misc]
    """One connection, keep-alive requests included, gets `server.request_timeout`."""

    def handle(self) -> None:
        with gevent.Timeout(self.server.request_timeout, False):
            super().handle()


def start_server(
    host: str,
    port: int,
    refresh: Callable[[], None],
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
) -> Any:
    """Serve /metrics on host:port; returns the started WSGIServer (stop() it).
    Raises OSError when the address cannot be bound."""
    server = WSGIServer(
        (host, port),
        make_app(refresh),
        spawn=Pool(max_connections),
        handler_class=_DeadlineHandler,
        log=None,
    )
    server.request_timeout = request_timeout
    server.start()
    return server
