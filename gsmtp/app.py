"""The composition root: configuration in, running objects out; signals; graceful stop.

The only reader of `Config`: every component gets its own values as arguments. Start-up
takes the spool's single-instance lock first (a second server exits 2), refuses to serve
a spool that fails its integrity check (never an empty spool over a corrupt one),
converts an old spool to incremental auto-vacuum, releases leases a previous process
left (safe: the lock says no other server holds them), and starts listeners last, once
everything they depend on is up.

Every long-lived greenlet and thread is watched by a `Supervisor`: when one dies, the
process ends at once with EXIT_COMPONENT_DIED, like a crash (what was answered 250 is on
disk; systemd starts a fresh process), rather than living on half-dead. SIGTERM stops
everything within one deadline: `shutdown_grace` for open sessions and deliveries, then
421 4.3.2, then the writer finishes what was submitted.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import gevent
from gevent.event import Event
from gevent.threadpool import ThreadPool

from gsmtp import accounts, db, lockfile, log, metrics, routing, writer
from gsmtp.acceptance import Acceptor
from gsmtp.accounts import AccountsSnapshot
from gsmtp.auth import Authenticator
from gsmtp.config import Config, ConfigError, load, parse_host_port, spool_reserve
from gsmtp.delivery.base import Deliverer
from gsmtp.delivery.maildir import MaildirDeliverer
from gsmtp.delivery.mx import DnsResolver
from gsmtp.delivery.smtp import SmtpDeliverer, Timeouts
from gsmtp.diskspace import SpaceReserve
from gsmtp.dkim import DkimKeyError, DkimSigner
from gsmtp.housekeeping import Housekeeping, Task
from gsmtp.limits import ConnectionLimiter
from gsmtp.policy import Client, IPAddress, Policy
from gsmtp.protocol.session import Limits
from gsmtp.queue import Notices, NoticeSettings, QueueManager, RetryPolicy
from gsmtp.routing import Router
from gsmtp.server import CUT_SECONDS, Deadlines, SmtpServer
from gsmtp.spool import Spool
from gsmtp.supervision import EXIT_COMPONENT_DIED, Progress, Supervisor
from gsmtp.tls import ServerTls, TlsError

# One thread writes all Maildir files. More threads, each giving up and retaking the GIL
# around every file syscall, starve the event loop (a GIL convoy): measured with
# `bench.load -c 100 -m 100`, 8 threads accepted half as much mail as 1.
MAILDIR_THREADS = 1
# DKIM signatures are computed on this many threads (OpenSSL releases the GIL).
DKIM_THREADS = 1
CHECKPOINT_SECONDS = 0.5
# How often stale files in Maildir tmp/ are looked for (a bounded batch of mailboxes each).
MAILDIR_TMP_CLEAN_SECONDS = 600.0
# Free pages go back to the file system once there are VACUUM_MIN_PAGES of them (some
# slack is kept for new mail), at most VACUUM_MAX_PAGES per round so that the writer,
# which does it between client commits, is never held up for long.
VACUUM_SECONDS = 1.0
VACUUM_MIN_PAGES = 2048
VACUUM_SLACK_PAGES = 1024
VACUUM_MAX_PAGES = 4096
EXIT_ALREADY_RUNNING = 2
WRITER_STOP_SECONDS = 0.5  # at SIGTERM, for the writer's last commits after the grace


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


def _in_pool(pool: ThreadPool, progress: Progress) -> Callable[[Any], Any]:
    """`run(work)`: `work()` on one of `pool`'s threads, tracked by `progress` (the
    supervisor's stall check); what it raises is raised in the calling greenlet, rather
    than printed by the pool."""

    def run(work: Any) -> Any:
        with progress.track():
            ok, value = pool.apply(_call_captured, (work,))
        if not ok:
            raise value
        return value

    return run


class Application:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._log = log.get_logger(component="app")
        self.supervisor = Supervisor()
        self._reader = self._open_spool()
        self._tls = self._server_tls()  # may refuse to start: before any thread
        self._dkim_pool = ThreadPool(DKIM_THREADS)  # its thread starts with the first task
        self._dkim_progress = Progress()
        self._dkim = self._dkim_signer(config)  # may refuse too; a reload replaces it whole
        self._writer = writer.GroupCommitter(config.spool.path)
        self._bodies = writer.ThreadReader(config.spool.path)
        self._reserve = SpaceReserve(config.spool.path, spool_reserve(config))
        self.spool = Spool(self._writer, self._reader, self._bodies)
        self._accounts = AccountsCache(self._reader)
        self.policy = Policy(
            hostname=config.server.hostname,
            trusted_networks=config.server.trusted_networks,
            snapshot=self._accounts.get,
            vrfy=config.server.vrfy,
        )
        self._router = Router(self.policy)
        self._acceptor = Acceptor(
            config.server.hostname,
            sign_notice=lambda content, notice_id: self._dkim.sign_notice(content, notice_id),
        )
        self._file_pool = ThreadPool(MAILDIR_THREADS)
        self._file_progress = Progress()
        delivery = config.delivery
        self.queue = QueueManager(
            spool=self.spool,
            deliverers=self._deliverers(),
            route=self._router.route,
            retry=RetryPolicy(delivery.retry, delivery.max_age),
            notices=Notices(
                spool=self.spool,
                writer=self._acceptor,
                settings=NoticeSettings(
                    postmaster=f"postmaster@{config.server.hostname}",
                    delay_warning=delivery.delay_warning,
                    max_age=delivery.max_age,
                ),
                clock=time.time,
            ),
            concurrency=delivery.concurrency,
            max_per_domain=delivery.max_per_domain,
            active_limit=delivery.active_limit,
            spawn=self.supervisor.spawn,
        )
        self._authenticator = Authenticator(
            snapshot=self._accounts.get,
            store_hash=self._store_password_hash,
            failure_limit=config.server.auth_failure_limit,
            is_exempt=self._is_trusted,
            ipv4_prefix=config.server.ipv4_prefix,
            ipv6_prefix=config.server.ipv6_prefix,
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
                soft_error_limit=config.server.soft_error_limit,
                junk_command_limit=config.server.junk_command_limit,
            ),
            idle_timeout=config.server.timeout,
            greet_wait=config.server.greet_wait,
            max_connections=config.server.max_connections,
            limiter=ConnectionLimiter(
                max_per_network=config.server.max_connections_per_ip,
                max_rate=config.server.max_connection_rate,
                v4_prefix=config.server.ipv4_prefix,
                v6_prefix=config.server.ipv6_prefix,
                exempt=config.server.trusted_networks,
            ),
            policy=self.policy,
            spool=self.spool,
            acceptor=self._acceptor,
            on_queued=self.queue.wake,
            tls=self._tls,
            proxy_networks=(config.server.proxy_networks if config.server.proxy_protocol else None),
            reserve=self._reserve,
            spawn=self.supervisor.spawn,
            deadlines=Deadlines(
                command=config.server.command_deadline,
                min_data_rate=config.server.min_data_rate,
                data_rate_grace=config.server.min_data_rate_grace,
            ),
            error_sleep=config.server.error_sleep,
            max_data_memory=config.server.max_data_memory,
            dkim=lambda: self._dkim,
        )
        self._metrics_server: Any = None
        self._housekeeper: gevent.Greenlet | None = None

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
        started = time.monotonic()
        try:
            converted = db.convert_to_incremental_vacuum(connection)
        except apsw.Error as error:
            # Most likely no room for the copy VACUUM writes: serve anyway (delivering
            # is how space comes back) and try again at the next start.
            self._log.warning("spool_vacuum_failed", error=str(error))
        else:
            if converted:
                elapsed = round((time.monotonic() - started) * 1000)
                self._log.info("spool_vacuumed", auto_vacuum="incremental", duration_ms=elapsed)
        return connection

    def _server_tls(self) -> ServerTls | None:
        tls = self.config.tls
        if not tls.enabled:
            return None
        try:
            return ServerTls(tls.cert, tls.key, tls.min_version)
        except TlsError as error:
            raise StartupError(f"[tls] {error}") from None

    def _dkim_signer(self, config: Config) -> DkimSigner:
        """The signer for `config`'s [dkim] keys, signing on the DKIM thread. Raises
        StartupError naming a key file that cannot be used."""
        try:
            return DkimSigner.from_config(
                config.dkim,
                hostname=config.server.hostname,
                run_blocking=_in_pool(self._dkim_pool, self._dkim_progress),
            )
        except DkimKeyError as error:
            raise StartupError(f"[dkim] keys: {error}") from None

    def _reload_dkim(self, fresh: Config) -> bool:
        """Load the [dkim] keys again (new, renewed or removed keys) and swap the signer
        whole; False if a key failed (the old signer stays)."""
        try:
            self._dkim = self._dkim_signer(fresh)
        except StartupError as error:
            self._log.error("reload_failed", error=str(error))
            return False
        return True

    def _deliverers(self) -> dict[str, Deliverer]:
        self._local = local = MaildirDeliverer(
            self.config.maildir.root,
            resolve_mailbox=self._router.mailbox,
            run_blocking=_in_pool(self._file_pool, self._file_progress),
        )
        self._remote = remote = self._remote_deliverer()
        return {routing.LOCAL: local, routing.SMTP: remote}

    def _remote_deliverer(self) -> SmtpDeliverer:
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
            connection_reuse=delivery.connection_reuse,
            connection_idle=delivery.connection_idle,
            # A destination never runs more deliveries at once than its window's cap,
            # nor the whole server more than its senders: more idle sessions are waste.
            cache_per_destination=delivery.max_per_domain,
            cache_limit=delivery.concurrency,
            spawn=self.supervisor.spawn,
        )

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        housekeeping = Housekeeping(
            [
                Task("log_flush", log.FLUSH_SECONDS, log.flush),
                Task("checkpoint", CHECKPOINT_SECONDS, self._checkpoint),
                Task("vacuum", VACUUM_SECONDS, self._give_back_space),
                Task("maildir_tmp", MAILDIR_TMP_CLEAN_SECONDS, self._clean_maildir_tmp),
            ],
            tick=log.FLUSH_SECONDS,
        )
        self._housekeeper = self.supervisor.spawn("housekeeping", housekeeping.run)
        released = self.spool.release_leases()
        if released:
            self._log.info("leases_released", count=released)
        orphans = self.spool.remove_orphan_parts()
        if orphans:
            self._log.info("orphan_body_parts_removed", count=orphans)
        self.queue.start()
        self._remote.start()
        self._start_metrics()
        try:
            self.server.start()
        except OSError as error:
            raise StartupError(f"cannot listen: {error.strerror} ({error})") from None
        self._supervise()
        self._log.info("server_started", hostname=self.config.server.hostname)

    def _supervise(self) -> None:
        """Register what has no greenlet spawned through the supervisor: threads, the
        stall checks, the listeners. (The queue runner and the pacer are spawned through
        the supervisor.)"""
        supervisor = self.supervisor
        supervisor.watch_thread("writer", self._writer.done)
        supervisor.watch_progress("writer", self._writer.progress)
        supervisor.watch_progress("reader", self._bodies.progress)
        supervisor.watch_progress("maildir", self._file_progress)
        supervisor.watch_progress("dkim", self._dkim_progress)
        supervisor.watch_health("listener", self.server.health)
        if self._metrics_server is not None:
            metrics_server = self._metrics_server
            supervisor.watch_health(
                "metrics", lambda: "metrics listener stopped" if metrics_server.closed else None
            )
        supervisor.start()

    def _checkpoint(self) -> None:
        """Move the WAL into the database on the reader thread."""
        try:
            self._bodies.checkpoint()
        except apsw.Error as error:
            self._log.warning("checkpoint_failed", error=str(error))

    def _give_back_space(self) -> None:
        """Incremental vacuum through the writer (it is a write), when enough pages are
        free; the count is read on the reader thread, off the event loop."""
        free = self._bodies.run(db.free_pages)
        if free < VACUUM_MIN_PAGES:
            return
        pages = min(free - VACUUM_SLACK_PAGES, VACUUM_MAX_PAGES)
        left = self._writer.submit(lambda connection: db.incremental_vacuum(connection, pages))
        self._log.info("spool_vacuumed", pages=pages, free_pages=left)

    def _clean_maildir_tmp(self) -> None:
        """Remove stale Maildir tmp/ files (maildir(5): older than 36 h) on the Maildir
        thread, a bounded batch of mailboxes per round."""
        removed = self._local.clean_tmp(time.time())
        if removed:
            self._log.info("maildir_tmp_cleaned", files=removed)

    def _start_metrics(self) -> None:
        if not self.config.metrics.listen:
            return
        address = parse_host_port(self.config.metrics.listen)
        try:
            self._metrics_server = metrics.start_server(
                address.host, address.port, self._refresh_gauges
            )
        except OSError as error:
            raise StartupError(f"[metrics] cannot listen on {address}: {error.strerror}") from None

    def _refresh_gauges(self) -> None:
        counts = self.spool.counts_by_status()
        for status in ("queued", "delivered", "failed"):
            metrics.QUEUE_SIZE.labels(status).set(counts.get(status, 0))
        oldest = self.spool.oldest_queued_at()
        metrics.OLDEST_QUEUED.set(time.time() - oldest if oldest else 0)

    def stop(self) -> bool:
        """SIGTERM: one deadline for everything. The queue runner stops claiming at
        once; open sessions and running deliveries get `shutdown_grace`, then sessions
        are cut with 421 4.3.2; the writer then finishes what was submitted. False if
        the writer did not finish in time (the process exits all the same)."""
        grace = self.config.server.shutdown_grace
        # The sessions' grace, the 421s (2 × CUT_SECONDS at most), then the writer's
        # last commits: DESIGN.md promises an exit within grace + 2 s.
        deadline = time.monotonic() + grace + 2 * CUT_SECONDS + WRITER_STOP_SECONDS
        self._log.info("server_stopping", grace_seconds=grace)
        self.supervisor.stop()
        self.queue.stop_claiming()  # at once: no new deliveries while clients drain
        # Side by side, not one after the other: each is bounded by the grace.
        steps = [
            gevent.spawn(self.server.stop, grace),
            gevent.spawn(self.queue.stop, timeout=grace),
        ]
        if self._metrics_server is not None:
            steps.append(gevent.spawn(self._metrics_server.stop, timeout=min(grace, 1.0)))
        gevent.joinall(steps, timeout=grace + 2 * CUT_SECONDS)
        for step in steps:
            if not step.ready():
                self._log.warning("stop_step_timed_out", step=str(step))
                step.kill(block=False)
            elif step.exception is not None:
                self._log.error("stop_step_failed", error=repr(step.exception))
        self._authenticator.close()
        self._remote.close()  # QUIT to idle outbound sessions (deliveries have ended)
        if self._housekeeper is not None:
            self._housekeeper.kill()
        finished = self._writer.stop(timeout=max(deadline - time.monotonic(), 0.1))
        if finished:
            self._close_quietly(self._bodies.close)
        else:
            self._log.error("writer_not_stopped", error="submitted work did not finish in time")
        self._file_pool.kill()
        self._dkim_pool.kill()
        self._local.close()
        self._log.info("server_stopped")
        log.flush()
        return finished

    def _close_quietly(self, close: Any) -> None:
        try:
            close()
        except db.DatabaseError as error:
            self._log.warning("spool_close_failed", error=str(error))

    def reload(self) -> None:
        """SIGHUP: re-read the configuration and the accounts; never exit. Settings that
        need new sockets or objects are reported, not applied."""
        try:
            fresh = load(Path(self.config.path))
        except ConfigError as error:
            self._log.error("reload_failed", error=str(error))
            metrics.RELOADS.labels("failed").inc()
            return
        tls_applied = self._reload_tls(fresh)
        dkim_applied = self._reload_dkim(fresh)
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
            and not (name == "tls" and tls_applied is not None)
        ]
        self._accounts.get()
        failed = tls_applied is False or not dkim_applied
        metrics.RELOADS.labels("failed" if failed else "ok").inc()
        self._log.info("config_reloaded", restart_needed_for=changed or None)

    def _reload_tls(self, fresh: Config) -> bool | None:
        """Load the certificate and key again, for new handshakes: a renewed pair at the
        same paths, or new paths. True: loaded; False: it failed and the old pair is
        still served; None: TLS is being turned on or off, which needs a restart."""
        if self._tls is None or not fresh.tls.enabled:
            return None
        return self._tls.reload(fresh.tls.cert, fresh.tls.key, fresh.tls.min_version)

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (exit status 0) or the death of a component
        (EXIT_COMPONENT_DIED, at once, without a graceful stop); SIGHUP reloads."""
        stop_requested = Event()
        gevent.signal_handler(signal.SIGTERM, stop_requested.set)
        gevent.signal_handler(signal.SIGINT, stop_requested.set)
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        try:
            self.start()
        except StartupError:
            # What did start (threads, a first listener) is stopped before the process
            # exits: live writer threads at interpreter exit crashed it (SIGSEGV).
            self.stop()
            raise
        gevent.wait([stop_requested, self.supervisor.died], count=1)
        death = self.supervisor.death
        if death is not None:
            self._log.error(
                "server_aborted",
                component=death.component,
                reason=death.reason,
                exit_status=EXIT_COMPONENT_DIED,
            )
            return EXIT_COMPONENT_DIED
        return 0 if self.stop() else EXIT_COMPONENT_DIED


