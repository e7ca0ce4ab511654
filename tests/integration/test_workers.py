"""`server.workers` at its default ("auto": one worker per CPU, 2 on the test machine):
shared-nothing workers, each on its own spool shard, under one supervisor.

End to end: mail accepted by every worker is delivered; `gsmtp queue` and `spool
backup` see every shard; a worker killed with SIGKILL is restarted and every message
answered 250 is delivered; SIGTERM stops the whole group; a second `serve` names the
supervisor; a shard left without a worker is adopted; /metrics sums the workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from gsmtp.config import allowed_cpus
from tests.integration.harness import GsmtpProcess, SmtpWire, environment, free_port, wait_for
from tests.integration.remote import Sink
from tests.integration.test_reload import TRUSTED, advertised_size, relay_reply

# The default, as an operator gets it; a one-CPU machine would run one process with
# "auto", and these tests are about several.
WORKERS: Any = "auto" if (os.cpu_count() or 1) >= 2 else 2
COUNT: int = (os.cpu_count() or 1) if WORKERS == "auto" else WORKERS


def send(port: int, rcpt: str, subject: str, source: str | None = None) -> str | None:
    """One message on a connection of its own: the queue id of a 250, else None."""
    try:
        with SmtpWire(port, source=source, timeout=20) as wire:
            return _transaction(wire, rcpt, subject)
    except (OSError, AssertionError, IndexError):  # cut off: the worker was killed
        return None


def _transaction(wire: SmtpWire, rcpt: str, subject: str) -> str | None:
    if not wire.read_reply():
        return None
    wire.command("EHLO c.example")
    wire.command("MAIL FROM:<a@remote.example>")
    wire.command(f"RCPT TO:<{rcpt}>")
    wire.command("DATA")
    wire.send(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
    reply = wire.read_reply()
    return reply[0].rsplit(" ", 1)[1] if reply and reply[0].startswith("250") else None


def send_until_every_worker_queued(
    gsmtp: GsmtpProcess, rcpt: str, source: str | None = None, prefix: str = "m"
) -> list[str]:
    """Rounds of 8 connections opened together, until each worker has queued mail
    (which worker accepts a connection is the kernel's and the loops' business)."""
    ids: list[str] = []
    for round_number in range(40):
        wires = [SmtpWire(gsmtp.port, source=source) for _ in range(8)]
        try:
            for number, wire in enumerate(wires):
                queued = _transaction(wire, rcpt, f"{prefix}-{round_number}-{number}")
                assert queued is not None
                ids.append(queued)
        finally:
            for wire in wires:
                wire.close()
        if all(gsmtp.events("message_queued", worker=k) for k in range(COUNT)):
            return ids
    raise AssertionError("one worker never queued anything")


def shard(gsmtp: GsmtpProcess, index: int) -> Path:
    spool = gsmtp.spool_path
    return spool if index == 0 else spool.with_name(f"{spool.stem}-{index}{spool.suffix}")


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    connection = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return list(connection.execute(sql).fetchall())
    finally:
        connection.close()


def subjects(gsmtp: GsmtpProcess, address: str) -> list[str]:
    found = []
    for path in gsmtp.maildir_files(address):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
                break
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return "zombie"


def worker_pids(gsmtp: GsmtpProcess) -> dict[int, int]:
    """The latest PID of each worker, from the supervisor's log."""
    return {event["worker"]: event["pid"] for event in gsmtp.events("worker_started")}


