"""The spool's write path and its bulk reader, each on a thread of its own.

`GroupCommitter` is the server's write path: callers hand it a unit of work and block
(their greenlet only) until it is committed. One worker thread owns the write connection
and runs every unit that arrived while it was busy in a single transaction, so one
fsync covers many messages under load (group commit) and the gevent hub never waits on
SQLite or the disk (apsw releases the GIL). `ThreadReader` moves message bodies off the
event loop the same way.

A failed statement never takes the writer down: if SQLite rolled the whole transaction
back under a unit (a write failed during a statement: disk full, I/O error), every unit
of the batch is answered with that error (their clients get 451 4.3.0, nothing of theirs
is stored) and the next batch starts afresh. Both classes count the requests they have
not answered yet (`progress`), so a supervisor can tell a hung thread from an idle one.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import apsw
import gevent
from gevent.event import AsyncResult
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from gsmtp.db import DatabaseError, connect
from gsmtp.supervision import Clock, Progress

T = TypeVar("T")

Work = Callable[[apsw.Connection], Any]
# A batch function applies many like items with few SQLite calls (executemany); the
# writer thread then needs the GIL a handful of times per batch, not per message.
BatchFn = Callable[[apsw.Connection, list[Any]], None]
Connect = Callable[[str], apsw.Connection]


class _TransactionLost(Exception):
    """SQLite rolled the batch's transaction back under a unit; `error` says why."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _ThreadLoop(ABC):
    """One OS thread with a connection of its own, running its own loop: it takes every
    unit submitted since its last pass, processes them together (`_process`), hands the
    outcomes back to the event loop (`run_callback_threadsafe`) and at once starts on
    what arrived meanwhile. So the next pass never waits for a busy event loop to come
    round, and a burst of requests costs one hand-off, not one each."""

    def __init__(self, connection: apsw.Connection, clock: Clock) -> None:
        self._connection = connection
        self._pending: deque[tuple[Any, AsyncResult]] = deque()
        self._work_ready = get_original("threading", "Event")()
        self._loop = gevent.get_hub().loop
        self._stopping = False
        self.progress = Progress(clock)  # units submitted and not answered yet
        self._thread = ThreadPool(1)
        self._done = self._thread.spawn(self._run)

    @property
    def done(self) -> AsyncResult:
        """Set when the thread's loop ends: after `stop()`, or when it dies."""
        return self._done

    def _stopped(self) -> DatabaseError:
        return DatabaseError(f"spool {type(self).__name__} is stopped")

    def _wait(self, unit: Any) -> Any:
        """Hand `unit` to the thread; its outcome, or raise the exception it is."""
        if self._stopping:
            raise self._stopped()
        result: AsyncResult = AsyncResult()
        self.progress.begin()
        self._pending.append((unit, result))
        if not self._work_ready.is_set():
            self._work_ready.set()
        return result.get()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish what was submitted, then close the connection. False if the thread
        did not finish within `timeout` (hung, or dead): its connection is then left
        to the process's exit rather than closed under a running statement."""
        self._stopping = True
        self._work_ready.set()
        self._done.wait(timeout)
        if not self._done.successful():
            return False
        self._thread.kill()
        _close(self._connection)
        return True

    def _run(self) -> None:
        """The thread's loop (no gevent calls here but the thread-safe callback)."""
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._work_ready.wait()
                self._work_ready.clear()
                continue
            batch = []
            while self._pending:
                batch.append(self._pending.popleft())
            outcomes = self._process([unit for unit, _ in batch])
            self._loop.run_callback_threadsafe(self._settle, batch, outcomes)
            # Not kept while idle: the payloads may be large (body parts).
            del batch, outcomes

    def _settle(self, batch: list[tuple[Any, AsyncResult]], outcomes: list[Any]) -> None:
        """On the event loop: wake each submitter with its outcome (an exception is
        raised in the submitter)."""
        for (_, result), outcome in zip(batch, outcomes, strict=True):
            self.progress.end()
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set(outcome)

    @abstractmethod
    def _process(self, units: list[Any]) -> list[Any]:
        """On the thread: each unit's outcome (a value, or the exception to raise)."""