def serve(
    config: Config, *, application_factory: Callable[[Config], Application] = Application
) -> int:
    """`gsmtp serve`: the exit status (0, 1 start-up failed, 2 already running); a dead
    component ends the process from here with EXIT_COMPONENT_DIED."""
    os.umask(0o077)
    log.configure(config.log.level, config.log.format)
    path = lockfile.lock_path(config.spool.path)
    try:
        lock = lockfile.acquire(path)
    except OSError as error:
        return _startup_failed(StartupError(f"cannot take the lock {path}: {error.strerror}"))
    if isinstance(lock, lockfile.HeldBy):
        holder = f"PID {lock.pid}" if lock.pid is not None else "another process"
        print(
            f"gsmtp: spool {config.spool.path} is already served by {holder} (lock {path})",
            file=sys.stderr,
        )
        return EXIT_ALREADY_RUNNING
    try:
        application = application_factory(config)
        status = application.serve_forever()
    except StartupError as error:
        lock.release()
        return _startup_failed(error)
    if application.supervisor.death is not None:
        # Like a crash, on purpose: a graceful stop could wait forever on the hung or
        # dead component. Everything answered 250 is on disk; clients still waiting
        # lose their connection without a reply; the kernel drops the lock.
        log.flush()
        sys.stderr.flush()
        os._exit(status)
    lock.release()
    return status


def _startup_failed(error: StartupError) -> int:
    log.get_logger(component="app").error("startup_failed", error=str(error))
    log.flush()
    print(f"gsmtp: {error}", file=sys.stderr)
    return 1