def test_every_worker_accepts_and_delivers_and_the_group_stops_together(
    gsmtp_factory: Any,
) -> None:
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS}})
    pids = worker_pids(gsmtp)
    assert sorted(pids) == list(range(COUNT)) and COUNT >= 2
    ids = send_until_every_worker_queued(gsmtp, "jones@foo.com")
    wait_for(
        lambda: len(gsmtp.maildir_files("jones@foo.com")) == len(ids),
        timeout=30,
        what="every message in the Maildir",
    )
    # Each worker stored its mail in its own shard (rows are gone once delivered; the
    # files are there), and logged its number.
    for index in range(COUNT):
        assert shard(gsmtp, index).exists()
        assert all(e["worker"] == index for e in gsmtp.events("message_queued", worker=index))
    # One /metrics endpoint sums every worker's counters. The queue gauges are counted
    # about once a second, after the deliveries: waited for too (under load the gauge
    # still showed one queued recipient when the counter was already complete).
    samples = wait_for(
        lambda: (
            (m := gsmtp.metrics())['gsmtp_deliveries_total{outcome="delivered",transport="local"}']
            == len(ids)
            and m['gsmtp_queue_size{status="queued"}'] == 0
            and m
        ),
        what="deliveries counted and the queue gauge at 0",
    )
    assert samples['gsmtp_messages_received_total{outcome="queued"}'] == len(ids)
    # A second serve on the same spool names the supervisor and exits 2.
    second = subprocess.run(
        [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(gsmtp.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(),
    )
    assert second.returncode == 2
    assert f"PID {gsmtp.process.pid}" in second.stderr
    # SIGHUP reaches every worker: each reloads, and finds nothing that needs a restart
    # (its divided limits and its shard are worked out again, not taken for changes).
    gsmtp.signal(signal.SIGHUP)
    reloads = wait_for(
        lambda: len(found := gsmtp.events("config_reloaded")) == COUNT and found,
        what="every worker to reload",
    )
    assert sorted(e["worker"] for e in reloads) == list(range(COUNT))
    assert gsmtp.events("config_restart_needed") == []
    # SIGTERM to the supervisor stops every worker, then the supervisor: exit 0.
    gsmtp.signal(signal.SIGTERM)
    assert gsmtp.wait(timeout=30) == 0
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), what="the workers to end")
    assert [e["worker"] for e in gsmtp.events("worker_stopped")].count(0) == 1


def test_a_killed_worker_is_restarted_and_what_it_answered_250_is_delivered(
    gsmtp_factory: Any,
) -> None:
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS}})
    victim = worker_pids(gsmtp)[1]
    accepted: list[str] = []
    stop = threading.Event()

    def client() -> None:
        number = 0
        while not stop.is_set():
            number += 1
            subject = f"k-{threading.get_ident()}-{number}"
            if send(gsmtp.port, "brown@foo.com", subject) is not None:
                accepted.append(subject)

    senders = [threading.Thread(target=client) for _ in range(4)]
    for thread in senders:
        thread.start()
    try:
        wait_for(
            lambda: len(gsmtp.events("message_queued", worker=1)) >= 10,
            timeout=30,
            what="worker 1 to queue mail",
        )
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gsmtp.events("worker_died", worker=1), what="the supervisor to notice")
        wait_for(
            lambda: len(gsmtp.events("worker_ready", worker=1)) == 2,
            timeout=30,
            what="worker 1 restarted",
        )
        restarted = worker_pids(gsmtp)[1]
        assert restarted != victim
        wait_for(
            lambda: any(e.get("worker") == 1 for e in gsmtp.events("message_queued")[-20:]),
            timeout=30,
            what="the restarted worker to take mail",
        )
    finally:
        stop.set()
        for thread in senders:
            thread.join(timeout=60)
    assert accepted
    wait_for(
        lambda: set(accepted) <= set(subjects(gsmtp, "brown@foo.com")),
        timeout=60,
        what="every message answered 250 in the Maildir",
    )
    delivered = subjects(gsmtp, "brown@foo.com")
    duplicates = len(delivered) - len(set(delivered))
    print(f"accepted {len(accepted)}, delivered {len(delivered)}, duplicates {duplicates}")
    assert gsmtp.events("worker_died", worker=1)[0]["exit"] == "signal SIGKILL"


