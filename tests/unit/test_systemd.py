"""sd_notify messages reach a datagram socket bound by the test (a path and an abstract
name); the watchdog pings only while the supervisor says every component is alive."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from gsmtp import db
from gsmtp.supervision import Supervisor
from gsmtp.systemd import NodeNotifier, SystemdNotifier, listen_fds
from gsmtp.workers import NodeHealth, WorkerState
from gsmtp.writer import GroupCommitter
from tests.unit.test_supervision import FakeClock


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A NOTIFY_SOCKET in the abstract namespace ("@name")."""
    name = f"@gsmtp-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.settimeout(5)
    yield sock, name
    sock.close()


def messages(sock: socket.socket) -> list[str]:
    """Every datagram waiting, without blocking."""
    found = []
    sock.setblocking(False)
    try:
        while True:
            found.append(sock.recv(4096).decode())
    except BlockingIOError:
        return found
    finally:
        sock.settimeout(5)


def test_each_message_is_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, name = receiver
    notifier = SystemdNotifier(name, clock_usec=lambda: 123456)
    assert notifier.ready("2 connections open")
    assert notifier.reloading()
    assert notifier.status("busy")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert messages(sock) == [
        "READY=1\nSTATUS=2 connections open",
        "RELOADING=1\nMONOTONIC_USEC=123456",
        "STATUS=busy",
        "WATCHDOG=1",
        "STOPPING=1",
    ]
    notifier.close()


def test_a_socket_path_works_too() -> None:
    directory = tempfile.mkdtemp(prefix="gsmtp-", dir="/tmp")  # sun_path is 108 bytes
    path = str(Path(directory) / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        assert SystemdNotifier(path).ready()
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert notifier.watchdog_interval is None


def test_gone_systemd_is_not_an_error() -> None:
    assert not SystemdNotifier("@gsmtp-test-nobody-listens-here").ready()


def test_the_watchdog_is_for_this_process_only() -> None:
    own = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environment(own).watchdog_interval == 15.0
    assert SystemdNotifier.from_environment({**own, "WATCHDOG_PID": "1"}).watchdog_interval is None
    without_pid = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000"}
    assert SystemdNotifier.from_environment(without_pid).watchdog_seconds == 2.0
    assert SystemdNotifier.from_environment({**own, "WATCHDOG_USEC": "x"}).watchdog_interval is None


def test_the_watchdog_loop_pings_every_half_period(receiver: tuple[socket.socket, str]) -> None:
    sock, name = receiver
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise gevent.GreenletExit

    notifier = SystemdNotifier(name, watchdog_usec=4_000_000, sleep=sleep)
    with pytest.raises(gevent.GreenletExit):
        notifier.run_watchdog(lambda: None)
    assert sleeps == [2.0, 2.0, 2.0]
    assert messages(sock) == ["WATCHDOG=1"] * 3


def test_no_ping_while_the_writer_is_blocked(
    receiver: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """The writer's thread is really blocked by an outside BEGIN EXCLUSIVE with work
    pending; past the watchdog's period without progress the pings stop, and come back
    once it commits again."""
    sock, name = receiver
    clock = FakeClock()
    path = str(tmp_path / "spool.sqlite")
    writer = GroupCommitter(path, clock=clock)
    supervisor = Supervisor(clock=clock)
    supervisor.watch_progress("writer", writer.progress)
    notifier = SystemdNotifier(name, watchdog_usec=10_000_000)

    def alive() -> str | None:
        return supervisor.liveness(stall_limit=10)

    assert notifier.watchdog_tick(alive)
    blocker = db.connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    waiting = gevent.spawn(writer.submit, lambda c: c.execute("DELETE FROM domains"))
    gevent.sleep(0)
    clock.now += 9
    assert notifier.watchdog_tick(alive), "not stalled yet"
    clock.now += 2
    assert alive() == "writer: no progress for 11s with 1 request(s) pending"
    assert not notifier.watchdog_tick(alive)
    assert not notifier.watchdog_tick(alive)
    assert supervisor.death is None  # the watchdog stops before the supervisor kills
    blocker.execute("ROLLBACK")
    waiting.get(timeout=10)
    assert notifier.watchdog_tick(alive)
    assert messages(sock) == ["WATCHDOG=1"] * 3
    assert writer.stop(timeout=10)


def test_a_dead_component_stops_the_pings() -> None:
    supervisor = Supervisor()

    def broken() -> None:
        raise RuntimeError("boom")

    supervisor.spawn("queue_runner", broken)
    gevent.sleep(0.01)
    assert supervisor.liveness(stall_limit=10) == "queue_runner died: RuntimeError: boom"


def test_sockets_passed_to_another_process_are_left_alone() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(environ) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds({}) == []


def _node(
    *alive: str | None, ready: bool = True, reloading: bool = False, stopping: bool = False
) -> NodeHealth:
    """Two workers with 1 and 2 connections and 3 and 4 queued; `alive`: each one's
    problem (None: alive)."""
    workers = tuple(
        WorkerState(i, 100 + i, ready, ready and p is None, {"connections": i + 1}, p)
        for i, p in enumerate(alive)
    )
    return NodeHealth(
        ready=all(w.ready for w in workers),
        alive=all(w.alive for w in workers),
        status={"connections": 3, "queued": 7},
        workers=workers,
        reloading=reloading,
        stopping=stopping,
    )


def test_the_node_notifier_speaks_for_every_worker(receiver: tuple[socket.socket, str]) -> None:
    """The supervisor's messages: nothing until every worker is ready, READY=1 with the
    summed STATUS=, RELOADING=1 then READY=1 once the reload is confirmed, WATCHDOG=1
    only while every worker reports its components alive, STOPPING=1 and then silence."""
    sock, name = receiver
    clock = FakeClock()
    node = NodeNotifier(
        SystemdNotifier(name, watchdog_usec=2_000_000, clock_usec=lambda: 42), clock=clock
    )
    node.update(_node(None, None, ready=False))
    assert messages(sock) == []
    node.update(_node(None, None))
    assert messages(sock) == ["READY=1\nSTATUS=3 connections open, 7 recipients queued"]
    node.update(_node(None, None))
    assert messages(sock) == ["WATCHDOG=1"]
    clock.now += 0.5
    node.update(_node(None, None))
    assert messages(sock) == []  # the next ping is due after 1 s (WatchdogSec= / 2)
    clock.now += 1.0
    node.update(_node(None, "writer: no progress for 3s with 1 request(s) pending"))
    assert messages(sock) == []  # withheld: worker 1's writer is stuck
    clock.now += 1.0
    node.update(_node(None, None, reloading=True))
    assert messages(sock) == ["RELOADING=1\nMONOTONIC_USEC=42", "WATCHDOG=1"]
    node.update(_node(None, None, reloading=True))
    assert messages(sock) == []
    node.update(_node(None, None))
    assert messages(sock) == ["READY=1\nSTATUS=3 connections open, 7 recipients queued"]
    node.update(_node(None, None, stopping=True))
    node.update(_node(None, None, stopping=True))
    clock.now += 5.0
    node.update(_node(None, None))
    assert messages(sock) == ["STOPPING=1"]


def test_node_liveness_names_the_worker_and_its_problem() -> None:
    assert _node(None, None).liveness() is None
    assert _node(None, "queue died: boom").liveness() == "worker 1: queue died: boom"
