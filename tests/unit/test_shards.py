"""Spool shards (server.workers): names, discovery, adoption of an orphan; the pipe
between a worker and its supervisor; node-wide limits divided among workers."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

from gsmtp import db, lockfile, shards, workers
from gsmtp.config import Config, ServerConfig, split_limits, worker_count
from gsmtp.worker_link import ALIVE, READY, Lines, Report, Reporter, Role
from gsmtp.workers import NodeHealth, Workers


def put(connection: apsw.Connection, message_id: str, *, received_at: float = 1.0) -> None:
    """A queued message with one recipient and one body part."""
    connection.execute(
        "INSERT INTO messages(id, sender, body, size, received_at, client, helo, parts)"
        " VALUES (?, 's@x.example', x'00', 1, ?, '192.0.2.1', 'c', 1)",
        (message_id, received_at),
    )
    connection.execute(
        "INSERT INTO recipients(message_id, address, status, next_attempt_at)"
        " VALUES (?, 'r@y.example', 'queued', 5)",
        (message_id,),
    )
    connection.execute(
        "INSERT INTO body_parts(message_id, seq, data) VALUES (?, 0, x'01')", (message_id,)
    )


def ids(connection: apsw.Connection, table: str = "messages") -> list[str]:
    column = "id" if table == "messages" else "message_id"
    return sorted(row[0] for row in connection.execute(f"SELECT {column} FROM {table}"))


def test_shard_names_and_discovery(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool.sqlite")
    assert shards.shard_path(spool, 0) == spool
    assert shards.shard_path(spool, 3) == str(tmp_path / "spool-3.sqlite")
    for name in ("spool-1.sqlite", "spool-12.sqlite", "spool-1.sqlite-wal", "spool-0.sqlite",
                 "spool-x.sqlite", "other-2.sqlite", "spool-2.sqlite.lock"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    found = shards.existing(spool)
    assert found == [
        (0, spool),
        (1, f"{tmp_path}/spool-1.sqlite"),
        (12, f"{tmp_path}/spool-12.sqlite"),
    ]
    # Down to 2 workers: shard 12 has none; worker 12 mod 2 = 0 adopts it.
    assert shards.orphans(spool, 0, 2) == [f"{tmp_path}/spool-12.sqlite"]
    assert shards.orphans(spool, 1, 2) == []
    assert shards.orphans(spool, 0, 1) == [
        f"{tmp_path}/spool-1.sqlite",
        f"{tmp_path}/spool-12.sqlite",
    ]


def test_adoption_moves_every_row_and_a_repeat_after_a_crash_moves_nothing_twice(
    tmp_path: Path,
) -> None:
    ours = db.connect(str(tmp_path / "spool.sqlite"))
    orphan_path = str(tmp_path / "spool-1.sqlite")
    orphan = db.connect(orphan_path)
    put(ours, "A")
    put(orphan, "B")
    put(orphan, "C")
    orphan.close()
    assert shards.adopt(ours, orphan_path).messages == 2
    assert ids(ours) == ["A", "B", "C"] and ids(ours, "recipients") == ["A", "B", "C"]
    assert ids(ours, "body_parts") == ["A", "B", "C"]
    orphan = db.connect(orphan_path)
    assert ids(orphan) == [] and ids(orphan, "recipients") == ids(orphan, "body_parts") == []
    # As if the process died after the first commit: C is still in the orphan too.
    put(orphan, "C")
    orphan.close()
    shards.adopt(ours, orphan_path)
    assert ids(ours) == ["A", "B", "C"] and ids(ours, "recipients") == ["A", "B", "C"]
    shards.remove(orphan_path)
    assert not any(p.name.startswith("spool-1.sqlite") for p in tmp_path.iterdir())


def test_an_id_naming_another_message_is_never_overwritten(tmp_path: Path) -> None:
    ours = db.connect(str(tmp_path / "spool.sqlite"))
    orphan_path = str(tmp_path / "spool-1.sqlite")
    orphan = db.connect(orphan_path)
    put(ours, "A", received_at=1.0)
    put(orphan, "A", received_at=2.0)
    orphan.close()
    with pytest.raises(shards.AdoptionRefused, match="'A'"):
        shards.adopt(ours, orphan_path)
    assert ids(db.connect(orphan_path)) == ["A"]  # left as it was


def test_reports_cross_the_pipe_whole(tmp_path: Path) -> None:
    read, write = os.pipe()
    reporter = Reporter(write)
    assert reporter.send(READY) and reporter.send(ALIVE, {"connections": 3})
    assert reporter.send(ALIVE, {"queued": 2}, "writer: no progress for 9s")
    data = os.read(read, 4096)
    lines = Lines()
    # Split anywhere: a report is taken only once its line is complete.
    assert lines.feed(data[:5]) == []
    assert lines.feed(data[5:] + b"garbage\n") == [
        Report(READY, {}),
        Report(ALIVE, {"connections": 3}),
        Report(ALIVE, {"queued": 2}, "writer: no progress for 9s"),
    ]
    os.close(read)
    assert not reporter.send(ALIVE)  # the supervisor is gone
    assert reporter.closed


def test_node_wide_limits_are_divided_rounded_up() -> None:
    config = Config(server=ServerConfig(max_connections=10, auth_failure_limit=10))
    one = split_limits(config, 3)
    assert one.server.max_connections == 4  # 10 / 3 rounded up
    assert one.server.max_connection_rate == 0  # 0 = no limit stays so
    assert one.server.max_data_memory == -(-config.server.max_data_memory // 3)
    assert one.delivery.concurrency == 34 and one.delivery.max_per_domain == 7
    assert one.delivery.active_limit == 3334
    assert one.server.auth_failure_limit == 4
    assert (
        split_limits(Config(server=ServerConfig(max_connections=2)), 3).server.max_connections == 1
    )
    # Per message and per session limits are not divided.
    assert one.server.max_message_size == config.server.max_message_size
    assert one.server.max_recipients == config.server.max_recipients
    assert split_limits(config, 1) == config
    assert dataclasses.replace(one, server=config.server, delivery=config.delivery) == config


def test_per_client_network_limits_are_whole_in_every_worker() -> None:
    """The kernel spreads one client's connections unevenly: a divided per-network
    limit refused it far below the configured one. Each worker enforces the whole
    limit (the node allows that network between the limit and workers x the limit)."""
    config = Config(server=ServerConfig(max_connections_per_ip=50, max_connection_rate=30))
    one = split_limits(config, 2)
    assert one.server.max_connections_per_ip == 50
    assert one.server.max_connection_rate == 30


def test_auto_workers_counts_the_cpus_this_process_may_use() -> None:
    """`workers = "auto"` under taskset/CPUAffinity=/a cpuset: one worker per CPU allowed,
    not per CPU of the machine."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from gsmtp.config import Config, worker_count; print(worker_count(Config()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "1"
    assert worker_count(Config()) == len(os.sched_getaffinity(0))
    assert worker_count(Config(server=ServerConfig(workers=3))) == 3


