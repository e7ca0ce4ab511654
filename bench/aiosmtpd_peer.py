"""aiosmtpd as a benchmark peer: `--store sqlite` commits each message to SQLite (WAL,
synchronous=FULL, group commit from a writer thread) before answering 250, the way a
careful asyncio MTA would; `--store none` discards.

    python -m bench.aiosmtpd_peer --listen 127.0.0.1:2800 --store sqlite --db /tmp/x.sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import threading
from typing import Any

from aiosmtpd.smtp import SMTP


class DiscardHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"


class SqliteHandler:
    """Group commit: messages that arrive while a commit runs share the next one."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS mail(sender TEXT, rcpts TEXT, body BLOB)")
        self._pending: list[tuple[tuple[str, str, bytes], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._lock = threading.Lock()
        self._task = asyncio.get_event_loop().create_task(self._writer())

    def _commit(self, rows: list[tuple[str, str, bytes]]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO mail VALUES (?, ?, ?)", rows)
        self._db.execute("COMMIT")

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await loop.run_in_executor(None, self._commit, [row for row, _ in batch])
                except Exception as error:
                    for _, future in batch:
                        future.set_exception(error)
                    continue
                for _, future in batch:
                    future.set_result(None)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(
            ((envelope.mail_from, ",".join(envelope.rcpt_tos), envelope.original_content), future)
        )
        self._wake.set()
        try:
            await future
        except Exception:
            return "451 4.3.0 Storage error"
        return "250 2.0.0 Ok"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--store", choices=("sqlite", "none"), default="none")
    parser.add_argument("--db", default="")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = SqliteHandler(args.db) if args.store == "sqlite" else DiscardHandler()
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, hostname="aiosmtpd.bench", data_size_limit=None),
            host=host,
            port=int(port),
            backlog=1024,
        )
    )
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
