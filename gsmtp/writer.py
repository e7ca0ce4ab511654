"""The spool's write path and its bulk reader, each on a thread of its own.

`GroupCommitter` is the server's write path: callers hand it a unit of work and block
(their greenlet only) until it is committed. One worker thread owns the write connection
and runs every unit that arrived while it was busy in a single transaction, so one
fsync covers many messages under load (group commit) and the gevent hub never waits on
SQLite or the disk (apsw releases the GIL). `ThreadReader` moves message bodies off the
event loop the same way.
"""

from __future__ import annotations

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

T = TypeVar("T")

Work = Callable[[apsw.Connection], Any]
# A batch function applies many like items with few SQLite calls (executemany); the
# writer thread then needs the GIL a handful of times per batch, not per message.
BatchFn = Callable[[apsw.Connection, list[Any]], None]


class GroupCommitter:
    """Serialises write transactions onto one OS thread and batches concurrent ones.

    The thread runs its own loop: it takes everything submitted since its last commit,
    commits it as one transaction, hands the outcomes back to the event loop
    (`run_callback_threadsafe`) and at once starts on what arrived meanwhile. So the
    next commit never waits for the busy event loop to come round."""

    def __init__(self, path: str) -> None:
        self._connection = connect(path)
        self._pending: deque[tuple[BatchFn | None, Any, Any]] = deque()
        self._work_ready = get_original("threading", "Event")()
        self._loop = gevent.get_hub().loop
        self._stopping = False
        self.commits = 0  # transactions committed: fewer than units under load
        self._thread = ThreadPool(1)
        self._done = self._thread.spawn(self._run)

    def submit(self, work: Callable[[apsw.Connection], T]) -> T:
        """Run `work` inside a committed transaction; raise what it (or COMMIT) raised."""
        return self._wait(None, work)  # type: ignore[no-any-return]

    def submit_item(self, batch_fn: BatchFn, item: Any) -> None:
        """Apply `batch_fn` to `item` (together with like items submitted meanwhile)
        inside a committed transaction; raise if it was not committed."""
        self._wait(batch_fn, item)

    def _wait(self, batch_fn: BatchFn | None, payload: Any) -> Any:
        if self._stopping:
            raise DatabaseError("spool writer is stopped")
        result: AsyncResult = AsyncResult()
        self._pending.append((batch_fn, payload, result))
        if not self._work_ready.is_set():
            self._work_ready.set()
        return result.get()

    def stop(self) -> None:
        """Finish what was submitted, then close the connection."""
        self._stopping = True
        self._work_ready.set()
        self._done.get()
        self._thread.kill()
        self._connection.close()

    def _run(self) -> None:
        """The writer thread's loop (no gevent calls here but the thread-safe callback)."""
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
            outcomes = self._commit([(batch_fn, payload) for batch_fn, payload, _ in batch])
            self._loop.run_callback_threadsafe(_settle, batch, outcomes)

    def _commit(self, units: list[tuple[BatchFn | None, Any]]) -> list[Any]:
        """One transaction for the whole batch. Like items go through their batch
        function together; if that fails, each is retried alone under a savepoint, so
        one bad unit never spoils the others."""
        connection = self._connection
        outcomes: list[Any] = [None] * len(units)
        try:
            connection.execute("BEGIN IMMEDIATE")
        except apsw.Error as error:
            return [error] * len(units)
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
        try:
            connection.execute("COMMIT")
        except apsw.Error as error:
            if not connection.get_autocommit():
                connection.execute("ROLLBACK")
            return [error] * len(units)
        self.commits += 1
        return outcomes


class ThreadReader:
    """Reads that move much data (message bodies) run on a thread of their own, with a
    connection of their own, so copying blobs never holds up the event loop."""

    def __init__(self, path: str) -> None:
        self._connection = connect(path)
        self._thread = ThreadPool(1)

    def run(self, work: Callable[[apsw.Connection], T]) -> T:
        """`work(connection)` on the thread; what it raises is raised here (and not also
        printed by the thread pool)."""
        ok, value = self._thread.apply(_capture, (work, self._connection))
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def checkpoint(self) -> None:
        """Copy committed WAL frames into the database without blocking writers, so the
        committing thread never pays for a checkpoint (nor the client for its fsync).
        The API call leaves no statement open: an open one would pin this connection's
        read snapshot, and later reads on it would not see new messages."""
        self.run(lambda connection: connection.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE))

    def close(self) -> None:
        self._thread.kill()
        self._connection.close()


def _capture(
    work: Callable[[apsw.Connection], Any], connection: apsw.Connection
) -> tuple[bool, Any]:
    try:
        return True, work(connection)
    except Exception as error:
        return False, error


def _settle(batch: list[tuple[Any, Any, Any]], outcomes: list[Any]) -> None:
    """On the event loop: wake each submitter with its outcome."""
    for (_, _, result), outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            result.set_exception(outcome)
        else:
            result.set(outcome)


def _savepoint(
    connection: apsw.Connection, work: Callable[[], Any], keep_result: bool = False
) -> Any:
    """Run `work` under a savepoint: its result (or None), or the exception it raised,
    with its changes undone."""
    connection.execute("SAVEPOINT unit")
    try:
        result = work()
    except Exception as error:
        connection.execute("ROLLBACK TO unit")
        connection.execute("RELEASE unit")
        return error
    connection.execute("RELEASE unit")
    return result if keep_result else None