def test_queue_and_backup_see_every_shard_and_a_lowered_count_adopts_the_orphans(
    gsmtp_factory: Any, tmp_path: Path
) -> None:
    # Relayed through a smarthost nobody listens on: the mail stays queued.
    closed = f"127.0.0.1:{free_port()}"
    gsmtp = gsmtp_factory(
        {"server": {"workers": WORKERS}, "delivery": {"smarthost": closed, "retry": ["1h"]}}
    )
    ids = send_until_every_worker_queued(gsmtp, "x@remote.example", source="127.0.0.2")
    wait_for(
        lambda: all(
            r["last_error"]
            for m in json.loads(gsmtp.cli("queue", "list", "--json").stdout)
            for r in m["recipients"]
        ),
        timeout=30,
        what="every first attempt deferred",
    )
    by_shard = {
        index: {row[0] for row in rows(shard(gsmtp, index), "SELECT id FROM messages")}
        for index in range(COUNT)
    }
    assert all(by_shard.values()) and set().union(*by_shard.values()) == set(ids)

    stats = json.loads(gsmtp.cli("queue", "stats", "--json").stdout)
    assert stats["messages"] == len(ids) and stats["queued"] == len(ids)
    listed = {m["id"] for m in json.loads(gsmtp.cli("queue", "list", "--json").stdout)}
    assert listed == set(ids)
    in_shard_1 = sorted(by_shard[1])[0]
    assert "Subject: m-" in gsmtp.cli("queue", "show", in_shard_1).stdout
    assert gsmtp.cli("queue", "delete", in_shard_1).returncode == 0
    in_shard_0 = sorted(by_shard[0])[0]
    assert gsmtp.cli("queue", "delete", in_shard_0).returncode == 0
    left = set(ids) - {in_shard_0, in_shard_1}
    assert json.loads(gsmtp.cli("queue", "stats", "--json").stdout)["messages"] == len(left)
    flushed = json.loads(gsmtp.cli("queue", "flush", "--json").stdout)
    assert flushed["count"] == len(left)  # every shard's
    wait_for(
        lambda: all(
            r["next_attempt_at"] > time.time() + 60  # deferred again, for 1h
            for m in json.loads(gsmtp.cli("queue", "list", "--json").stdout)
            for r in m["recipients"]
        ),
        timeout=30,
        what="every worker to try its flushed mail again",
    )

    copy = tmp_path / "backup"
    printed = gsmtp.cli("spool", "backup", str(copy)).stdout
    assert printed.count("spool copied to") == COUNT
    copied = set()
    for index in range(COUNT):
        copied |= {
            row[0] for row in rows(copy / shard(gsmtp, index).name, "SELECT id FROM messages")
        }
    assert copied == left

    # Down to one worker: it adopts every other shard at start, and delivers its mail.
    gsmtp.stop()
    sink = Sink("127.0.0.3", free_port("127.0.0.3"))
    try:
        text = gsmtp.config.read_text()
        text = text.replace(f'"{closed}"', f'"127.0.0.3:{sink.controller.port}"')
        text = text.replace(f"workers = {json.dumps(WORKERS)}", "workers = 1")
        gsmtp.config.write_text(text)
        gsmtp.started_event = b'"event":"server_started"'
        gsmtp.start()
        adopted = gsmtp.events("shard_adopted")
        assert len(adopted) == COUNT - 1
        for index in range(1, COUNT):
            assert not shard(gsmtp, index).exists()
            assert not Path(f"{shard(gsmtp, index)}.reserve").exists()  # its ballast too
        assert json.loads(gsmtp.cli("queue", "stats", "--json").stdout)["messages"] == len(left)

        # The backup of the wider node in `copy` holds shard copies this spool no
        # longer has: a node restored from it would adopt them and deliver their mail
        # again. Refused, naming them; with --force they go and the set is this spool's.
        (copy / gsmtp.spool_path.name).unlink()  # so only the stale copies stand in the way
        refused = gsmtp.cli("spool", "backup", str(copy), check=False)
        assert refused.returncode != 0 and "no longer has" in refused.stderr
        assert shard(gsmtp, 1).name in refused.stderr and "Traceback" not in refused.stderr
        assert gsmtp.cli("spool", "backup", str(copy), "--force").returncode == 0
        copies = sorted(p.name for p in copy.iterdir() if not p.name.endswith(".lock"))
        assert copies == [gsmtp.spool_path.name]
        assert {
            row[0] for row in rows(copy / gsmtp.spool_path.name, "SELECT id FROM messages")
        } == left

        flushed = json.loads(gsmtp.cli("queue", "flush", "--json").stdout)
        assert flushed["count"] == len(left)
        wait_for(lambda: len(sink.received) == len(left), timeout=30, what="the sink to get all")
        got = {m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.received}
        assert len(got) == len(left)
    finally:
        sink.stop()


def test_one_worker_is_one_process(gsmtp_factory: Any) -> None:
    """`workers = 1` is today's single process: no supervisor, no worker field."""
    gsmtp = gsmtp_factory({"server": {"workers": 1}})
    assert not gsmtp.events("workers_started")
    assert "worker" not in gsmtp.events("server_started")[0]


