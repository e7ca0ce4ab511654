"""The supervisor of a node's worker processes (`server.workers` > 1): start, watch, restart.

Theory of operation. Each worker is a whole gsmtp (gsmtp.app with a `Role`): its own
event loop, its own spool shard (gsmtp.shards) with its own writer and queue runner.
This process only binds, forks, watches and forwards; it runs no event loop and never
opens a spool, so there is little in it to go wrong:

- It takes the node's lock `<spool.path>.lock` first (a second `serve` exits 2 naming
  this process's PID; when the PID the lock names has exited, the holders are the
  workers of a supervisor killed with SIGKILL, stopping: it waits for them, and for any
  shard lock one of them still holds, up to `orphans_wait`), then binds every listener
  (SMTP, submission, /metrics) once, or takes the socket systemd passed for that
  address (socket activation, $LISTEN_FDS);
  the workers inherit the sockets. Bound here rather than with SO_REUSEPORT in each
  worker: a port already in use or not allowed fails the start once, clearly; no other
  process of the same user can join the port and take connections (SO_REUSEPORT lets
  it, and a test harness's "free" port raced by two servers would be shared silently
  instead of failing); and connections waiting in the backlog are not reset when a
  worker dies: the others accept them. Each worker takes a few connections per turn
  of its loop (server.SHARED_MAX_ACCEPT), so a worker with a free loop takes more.
- Workers are forked from this process before it imports gevent, and monkey-patch in
  the child; they stay in this process group (systemd and test harnesses stop the
  group) and get SIGTERM should this process die (PR_SET_PDEATHSIG; their heartbeat
  also fails then). Worker 0 serves shard 0, the spool file itself, under the node lock
  it inherits; worker k takes `<shard k>.lock`, so a restarted worker never shares its
  shard with a worker of an earlier supervisor still draining.
- Each worker is kept on CPUs of its own (`server.cpu_affinity = "auto"`, `worker_cpus`:
  worker k of n on the k-th, (k+n)-th, … of the CPUs this process may use; none where
  there are more workers than CPUs). Its threads (event loop, spool writer and reader,
  Maildir writers) hand work to each other several times a message; on one CPU a
  hand-off wakes a thread there instead of interrupting the other CPU, which is busy
  with the other worker under load. Measured at C=100 M=100 on 2 CPUs (bench/notes.md,
  2026-12-05): 9–10 % less CPU a message and as much more mail. Set when the worker
  starts (a restarted one gets the same CPUs); "off" leaves them to the scheduler.
- Every worker writes "ready" then "alive" lines on a pipe (gsmtp.worker_link).
  `Workers.health()` turns them into one `NodeHealth` (ready: every worker ready; alive:
  every worker heard from within ALIVE_SECONDS and reporting every component alive;
  reloading: a forwarded SIGHUP not yet confirmed by every worker; status: counts
  summed), and `on_health` receives it after every turn: the one place systemd's
  notifier reads (systemd.NodeNotifier: this process is the unit's main PID, so it
  alone speaks to systemd; the workers are not given $NOTIFY_SOCKET).
- A worker that ends while the node is not stopping is restarted, after a back-off
  that doubles with each quick death (BACKOFF_FIRST to BACKOFF_MAX) so a crash loop
  does not spin; that includes exit 70, the death of a component inside it. A ready
  worker silent for HANG_SECONDS (its event loop stuck) is killed and restarted. A
  worker that fails before the node has started at all fails the start (exit 1).
- SIGTERM or SIGINT: forwarded, and the node exits once every worker has (SIGKILL
  after shutdown_grace + STOP_MARGIN). SIGHUP and SIGUSR1 are forwarded; after a SIGHUP
  the node counts as reloading until every worker has said "reloaded" (or died, or
  RELOAD_SECONDS passed: a worker that never answers must not hold READY=1 back). At
  SIGHUP this process first reads the file again: a worker restarted later starts from
  the latest configuration that loaded (not the start-up one: it would relay for a
  network since removed), and the stop deadline uses its shutdown_grace; settings that
  need a restart (gsmtp.reload.RESTART) keep their start-up values here too. A file
  that does not load keeps the previous one (the workers, reading it too, keep theirs).
- Until its handlers are installed, in this process from the start of `serve` and in a
  worker from its fork until its event loop's, SIGHUP and SIGUSR1 are remembered, not
  fatal (gsmtp.early_signals), and acted on once started.
- /metrics: prometheus_client's multiprocess mode. PROMETHEUS_MULTIPROC_DIR is a
  private directory beside the spool (`<spool.path>.metrics`), emptied at start under
  the node lock; a dead worker's "live" gauge files are removed, its counters and
  histograms stay (node-wide counters never go back).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gsmtp import early_signals, lockfile, log, shards
from gsmtp.config import Config, ConfigError, allowed_cpus, load, parse_host_port
from gsmtp.reload import in_effect, restart_needed
from gsmtp.sockets import bind_listener, take_bound
from gsmtp.systemd import NOTIFY_VARIABLES, NodeNotifier, SystemdNotifier, listen_fds
from gsmtp.worker_link import ALIVE, HEARTBEAT_SECONDS, READY, RELOADED, Lines, Role

EXIT_STARTUP_FAILED = 1
EXIT_ALREADY_RUNNING = 2
EXIT_WORKER_FAILED = 70  # a worker did not stop cleanly at SIGTERM
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 30.0
STEADY_SECONDS = 60.0  # a worker that ran this long restarts after BACKOFF_FIRST again
HANG_SECONDS = 60.0  # a ready worker not heard from for this long is killed
ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # heard from within this: alive
STOP_MARGIN = 3.0  # after a worker's own deadline (shutdown_grace + 2 s): SIGKILL
TICK_SECONDS = 1.0
RELOAD_SECONDS = 30.0  # a worker's "reloaded" awaited this long at most
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)

RunWorker = Callable[[Config, Role], int]


@dataclass(frozen=True, slots=True)
class WorkerState:
    index: int
    pid: int | None  # None while waiting to be restarted
    ready: bool
    alive: bool
    status: Mapping[str, int] = field(default_factory=dict)
    problem: str | None = None  # why not alive


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """The node as systemd's notifier needs it: READY=1 once `ready` (every worker
    ready), WATCHDOG=1 only while `alive` (every worker heard from lately, each with
    its writer, queue runner and loop alive), RELOADING=1 while `reloading`, STOPPING=1
    once `stopping`, STATUS= from `status` (each worker's counts summed)."""

    ready: bool
    alive: bool
    status: Mapping[str, int]
    workers: tuple[WorkerState, ...]
    reloading: bool = False
    stopping: bool = False

    def liveness(self) -> str | None:
        """None while `alive`; else which worker is not, and why (the watchdog's log)."""
        for worker in self.workers:
            if not worker.alive:
                return f"worker {worker.index}: {worker.problem or 'not running'}"
        return None


@dataclass(slots=True)
class _Worker:
    index: int
    pid: int | None = None
    pipe: int | None = None
    lines: Lines = field(default_factory=Lines)
    ready: bool = False
    heard_at: float = 0.0
    started_at: float = 0.0
    status: dict[str, int] = field(default_factory=dict)
    problem: str | None = None  # from its last heartbeat
    quick_deaths: int = 0
    restart_at: float | None = None
    killed: bool = False
    starts: int = 0  # processes forked for this worker so far


def serve(
    config: Config,
    count: int,
    *,
    run_worker: RunWorker | None = None,
    on_health: Callable[[NodeHealth], None] | None = None,
    environ: MutableMapping[str, str] = os.environ,
) -> int:
    """`gsmtp serve` with `count` workers: the exit status (0 stopped, 1 could not
    start, 2 the spool is served already). `on_health` gets the node's health after
    every turn of the supervisor's loop (at least every TICK_SECONDS), after systemd's
    notifier (from `environ`, whose systemd variables are then removed: the workers
    inherit neither $NOTIFY_SOCKET nor $LISTEN_FDS)."""
    early_signals.defer()  # until Workers.run installs the handlers (the CLI did too)
    os.umask(0o077)
    log.configure(config.log.level, config.log.format)
    notifier = NodeNotifier(SystemdNotifier.from_environment(environ))
    inherited = listen_fds(environ)
    for name in NOTIFY_VARIABLES:
        environ.pop(name, None)
    path = lockfile.lock_path(config.spool.path)
    try:
        lock = take_node_lock(config, path)
    except OSError as error:
        return _failed(f"cannot take the lock {path}: {error.strerror}")
    if not isinstance(lock, lockfile.InstanceLock):
        return lock
    try:
        metrics_dir = _metrics_directory(config.spool.path)
        sockets = _bind(config, inherited)
    except _StartError as error:
        lock.release()
        return _failed(str(error))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    def publish(health: NodeHealth) -> None:
        notifier.update(health)
        if on_health is not None:
            on_health(health)

    interval = notifier.notifier.watchdog_interval
    node = Workers(
        config,
        count,
        sockets,
        lock,
        metrics_dir,
        run_worker=run_worker,
        on_health=publish,
        watchdog_seconds=notifier.notifier.watchdog_seconds,
        tick=min(TICK_SECONDS, interval) if interval is not None else TICK_SECONDS,
    )
    try:
        return node.run()
    finally:
        for listener in sockets.values():
            listener.close()
        lock.release()


def worker_cpus(index: int, count: int, allowed: set[int]) -> set[int] | None:
    """The CPUs worker `index` of `count` is kept on: every `count`-th of the `allowed`
    ones (in order) from its own index, so the workers share none and use them all.
    None for a single worker (its threads are better spread over every CPU) and for
    more workers than CPUs (some would have to share one; the scheduler balances)."""
    cpus = sorted(allowed)
    if count < 2 or count > len(cpus) or not 0 <= index < count:
        return None
    return set(cpus[index::count])


def orphans_wait(config: Config) -> float:
    """How long a starting `serve` waits for the workers of a supervisor that was killed
    to finish their stop: their own deadline (shutdown_grace + 2 s, this configuration's
    grace standing for theirs) and the margin this process would give them."""
    return config.server.shutdown_grace + 2.0 + STOP_MARGIN


def take_node_lock(
    config: Config, path: str, *, sleep: Callable[[float], None] = time.sleep
) -> lockfile.InstanceLock | int:
    """The node lock `serve` runs under (a supervisor's, or a single process's), or the
    exit status to end with, its reason printed. When the PID the lock names has exited
    (lockfile.exited: a supervisor killed with SIGKILL), its workers are stopping: wait
    up to `orphans_wait` for the lock and for every shard lock they still hold (a worker
    of this node, or a single process adopting the shard, would find it taken). Ctrl-C
    during the wait ends it with a line, not a traceback. OSError: the lock file cannot
    be opened."""
    wait = orphans_wait(config)
    deadline = time.monotonic() + wait
    lock: lockfile.InstanceLock | lockfile.HeldBy | None = None
    try:
        lock = lockfile.acquire_after_exited_holder(
            path,
            wait,
            waiting=lambda held: _say(
                lockfile.waiting_for_orphans(config.spool.path, path, held, wait)
            ),
            sleep=sleep,
        )
        if isinstance(lock, lockfile.HeldBy):
            return refuse_served(config, path, lock)
        refusal = wait_for_draining_shards(config.spool.path, deadline, sleep=sleep)
    except KeyboardInterrupt:
        if isinstance(lock, lockfile.InstanceLock):
            lock.release()
        _say(f"gsmtp: interrupted while waiting for the spool {config.spool.path}")
        return EXIT_STARTUP_FAILED
    if refusal is not None:
        lock.release()
        _say(refusal)
        return EXIT_ALREADY_RUNNING
    return lock


def refuse_served(config: Config, path: str, held: lockfile.HeldBy) -> int:
    """Say which process serves the spool (its node lock, or a shard's at `path`) and
    give the exit status `serve` ends with."""
    _say(lockfile.already_served(config.spool.path, path, held))
    return EXIT_ALREADY_RUNNING


def _say(line: str) -> None:
    print(line, file=sys.stderr)
    sys.stderr.flush()


def wait_for_draining_shards(
    spool_path: str, deadline: float, *, sleep: Callable[[float], None] = time.sleep
) -> str | None:
    """With the node lock taken, a shard lock can only be held by a worker of an earlier
    node still stopping (its worker 0, holder of the node lock, ended first): wait for
    it until `deadline`, else the refusal to print."""
    for _, shard in shards.existing(spool_path)[1:]:
        path = lockfile.lock_path(shard)
        holder = _shard_holder(path)
        if holder is not None:
            _say(
                f"gsmtp: shard {shard} is still served by PID {holder}, a worker of an earlier"
                f" server still stopping; waiting up to"
                f" {max(0.0, deadline - time.monotonic()):.0f} s for it (lock {path})"
            )
        while holder is not None and time.monotonic() < deadline:
            sleep(lockfile.ORPHAN_POLL)
            holder = _shard_holder(path)
        if holder is not None:
            return (
                f"gsmtp: shard {shard} is still served by PID {holder}, a worker of an"
                f" earlier server still stopping (lock {path})"
            )
    return None


def _shard_holder(path: str) -> int | None:
    """`lockfile.holder`, taking the PID a held lock's file names at its word when it
    cannot be confirmed: it is only waited for and named, never signalled."""
    try:
        return lockfile.holder(path)
    except lockfile.HolderUnverified as unverified:
        return unverified.pid


class _StartError(Exception):
    pass


def _stopped_cleanly(code: int, *, ready: bool, killed: bool) -> bool:
    """Whether a worker that ended during the node's stop (exit code `code`, as
    os.waitstatus_to_exitcode gives it) stopped cleanly. Not: one this process had to
    SIGKILL (`killed`: it did not stop by its deadline), or one that failed on its own
    (another status, another signal). Clean: status 0; the forwarded SIGTERM ending a
    worker not yet `ready` (still starting, before or while its handlers go in: it
    had accepted nothing); a SIGKILL this process did not send (someone killed it,
    typically just before the stop, which then counts it among the stopped)."""
    if killed:
        return False
    return code == 0 or (code == -signal.SIGTERM and not ready) or code == -signal.SIGKILL


def _failed(message: str) -> int:
    log.get_logger(component="workers").error("startup_failed", error=message)
    log.flush()
    print(f"gsmtp: {message}", file=sys.stderr)
    return EXIT_STARTUP_FAILED


def _metrics_directory(spool_path: str) -> str:
    """A private, empty directory for the workers' metric files (see the docstring)."""
    directory = os.path.realpath(spool_path) + ".metrics"
    try:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as error:
        raise _StartError(f"cannot create {directory}: {error.strerror}") from None
    return directory


def _bind(
    config: Config, inherited: list[socket.socket]
) -> dict[tuple[str, int] | str, socket.socket]:
    """Every listener of the node, by address; "metrics" for the /metrics one. A socket
    systemd passed for an address (`inherited`) is used instead of binding it; one for
    no configured address is closed with a warning."""
    addresses = [
        *config.server.listen,
        *config.submission.listen,
        *config.submission.tls_listen,
    ]
    bound: dict[tuple[str, int] | str, socket.socket] = {}
    try:
        for address in addresses:
            bound[(address.host, address.port)] = _bind_one(address.host, address.port, inherited)
        if config.metrics.listen:
            address = parse_host_port(config.metrics.listen)
            bound["metrics"] = _bind_one(address.host, address.port, inherited, "[metrics] ")
    except _StartError:
        for listener in bound.values():
            listener.close()
        raise
    finally:
        for unused in inherited:
            log.get_logger(component="workers").warning(
                "inherited_socket_unused", address=str(unused.getsockname())
            )
            unused.close()
        inherited.clear()
    return bound


def _bind_one(
    host: str, port: int, inherited: list[socket.socket], what: str = ""
) -> socket.socket:
    passed = take_bound(inherited, host, port)
    if passed is not None:
        log.get_logger(component="workers").info("listener_inherited", host=host, port=port)
        return passed
    try:
        return bind_listener(host, port)
    except OSError as error:
        raise _StartError(f"{what}cannot listen on {host}:{port}: {error.strerror}") from None


def _run_worker(config: Config, role: Role) -> int:
    """In the child: become a gevent process, then a whole gsmtp on one shard."""
    from gevent import monkey

    monkey.patch_all()
    from gsmtp import app

    return app.serve(config, role=role)


def _problem(worker: _Worker, now: float) -> str | None:
    """None while `worker` is alive for the watchdog: ready, heard from within
    ALIVE_SECONDS, and its last heartbeat reported every component alive."""
    if worker.pid is None:
        return "not running"
    if not worker.ready:
        return "not ready"
    if now - worker.heard_at > ALIVE_SECONDS:
        return f"not heard from for {now - worker.heard_at:.0f}s"
    return worker.problem


class Workers:
    """The running node (see the module docstring). `on_health` is called with the
    node's `NodeHealth` after every report and every change of a worker."""

    def __init__(
        self,
        config: Config,
        count: int,
        sockets: Mapping[tuple[str, int] | str, socket.socket],
        lock: lockfile.InstanceLock,
        metrics_dir: str,
        *,
        run_worker: RunWorker | None = None,
        on_health: Callable[[NodeHealth], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        watchdog_seconds: float | None = None,
        tick: float = TICK_SECONDS,
    ) -> None:
        self._config = config
        self._sockets = sockets
        self._lock = lock
        self._metrics_dir = metrics_dir
        self._run_worker = run_worker or _run_worker
        self.on_health = on_health
        self._clock = clock
        self._watchdog_seconds = watchdog_seconds  # passed on to each worker (its Role)
        self._tick = tick
        self._reloading: set[int] = set()  # workers yet to confirm a forwarded SIGHUP
        self._reload_deadline = 0.0
        self._workers = [_Worker(index) for index in range(count)]
        self._log = log.get_logger(component="workers")
        self._selector = selectors.DefaultSelector()
        self._pending: list[int] = []
        self._stopping = False
        self._kill_at = 0.0
        self._started = False  # every worker has been ready once
        self._status = 0
        self._pid = os.getpid()
        self._wake_read, self._wake_write = os.pipe()

    # -- the node's health: the one place a notifier reads ---------------------------

    def health(self) -> NodeHealth:
        now = self._clock()
        states = tuple(
            WorkerState(
                worker.index,
                worker.pid,
                worker.ready and worker.pid is not None,
                _problem(worker, now) is None,
                dict(worker.status),
                _problem(worker, now),
            )
            for worker in self._workers
        )
        summed: dict[str, int] = {}
        for state in states:
            for key, value in state.status.items():
                summed[key] = summed.get(key, 0) + value
        return NodeHealth(
            ready=all(s.ready for s in states),
            alive=all(s.alive for s in states),
            status=summed,
            workers=states,
            reloading=bool(self._reloading),
            stopping=self._stopping,
        )

    def _publish(self) -> None:
        if self.on_health is not None:
            self.on_health(self.health())

    # -- running ----------------------------------------------------------------------

    def run(self) -> int:
        for descriptor in (self._wake_read, self._wake_write):
            os.set_blocking(descriptor, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(self._wake_write)
        self._pending += sorted(early_signals.take())  # arrived while starting
        try:
            return self._run()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run(self) -> int:
        self._log.info("workers_starting", workers=len(self._workers))
        for worker in self._workers:
            self._start(worker)
        while True:
            for key, _ in self._selector.select(self._timeout()):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                else:
                    self._read(key.data)
            self._handle_signals()
            self._reap()
            log.flush()  # this process has no housekeeping loop: after every turn
            now = self._clock()
            if self._reloading and now >= self._reload_deadline:
                self._log.warning("reload_unconfirmed", workers=sorted(self._reloading))
                self._reloading.clear()
            if self._stopping:
                if all(worker.pid is None for worker in self._workers):
                    break
                if now >= self._kill_at:
                    self._kill_remaining()
                continue
            self._check_hangs(now)
            for worker in self._workers:
                if (
                    worker.pid is None
                    and worker.restart_at is not None
                    and now >= worker.restart_at
                ):
                    self._start(worker)
            self._publish()
        self._log.info("workers_stopped", exit_status=self._status)
        log.flush()
        return self._status

    def _timeout(self) -> float:
        now = self._clock()
        deadlines = [now + self._tick]
        if self._stopping:
            deadlines.append(self._kill_at)
        else:
            deadlines += [w.restart_at for w in self._workers if w.restart_at is not None]
        return max(0.0, min(deadlines) - now)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending.append(signum)  # handled in the loop (the wake-up fd woke it)

    def _handle_signals(self) -> None:
        pending, self._pending = self._pending, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._stop(signum)
            elif signum in (signal.SIGHUP, signal.SIGUSR1):
                if signum == signal.SIGHUP:
                    self._reload()
                self._log.info("signal_forwarded", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP and not self._stopping:
                    # Ready workers answer "reloaded"; one not ready yet reads the new
                    # file as it starts.
                    self._reloading |= {w.index for w in self._workers if w.ready}
                    self._reload_deadline = self._clock() + RELOAD_SECONDS
                self._signal_all(signum)

    def _reload(self) -> None:
        """SIGHUP, before it is forwarded: the file read again, for the workers started
        from now on and the stop deadline (see the module docstring). Each worker
        applies it, and logs what, itself."""
        try:
            fresh = load(Path(self._config.path))
        except ConfigError as error:
            self._log.error("reload_failed", error=str(error))
            return
        self._config = in_effect(self._config, fresh, restart_needed(self._config, fresh))

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if self._stopping:
            return
        self._stopping = True
        grace = self._config.server.shutdown_grace
        self._kill_at = self._clock() + grace + 2.0 + STOP_MARGIN
        self._log.info("workers_stopping", grace_seconds=grace)
        for worker in self._workers:
            worker.restart_at = None
        self._signal_all(signal.SIGTERM)
        self._publish()  # STOPPING=1 at once

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers:
            if worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _kill_remaining(self) -> None:
        for worker in self._workers:
            if worker.pid is not None and not worker.killed:
                self._log.error("worker_killed", worker=worker.index, reason="did not stop")
                worker.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)

    def _check_hangs(self, now: float) -> None:
        for worker in self._workers:
            silent = now - worker.heard_at
            if worker.pid is None or not worker.ready or worker.killed or silent <= HANG_SECONDS:
                continue
            self._log.error("worker_hung", worker=worker.index, pid=worker.pid, silent=silent)
            worker.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)

    # -- one worker -------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        read, write = os.pipe()
        role = Role(
            index=worker.index,
            count=len(self._workers),
            listeners={
                address: listener.fileno()
                for address, listener in self._sockets.items()
                if isinstance(address, tuple)
            },
            metrics=self._sockets["metrics"].fileno() if "metrics" in self._sockets else None,
            report=write,
            watchdog_seconds=self._watchdog_seconds,
            restart=worker.starts > 0,
        )
        worker.starts += 1
        allowed = allowed_cpus()
        cpus = self._cpus(worker.index, allowed)
        log.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across the fork: a SIGTERM forwarded before the child has dropped this
        # process's handlers would be taken by their copy and lost (the worker would
        # run on until SIGKILLed); blocked, it waits and then gets the default action.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if pid == 0:  # the child never returns from here
            status = EXIT_WORKER_FAILED
            try:
                os.close(read)
                self._become_worker(worker.index, cpus)
                status = self._run_worker(self._config, role)
            except SystemExit as exit:
                status = exit.code if isinstance(exit.code, int) else EXIT_STARTUP_FAILED
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(write)
        os.set_blocking(read, False)
        now = self._clock()
        worker.pid, worker.pipe, worker.lines = pid, read, Lines()
        worker.ready, worker.killed, worker.status, worker.problem = False, False, {}, None
        worker.started_at = worker.heard_at = now
        worker.restart_at = None
        self._selector.register(read, selectors.EVENT_READ, worker)
        # The CPUs it may run on: its own, or (kept on none) every one this process may.
        may_run_on = cpus or allowed
        self._log.info(
            "worker_started",
            worker=worker.index,
            pid=pid,
            cpus=sorted(may_run_on) if may_run_on else "any",
        )

    def _cpus(self, index: int, allowed: set[int] | None) -> set[int] | None:
        """The CPUs worker `index` is kept on, of the `allowed` ones, or None
        (`server.cpu_affinity = "off"`, a platform that cannot tell, or more workers
        than CPUs)."""
        if self._config.server.cpu_affinity == "off" or allowed is None:
            return None
        return worker_cpus(index, len(self._workers), allowed)

    def _become_worker(self, index: int, cpus: set[int] | None) -> None:
        """In the child, before anything else: die with the supervisor, drop what is
        the supervisor's (signal handlers, its loop, the other workers' pipes, and the
        node lock unless this is worker 0); move to `cpus` while this is its only
        thread (the threads it starts later inherit them)."""
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != self._pid:
            os._exit(0)  # the supervisor died before prctl: nothing to serve for
        early_signals.defer(forget=True)  # SIGHUP, SIGUSR1: until its loop's handlers
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            if signum not in early_signals.DEFERRED:
                signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # blocked by _start
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        for other in self._workers:
            if other.pipe is not None:
                os.close(other.pipe)
        if index != 0:
            self._lock.release()  # this copy only: the supervisor's keeps the lock
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)
            except OSError as error:  # the CPUs were taken away meanwhile (a cpuset)
                self._log.warning("cpu_affinity_failed", worker=index, error=str(error))
                log.flush()  # now: the worker's own log set-up starts a new buffer

    def _read(self, worker: _Worker) -> None:
        assert worker.pipe is not None
        try:
            data = os.read(worker.pipe, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(worker)
            return
        now = self._clock()
        for report in worker.lines.feed(data):
            worker.heard_at = now
            if report.state == READY and not worker.ready:
                worker.ready = True
                self._log.info("worker_ready", worker=worker.index, pid=worker.pid)
                if not self._started and all(w.ready for w in self._workers):
                    self._started = True
                    pids = [w.pid for w in self._workers]
                    self._log.info("workers_started", workers=len(self._workers), pids=pids)
            elif report.state == ALIVE:
                worker.status = dict(report.status)
                worker.problem = report.problem
            elif report.state == RELOADED and worker.index in self._reloading:
                self._reloading.discard(worker.index)
                if not self._reloading:
                    self._log.info("workers_reloaded", workers=len(self._workers))

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.pipe is not None:
            self._selector.unregister(worker.pipe)
            os.close(worker.pipe)
            worker.pipe = None

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is not None:
                self._ended(worker, os.waitstatus_to_exitcode(wait_status))

    def _ended(self, worker: _Worker, code: int) -> None:
        self._close_pipe(worker)
        self._reloading.discard(worker.index)  # restarted, it reads the new file
        self._forget_live_gauges(worker.pid)
        pid, ready, worker.pid, worker.ready = worker.pid, worker.ready, None, False
        now = self._clock()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        if self._stopping:
            self._log.info("worker_stopped", worker=worker.index, pid=pid, exit=how)
            clean = _stopped_cleanly(code, ready=ready, killed=worker.killed)
            if not clean and self._status == 0:
                self._status = EXIT_WORKER_FAILED
            return
        if not self._started:
            # Not every worker has started yet: this is the node failing to start
            # (the worker's own log line says why), not a crash to ride out.
            self._log.error("worker_failed_to_start", worker=worker.index, pid=pid, exit=how)
            self._status = EXIT_STARTUP_FAILED
            self._stop()
            return
        if now - worker.started_at >= STEADY_SECONDS:
            worker.quick_deaths = 0
        delay = min(BACKOFF_FIRST * 2**worker.quick_deaths, BACKOFF_MAX)
        worker.quick_deaths += 1
        worker.restart_at = now + delay
        self._log.error(
            "worker_died", worker=worker.index, pid=pid, exit=how, restart_in=round(delay, 2)
        )

    def _forget_live_gauges(self, pid: int | None) -> None:
        """What prometheus_client.multiprocess.mark_process_dead does (that module is
        not imported here, before the fork: it imports ssl, which gevent must patch
        first): the dead process's "live" gauge files go; counters stay."""
        if pid is None:
            return
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self._metrics_dir):
                if name.startswith("gauge_live") and name.endswith(f"_{pid}.db"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self._metrics_dir, name))
