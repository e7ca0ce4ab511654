"""The composition root: configuration in, running objects out; signals; graceful stop.

The only reader of `Config`: every component gets its own values as arguments. Start-up
refuses to serve a spool that fails its integrity check (never an empty spool over a
corrupt one), releases leases a previous process left, and starts listeners last, once
everything they depend on is up.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import apsw
import gevent
from gevent.event import Event
from gevent.threadpool import ThreadPool

from gsmtp import accounts, db, log, metrics, routing, writer
from gsmtp.acceptance import Acceptor
from gsmtp.accounts import AccountsSnapshot
from gsmtp.auth import Authenticator
from gsmtp.config import Config, ConfigError, load, parse_host_port
from gsmtp.delivery.base import Deliverer
from gsmtp.delivery.maildir import MaildirDeliverer
from gsmtp.delivery.mx import DnsResolver
from gsmtp.delivery.smtp import SmtpDeliverer, Timeouts
from gsmtp.policy import Client, IPAddress, Policy
from gsmtp.protocol.session import Limits
from gsmtp.routing import Router
from gsmtp.scheduler import RetryPolicy, Scheduler
from gsmtp.server import SmtpServer
from gsmtp.spool import Spool

# One thread writes all Maildir files. More threads, each giving up and retaking the GIL
# around every file syscall, starve the event loop (a GIL convoy): measured with
# `bench.load -c 100 -m 100`, 8 threads accepted half as much mail as 1.
MAILDIR_THREADS = 1
CHECKPOINT_SECONDS = 0.5
# How often stale files in Maildir tmp/ are looked for (a bounded batch of mailboxes each).
MAILDIR_TMP_CLEAN_SECONDS = 600.0


class StartupError(Exception):
    """The server cannot start; the message says why, for the operator."""


class AccountsCache:
    """The accounts snapshot policy reads. `gsmtp user/domain` bump a serial in `meta`;
    it is re-read at most every REFRESH_SECONDS, and always before an answer that
    would refuse, so a new user or domain is seen at once and a removed one within
    REFRESH_SECONDS — no restart needed, and no query per recipient under load."""

    REFRESH_SECONDS = 0.05

    def __init__(self, connection: apsw.Connection) -> None:
        self._connection = connection
        self._snapshot = accounts.load_snapshot(connection)
        self._checked_at = time.monotonic()

    def get(self, *, fresh: bool = False) -> AccountsSnapshot:
        now = time.monotonic()
        if fresh or now - self._checked_at >= self.REFRESH_SECONDS:
            self._checked_at = now
            if accounts.read_serial(self._connection) != self._snapshot.serial:
                self._snapshot = accounts.load_snapshot(self._connection)
        return self._snapshot


def _call_captured(work: Any) -> tuple[bool, Any]:
    try:
        return True, work()
    except Exception as error:
        return False, error


class Application:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._log = log.get_logger(component="app")
        self._reader = self._open_spool()
        self._writer = writer.GroupCommitter(config.spool.path)
        self._bodies = writer.ThreadReader(config.spool.path)
        self.spool = Spool(self._writer, self._reader, self._bodies)
        self._accounts = AccountsCache(self._reader)
        self.policy = Policy(
            hostname=config.server.hostname,
            trusted_networks=config.server.trusted_networks,
            snapshot=self._accounts.get,
            vrfy=config.server.vrfy,
        )
        self._router = Router(self.policy)
        self._acceptor = Acceptor(config.server.hostname)
        self._file_pool = ThreadPool(MAILDIR_THREADS)
        self.scheduler = Scheduler(
            spool=self.spool,
            deliverers=self._deliverers(),
            route=self._router.route,
            retry=RetryPolicy(config.delivery.retry, config.delivery.max_age),
            acceptor=self._acceptor,
            concurrency=config.delivery.concurrency,
            max_per_domain=config.delivery.max_per_domain,
        )
        self._authenticator = Authenticator(
            snapshot=self._accounts.get,
            store_hash=self._store_password_hash,
            failure_limit=config.server.auth_failure_limit,
            is_exempt=self._is_trusted,
        )
        submission = config.submission
        self.server = SmtpServer(
            listen=tuple((a.host, a.port) for a in config.server.listen),
            submission_listen=tuple((a.host, a.port) for a in submission.listen),
            submission_tls_listen=tuple((a.host, a.port) for a in submission.tls_listen),
            plaintext_auth=submission.allow_plaintext_auth,
            authenticator=self._authenticator,
            hostname=config.server.hostname,
            limits=Limits(
                max_message_size=config.server.max_message_size,
                max_recipients=config.server.max_recipients,
            ),
            idle_timeout=config.server.timeout,
            max_connections=config.server.max_connections,
            max_connections_per_ip=config.server.max_connections_per_ip,
            policy=self.policy,
            spool=self.spool,
            acceptor=self._acceptor,
            on_queued=self.scheduler.wake,
            tls_context=self._tls_context(),
        )
        self._metrics_server: Any = None
        self._log_flusher: Any = None

    def _store_password_hash(self, user: str, old: str, new: str) -> bool:
        """A rehashed password (AUTH), written by the spool's writer thread."""
        return self._writer.submit(
            lambda connection: accounts.replace_password_hash(connection, user, old, new)
        )

    def _is_trusted(self, ip: IPAddress) -> bool:
        return self.policy.is_trusted(Client(ip))

    def _open_spool(self) -> apsw.Connection:
        try:
            connection = db.connect(self.config.spool.path)
        except db.DatabaseError as error:
            raise StartupError(f"cannot open the spool: {error}") from None
        verdict = db.check_integrity(connection)
        if verdict != "ok":
            raise StartupError(f"{self.config.spool.path}: integrity check failed: {verdict}")
        return connection

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if not tls.enabled:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as error:
            raise StartupError(f"[tls] cannot load cert/key: {error}") from None
        return context

    def _deliverers(self) -> dict[str, Deliverer]:
        def in_thread(work: Any) -> Any:
            # Raised here, in the delivery's greenlet, rather than printed by the pool.
            ok, value = self._file_pool.apply(_call_captured, (work,))
            if not ok:
                raise value
            return value

        self._local = local = MaildirDeliverer(
            self.config.maildir.root,
            resolve_mailbox=self._router.mailbox,
            run_blocking=in_thread,
        )
        return {routing.LOCAL: local, routing.SMTP: self._remote_deliverer()}

    def _remote_deliverer(self) -> Deliverer:
        delivery = self.config.delivery
        smarthost = None
        if delivery.smarthost:
            address = parse_host_port(delivery.smarthost)
            smarthost = (address.host, address.port)
        return SmtpDeliverer(
            resolver=DnsResolver([(n.host, n.port) for n in delivery.nameservers]),
            helo_name=self.config.server.hostname,
            port=delivery.port,
            smarthost=smarthost,
            timeouts=Timeouts(
                delivery.connect_timeout,
                delivery.command_timeout,
                delivery.data_timeout,
                delivery.attempt_timeout,
            ),
            listeners=[(a.host, a.port) for a in self.config.server.listen],
        )

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        self._log_flusher = gevent.spawn(self._housekeeping)
        released = self.spool.release_leases()
        if released:
            self._log.info("leases_released", count=released)
        self.scheduler.start()
        self._start_metrics()
        try:
            self.server.start()
        except OSError as error:
            raise StartupError(f"cannot listen: {error.strerror} ({error})") from None
        self._log.info("server_started", hostname=self.config.server.hostname)

    def _housekeeping(self) -> None:
        """Every FLUSH_SECONDS write out log lines; every CHECKPOINT_SECONDS move the
        WAL into the database on the reader thread; every MAILDIR_TMP_CLEAN_SECONDS
        remove stale Maildir tmp/ files on the Maildir thread."""
        next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
        next_tmp_clean = time.monotonic() + MAILDIR_TMP_CLEAN_SECONDS
        while True:
            gevent.sleep(log.FLUSH_SECONDS)
            log.flush()
            if time.monotonic() >= next_checkpoint:
                next_checkpoint = time.monotonic() + CHECKPOINT_SECONDS
                try:
                    self._bodies.checkpoint()
                except apsw.Error as error:
                    self._log.warning("checkpoint_failed", error=str(error))
            if time.monotonic() >= next_tmp_clean:
                next_tmp_clean = time.monotonic() + MAILDIR_TMP_CLEAN_SECONDS
                self._clean_maildir_tmp()

    def _clean_maildir_tmp(self) -> None:
        try:
            removed = self._local.clean_tmp(time.time())
        except OSError as error:
            self._log.warning("maildir_tmp_clean_failed", error=str(error))
            return
        if removed:
            self._log.info("maildir_tmp_cleaned", files=removed)

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        from gevent.pywsgi import WSGIServer

        address = parse_host_port(self.config.metrics.listen)
        app = metrics.make_app(self._refresh_gauges)
        self._metrics_server = WSGIServer((address.host, address.port), app, log=None)
        try:
            self._metrics_server.start()
        except OSError as error:
            raise StartupError(f"[metrics] cannot listen on {address}: {error.strerror}") from None

    def _refresh_gauges(self) -> None:
        counts = self.spool.counts_by_status()
        for status in ("queued", "delivered", "failed"):
            metrics.QUEUE_SIZE.labels(status).set(counts.get(status, 0))
        oldest = self.spool.oldest_queued_at()
        metrics.OLDEST_QUEUED.set(time.time() - oldest if oldest else 0)

    def stop(self) -> None:
        grace = self.config.server.shutdown_grace
        self._log.info("server_stopping", grace_seconds=grace)
        self.server.stop(grace)
        self.scheduler.stop(timeout=min(grace, 5.0))
        if self._metrics_server is not None:
            self._metrics_server.stop(timeout=1)
        self._authenticator.close()
        self._writer.stop()
        self._bodies.close()
        self._file_pool.kill()
        self._local.close()
        self._log.info("server_stopped")
        if self._log_flusher is not None:
            self._log_flusher.kill()
        log.flush()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and the accounts; never exit. Settings that
        need new sockets or objects are reported, not applied."""
        try:
            fresh = load(Path(self.config.path))
        except ConfigError as error:
            self._log.error("reload_failed", error=str(error))
            return
        changed = [
            name
            for name in (
                "server",
                "tls",
                "submission",
                "spool",
                "maildir",
                "delivery",
                "metrics",
                "log",
            )
            if getattr(fresh, name) != getattr(self.config, name)
        ]
        self._accounts.get()
        self._log.info("config_reloaded", restart_needed_for=changed or None)

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads."""
        stop_requested = Event()
        gevent.signal_handler(signal.SIGTERM, stop_requested.set)
        gevent.signal_handler(signal.SIGINT, stop_requested.set)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        self.start()
        stop_requested.wait()
        self.stop()


def serve(config: Config) -> int:
    os.umask(0o077)
    log.configure(config.log.level, config.log.format)
    try:
        application = Application(config)
        application.serve_forever()
    except StartupError as error:
        log.get_logger(component="app").error("startup_failed", error=str(error))
        log.flush()
        print(f"gsmtp: {error}", file=sys.stderr)
        return 1
    return 0