def test_a_restarted_worker_starts_from_the_last_configuration_that_loaded(
    gsmtp_factory: Any,
) -> None:
    """After a SIGHUP that lowered the size and revoked a trusted network, a worker the
    supervisor restarts runs with the reloaded settings, not the start-up ones; a later
    file that does not load changes nothing; a restart-only key (hostname) keeps its
    start-up value."""
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS}})
    assert relay_reply(gsmtp.port).startswith("250")
    text = gsmtp.config.read_text()
    reloaded = text.replace(TRUSTED, 'trusted_networks = []\nmax_message_size = "1MB"')
    gsmtp.config.write_text(reloaded.replace('"mx.foo.com"', '"other.foo.com"'))
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: len(gsmtp.events("config_reloaded")) == COUNT, what="every worker reloaded")
    gsmtp.config.write_text(reloaded + "[server\n")  # broken: the supervisor keeps the last
    gsmtp.signal(signal.SIGHUP)
    wait_for(
        lambda: gsmtp.events("reload_failed", component="workers"), what="the supervisor to fail"
    )
    for index, pid in worker_pids(gsmtp).items():
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda index=index: len(gsmtp.events("worker_ready", worker=index)) == 2,
            timeout=30,
            what=f"worker {index} restarted",
        )
    for _ in range(2 * COUNT):  # any worker may take a connection: every one must answer so
        assert advertised_size(gsmtp.port) == 1024 * 1024
        assert relay_reply(gsmtp.port).startswith("554")
        with SmtpWire(gsmtp.port) as wire:
            assert wire.read_reply()[0].startswith("220 mx.foo.com")


def test_the_stop_deadline_follows_a_reloaded_shutdown_grace(gsmtp_factory: Any) -> None:
    """shutdown_grace is applied by SIGHUP: the supervisor's SIGKILL deadline too, so a
    client mid-DATA past the start-up grace (1 s + margins) still gets its 250."""
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS, "shutdown_grace": "1s"}})
    text = gsmtp.config.read_text()
    gsmtp.config.write_text(text.replace('shutdown_grace = "1s"', 'shutdown_grace = "30s"'))
    gsmtp.signal(signal.SIGHUP)
    wait_for(lambda: len(gsmtp.events("config_reloaded")) == COUNT, what="every worker reloaded")
    with SmtpWire(gsmtp.port, timeout=30) as wire:
        wire.read_reply()
        wire.command("EHLO c.example")
        wire.command("MAIL FROM:<a@remote.example>")
        wire.command("RCPT TO:<brown@foo.com>")
        assert wire.command("DATA").startswith("354")
        wire.send(b"Subject: slow\r\n\r\npart one\r\n")
        gsmtp.signal(signal.SIGTERM)
        wait_for(lambda: gsmtp.events("workers_stopping"), what="the supervisor to stop")
        assert gsmtp.events("workers_stopping")[0]["grace_seconds"] == 30
        # Past the old deadline (1 s + 2 s + STOP_MARGIN 3 s), inside the new one: the
        # point of the test is this much time passing.
        time.sleep(7)
        wire.send(b"part two\r\n.\r\n")
        assert wire.read_reply()[0].startswith("250")
    assert gsmtp.wait(timeout=60) == 0
    assert not gsmtp.events("worker_killed")


@pytest.mark.parametrize("workers", [WORKERS, 1])
def test_sighup_and_sigusr1_while_starting_are_not_fatal_nor_lost(
    gsmtp_factory: Any, workers: Any
) -> None:
    """`systemctl reload` (SIGHUP) and `gsmtp queue` (SIGUSR1 to the PID in the lock
    file) while the node starts: sent to the process from when its lock names it, and
    to every worker from its fork, until the node is started. Nothing dies, and each
    process reloads (at once, or once started: `reload_deferred`)."""
    gsmtp = gsmtp_factory({"server": {"workers": workers}}, start=False)
    assert gsmtp.process is None
    log = gsmtp.log_path.open("ab")
    gsmtp.process = subprocess.Popen(
        [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(gsmtp.config)],
        stdout=log,
        stderr=log,
        cwd=gsmtp.directory,
        env=environment(),
    )
    log.close()
    process = gsmtp.process
    lock = Path(f"{gsmtp.spool_path}.lock")
    wait_for(
        lambda: lock.exists() and lock.read_text().split("\n")[0] == str(process.pid),
        what="the lock to name the server",
    )
    signalled: set[int] = set()
    while process.poll() is None and not gsmtp.events(
        "workers_started" if workers != 1 else "server_started"
    ):
        for pid in {process.pid, *worker_pids(gsmtp).values()}:
            for signum in (signal.SIGHUP, signal.SIGUSR1):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            signalled.add(pid)
        time.sleep(0.02)  # the pace of the signals, not a wait for something
    assert process.poll() is None, gsmtp.log()
    assert not gsmtp.events("worker_failed_to_start") and not gsmtp.events("worker_died")
    processes = COUNT if workers != 1 else 1
    assert len(signalled) == processes + (1 if workers != 1 else 0)

    def reloaded() -> bool:
        done = gsmtp.events("config_reloaded") + gsmtp.events("reload_deferred")
        return len({e.get("worker") for e in done}) == processes

    wait_for(reloaded, what="every process to act on a SIGHUP")


