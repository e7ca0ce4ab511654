"""The composition root: configuration in, running objects out; signals; graceful stop.

The only reader of `Config` (with gsmtp.component_settings, which builds the values):
every component gets its own values as arguments. Start-up takes the spool's
single-instance lock first (a second server exits 2), refuses to serve a spool that
fails its integrity check (never an empty spool over a corrupt one), converts an old
spool to incremental auto-vacuum, releases leases a previous process left (safe: the
lock says no other server holds them), and starts listeners last, once everything they
depend on is up. The spool's checkpoint and vacuum are gsmtp.spool_upkeep's tasks.

Every long-lived greenlet and thread is watched by a `Supervisor`: when one dies, the
process ends at once with EXIT_COMPONENT_DIED, like a crash (what was answered 250 is on
disk; systemd starts a fresh process), rather than living on half-dead. SIGTERM stops
everything within one deadline: `shutdown_grace` for open sessions and deliveries, then
421 4.3.2, then the writer finishes what was submitted.
"""

from __future__ import annotations

import grp
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import gevent
from gevent.event import Event
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from gsmtp import (
    accounts,
    collector,
    db,
    descriptors,
    early_signals,
    lockfile,
    log,
    metrics,
    routing,
    shards,
    spool_upkeep,
    writer,
)
from gsmtp import component_settings as settings
from gsmtp.acceptance import Acceptor
from gsmtp.accounts import AccountsSnapshot
from gsmtp.auth import Authenticator
from gsmtp.component_settings import StartupError
from gsmtp.config import Config, ConfigError, load, parse_host_port, spool_reserve
from gsmtp.delivery.base import Deliverer
from gsmtp.delivery.maildir import CACHED_MAILBOXES, MAX_BATCH, MaildirDeliverer, Permissions
from gsmtp.delivery.mta_sts import HttpsFetcher, MtaSts
from gsmtp.delivery.smarthost import Smarthost
from gsmtp.delivery.smtp import SmtpDeliverer
from gsmtp.delivery.tls_client import ClientTls, TlsClientError
from gsmtp.delivery.tls_levels import TlsLevel
from gsmtp.delivery.tls_policy import TlsPolicy
from gsmtp.diskspace import Ballast, SpaceReserve
from gsmtp.dkim import DkimKeyError, DkimSigner
from gsmtp.housekeeping import Housekeeping, Task
from gsmtp.limits import ConnectionLimiter
from gsmtp.policy import Client, IPAddress, Policy
from gsmtp.queue import DeliveryPacer, Notices, QueueManager, RetryPolicy
from gsmtp.queue.manager import body_budget
from gsmtp.reload import changed, in_effect, restart_needed
from gsmtp.routing import Router
from gsmtp.server import CUT_SECONDS, ListenError, SmtpServer
from gsmtp.spool import Spool
from gsmtp.spool_upkeep import SpoolUpkeep
from gsmtp.supervision import (
    EXIT_COMPONENT_DIED,
    STALL_SECONDS,
    Progress,
    Supervisor,
    stop_thread_pools,
)
from gsmtp.systemd import SystemdNotifier, listen_fds, status_text
from gsmtp.tls import ServerTls, TlsError, server_context
from gsmtp.worker_link import (
    ALIVE,
    HEARTBEAT_SECONDS,
    READY,
    RELOADED,
    SINGLE_PROCESS,
    Reporter,
    Role,
)
from gsmtp.workers import refuse_served, take_node_lock

