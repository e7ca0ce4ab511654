"""Prometheus collectors and the /metrics endpoint.

Metric names are part of the outside (DESIGN.md); labels come from small fixed sets,
never an address or a domain. The endpoint is a gevent WSGI server with a bounded pool
(while it is full no more connections are accepted) and a deadline for each connection,
so a scraper that stalls, or a stranger trickling a request, cannot pile up greenlets.
Two more bounds keep a few idle sockets from taking every slot: the request line and
headers must arrive within HEADER_TIMEOUT (a scraper sends them at once), and one client
address holds at most MAX_PER_PEER connections (more are closed as soon as accepted, so
they never wait in the backlog in front of another client's scrape).

Every labelled series is created at import with the value 0 (`_preset`), so a rate() or
an alert sees a series from the first scrape rather than from its first event, and the
`*_created` series prometheus_client adds by default are turned off (noise: one per
series). Every Gauge names its `multiprocess_mode`, the way its value combines over
worker processes in prometheus_client's multiprocess mode: counts of this process's
own things sum ('livesum'), ages and process-wide facts (build, certificate) take the
largest ('max'), so a scrape reads one value either way. A scrape itself does no
spool query: the queue gauges are set by a background task (`app`), off the event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client import values as prometheus_values

from gsmtp import __version__
from gsmtp.auth import AuthOutcome

disable_created_metrics()  # type: ignore[no-untyped-call]


class _ProcessId:
    """os.getpid(), remembered. In multiprocess mode prometheus_client asks for the
    process's PID on every update of a value (to notice a fork): a worker updates a
    dozen values per message delivered, each a system call. Taken again in a forked
    child, so a fork is still noticed."""

    def __init__(self) -> None:
        self.value = os.getpid()
        os.register_at_fork(after_in_child=self._refresh)

    def _refresh(self) -> None:
        self.value = os.getpid()

    def __call__(self) -> int:
        return self.value


if getattr(prometheus_values.ValueClass, "_multiprocess", False):
    # Before the first metric below is made: each takes its value class from here.
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_ProcessId()
    )

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
CONNECTIONS_ACTIVE = Gauge(
    "gsmtp_connections_active", "SMTP connections open now", multiprocess_mode="livesum"
)
MESSAGES_RECEIVED = Counter(
    "gsmtp_messages_received", "Messages at the end of DATA, by outcome", ["outcome"]
)
DELIVERIES = Counter(
    "gsmtp_deliveries", "Delivery attempts per recipient", ["transport", "outcome"]
)
MESSAGES_QUEUED = MESSAGES_RECEIVED.labels("queued")  # the hot path's child, looked up once
QUEUE_SIZE = Gauge(
    "gsmtp_queue_size",
    "Recipients in the spool by status",
    ["status"],
    multiprocess_mode="livesum",
)
OLDEST_QUEUED = Gauge(
    "gsmtp_oldest_queued_seconds",
    "Age of the oldest queued message",
    multiprocess_mode="livemax",
)
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
OUTBOUND_TLS = Counter(
    "gsmtp_outbound_tls",
    "Messages delivered over SMTP, by how the session was protected: none (plaintext), "
    "tls (encrypted, certificate not verified), verified (certificate valid for the host)",
    ["level"],
)
TLS_POLICY_FAILURES = Counter(
    "gsmtp_tls_policy_failures",
    "Outbound sessions that did not get the TLS their destination demands (or, under may, "
    "fell back to plaintext), by reason",
    ["reason"],
)
DELIVERY_CONCURRENCY_ALLOWED = Gauge(
    "gsmtp_delivery_concurrency_allowed",
    "Concurrent deliveries the pacer allows now (delivery.concurrency when the loop is idle)",
    multiprocess_mode="livesum",
)
AUTH_ATTEMPTS = Counter("gsmtp_auth", "AUTH attempts by outcome", ["outcome"])
INTERNAL_ERRORS = Counter("gsmtp_internal_errors", "Unexpected exceptions caught", ["where"])
DELIVERIES_IN_FLIGHT = Gauge(
    "gsmtp_deliveries_in_flight", "Deliveries running now", multiprocess_mode="livesum"
)
DEAD_DESTINATIONS = Gauge(
    "gsmtp_dead_destinations",
    "Destinations none of whose hosts could be reached, for now",
    # Each worker learns of a dead destination alone; most learn of the same ones.
    multiprocess_mode="livemax",
)
NOTICES = Counter("gsmtp_notices", "Notices queued (bounce, delay, postmaster)", ["kind"])
RELOADS = Counter(
    "gsmtp_reloads", "SIGHUP reloads, by outcome (failed: config or TLS pair)", ["outcome"]
)
RELOAD_SUCCESSFUL = Gauge(
    "gsmtp_config_last_reload_successful",
    "1 if the last configuration load (start or SIGHUP) was applied, 0 if it failed",
    multiprocess_mode="livemin",  # one worker that failed makes the node's 0
)
RELOAD_SUCCESS_TIME = Gauge(
    "gsmtp_config_last_reload_success_timestamp_seconds",
    "When the configuration in effect was loaded (start or the last applied SIGHUP)",
    multiprocess_mode="livemin",  # the worker whose settings are oldest
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
    multiprocess_mode="livesum",
)
MAILDIR_BATCHES = Counter(
    "gsmtp_maildir_batches", "Batches of Maildir files written (one fsync per new/ each)"
)
MAILDIR_FILES = Counter("gsmtp_maildir_files", "Maildir files attempted in batches")
MAILDIR_DIRECTORY_FSYNCS = Counter(
    "gsmtp_maildir_directory_fsyncs", "fsyncs of Maildir new/ directories (one per batch each)"
)
BODY_PARTS = Counter(
    "gsmtp_body_parts_written", "Parts of large message bodies written to the spool as they arrived"
)

# Why the server refused a connection, a command or a recipient (gsmtp_rejects_total).
REJECT_REASONS = (
    "relay_denied",
    "unknown_user",
    "size",
    "bare_lf",
    "loop",
    "too_many_recipients",
    "connection_limit",
    "rate_limit",
    "timeout",
    "too_many_errors",
    "junk_commands",
    "early_talker",
    "proxy_denied",
    "storage",
    "auth_required",
    "auth_failed",
    "sender_not_owned",
)
REJECTS = Counter(
    "gsmtp_rejects",
    "Connections, commands and recipients the server refused, by reason",
    ["reason"],
)
# Protocol versions as ssl names them; anything else is "other" (bounded labels).
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3", "other")
TLS_SESSIONS = Counter(
    "gsmtp_tls_sessions", "Inbound TLS handshakes completed, by protocol version", ["version"]
)
# active: waiting for its first attempt or in delivery now; deferred: waiting for a
# retry after a failed attempt; held: kept from delivery by the administrator.
QUEUE_STATES = ("active", "deferred", "held")
QUEUE_MESSAGES = Gauge(
    "gsmtp_queue_messages",
    "Messages with recipients still to deliver, by state",
    ["state"],
    multiprocess_mode="livesum",
)
QUEUE_BYTES = Gauge(
    "gsmtp_queue_bytes",
    "Size of the messages with recipients still to deliver, by state",
    ["state"],
    multiprocess_mode="livesum",
)
TIME_IN_QUEUE = Histogram(
    "gsmtp_time_in_queue_seconds",
    "From a message's arrival to the delivery of one recipient",
    buckets=(1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400),
)
MESSAGE_SIZE = Histogram(
    "gsmtp_message_size_bytes",
    "Size of each message accepted (stored with its trace header)",
    buckets=tuple(float(2**n) for n in range(10, 28, 2)),  # 1 KiB .. 64 MiB
)
# rejected: a permanent error from the destination (or the Maildir); expired: still
# deferred at delivery.max_age; admin: `gsmtp queue bounce`.
BOUNCE_REASONS = ("rejected", "expired", "admin")
BOUNCES = Counter(
    "gsmtp_bounces", "Recipients that failed for good (each gets a bounce), by reason", ["reason"]
)
BUILD_INFO = Gauge(
    "gsmtp_build_info",
    "Always 1; the running gsmtp's version is the label",
    ["version"],
    multiprocess_mode="livemax",
)
WORKERS = Gauge(
    "gsmtp_workers",
    "Worker processes the node runs (server.workers; 1 without workers)",
    multiprocess_mode="livemax",
)
WORKERS_UP = Gauge(
    "gsmtp_workers_up",
    "Worker processes serving now; below gsmtp_workers, a worker is down (its shard's"
    " mail waits, and the queue gauges leave that shard out)",
    multiprocess_mode="livesum",  # each worker's 1; a dead one's file is removed
)
WORKER_RESTARTS = Counter(
    "gsmtp_worker_restarts",
    "Workers started again after one died or hung (counted by the new one once started):"
    " a worker that keeps hanging is up most of the time, and shows here",
)
TLS_CERT_NOT_AFTER = Gauge(
    "gsmtp_tls_cert_not_after_timestamp_seconds",
    "When the inbound TLS certificate served now expires (Unix time; 0 without TLS)",
    multiprocess_mode="livemin",  # the soonest expiry any worker serves
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


def _preset() -> None:
    """Create every labelled series with 0: the label values are fixed sets."""
    labelled: list[tuple[Any, tuple[str, ...]]] = [
        (REJECTS, REJECT_REASONS),
        (TLS_SESSIONS, TLS_VERSIONS),
        (QUEUE_MESSAGES, QUEUE_STATES),
        (QUEUE_BYTES, QUEUE_STATES),
        (BOUNCES, BOUNCE_REASONS),
        (CONNECTIONS_REFUSED, ("total", "connections", "rate", "proxy")),
        (MESSAGES_RECEIVED, ("queued", "spool_error")),
        (QUEUE_SIZE, ("queued", "delivered", "failed")),
        (OUTBOUND_SESSIONS, ("opened", "reused", "stale")),
        (AUTH_ATTEMPTS, tuple(outcome.value for outcome in AuthOutcome)),
        (
            INTERNAL_ERRORS,
            ("connection", "delivery", "housekeeping", "notices", "queue", "spool"),
        ),
        (NOTICES, ("bounce", "delay", "success", "postmaster")),
        (RELOADS, ("ok", "failed")),
        (SLOW_CLIENTS, ("idle", "command_deadline", "min_data_rate")),
        (DELIVERY_SECONDS, TRANSPORTS),
    ]
    for metric, values in labelled:
        for value in values:
            metric.labels(value)
    for transport in TRANSPORTS:
        for outcome in ("delivered", "deferred", "failed"):
            DELIVERIES.labels(transport, outcome)
    BUILD_INFO.labels(__version__).set(1)


TRANSPORTS = ("local", "smtp")


def reject(reason: str) -> None:
    """Count one refusal; `reason` is one of REJECT_REASONS."""
    REJECTS.labels(reason).inc()


def tls_session(version: str | None) -> None:
    """Count one inbound TLS session by its protocol version."""
    TLS_SESSIONS.labels(version if version in TLS_VERSIONS else "other").inc()


def multiprocess_registry() -> CollectorRegistry:
    """A registry that reads every worker's samples from PROMETHEUS_MULTIPROC_DIR (set
    by the workers' supervisor before any worker imported prometheus_client): counters
    and histograms summed, each gauge by its multiprocess_mode above, chosen so that the
    node's value means what one process's value meant (counts summed, ages the max;
    "live" modes leave out workers that died, whose files the supervisor removes)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def default_registry() -> CollectorRegistry:
    """The process's own registry (one process: no files)."""
    return REGISTRY


def make_app(
    refresh: Callable[[], None], registry: CollectorRegistry = REGISTRY
) -> Callable[..., object]:
    """The WSGI /metrics app; `refresh` runs before each scrape, on the event loop: it
    must be cheap (no spool query; the queue gauges are counted in the background)."""
    inner = make_wsgi_app(registry)

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
    registry: CollectorRegistry = REGISTRY,
    listener: Any = None,
) -> Any:
    """Serve /metrics on host:port (or on `listener`, a socket already bound there);
    returns the started WSGIServer (stop() it). Raises OSError when the address cannot
    be bound."""
    server = _MetricsServer(
        listener if listener is not None else (host, port),
        make_app(refresh, registry),
        spawn=Pool(max_connections),
        handler_class=_DeadlineHandler,
        log=None,
        max_per_peer=max_per_peer,
    )
    server.request_timeout = request_timeout
    server.header_timeout = header_timeout
    server.start()
    return server


_preset()