def _greeting(wire: SmtpWire) -> str:
    reply = wire.read_reply()
    return reply[0][:3] if reply else "closed"


def test_a_full_worker_stops_accepting_and_the_others_take_the_connections(
    gsmtp_factory: Any,
) -> None:
    """server.max_connections is the node's: a worker at its share stops accepting from
    the shared listener, the other takes what waits, none is refused below the limit.
    Worker 1 is frozen meanwhile, so every connection reaches worker 0 first."""
    gsmtp = gsmtp_factory({"server": {"workers": 2, "max_connections": 40}})
    sources = [f"127.0.0.{10 + n}" for n in range(8)]

    def opened(worker: int) -> int:  # not counting the harness's probe at start
        return sum(e["peer"] in sources for e in gsmtp.events("connection_opened", worker=worker))

    frozen = worker_pids(gsmtp)[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        wires = [SmtpWire(gsmtp.port, source=sources[n % 8]) for n in range(40)]
        wait_for(
            lambda: opened(0) == 20,
            what="worker 0 to take its share",
        )
    finally:
        os.kill(frozen, signal.SIGCONT)
    try:
        assert [_greeting(wire) for wire in wires] == ["220"] * 40
        wait_for(lambda: opened(1) == 20, what="worker 1 to log the rest")  # logs are buffered
        assert gsmtp.events("connection_refused") == []
        # Every worker full: the next connection waits in the backlog (it is not told
        # 421) and is greeted as soon as a connection ends.
        waiting = SmtpWire(gsmtp.port, source="127.0.0.20")
        waiting.sock.settimeout(1)
        try:
            waiting.sock.recv(1)
            raise AssertionError("a connection past the node's limit was answered")
        except TimeoutError:
            pass
        waiting.sock.settimeout(10)
        wires.pop().close()
        assert _greeting(waiting) == "220"
        waiting.close()
    finally:
        for wire in wires:
            wire.close()


def test_the_per_network_limit_is_whole_in_each_worker(gsmtp_factory: Any) -> None:
    """max_connections_per_ip with several workers: each worker enforces the whole
    limit, so one client is never refused below it however the kernel spreads its
    connections (the node allows it at most workers x the limit)."""
    gsmtp = gsmtp_factory({"server": {"workers": 2, "max_connections_per_ip": 10}})
    frozen = worker_pids(gsmtp)[1]
    os.kill(frozen, signal.SIGSTOP)  # every connection goes to worker 0
    wires = []
    try:
        wires = [SmtpWire(gsmtp.port, source="127.0.0.9") for _ in range(11)]
        greetings = [_greeting(wire) for wire in wires]
    finally:
        os.kill(frozen, signal.SIGCONT)
        for wire in wires:
            wire.close()
    assert greetings == ["220"] * 10 + ["421"]


def test_sigterm_while_a_worker_restarts_or_is_killed_is_a_clean_stop(
    gsmtp_factory: Any,
) -> None:
    """A worker still starting ends by the forwarded SIGTERM, one killed just before
    the stop was not a failed stop: the node exits 0 (systemd: not "failed")."""
    gsmtp = gsmtp_factory({"server": {"workers": 2}})
    os.kill(worker_pids(gsmtp)[1], signal.SIGKILL)
    wait_for(lambda: len(gsmtp.events("worker_started", worker=1)) == 2, what="the restart")
    gsmtp.signal(signal.SIGTERM)
    assert gsmtp.wait(timeout=30) == 0
    assert not gsmtp.events("worker_killed")
    if len(gsmtp.events("worker_ready", worker=1)) == 1:  # the SIGTERM found it starting
        assert gsmtp.events("worker_stopped", worker=1)[-1]["exit"] == "signal SIGTERM"

    gsmtp.start()
    victim = worker_pids(gsmtp)[1]
    os.kill(victim, signal.SIGKILL)
    gsmtp.signal(signal.SIGTERM)
    assert gsmtp.wait(timeout=30) == 0
    assert not gsmtp.events("worker_killed")


USER = "jones@foo.com"


def stall_in(gsmtp: GsmtpProcess, wanted: set[int]) -> list[SmtpWire]:
    """A session in each worker of `wanted` whose body has begun and never ends (the
    worker then stops only at the end of its grace); connections that land elsewhere
    are closed. Which worker took a connection is read from its connection_opened line,
    one connection at a time."""
    wait_for(lambda: gsmtp.events("connection_closed"), what="the start's probe logged")
    stalled: list[SmtpWire] = []
    covered: set[int] = set()
    try:
        for _ in range(60):
            seen = len(gsmtp.events("connection_opened"))
            wire = SmtpWire(gsmtp.port)
            assert wire.read_reply()[0].startswith("220")
            wait_for(lambda n=seen: len(gsmtp.events("connection_opened")) > n, what="the log")
            worker = gsmtp.events("connection_opened")[-1]["worker"]
            if worker not in wanted or worker in covered:
                wire.close()
                continue
            for line in ("EHLO c.example", "MAIL FROM:<a@remote.example>", f"RCPT TO:<{USER}>"):
                assert wire.command(line).startswith("250")
            assert wire.command("DATA").startswith("354")
            wire.send(b"Subject: never ends\r\n\r\n")
            stalled.append(wire)
            covered.add(worker)
            if covered == wanted:
                return stalled
    except BaseException:
        for wire in stalled:
            wire.close()
        raise
    raise AssertionError(f"no connection landed in each of the workers {wanted}")


def test_a_serve_after_a_kill_9_of_the_supervisor_waits_for_its_workers_then_starts(
    gsmtp_factory: Any,
) -> None:
    """Red-team finding: killed with SIGKILL, the supervisor leaves its workers to stop
    within their grace (SIGTERM at its death); worker 0 holds the node lock it inherited
    until then, and a `serve` started meanwhile exited 2 naming the dead PID. Now it
    says what it waits for, starts once they are gone, and delivers."""
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS, "shutdown_grace": "4s"}})
    assert gsmtp.process is not None
    supervisor, workers = gsmtp.process.pid, worker_pids(gsmtp)
    old_workers = list(workers.values())
    stalled = stall_in(gsmtp, set(range(COUNT)))
    try:
        gsmtp.kill9()
        assert all(alive(pid) for pid in old_workers)  # stopping, with a client each
        gsmtp.start()
        started = gsmtp.log()
        # Worker 0 holds the node lock it inherited: named, though no file names it.
        assert (
            f"is still served by the workers of PID {supervisor}, which has exited; waiting"
            f" up to 9 s for them to finish their stop (lock {gsmtp.spool_path}.lock, held by"
            f" PID {workers[0]})" in started
        )
        assert not any(alive(pid) for pid in old_workers)
        assert send(gsmtp.port, "jones@foo.com", "after the restart") is not None
        wait_for(lambda: "after the restart" in subjects(gsmtp, "jones@foo.com"), what="delivery")
    finally:
        for wire in stalled:
            wire.close()