class GroupCommitter(_ThreadLoop):
    """Serialises write transactions onto one OS thread and batches concurrent ones:
    everything submitted since the last commit is committed as one transaction."""

    def __init__(
        self, path: str, *, open_connection: Connect = connect, clock: Clock = time.monotonic
    ) -> None:
        self._gathered: list[tuple[tuple[BatchFn | None, Any], AsyncResult]] = []
        self.commits = 0  # transactions committed: fewer than units under load
        connection = open_connection(path)
        # Temporary tables and indexes (a claim's domain filter, the index SQLite builds
        # for an IN list) stay in memory, never in a file of a temp directory: with
        # none writable (a read-only /var/tmp), claims over 65,000 local domains failed
        # with an I/O error and the queue runner gave up (red team). They are small:
        # 150,000 domain names take a few megabytes.
        connection.execute("PRAGMA temp_store=MEMORY")
        super().__init__(connection, clock)

    def submit(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work` inside a committed transaction; raise what it (or COMMIT) raised."""
        return self._wait((None, work))  # type: ignore[no-any-return]

    def finish_checkpoint(self) -> tuple[int, int]:
        """Copy what is left of the WAL into the database on the writer's own connection,
        between two transactions (before the next batch's): frames in the WAL, frames
        copied. Only a writer can start the WAL again from its beginning, and SQLite
        does that at the first write after a checkpoint that copied every frame; the
        reader thread's checkpoints run beside the commits and never catch up with
        them under steady load, so without this the WAL grows to the auto-checkpoint
        size. Cheap when that checkpoint has just copied nearly everything (see
        gsmtp.spool_upkeep): the batch it runs before waits for the rest and one
        fsync of the database."""
        return self._wait((None, _finish_checkpoint))  # type: ignore[no-any-return]

    def submit_item(self, batch_fn: BatchFn, item: Any) -> None:
        """Apply `batch_fn` to `item` (together with like items submitted meanwhile)
        inside a committed transaction; raise if it was not committed."""
        self._wait((batch_fn, item))

    def submit_gathered(self, batch_fn: BatchFn, item: Any) -> None:
        """`submit_item`, but the items submitted by greenlets that run in the same pass
        of the event loop reach the writer together, so they share one transaction: the
        results of a batch of deliveries, answered at once, cost one commit. (The
        writer thread could otherwise take the first before the others are submitted.)"""
        if self._stopping:
            raise self._stopped()
        result: AsyncResult = AsyncResult()
        first = not self._gathered
        self._gathered.append(((batch_fn, item), result))
        if first:
            # The first submitter hands the group over itself, after one pass of the
            # loop (`sleep(0)` resumes it after the callbacks already queued: those
            # wake the other greenlets). Not from a loop callback: waking the thread
            # takes its Event's lock, a gevent lock the thread may hold at that moment,
            # and a callback cannot wait for it (BlockingSwitchOutError: the group
            # would sit in `_pending` with the thread asleep, its rows left owned).
            # If this greenlet is killed meanwhile, the others are still handed over.
            try:
                gevent.sleep(0)
            finally:
                self._hand_gathered()
        result.get()

    def _hand_gathered(self) -> None:
        """In a greenlet (waking the thread may wait): the gathered group, to the thread."""
        gathered, self._gathered = self._gathered, []
        if self._stopping:  # the thread may have ended: it would never answer
            for _, result in gathered:
                result.set_exception(self._stopped())
            return
        for _ in gathered:
            self.progress.begin()
        self._pending.extend(gathered)  # at once: the writer takes them in one batch
        if not self._work_ready.is_set():
            self._work_ready.set()

    def _process(self, units: list[Any]) -> list[Any]:
        """A checkpoint first, outside any transaction (`finish_checkpoint`); then one
        transaction for every other unit."""
        alone = [unit[1] is _finish_checkpoint for unit in units]
        if not any(alone):
            return self._commit(units)
        checkpointed = _captured(_finish_checkpoint, self._connection)
        work = [unit for unit, checkpoint in zip(units, alone, strict=True) if not checkpoint]
        outcomes = iter(self._commit(work) if work else [])
        return [checkpointed if checkpoint else next(outcomes) for checkpoint in alone]

    def _commit(self, units: list[tuple[BatchFn | None, Any]]) -> list[Any]:
        """One transaction for the whole batch. Like items go through their batch
        function together; if that fails, each is retried alone under a savepoint, so
        one bad unit never spoils the others. If the transaction itself is lost (SQLite
        rolled it back, or COMMIT failed), every unit gets the error: none is stored."""
        connection = self._connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except apsw.Error as error:
            return [error] * len(units)
        try:
            outcomes = self._apply(units)
            connection.execute("COMMIT")
        except _TransactionLost as lost:
            return [lost.error] * len(units)
        except apsw.Error as error:
            if not connection.get_autocommit():
                connection.execute("ROLLBACK")
            return [error] * len(units)
        self.commits += 1
        return outcomes

    def _apply(self, units: list[tuple[BatchFn | None, Any]]) -> list[Any]:
        connection = self._connection
        outcomes: list[Any] = [None] * len(units)
        groups: dict[int, list[int]] = {}
        for index, (batch_fn, _) in enumerate(units):
            groups.setdefault(id(batch_fn) if batch_fn else -index - 1, []).append(index)
        for indexes in groups.values():
            batch_fn = units[indexes[0]][0]
            if batch_fn is not None:
                items = [units[i][1] for i in indexes]
                if _savepoint(connection, partial(batch_fn, connection, items)) is None:
                    continue
            for index in indexes:
                fn, payload = units[index]
                work = partial(fn, connection, [payload]) if fn else partial(payload, connection)
                outcomes[index] = _savepoint(connection, work, keep_result=fn is None)
        return outcomes


class ThreadReader(_ThreadLoop):
    """Reads that move much data (message bodies) run on a thread of their own, with a
    connection of their own, so copying blobs never holds up the event loop. The reads
    that arrive while the thread is busy run together, in one read transaction: fifty
    deliveries starting at once cost one hand-off and one look at the WAL, not fifty."""

    def __init__(self, path: str, *, clock: Clock = time.monotonic) -> None:
        super().__init__(connect(path), clock)

    def run(self, work: Callable[[apsw.Connection], T]) -> T:
        """`work(connection)` on the thread; what it raises is raised here."""
        return self._wait((False, work))  # type: ignore[no-any-return]

    def checkpoint(self, *, truncate: bool = False) -> tuple[int, int]:
        """Copy committed WAL frames into the database without blocking writers, so the
        committing thread never pays for a checkpoint (nor the client for its fsync):
        frames in the WAL, frames copied. Run outside any read transaction: an open one
        would pin this connection's read snapshot (the checkpoint could not pass it,
        and later reads would not see new messages).

        `truncate`: copy everything and cut the WAL file to nothing (waits, up to the
        busy timeout, for writers and old readers): gives a full disk its WAL back."""
        mode = apsw.SQLITE_CHECKPOINT_TRUNCATE if truncate else apsw.SQLITE_CHECKPOINT_PASSIVE
        return self._wait(  # type: ignore[no-any-return]
            (True, lambda connection: connection.wal_checkpoint(mode=mode))
        )

    def close(self) -> None:
        self.stop(timeout=5.0)

    def _process(self, units: list[Any]) -> list[Any]:
        """Reads in one transaction (one snapshot); a unit that must run alone (a
        checkpoint) after it, outside."""
        connection = self._connection
        reads = [work for alone, work in units if not alone]
        outcomes = iter(self._read_together(reads) if reads else [])
        return [_captured(work, connection) if alone else next(outcomes) for alone, work in units]

    def _read_together(self, reads: list[Work]) -> list[Any]:
        connection = self._connection
        try:
            connection.execute("BEGIN")
        except apsw.Error as error:
            return [error] * len(reads)
        try:
            return [_captured(work, connection) for work in reads]
        finally:
            if not connection.get_autocommit():
                _end_read(connection)


def _close(connection: apsw.Connection) -> None:
    try:
        connection.close()
    except apsw.Error as error:
        raise DatabaseError(f"closing the spool: {error}") from None


def _end_read(connection: apsw.Connection) -> None:
    """End a read transaction: nothing was written, so COMMIT only lets the snapshot
    go; if even that fails, ROLLBACK does (a snapshot kept would hide new messages)."""
    try:
        connection.execute("COMMIT")
    except apsw.Error:
        with contextlib.suppress(apsw.Error):
            connection.execute("ROLLBACK")


def _finish_checkpoint(connection: apsw.Connection) -> tuple[int, int]:
    """The writer's checkpoint (GroupCommitter.finish_checkpoint). PASSIVE: it waits for
    no reader and no writer, and copies the frames that no reader still needs."""
    result: tuple[int, int] = connection.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    return result


def _captured(work: Work, connection: apsw.Connection) -> Any:
    """What `work` returned, or the exception it raised (as a value, to raise in the
    submitter)."""
    try:
        return work(connection)
    except Exception as error:
        return error


def _savepoint(
    connection: apsw.Connection, work: Callable[[], Any], keep_result: bool = False
) -> Any:
    """Run `work` under a savepoint: its result (or None), or the exception it raised,
    with its changes undone. Raises _TransactionLost if SQLite rolled back the whole
    transaction while `work` ran: then there is no savepoint left to return to."""
    connection.execute("SAVEPOINT unit")
    try:
        result = work()
    except Exception as error:
        if connection.get_autocommit():
            raise _TransactionLost(error) from None
        connection.execute("ROLLBACK TO unit")
        connection.execute("RELEASE unit")
        return error
    if connection.get_autocommit():
        raise _TransactionLost(DatabaseError("the transaction ended inside a unit of work"))
    connection.execute("RELEASE unit")
    return result if keep_result else None