def _fake_worker(config: Config, role: Role) -> int:
    """A worker that only speaks on its pipe: ready, then alive with a count, until
    SIGTERM (in a forked child of the test process)."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    assert role.report is not None
    reporter = Reporter(role.report)
    reporter.send(READY)
    while not stopping:
        reporter.send(ALIVE, {"connections": role.index + 1})
        time.sleep(0.05)
    return 0


def run_two_workers(
    tmp_path: Path,
    run_worker: Callable[[Config, Role], int],
    on_health: Callable[[NodeHealth], None],
) -> int:
    """A supervisor of two workers run by `run_worker`, holding the node's lock in
    `tmp_path`, until `on_health` stops it: its exit status."""
    lock = lockfile.acquire(str(tmp_path / "spool.sqlite.lock"))
    assert isinstance(lock, lockfile.InstanceLock)
    node = Workers(Config(), 2, {}, lock, str(tmp_path), run_worker=run_worker, on_health=on_health)
    try:
        return node.run()
    finally:
        lock.release()


def _starting_worker(config: Config, role: Role) -> int:
    """A worker still starting: it has installed no handler yet and never gets ready."""
    time.sleep(60)
    return 0


def test_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM before the workers are ready (their handlers not in yet): each dies of
    the forwarded SIGTERM at once, having accepted nothing. A clean stop: exit 0."""
    sent: list[int] = []

    def on_health(health: NodeHealth) -> None:
        if not sent and all(w.pid is not None for w in health.workers):
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_two_workers(tmp_path, _starting_worker, on_health) == 0


def test_how_a_worker_ended_during_the_stop_decides_the_exit_status() -> None:
    clean = workers._stopped_cleanly
    assert clean(0, ready=True, killed=False)
    assert clean(-signal.SIGTERM, ready=False, killed=False)  # still starting
    assert clean(-signal.SIGKILL, ready=True, killed=False)  # killed by someone else
    assert not clean(-signal.SIGKILL, ready=True, killed=True)  # we SIGKILLed it: too slow
    assert not clean(-signal.SIGKILL, ready=False, killed=True)
    assert not clean(-signal.SIGTERM, ready=True, killed=False)  # a ready worker handles it
    assert not clean(70, ready=True, killed=False)  # a component died during the stop
    assert not clean(1, ready=False, killed=False)
    assert not clean(-signal.SIGSEGV, ready=True, killed=False)


def test_the_node_is_ready_and_alive_when_every_worker_is(tmp_path: Path) -> None:
    """`Workers.on_health` (what a systemd notifier reads): ready once every worker
    said so, alive while every worker reports, counts summed; SIGTERM ends the node."""
    seen: list[NodeHealth] = []
    deadline = time.monotonic() + 20

    def on_health(health: NodeHealth) -> None:
        seen.append(health)
        done = health.alive and health.status.get("connections") == 1 + 2
        if done or time.monotonic() > deadline:  # the assertions below then tell
            os.kill(os.getpid(), signal.SIGTERM)  # to the supervisor: stop the node

    assert run_two_workers(tmp_path, _fake_worker, on_health) == 0
    final = seen[-1]
    assert final.ready and final.alive and final.status == {"connections": 3}
    assert [w.index for w in final.workers] == [0, 1]