def test_a_single_process_after_a_kill_9_of_the_supervisor_waits_for_every_shard(
    gsmtp_factory: Any,
) -> None:
    """Red-team finding: a `workers = 1` serve waited for the node lock only; once the
    old worker 0 had ended it started while the old worker 1 still served shard 1,
    skipped adopting it (shard_not_adopted), and mail queued there waited for the next
    restart. Now it waits for the shard too, then adopts it."""
    gsmtp = gsmtp_factory({"server": {"workers": 2, "shutdown_grace": "4s"}})
    assert gsmtp.process is not None
    old_worker_1 = worker_pids(gsmtp)[1]
    stalled = stall_in(gsmtp, {1})
    try:
        gsmtp.kill9()
        gsmtp.config.write_text(gsmtp.config.read_text().replace("workers = 2", "workers = 1"))
        gsmtp.started_event = b'"event":"server_started"'
        gsmtp.start()
        log = gsmtp.log()
        assert f"is still served by PID {old_worker_1}, a worker of an earlier server" in log
        assert not alive(old_worker_1)
        assert not gsmtp.events("shard_not_adopted")
        assert gsmtp.events("shard_adopted") and not shard(gsmtp, 1).exists()
    finally:
        for wire in stalled:
            wire.close()


@pytest.mark.parametrize("workers", [WORKERS, 1])
def test_ctrl_c_while_a_serve_waits_for_a_killed_supervisors_workers_is_a_line(
    gsmtp_factory: Any, workers: Any
) -> None:
    """Red-team finding: SIGINT during the wait printed a Python traceback (and, in a
    single process, gevent's hub's)."""
    gsmtp = gsmtp_factory({"server": {"workers": 2, "shutdown_grace": "4s"}})
    stalled = stall_in(gsmtp, {0})
    try:
        gsmtp.kill9()
        config = gsmtp.directory / "again.toml"
        setting = f"workers = {json.dumps(workers)}"
        config.write_text(gsmtp.config.read_text().replace("workers = 2", setting))
        # SIGINT as a terminal sends it: a test run started in the background of a
        # non-interactive shell ignores SIGINT, and its children would inherit that
        # (the serve then took the spool over and ran on, and the test hung).
        serve = subprocess.Popen(
            [sys.executable, "-m", "gsmtp.cli", "serve", "-c", str(config)],
            cwd=gsmtp.directory,
            env=environment(),
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            assert serve.stderr is not None
            line = serve.stderr.readline()
            assert "which has exited; waiting up to 9 s" in line, line
            serve.send_signal(signal.SIGINT)
            _, rest = serve.communicate(timeout=10)
            assert serve.returncode == 1
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.wait()
        assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
        assert rest.endswith(f"gsmtp: interrupted while waiting for the spool {gsmtp.spool_path}\n")
    finally:
        for wire in stalled:
            wire.close()


def test_a_file_with_a_shards_name_that_is_no_spool_is_left_alone(
    gsmtp_factory: Any, tmp_path: Path
) -> None:
    """Red-team finding: `queue stats` migrated another program's SQLite file named
    like a shard, and `serve` then adopted it as an orphan and deleted it. Now the CLI
    leaves it out with a warning and the worker refuses to adopt it; it stays as it was."""
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS}})
    gsmtp.stop()
    stray = shard(gsmtp, COUNT + 1)  # a shard without a worker: would be adopted
    other = apsw.Connection(str(stray))
    other.execute("CREATE TABLE notes(body TEXT); INSERT INTO notes VALUES ('keep me')")
    other.close()
    before = stray.read_bytes()

    stats = gsmtp.cli("queue", "stats", "--json")
    assert json.loads(stats.stdout)["messages"] == 0
    assert f"warning: left out {stray}: not a gsmtp spool" in stats.stderr
    assert stray.read_bytes() == before

    gsmtp.start()
    refused = gsmtp.events("shard_not_adopted")
    assert [event["shard"] for event in refused] == [str(stray)]
    assert "not a gsmtp spool" in refused[0]["error"] and not gsmtp.events("shard_adopted")
    assert stray.read_bytes() == before
    assert relay_reply(gsmtp.port).startswith("250")  # and the node serves