# One thread creates, writes and links all Maildir files. More threads, each giving up and
# retaking the GIL around every file syscall, starve the event loop (a GIL convoy):
# measured with `bench.load -c 100 -m 100`, 8 threads accepted half as much mail as 1.
MAILDIR_THREADS = 1
# The fsyncs of a batch of Maildir files (and of its new/ directories) are spread over
# these threads so that they overlap on the disk; each does one long system call per
# file, so they hardly contend for the GIL.
MAILDIR_FSYNC_THREADS = 8
# DKIM signatures are computed on this many threads (OpenSSL releases the GIL).
DKIM_THREADS = 1
# How often stale files in Maildir tmp/ are looked for (a bounded batch of mailboxes each).
MAILDIR_TMP_CLEAN_SECONDS = 600.0
WRITER_STOP_SECONDS = 0.5  # at SIGTERM, for the writer's last commits after the grace
# The queue gauges are counted on the body reader's thread (never on the event loop, never
# by a scrape) this often, and never for more than QUEUE_GAUGES_SHARE of that thread's
# time: on a large queue the count takes longer, and is then made less often. With
# several workers each counts its own shard; a scrape reads every worker's files.
QUEUE_GAUGES_SECONDS = 1.0
QUEUE_GAUGES_SHARE = 0.1
# How often systemd's STATUS= line (connections, queue size) is refreshed.
STATUS_SECONDS = 5.0


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
    def __init__(
        self,
        config: Config,
        *,
        role: Role = SINGLE_PROCESS,
        notifier: SystemdNotifier | None = None,
        listen_sockets: Sequence[socket.socket] | None = None,
    ) -> None:
        """`config` is the node's; `role` says which worker this process is (see
        gsmtp.workers), by default the only one. `notifier` and `listen_sockets` (socket
        activation) default to what the environment says: $NOTIFY_SOCKET,
        $WATCHDOG_USEC, $LISTEN_FDS; a worker of several leaves systemd to its
        supervisor (gsmtp.workers) and gets its listeners from it."""
        self.role = role
        self._accounts_path = config.spool.path  # shard 0 holds the accounts
        config = settings.worker_config(config, role)
        self.config = config
        self._log = log.get_logger(component="app")
        if notifier is None:  # a worker of several: its supervisor speaks to systemd
            notifier = (
                SystemdNotifier(None) if role.count > 1 else SystemdNotifier.from_environment()
            )
        self.notifier = notifier
        self.supervisor = Supervisor()
        self._reporter = Reporter(role.report) if role.report is not None else None
        self._stop_requested = Event()
        self._reader = self._open_spool()
        self._tls = self._server_tls()  # may refuse to start: before any thread
        self._permissions = self._maildir_permissions()  # likewise
        # Files per Maildir batch and mailboxes kept open, within the descriptor limit.
        self._maildir_batch, self._maildir_mailboxes = descriptors.maildir_shares(
            descriptors.raise_limit(), MAX_BATCH, CACHED_MAILBOXES
        )
        self._smarthost = settings.smarthost(config)  # these too (files they read)
        self._outbound_tls = self._client_tls()
        self._dkim_pool = ThreadPool(DKIM_THREADS)  # its thread starts with the first task
        self._dkim_progress = Progress()
        self._dkim = self._dkim_signer(config)  # may refuse too; a reload replaces it whole
        self._writer = writer.GroupCommitter(config.spool.path)
        self._bodies = writer.ThreadReader(config.spool.path)
        self._reserve = SpaceReserve(config.spool.path, spool_reserve(config))
        self._ballast = Ballast(config.spool.path)
        self.spool = Spool(self._writer, self._reader, self._bodies, ballast=self._ballast)
        self._upkeep = SpoolUpkeep(
            self.spool,
            writer=self._writer,
            bodies=self._bodies,
            ballast=self._ballast,
            reserve=self._reserve,
        )
        self._accounts = AccountsCache(self._open_accounts())
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
        self._fsync_pool = ThreadPool(MAILDIR_FSYNC_THREADS)
        self._file_progress = Progress()
        delivery = config.delivery
        deliverers = self._deliverers()
        self.queue = QueueManager(
            spool=self.spool,
            deliverers=deliverers,
            route=self._router.route,
            local_domains=self._router.local_domains,
            retry=RetryPolicy(delivery.retry, delivery.max_age),
            notices=Notices(
                spool=self.spool,
                writer=self._acceptor,
                settings=settings.notice_settings(config),
                clock=time.time,
            ),
            concurrency=delivery.concurrency,
            local_concurrency=self._local.deliveries_at_once,
            max_per_domain=delivery.max_per_domain,
            active_limit=delivery.active_limit,
            body_budget=body_budget(config.server.max_data_memory),
            spawn=self.supervisor.spawn,
            # Paced only while clients are being served (self.server is made below).
            pacer=DeliveryPacer(delivery.concurrency, clients=lambda: self.server.clients_served),
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
        self._limiter = ConnectionLimiter(
            max_per_network=config.server.max_connections_per_ip,
            max_rate=config.server.max_connection_rate,
            v4_prefix=config.server.ipv4_prefix,
            v6_prefix=config.server.ipv6_prefix,
            exempt=config.server.trusted_networks,
        )
        self.server = SmtpServer(
            listen=tuple((a.host, a.port) for a in config.server.listen),
            submission_listen=tuple((a.host, a.port) for a in submission.listen),
            submission_tls_listen=tuple((a.host, a.port) for a in submission.tls_listen),
            plaintext_auth=submission.allow_plaintext_auth,
            authenticator=self._authenticator,
            hostname=config.server.hostname,
            limits=settings.limits(config),
            idle_timeout=config.server.timeout,
            greet_wait=config.server.greet_wait,
            max_connections=config.server.max_connections,
            limiter=self._limiter,
            policy=self.policy,
            spool=self.spool,
            acceptor=self._acceptor,
            on_queued=self.queue.wake,
            tls=self._tls,
            proxy_networks=(config.server.proxy_networks if config.server.proxy_protocol else None),
            reserve=self._reserve,
            spawn=self.supervisor.spawn,
            deadlines=settings.deadlines(config),
            error_sleep=config.server.error_sleep,
            max_data_memory=config.server.max_data_memory,
            sockets={
                address: socket.socket(fileno=descriptor)
                for address, descriptor in role.listeners.items()
            },
            inherited=_inherited_sockets(role, listen_sockets),
            dkim=lambda: self._dkim,
        )
        self._metrics_server: Any = None
        self._housekeeper: gevent.Greenlet | None = None
        self._gauges_due = 0.0  # monotonic time of the next queue count
        self._queued = 0  # recipients queued, as last counted for STATUS=
        self._watchdog: gevent.Greenlet | None = None
        self._reloader: gevent.Greenlet | None = None  # see _request_reload
        self._reload_wanted = False

    def _open_accounts(self) -> apsw.Connection:
        """The connection accounts are read from: the spool's own in worker 0, a
        connection to shard 0 in the others (SQLite's locking is all they share)."""
        if self.role.index == 0:
            return self._reader
        try:
            return db.connect(self._accounts_path)
        except db.DatabaseError as error:
            raise StartupError(f"cannot open the accounts: {error}") from None

    def _store_password_hash(self, user: str, old: str, new: str) -> bool:
        """A rehashed password (AUTH), written by the spool's writer thread. Only worker
        0's spool holds the accounts: the other workers leave the rehash to it (the
        next login that worker 0 answers), rather than write shard 0 from the loop."""
        if self.role.index != 0:
            return False
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
        self._adopt_orphans(connection)
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

    def _adopt_orphans(self, connection: apsw.Connection) -> None:
        """Take in the mail of shards left without a worker (`workers` was lowered):
        this worker adopts shard k when k mod workers is its number (gsmtp.shards)."""
        node_spool = self._accounts_path
        for orphan in shards.orphans(node_spool, self.role.index, self.role.count):
            lock = lockfile.acquire(lockfile.lock_path(orphan))
            if isinstance(lock, lockfile.HeldBy):
                self._log.warning("shard_not_adopted", shard=orphan, held_by=lock.pid)
                continue
            try:
                try:
                    check = db.connect(orphan)  # its schema brought up to ours
                    verdict = db.check_integrity(check)
                    check.close()
                except db.DatabaseError as error:
                    verdict = str(error)
                if verdict != "ok":
                    self._log.error("shard_not_adopted", shard=orphan, error=verdict)
                    continue
                try:
                    adopted = shards.adopt(connection, orphan)
                except (shards.AdoptionRefused, apsw.Error) as error:
                    self._log.error("shard_not_adopted", shard=orphan, error=str(error))
                    continue
                shards.remove(orphan)
                self._log.info("shard_adopted", shard=orphan, messages=adopted.messages)
            finally:
                lock.release()

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

    def _deliverers(self) -> dict[str, Deliverer]:
        def in_parallel(works: Sequence[Callable[[], None]]) -> None:
            with self._file_progress.track():
                pending = [self._fsync_pool.spawn(_call_captured, work) for work in works]
                for ok, value in (result.get() for result in pending):
                    if not ok:
                        raise value

        self._local = local = MaildirDeliverer(
            self.config.maildir.root,
            resolve_mailbox=self._router.mailbox,
            run_blocking=_in_pool(self._file_pool, self._file_progress),
            permissions=self._permissions,
            run_parallel=in_parallel,
            fsync_threads=MAILDIR_FSYNC_THREADS,
            max_batch=self._maildir_batch,
            cached_mailboxes=self._maildir_mailboxes,
        )
        self._remote = remote = self._remote_deliverer()
        return {routing.LOCAL: local, routing.SMTP: remote}

    def _maildir_permissions(self) -> Permissions:
        """maildir.mode and maildir.group; a group that does not exist stops the start."""
        maildir = self.config.maildir
        gid = None
        if maildir.group:
            try:
                gid = grp.getgrnam(maildir.group).gr_gid
            except KeyError:
                raise StartupError(f"[maildir] group {maildir.group!r} does not exist") from None
        return Permissions(maildir.mode, gid)

    def _client_tls(self) -> ClientTls:
        try:
            return ClientTls(self.config.delivery.ca_file)
        except TlsClientError as error:
            raise StartupError(f"[delivery] ca_file: {error}") from None

    def _remote_deliverer(self) -> SmtpDeliverer:
        delivery = self.config.delivery
        resolver = settings.resolver(self.config)
        # MTA-STS raises a domain's level when MX delivery asks (never for a smarthost).
        sources = []
        if delivery.mta_sts:
            fetcher = HttpsFetcher(
                resolver, self._outbound_tls.verified, port=delivery.mta_sts_port
            )
            sources.append(MtaSts(resolver, fetcher.fetch))
        return SmtpDeliverer(
            resolver=resolver,
            helo_name=self.config.server.hostname,
            port=delivery.port,
            smarthost=self._smarthost,
            tls_policy=TlsPolicy(
                TlsLevel.parse(delivery.tls),
                [(domain, TlsLevel.parse(level)) for domain, level in delivery.tls_policy],
                sources,
            ),
            client_tls=self._outbound_tls,
            timeouts=settings.timeouts(self.config),
            listeners=[(a.host, a.port) for a in self.config.server.listen],
            connection_reuse=delivery.connection_reuse,
            connection_idle=delivery.connection_idle,
            # A destination never runs more deliveries at once than its window's cap,
            # nor the whole server more than its senders: more idle sessions are waste.
            cache_per_destination=delivery.max_per_domain,
            cache_limit=delivery.concurrency,
            spawn=self.supervisor.spawn,
            auth_backoff=delivery.retry[0],
        )

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        housekeeping = Housekeeping(
            [
                Task("log_flush", log.FLUSH_SECONDS, log.flush),
                Task("checkpoint", spool_upkeep.CHECKPOINT_SECONDS, self._upkeep.checkpoint),
                Task("vacuum", spool_upkeep.VACUUM_SECONDS, self._upkeep.give_back_space),
                Task("maildir_tmp", MAILDIR_TMP_CLEAN_SECONDS, self._clean_maildir_tmp),
                Task("queue_gauges", QUEUE_GAUGES_SECONDS, self._refresh_gauges),
                *(
                    [Task("systemd_status", STATUS_SECONDS, self._report_status)]
                    if self.notifier.enabled or self._reporter is not None
                    else []
                ),
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
        ballast_error = self._ballast.restore()
        if ballast_error is not None:  # made by the checkpoint task once there is room
            self._log.warning(
                "spool_ballast_not_made", path=str(self._ballast.path), error=str(ballast_error)
            )
        self.queue.start()
        self._remote.start()
        self._start_metrics()
        try:
            self.server.start()
        except ListenError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(f"cannot listen: {error.strerror} ({error})") from None
        self._supervise()
        metrics.RELOAD_SUCCESSFUL.set(1)  # the configuration in effect loaded
        metrics.RELOAD_SUCCESS_TIME.set(time.time())
        metrics.WORKERS.set(self.role.count)
        metrics.WORKERS_UP.set(1)
        if self.role.restart:
            metrics.WORKER_RESTARTS.inc()
        self._log.info("server_started", hostname=self.config.server.hostname)
        # Listeners bound, spool open, every component running: systemd may now
        # report the start as done (Type=notify), and the watchdog begins.
        self._queued = self._bodies.run(_queued_recipients)
        self.notifier.ready(self._status_text())
        if self.notifier.watchdog_interval is not None:
            self._watchdog = self.supervisor.spawn(
                "watchdog", self.notifier.run_watchdog, self._liveness
            )
        if self._reporter is not None:
            log.flush()  # this worker's lines first, then the node's READY=1
            self._reporter.send(READY)
            self.supervisor.spawn("heartbeat", self._heartbeat)

    def _heartbeat(self) -> None:
        """Tell the workers' supervisor this worker is alive while no component has
        died, with its counts and whether every component makes progress (what the
        node's watchdog needs, gsmtp.worker_link); stop when the supervisor is gone."""
        assert self._reporter is not None
        while True:
            gevent.sleep(HEARTBEAT_SECONDS)
            if self.supervisor.death is not None:
                continue  # the process is on its way out: no more "alive"
            status = {"connections": self.server.connections, "queued": self._queued}
            if not self._reporter.send(ALIVE, status, self._liveness()):
                self._log.error("supervisor_gone")
                self._stop_requested.set()
                return

    def _supervise(self) -> None:
        """Register what has no greenlet spawned through the supervisor: threads, the
        stall checks, the listeners. (The queue runner and the pacer are spawned through
        the supervisor.)"""
        supervisor = self.supervisor
        supervisor.watch_thread("writer", self._writer.done)
        supervisor.watch_thread("reader", self._bodies.done)
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
        shared = self.role.metrics is not None
        try:
            # A scrape reads what the queue_gauges task counted last: no query of its own.
            self._metrics_server = metrics.start_server(
                address.host,
                address.port,
                lambda: None,
                registry=metrics.multiprocess_registry() if shared else metrics.default_registry(),
                listener=socket.socket(fileno=self.role.metrics) if shared else None,
            )
        except OSError as error:
            raise StartupError(f"[metrics] cannot listen on {address}: {error.strerror}") from None

    def _refresh_gauges(self) -> None:
        """Count the queue for the gauges, on the reader thread (see QUEUE_GAUGES_SHARE)."""
        started = time.monotonic()
        if started < self._gauges_due:
            return
        shape = self.spool.queue_shape()
        took = time.monotonic() - started
        self._gauges_due = started + took / QUEUE_GAUGES_SHARE
        for status in ("queued", "delivered", "failed"):
            metrics.QUEUE_SIZE.labels(status).set(shape.by_status.get(status, 0))
        for state in metrics.QUEUE_STATES:
            metrics.QUEUE_MESSAGES.labels(state).set(shape.messages.get(state, 0))
            metrics.QUEUE_BYTES.labels(state).set(shape.size.get(state, 0))
        oldest = shape.oldest_received_at
        metrics.OLDEST_QUEUED.set(max(time.time() - oldest, 0) if oldest else 0)
        if self.role.count > 1:  # one process reads it live (set_function)
            metrics.DATA_MEMORY.set(self.server.data_memory.used)

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
        self.notifier.stopping()
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
        if self._watchdog is not None:
            self._watchdog.kill()
        finished = self._writer.stop(timeout=max(deadline - time.monotonic(), 0.1))
        if finished:
            self._close_quietly(partial(self._stop_reader, deadline))
        else:
            self._log.error("writer_not_stopped", error="submitted work did not finish in time")
        pools = {"maildir": self._file_pool, "fsync": self._fsync_pool, "dkim": self._dkim_pool}
        for name in stop_thread_pools(pools, max(deadline - time.monotonic(), 0.1)):
            self._log.warning("threads_not_stopped", pool=name, error="a task did not finish")
        self._local.close()  # closed by its last running step if one still runs
        self._log.info("server_stopped")
        log.flush()
        return finished

    def _stop_reader(self, deadline: float) -> None:
        """The body reader, within the stop's deadline too: it may be waiting in a
        disk-full recovery's TRUNCATE checkpoint (up to the busy timeout); if so its
        connection is left to the process's exit."""
        if not self._bodies.stop(timeout=max(deadline - time.monotonic(), 0.1)):
            self._log.warning("reader_not_stopped", error="a read did not finish in time")

    def _close_quietly(self, close: Any) -> None:
        try:
            close()
        except db.DatabaseError as error:
            self._log.warning("spool_close_failed", error=str(error))

    def _request_reload(self) -> None:
        """SIGHUP: one reload at a time, in order. A reload waits on threads (the DKIM
        keys, the accounts), so two running side by side could apply an older file
        after a newer one; signals that arrive during a reload make one more reload,
        which reads the file as it is then."""
        self._reload_wanted = True
        if self._reloader is None or self._reloader.dead:
            self._reloader = gevent.spawn(self._reload_while_wanted)

    def _reload_while_wanted(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False
            self.reload()

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration and apply what needs no restart; never
        exit. All or nothing: everything is loaded first (the file, the certificate
        pair, the DKIM signer), and only when all of it loaded is it applied; else the
        old settings stay, in full, and the reload counts as failed. Settings that need
        a restart are named in a warning and keep their old values. True if applied."""
        self.notifier.reloading()
        try:
            applied = self._reload()
        finally:
            self.notifier.ready(self._status_text())
            if self._reporter is not None:
                log.flush()  # this worker's lines first, then the node's READY=1
                self._reporter.send(RELOADED)  # the supervisor's READY=1 waits for it
        metrics.RELOADS.labels("ok" if applied else "failed").inc()
        metrics.RELOAD_SUCCESSFUL.set(1 if applied else 0)
        if applied:
            metrics.RELOAD_SUCCESS_TIME.set(time.time())
        return applied

    def _reload(self) -> bool:
        try:
            fresh = settings.worker_config(load(Path(self.config.path)), self.role)
        except ConfigError as error:
            self._log.error("reload_failed", error=str(error))
            return False
        restart = restart_needed(self.config, fresh)
        effective = in_effect(self.config, fresh, restart)
        tls_context: ssl.SSLContext | None = None
        if self._tls is not None and effective.tls.enabled:
            # Loaded again even at the same paths: a renewed pair (a certbot hook).
            try:
                tls_context = server_context(
                    effective.tls.cert, effective.tls.key, effective.tls.min_version
                )
            except TlsError as error:
                self._log.error("reload_failed", error=f"[tls] {error}")
                return False
        try:
            # The [dkim] keys read again (new, renewed, removed): one that does not load
            # fails the reload, like the TLS pair; the smarthost's auth file likewise.
            signer = self._dkim_signer(effective)
            smarthost = settings.smarthost(effective)
        except StartupError as error:
            self._log.error("reload_failed", error=str(error))
            return False
        # Nothing below can fail: the new settings go in together.
        self._apply(effective, tls_context, signer, smarthost)
        applied = changed(self.config, effective)
        self.config = effective
        self._accounts.get(fresh=True)
        if restart:
            self._log.warning("config_restart_needed", settings=restart)
        self._log.info("config_reloaded", applied=applied or None)
        return True

    def _apply(
        self,
        config: Config,
        tls_context: ssl.SSLContext | None,
        signer: DkimSigner,
        smarthost: Smarthost | None,
    ) -> None:
        """Hand each running component its new settings (values only; cannot fail)."""
        server = config.server
        self.policy.reconfigure(trusted_networks=server.trusted_networks, vrfy=server.vrfy)
        self._limiter.reconfigure(
            max_per_network=server.max_connections_per_ip,
            max_rate=server.max_connection_rate,
            exempt=server.trusted_networks,
        )
        self.server.reconfigure(
            limits=settings.limits(config),
            idle_timeout=server.timeout,
            deadlines=settings.deadlines(config),
            greet_wait=server.greet_wait,
            error_sleep=server.error_sleep,
            proxy_networks=server.proxy_networks,
            max_data_memory=server.max_data_memory,
        )
        self._reserve.reserve = spool_reserve(config)
        delivery = config.delivery
        self.queue.reconfigure(
            retry=RetryPolicy(delivery.retry, delivery.max_age),
            notices=settings.notice_settings(config),
            body_budget=body_budget(server.max_data_memory),
        )
        self._remote.reconfigure(
            resolver=settings.resolver(config),
            port=delivery.port,
            smarthost=smarthost,
            timeouts=settings.timeouts(config),
        )
        if self._tls is not None and tls_context is not None:
            self._tls.use(tls_context, config.tls.cert, config.tls.min_version)
        self._dkim = signer
        log.set_level(config.log.level)

    # -- systemd ----------------------------------------------------------------------

    def _liveness(self) -> str | None:
        """For the watchdog: None while the writer, the readers, the queue runner and
        the other supervised components are alive (the event loop is, if this runs)."""
        limit = self.notifier.watchdog_seconds or self.role.watchdog_seconds or STALL_SECONDS
        return self.supervisor.liveness(stall_limit=limit)

    def _status_text(self) -> str:
        return status_text(self.server.connections, self._queued)

    def _report_status(self) -> None:
        """STATUS= for `systemctl status` (a worker's heartbeat carries the count to
        its supervisor instead); the count is taken on the reader thread."""
        self._queued = self._bodies.run(_queued_recipients)
        self.notifier.status(self._status_text())

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT (exit status 0) or the death of a component
        (EXIT_COMPONENT_DIED, at once, without a graceful stop); SIGHUP reloads."""
        stop_requested = self._stop_requested
        gevent.signal_handler(signal.SIGTERM, stop_requested.set)
        gevent.signal_handler(signal.SIGINT, stop_requested.set)
        gevent.signal_handler(signal.SIGHUP, self._request_reload)
        # `gsmtp queue ...` changed the queue (gsmtp.queue_control.wake_server).
        gevent.signal_handler(signal.SIGUSR1, self.queue.admin_signalled)
        # The start waits on the spool threads (the reader counts the queue): one that
        # dies meanwhile strands it, so a death ends the start as it ends the serving.
        starting = gevent.spawn(_failure_of, self.start)
        gevent.wait([starting, self.supervisor.died], count=1)
        if not starting.ready():
            return self._aborted()
        failure = starting.value
        if isinstance(failure, StartupError):
            # What did start (threads, a first listener) is stopped before the process
            # exits: live writer threads at interpreter exit crashed it (SIGSEGV).
            self.stop()
        if failure is not None:
            raise failure
        # Remembered while starting (gsmtp.early_signals), acted on now: the file may
        # have changed since it was read; the CLI may have changed the queue.
        arrived = early_signals.take()
        if signal.SIGHUP in arrived:
            self._log.info("reload_deferred", reason="SIGHUP during start")
            self._request_reload()
        if signal.SIGUSR1 in arrived:
            self.queue.admin_signalled()
        collector.settle_after_start()
        gevent.wait([stop_requested, self.supervisor.died], count=1)
        if self.supervisor.death is not None:
            return self._aborted()
        return 0 if self.stop() else EXIT_COMPONENT_DIED

    def _aborted(self) -> int:
        """A component died: no graceful stop (it could wait forever on the dead one)."""
        death = self.supervisor.death
        assert death is not None
        self._log.error(
            "server_aborted",
            component=death.component,
            reason=death.reason,
            exit_status=EXIT_COMPONENT_DIED,
        )
        return EXIT_COMPONENT_DIED


def _failure_of(run: Callable[[], None]) -> Exception | None:
    """What `run()` raised, as a value: raised again by the waiter (a greenlet's own
    exception would also be printed, traceback and all, by the hub)."""
    try:
        run()
    except Exception as error:
        return error
    return None


def serve(
    config: Config,
    *,
    application_factory: Callable[..., Application] = Application,
    role: Role = SINGLE_PROCESS,
) -> int:
    """`gsmtp serve`, or one worker of it: the exit status (0, 1 start-up failed, 2
    already running); a dead component ends the process from here with
    EXIT_COMPONENT_DIED. The single process takes the spool's lock; a worker takes its
    shard's, but worker 0, whose shard is the spool itself, runs under the lock its
    supervisor holds (and keeps the inherited descriptor open)."""
    os.umask(0o077)
    fields = {"worker": role.index} if role.count > 1 else None
    log.configure(config.log.level, config.log.format, fields)
    # The CLI signals the PID in the lock file once it is written (a supervisor forwards
    # it), systemd or a certbot hook sends SIGHUP: until the handlers are installed
    # (serve_forever) they must not end the process (their default action). A worker
    # deferred them at its fork (gsmtp.workers).
    if role.count == 1:
        early_signals.defer()
    if role.count > 1 and role.index == 0:
        return _run(application_factory, config, role, None)
    path = lockfile.lock_path(shards.shard_path(config.spool.path, role.index))
    try:
        lock = _take_lock(config, role, path)
    except OSError as error:
        return _startup_failed(StartupError(f"cannot take the lock {path}: {error.strerror}"))
    if not isinstance(lock, lockfile.InstanceLock):
        return lock
    return _run(application_factory, config, role, lock)


def _take_lock(config: Config, role: Role, path: str) -> lockfile.InstanceLock | int:
    """The single process's lock, taken as a supervisor takes the node lock (waiting for
    the workers of a killed supervisor, and for the shards they hold, which it adopts),
    or a worker's shard lock (taken or refused at once: its supervisor restarts it); or
    the exit status. The wait sleeps outside gevent's hub, so a Ctrl-C in it raises
    here, not in the hub (which would print its traceback)."""
    if role.count == 1:
        return take_node_lock(config, path, sleep=get_original("time", "sleep"))
    lock = lockfile.acquire(path)
    if isinstance(lock, lockfile.HeldBy):
        return refuse_served(config, path, lock)
    return lock


def _run(
    application_factory: Callable[..., Application],
    config: Config,
    role: Role,
    lock: lockfile.InstanceLock | None,
) -> int:
    try:
        application = application_factory(config, role=role)
        status = application.serve_forever()
    except StartupError as error:
        if lock is not None:
            lock.release()
        return _startup_failed(error)
    if application.supervisor.death is not None:
        # Like a crash, on purpose: a graceful stop could wait forever on the hung or
        # dead component. Everything answered 250 is on disk; clients still waiting
        # lose their connection without a reply; the kernel drops the lock.
        log.flush()
        sys.stderr.flush()
        os._exit(status)
    if lock is not None:
        lock.release()
    return status


def _startup_failed(error: StartupError) -> int:
    log.get_logger(component="app").error("startup_failed", error=str(error))
    log.flush()
    print(f"gsmtp: {error}", file=sys.stderr)
    return 1


def _inherited_sockets(role: Role, given: Sequence[socket.socket] | None) -> list[socket.socket]:
    """Socket activation's sockets: those given, else $LISTEN_FDS's. A worker of several
    takes none: its supervisor took them and shares them as `role.listeners` (and a
    worker must never read the supervisor's $LISTEN_FDS as its own)."""
    if given is not None:
        return list(given)
    return [] if role.count > 1 else listen_fds()


def _queued_recipients(connection: apsw.Connection) -> int:
    return int(db.scalar(connection, "SELECT COUNT(*) FROM recipients WHERE status = 'queued'"))
