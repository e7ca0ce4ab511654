"""Prometheus collectors and the /metrics endpoint.

Metric names are part of the outside (DESIGN.md); labels come from small fixed sets,
never an address or a domain.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app

CONNECTIONS = Counter("gsmtp_connections_total", "SMTP connections accepted")
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
AUTH_ATTEMPTS = Counter("gsmtp_auth", "AUTH attempts by outcome", ["outcome"])
INTERNAL_ERRORS = Counter("gsmtp_internal_errors", "Unexpected exceptions caught", ["where"])


def make_app(refresh: Callable[[], None]) -> Callable[..., object]:
    """The WSGI /metrics app; `refresh` updates the spool gauges on each scrape."""
    inner = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> object:
        refresh()
        return inner(environ, start_response)

    return app