HOLD_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
"""


def test_metrics_show_a_worker_that_keeps_failing_to_start(gsmtp_factory: Any) -> None:
    """Red-team finding: a worker that keeps failing to start could not be seen in
    /metrics (its shard only dropped out of the queue gauges). gsmtp_workers_up counts
    the workers serving, gsmtp_workers the ones configured; once the cause is fixed the
    worker is back and counted, and gsmtp_worker_restarts_total counts its restart."""
    gsmtp = gsmtp_factory({"server": {"workers": WORKERS}})
    up = "gsmtp_workers_up"
    restarts = "gsmtp_worker_restarts_total"
    assert gsmtp.metrics()["gsmtp_workers"] == COUNT and gsmtp.metrics()[up] == COUNT
    assert gsmtp.metrics()[restarts] == 0
    # Another process takes worker 1's shard lock the moment the worker dies: each
    # restart then fails ("held by"), again after every back-off.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, os.path.realpath(shard(gsmtp, 1)) + ".lock"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        os.kill(worker_pids(gsmtp)[1], signal.SIGKILL)
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        wait_for(
            lambda: len(gsmtp.events("worker_died", worker=1)) >= 3,
            timeout=30,
            what="worker 1 to fail its restarts",
        )
        samples = gsmtp.metrics()
        assert samples[up] == COUNT - 1 and samples["gsmtp_workers"] == COUNT
    finally:
        holder.kill()
        holder.wait()
    wait_for(
        lambda: len(gsmtp.events("worker_ready", worker=1)) == 2,
        timeout=30,
        what="worker 1 to start again",
    )
    wait_for(lambda: gsmtp.metrics()[up] == COUNT, what="gsmtp_workers_up back to every worker")
    # One restart counted: by the worker that started (the ones that failed could not).
    # A worker that hangs again after every restart is up most of the time: it shows here.
    assert gsmtp.metrics()[restarts] == 1


def _cpu_list(text: str) -> set[int]:
    """/proc's CPU list ("0-2,5") as a set."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def threads_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of `pid` may run on."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    found.append(_cpu_list(line.split(":", 1)[1].strip()))
    return found


