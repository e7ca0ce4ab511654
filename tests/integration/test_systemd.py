"""A real gsmtp under a pretend systemd: sd_notify datagrams on a NOTIFY_SOCKET the test
binds (READY after the listeners are bound, RELOADING/READY around SIGHUP, STOPPING,
STATUS, WATCHDOG only while the writer makes progress), socket activation from a
listening socket passed as fd 3 with LISTEN_FDS/LISTEN_PID; the same with two workers,
where the supervisor speaks for the node."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gsmtp import db
from gsmtp.workers import TICK_SECONDS
from tests.integration.conftest import Factory
from tests.integration.harness import (
    REPOSITORY,
    GsmtpProcess,
    SmtpWire,
    free_port,
    wait_for,
)

TWO_WORKERS = {"server": {"workers": 2}}


class Receiver:
    """NOTIFY_SOCKET in the abstract namespace; a thread records each datagram with the
    monotonic time it arrived; `on_message`, if set, runs in that thread as each arrives
    (to see what the server had logged by then)."""

    def __init__(self) -> None:
        self.on_message: Callable[[str], None] | None = None
        self.name = f"@gsmtp-notify-{os.getpid()}-{id(self)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(b"\0" + self.name[1:].encode())
        self._sock.settimeout(0.1)
        self.received: list[tuple[float, str]] = []
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if self.on_message is not None:
                self.on_message(data.decode())
            self.received.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        return [text for _, text in self.received]

    def first(self, prefix: str, after: int = 0) -> int:
        """Wait for a message starting with `prefix` at index >= after; its index."""

        def found() -> int | None:
            for index, text in enumerate(self.messages()[after:], after):
                if text.startswith(prefix):
                    return index + 1  # 0 would read as "not yet"
            return None

        return int(wait_for(found, timeout=20, what=f"{prefix} on NOTIFY_SOCKET")) - 1

    def close(self) -> None:
        self._running = False
        self._thread.join()
        self._sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def test_ready_reloading_status_watchdog_and_stopping(
    gsmtp_factory: Factory, receiver: Receiver
) -> None:
    gsmtp = gsmtp_factory(start=False)
    gsmtp.env = {"NOTIFY_SOCKET": receiver.name, "WATCHDOG_USEC": "400000"}
    gsmtp.start()
    ready = receiver.first("READY=1")
    # Sent once the listeners were bound and the spool open: before it, nothing else.
    assert receiver.messages()[:ready] == []
    assert receiver.messages()[ready] == "READY=1\nSTATUS=0 connections open, 0 recipients queued"
    receiver.first("WATCHDOG=1", after=ready)

    gsmtp.signal(signal.SIGHUP)
    reloading = receiver.first("RELOADING=1", after=ready + 1)
    lines = receiver.messages()[reloading].split("\n")
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert receiver.messages()[receiver.first("READY=1", after=reloading)].startswith(
        "READY=1\nSTATUS="
    )
    wait_for(lambda: gsmtp.events("config_reloaded"), what="the reload")

    with SmtpWire(gsmtp.port) as wire:  # the periodic STATUS= counts connections
        wire.read_reply()
        receiver.first("STATUS=1 connections open", after=reloading)

    gsmtp.stop()
    stopping = receiver.first("STOPPING=1", after=reloading)
    assert all(not text.startswith("READY") for text in receiver.messages()[stopping:])


def test_watchdog_pings_stop_while_the_writer_is_blocked(
    gsmtp_factory: Factory, receiver: Receiver
) -> None:
    """An outside BEGIN EXCLUSIVE blocks the writer with a message to commit: no
    WATCHDOG=1 from when it has made no progress for WatchdogSec= until it can commit
    again (its busy timeout runs out and the client gets a 451)."""
    gsmtp = gsmtp_factory(start=False)
    gsmtp.env = {"NOTIFY_SOCKET": receiver.name, "WATCHDOG_USEC": "1000000"}
    gsmtp.start()
    receiver.first("WATCHDOG=1")
    blocker = db.connect(str(gsmtp.spool_path))
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with SmtpWire(gsmtp.port, timeout=30) as wire:
            wire.read_reply()
            for command in (
                b"EHLO c.example",
                b"MAIL FROM:<a@c.example>",
                b"RCPT TO:<jones@foo.com>",
            ):
                wire.send(command + b"\r\n")
                wire.read_reply()
            wire.send(b"DATA\r\n")
            assert wire.read_reply()[0].startswith("354")
            wire.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
            (withheld,) = wait_for(lambda: gsmtp.events("watchdog_withheld"), timeout=20)
            assert withheld["reason"].startswith("writer: no progress for")
            assert wire.read_reply()[0].startswith("451")  # the writer's busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: gsmtp.events("watchdog_resumed"), timeout=20, what="pings again")
    receiver.first("WATCHDOG=1", after=len(receiver.messages()))
    pings = [at for at, text in receiver.received if text == "WATCHDOG=1"]
    longest = max(later - earlier for earlier, later in itertools.pairwise(pings))
    assert longest > 2.0, "the pings (every 0.5 s) paused while the writer was stuck"


def test_socket_activation_serves_on_the_inherited_socket(gsmtp_factory: Factory) -> None:
    """The test binds and listens (as systemd does for gsmtp.socket) and connects before
    gsmtp even runs: that connection is served, so nothing was refused meanwhile. gsmtp
    cannot have bound the address itself: it is taken by the test's socket."""
    gsmtp = gsmtp_factory(start=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", gsmtp.port))
    listener.listen(16)
    gsmtp.listen_socket = listener
    early = SmtpWire(gsmtp.port)  # in the backlog of the passed socket
    try:
        gsmtp.start()
        assert early.read_reply()[0].startswith("220")
        (started,) = gsmtp.events("listener_started")
        assert started["inherited"] is True
        assert not os.environ.get("LISTEN_FDS")
    finally:
        early.sock.close()
        listener.close()


def test_an_inherited_socket_for_no_configured_address_is_closed(
    gsmtp_factory: Factory,
) -> None:
    gsmtp = gsmtp_factory(start=False)
    stray = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stray.bind(("127.0.0.1", free_port()))
    stray.listen(1)
    gsmtp.listen_socket = stray
    try:
        gsmtp.start()  # binds its own listener
        (unused,) = gsmtp.events("inherited_socket_unused")
        assert unused["level"] == "warning"
        (started,) = gsmtp.events("listener_started")
        assert started["inherited"] is False
    finally:
        stray.close()


UNITS = [REPOSITORY / "systemd" / "gsmtp.service", REPOSITORY / "systemd" / "gsmtp.socket"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks the directives; ExecStart's binary must exist,
    so the units are checked as copies pointing at a file that does."""
    fake = tmp_path / "gsmtp"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for unit in UNITS:
        text = unit.read_text().replace("/opt/gsmtp/bin/gsmtp", str(fake))
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / unit.name) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # A directive it cannot parse is only a warning ("Failed to parse …, ignoring"),
    # so any line about the units counts, not just the exit status.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "gsmtp" in line]
    assert result.returncode == 0 and problems == [], "\n".join(problems)


# -- several workers: the supervisor is the unit's main process --------------------------


def _connections_on_both_workers(gsmtp: GsmtpProcess) -> list[SmtpWire]:
    """Connections (each from its own 127.0.1.x, so the log tells which worker took it)
    until both workers hold at least one; all left open."""
    wires: list[SmtpWire] = []
    for number in range(1, 41):
        wire = SmtpWire(gsmtp.port, source=f"127.0.1.{number}")
        wire.read_reply()
        wires.append(wire)
        wait_for(
            lambda n=number: gsmtp.events("connection_opened", peer=f"127.0.1.{n}"),
            what="the connection in the log",
        )
        mine = [e for e in gsmtp.events("connection_opened") if e["peer"].startswith("127.0.1.")]
        workers = {event["worker"] for event in mine}
        if workers == {0, 1}:
            return wires
    raise AssertionError("40 connections, all taken by one worker")


def test_two_workers_ready_status_reloading_and_stopping(
    gsmtp_factory: Factory, receiver: Receiver
) -> None:
    """The supervisor sends READY=1 once both workers bound their listeners and opened
    their shards (their `server_started` lines are logged before it arrives), STATUS=
    with both workers' connections summed, RELOADING=1 at SIGHUP and READY=1 only once
    both workers reloaded (worker 1 is stopped meanwhile), STOPPING=1 at SIGTERM; the
    workers themselves send nothing."""
    gsmtp = gsmtp_factory(TWO_WORKERS, start=False)
    gsmtp.env = {"NOTIFY_SOCKET": receiver.name}
    logged_at: dict[str, list[dict[str, object]]] = {}

    def snapshot(text: str) -> None:
        if text.startswith("READY=1"):
            event = "config_reloaded" if "READY=1" in logged_at else "server_started"
            logged_at.setdefault("READY=1", []).append({})
            logged_at[event] = gsmtp.events(event)

    receiver.on_message = snapshot
    gsmtp.start()
    ready = receiver.first("READY=1")
    assert receiver.messages()[:ready] == []
    assert receiver.messages()[ready] == "READY=1\nSTATUS=0 connections open, 0 recipients queued"
    assert sorted(event["worker"] for event in logged_at["server_started"]) == [0, 1]

    wires = _connections_on_both_workers(gsmtp)
    try:  # neither worker alone holds them all: the count is the sum
        receiver.first(f"STATUS={len(wires)} connections open, 0 recipients queued")
    finally:
        for wire in wires:
            wire.sock.close()
    after = receiver.first("STATUS=0 connections open", after=ready + 1)

    # Worker 1 is held still: worker 0 reloads, and the node stays "reloading" (no
    # READY=1 over two turns of the supervisor's loop) until worker 1 has reloaded too.
    (slow,) = gsmtp.events("worker_started", worker=1)
    os.kill(slow["pid"], signal.SIGSTOP)
    try:
        gsmtp.signal(signal.SIGHUP)
        reloading = receiver.first("RELOADING=1", after=after)
        assert receiver.messages()[reloading].split("\n")[1].startswith("MONOTONIC_USEC=")
        wait_for(lambda: gsmtp.events("config_reloaded", worker=0), what="worker 0's reload")
        time.sleep(2 * TICK_SECONDS)  # what must not happen: READY=1 meanwhile
        assert not any(t.startswith("READY") for t in receiver.messages()[reloading:])
    finally:
        os.kill(slow["pid"], signal.SIGCONT)
    reloaded = receiver.first("READY=1", after=reloading)
    assert sorted(event["worker"] for event in logged_at["config_reloaded"]) == [0, 1]

    gsmtp.stop()
    stopping = receiver.first("STOPPING=1", after=reloaded)
    assert all(not text.startswith("READY") for text in receiver.messages()[stopping:])
    # Only the supervisor spoke: one READY=1 at start and one after the reload.
    assert [text for text in receiver.messages() if text.startswith("READY=1")] == [
        receiver.messages()[ready],
        receiver.messages()[reloaded],
    ]


def test_two_workers_watchdog_withheld_while_one_writer_is_blocked(
    gsmtp_factory: Factory, receiver: Receiver
) -> None:
    """An outside BEGIN EXCLUSIVE on shard 1 blocks worker 1's writer with a message to
    commit: the supervisor stops WATCHDOG=1 while worker 1 reports its writer stalled
    (for WatchdogSec=, 2 s), though worker 0 is fine, and resumes once it commits."""
    gsmtp = gsmtp_factory(TWO_WORKERS, start=False)
    gsmtp.env = {"NOTIFY_SOCKET": receiver.name, "WATCHDOG_USEC": "2000000"}
    gsmtp.start()
    receiver.first("WATCHDOG=1")
    wires = _connections_on_both_workers(gsmtp)
    by_peer = {e["peer"]: e["worker"] for e in gsmtp.events("connection_opened")}
    wire = next(w for w in wires if by_peer[w.sock.getsockname()[0]] == 1)
    for other in wires:
        if other is not wire:
            other.sock.close()
    shard = gsmtp.spool_path.with_name(f"{gsmtp.spool_path.stem}-1{gsmtp.spool_path.suffix}")
    blocker = db.connect(str(shard))
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        wire.sock.settimeout(30)
        for command in (b"EHLO c.example", b"MAIL FROM:<a@c.example>", b"RCPT TO:<jones@foo.com>"):
            wire.send(command + b"\r\n")
            wire.read_reply()
        wire.send(b"DATA\r\n")
        assert wire.read_reply()[0].startswith("354")
        wire.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        (withheld,) = wait_for(
            lambda: gsmtp.events("watchdog_withheld", component="systemd"), timeout=20
        )
        assert withheld["reason"].startswith("worker 1: writer: no progress for")
        assert wire.read_reply()[0].startswith("451")  # the writer's busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        wire.sock.close()
    wait_for(lambda: gsmtp.events("watchdog_resumed"), timeout=20, what="pings again")
    receiver.first("WATCHDOG=1", after=len(receiver.messages()))
    pings = [at for at, text in receiver.received if text == "WATCHDOG=1"]
    longest = max(later - earlier for earlier, later in itertools.pairwise(pings))
    assert longest > 3.0, "the pings (every 1 s) paused while worker 1's writer was stuck"


def test_two_workers_serve_through_the_socket_systemd_passed(gsmtp_factory: Factory) -> None:
    """The supervisor takes the passed socket (fd 3) for the configured address instead
    of binding it (it could not: the test's socket holds the address), and both workers
    accept on it; the connection made before gsmtp ran is served."""
    gsmtp = gsmtp_factory(TWO_WORKERS, start=False)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", gsmtp.port))
    listener.listen(16)
    gsmtp.listen_socket = listener
    early = SmtpWire(gsmtp.port)
    try:
        gsmtp.start()
        assert early.read_reply()[0].startswith("220")
        (inherited,) = gsmtp.events("listener_inherited")
        assert inherited["port"] == gsmtp.port
        assert not gsmtp.events("inherited_socket_unused")
        for wire in _connections_on_both_workers(gsmtp):
            wire.sock.close()
    finally:
        early.sock.close()
        listener.close()