ALLOWED = sorted(allowed_cpus() or ())


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs this process may use")
def test_each_worker_keeps_to_cpus_of_its_own_and_a_restarted_one_to_the_same(
    gsmtp_factory: Any,
) -> None:
    """`cpu_affinity = "auto"` (the default), 2 workers: every thread of worker k (its
    event loop, the spool writer and reader started after the fork) may run only on
    the k-th, (k+2)-th, … allowed CPU, as the supervisor's log says; the supervisor
    keeps every CPU; a worker killed with SIGKILL comes back on the same CPUs."""
    gsmtp = gsmtp_factory({"server": {"workers": 2}})
    wait_for(lambda: len(gsmtp.events("worker_ready")) == 2, what="both workers ready")
    expected = {index: set(ALLOWED[index::2]) for index in range(2)}
    for index, pid in worker_pids(gsmtp).items():
        threads = threads_cpus(pid)
        assert len(threads) > 1, "the worker's threads are started by the time it is ready"
        assert all(cpus == expected[index] for cpus in threads), (index, threads)
    logged = {e["worker"]: e["cpus"] for e in gsmtp.events("worker_started")}
    assert logged == {index: sorted(cpus) for index, cpus in expected.items()}
    assert all(cpus == set(ALLOWED) for cpus in threads_cpus(gsmtp.process.pid))
    victim = worker_pids(gsmtp)[1]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(gsmtp.events("worker_ready", worker=1)) == 2, what="worker 1 back")
    restarted = worker_pids(gsmtp)[1]
    assert restarted != victim
    assert all(cpus == expected[1] for cpus in threads_cpus(restarted))


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs this process may use")
def test_cpu_affinity_off_leaves_every_worker_every_cpu(gsmtp_factory: Any) -> None:
    gsmtp = gsmtp_factory({"server": {"workers": 2, "cpu_affinity": "off"}})
    wait_for(lambda: len(gsmtp.events("worker_ready")) == 2, what="both workers ready")
    for pid in worker_pids(gsmtp).values():
        assert all(cpus == set(ALLOWED) for cpus in threads_cpus(pid))
    assert [e["cpus"] for e in gsmtp.events("worker_started")] == [ALLOWED, ALLOWED]


# gsmtp serve, with every call that would keep a process on CPUs failing (as when a
# cpuset shrinks between the supervisor's choice and the worker's call).
_AFFINITY_REFUSED = """
import errno, os, sys
def refuse(pid, cpus):
    raise OSError(errno.EINVAL, "Invalid argument")
os.sched_setaffinity = refuse
from gsmtp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 CPUs this process may use")
def test_a_worker_that_cannot_keep_to_its_cpus_says_so_and_serves(gsmtp_factory: Any) -> None:
    gsmtp = gsmtp_factory({"server": {"workers": 2}}, start=False)
    gsmtp.command = [sys.executable, "-c", _AFFINITY_REFUSED, "serve", "-c"]
    gsmtp.start()
    wait_for(lambda: len(gsmtp.events("worker_ready")) == 2, what="both workers ready")
    failed = gsmtp.events("cpu_affinity_failed")
    assert sorted(e["worker"] for e in failed) == [0, 1]
    assert all("Invalid argument" in e["error"] for e in failed)
    for pid in worker_pids(gsmtp).values():
        assert all(cpus == set(ALLOWED) for cpus in threads_cpus(pid))
    assert send(gsmtp.port, "jones@foo.com", "unpinned") is not None
    wait_for(lambda: subjects(gsmtp, "jones@foo.com") == ["unpinned"], what="the delivery")
