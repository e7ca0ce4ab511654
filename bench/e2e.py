"""End-to-end cells: how fast mail *leaves*, not only how fast it is acknowledged.

    python -m bench.e2e --messages 3000        (bench.compare runs them in its run)

*local*: N messages of S bytes at C connections × M messages per session, spread over
MAILBOXES local mailboxes; timed from the first connect (bench.load's start) to the last
file linked into a new/ (the latest mtime of the new/ directories, read once every file
is there). Peers: gsmtp, Postfix with local(8) Maildir delivery, and beside them the
physical probe (bench.probe, fsync and syncfs variants) on the same file system.

*relay*: the same load relayed to a sink on another loopback address (bench.sink, which
counts what it received and when the last one came); timed to the last message the
sink received. Peers: gsmtp (delivery.smarthost pointing at the sink: this machine has
no DNS for the sink's domain) and Postfix (relayhost). A fresh sink for each peer.

Each cell reports both rates: acknowledged (accepted ÷ the load's own time) and
delivered (delivered ÷ first connect to last delivery), and the counts, so a cell that
lost or duplicated messages says so. `measure(repeats=3)` runs every server cell three
times, the peers taking turns in each round, in reversed order every other round (so a
slow minute of the machine falls on all of them), and keeps the median with every run's
rate: one run of a cell varies by ±20 % on these machines, more than some of the ratios
the targets ask for.

*kill*: no message lost (`measure_kill`, gsmtp only). The local cell's load, each
message numbered and each number answered 250 recorded by bench.load (--record); when
half of the messages were acknowledged, `kill -9` of one worker process (a child of the
supervisor: the busiest, by open descriptors), which the supervisor restarts; the load
goes on (its sessions on that worker see their connections drop and open new ones).
Once the spool is empty, every Maildir file's number is read: every number answered 250
must be there (missing 0); copies beyond the first are counted (duplicates: a batch in
the Maildir whose result commit the kill prevented is delivered again); numbers
delivered without a 250 seen are counted too (committed, but the 250 died with the
worker: allowed, the client would send it again).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.compare import round_order
from bench.peers import (
    E2E_LOCAL,
    E2E_RELAY,
    MAILBOXES,
    RECORD_BYTES,
    SINK_HOST,
    BareSink,
    Gsmtp,
    Peer,
    Postfix,
    load_argv,
    load_result,
    run_load,
)
from bench.proctree import children, open_fds
from bench.workdirs import cell_directory, exit_on_sigterm

KiB = 1024
POLL_SECONDS = 0.5


@dataclass
class EndToEnd:
    kind: str  # "local", "relay" or "probe"
    peer: str
    durable: bool
    messages: int  # asked for
    accepted: int  # answered 250 (the probe: files it made)
    delivered: int  # files in the mailboxes, messages at the sink
    acknowledged_per_s: float
    delivered_per_s: float
    seconds: float  # first connect to the last delivery
    errors: int = 0
    note: str = ""
    runs: list[float] = field(default_factory=list)  # delivered msgs/s of each run, in order
    exact_runs: int = 1  # runs in which every accepted message was delivered exactly once
    failed_runs: int = 0  # runs that failed (no counts: not exactly once), reasons in note


def median_of(runs: list[EndToEnd]) -> EndToEnd:
    """The run with the median delivered rate (of an even number, the upper one), with
    every run's rate, how many delivered each accepted message exactly once, and the
    other runs' notes."""
    kept = sorted(runs, key=lambda run: run.delivered_per_s)[len(runs) // 2]
    notes = [kept.note] if kept.note else []
    notes += [
        f"run {n}: {run.note}" for n, run in enumerate(runs, 1) if run.note and run is not kept
    ]
    return replace(
        kept,
        runs=[run.delivered_per_s for run in runs],
        exact_runs=sum(run.delivered == run.accepted for run in runs),
        note="; ".join(notes),
    )


def _load_limit(messages: int) -> float:
    """bench.load's --max-seconds for `messages`."""
    return max(300.0, messages / 20)


def _load_options(messages: int) -> list[str]:
    """bench.load's options for an end-to-end cell of `messages`."""
    limit = str(_load_limit(messages))
    return ["--mailboxes", str(MAILBOXES), "--total", str(messages), "--max-seconds", limit]


def _load(
    port: int, to: str, messages: int, connections: int, per_session: int, size: int
) -> dict[str, Any]:
    limit = _load_limit(messages)
    return run_load(
        port,
        connections=connections,
        messages=per_session,
        size=size,
        to=to,
        options=_load_options(messages),
        timeout=limit + 120,
    )


def run_cell(
    peer: Peer,
    kind: str,
    messages: int,
    *,
    connections: int = 100,
    per_session: int = 100,
    size: int = KiB,
    sink: BareSink | None = None,
) -> EndToEnd:
    """Load the started `peer`, then wait until everything it accepted was delivered
    (or the wait runs out: the cell then says how many were missing)."""
    to = E2E_RELAY if kind == "relay" else E2E_LOCAL
    load = _load(peer.port, to, messages, connections, per_session, size)
    accepted, started = int(load["accepted"]), float(load["started_at"])

    def state() -> tuple[int, float]:
        return sink.received() if sink is not None else peer.delivered()

    deadline = time.monotonic() + max(120.0, messages / 50)
    count, last = state()
    while count < accepted and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        count, last = state()
    note = ""
    if count < accepted:
        note = f"{accepted - count} accepted messages not delivered when the wait ran out"
    elif count > accepted:
        note = f"{count - accepted} more delivered than accepted (duplicates)"
    seconds = max(last - started, 1e-6) if count else 0.0
    acknowledged = float(load["finished_at"]) - started
    return EndToEnd(
        kind,
        peer.name,
        peer.durable,
        messages,
        accepted,
        count,
        round(accepted / acknowledged, 1) if acknowledged > 0 else 0.0,
        round(min(count, accepted) / seconds, 1) if seconds else 0.0,
        round(seconds, 3),
        int(load["errors"]),
        note,
    )


def run_probe(directory: Path, files: int, mode: str) -> EndToEnd:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.probe",
            "--dir",
            str(directory),
            "--files",
            str(files),
            "--mode",
            mode,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=max(600.0, files / 10),
    )
    if not output.stdout.strip():
        raise RuntimeError(f"bench.probe failed: {output.stderr.strip()[-300:]}")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    rate = float(result["files_per_s"])
    return EndToEnd(
        "probe",
        f"probe ({mode})",
        True,
        files,
        files,
        int(result["stored"]),
        rate,
        rate,
        float(result["seconds"]),
        note="one Maildir, batches of 50: "
        + (
            "fsync each file, one fsync of new/ per batch"
            if mode == "fsync"
            else "one syncfs(2) per batch"
        ),
    )


def _run_peer(
    peer: Peer, kind: str, messages: int, size: int, sink: BareSink | None = None
) -> EndToEnd | str:
    """The cell, or why it could not run."""
    reason = peer.missing()
    if reason:
        return reason
    with cell_directory(f"bench-e2e-{peer.name}-") as workdir:
        try:
            peer.start(Path(workdir))
            return run_cell(peer, kind, messages, size=size, sink=sink)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
            return f"failed: {error}"
        finally:
            peer.stop()


def measure(
    messages: int,
    *,
    size: int = KiB,
    wanted: set[str] | None = None,
    log: bool = True,
    repeats: int = 1,
) -> tuple[list[EndToEnd], dict[str, str], dict[str, str]]:
    """Every end-to-end cell: (cells, skipped {peer: reason}, descriptions). Each server
    cell runs `repeats` times, in rounds (every peer once a round, in the order of the
    round before reversed, so the one that ran first runs last next) and is kept as the
    median (`median_of`); the probe runs once, in the first round."""
    runs: dict[str, list[EndToEnd]] = {}  # "kind: peer" → its runs; the probes in place
    failures: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}

    def keep(kind: str, peer: Peer, outcome: EndToEnd | str, number: int) -> None:
        key = f"{kind}: {peer.name}"
        runs.setdefault(key, [])
        if isinstance(outcome, str):
            failures.setdefault(key, []).append(f"run {number}: {outcome}")
            if log:
                print(f"  e2e {key} run {number} skipped: {outcome}", flush=True)
            return
        descriptions[key] = peer.description
        runs[key].append(outcome)
        if log:
            print(
                f"  e2e {key:<22} run {number}: acknowledged"
                f" {outcome.acknowledged_per_s:>8,.0f} msg/s,"
                f" delivered {outcome.delivered_per_s:>8,.0f} msg/s"
                f" ({outcome.accepted} accepted, {outcome.delivered} delivered"
                f"{', ' + outcome.note if outcome.note else ''})",
                flush=True,
            )

    def base(peer: Peer) -> str:
        return "postfix" if peer.name.startswith("postfix") else peer.name

    rounds = max(1, repeats)
    relays: list[Callable[[tuple[str, int]], Peer]] = [
        lambda at: Gsmtp("gsmtp", e2e="relay", smarthost=at),
        lambda at: Postfix("relay", sink=at),
    ]
    local_rounds = round_order([Gsmtp("gsmtp", e2e="local"), Postfix("local")], rounds)
    relay_rounds = round_order(relays, rounds)
    for number in range(1, rounds + 1):
        for peer in local_rounds[number - 1]:
            if not wanted or base(peer) in wanted:
                keep("local", peer, _run_peer(peer, "local", messages, size), number)
        if number == 1 and (not wanted or "probe" in wanted or "gsmtp" in wanted):
            for mode in ("fsync", "syncfs"):
                runs[f"probe ({mode})"] = _probe_runs(mode, messages, failures, log)
        for make in relay_rounds[number - 1]:
            with cell_directory("bench-e2e-sink-") as sinkdir:
                sink = BareSink(SINK_HOST)
                try:
                    sink.start(Path(sinkdir))
                    peer = make((SINK_HOST, sink.port))
                    if not wanted or base(peer) in wanted:
                        outcome = _run_peer(peer, "relay", messages, size, sink)
                        keep("relay", peer, outcome, number)
                except (RuntimeError, OSError) as error:
                    failures.setdefault("relay sink", []).append(f"run {number}: failed: {error}")
                finally:
                    sink.stop()
    cells, skipped = combine_runs(runs, failures)
    return cells, skipped, descriptions


def combine_runs(
    runs: dict[str, list[EndToEnd]], failures: dict[str, list[str]]
) -> tuple[list[EndToEnd], dict[str, str]]:
    """The cells of `measure` ("kind: peer" → its runs, and the reasons of the runs
    that failed): each the median of its runs (`median_of`), with the failures in its
    note; a cell with no run at all is skipped, with every reason."""
    failures = {key: list(reasons) for key, reasons in failures.items()}
    cells = [median_of(found) for found in runs.values() if found]
    for cell in cells:
        failed = failures.pop(f"{cell.kind}: {cell.peer}", [])
        cell.note = "; ".join([cell.note, *failed] if cell.note else failed)
        cell.failed_runs = len(failed)
    skipped = {key: "; ".join(reasons) for key, reasons in failures.items()}
    return cells, skipped


def _probe_runs(
    mode: str, messages: int, failures: dict[str, list[str]], log: bool
) -> list[EndToEnd]:
    """The probe in `mode`, once: [its cell], or [] with the failure noted."""
    with cell_directory("bench-e2e-probe-") as workdir:
        try:
            probe = run_probe(Path(workdir), messages, mode)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            failures.setdefault(f"probe ({mode})", []).append(f"failed: {error}")
            return []
    if log:
        print(f"  e2e probe ({mode}): {probe.delivered_per_s:,.0f} files/s", flush=True)
    return [probe]


@dataclass
class KillCell:
    """The no-message-lost cell: what was acknowledged, what is in the Maildirs, and the
    kill (`killed_pid` None: no worker was killed, and the cell proves nothing)."""

    peer: str
    messages: int  # asked for
    accepted: int  # numbers answered 250
    files: int  # files in the mailboxes' new/ and cur/
    missing: int  # answered 250, in no mailbox
    duplicates: int  # files beyond the first with the same number
    delivered_unacknowledged: int  # in a mailbox, no 250 seen (it died with the worker)
    unnumbered: int  # files without a bench number (should be 0)
    workers: int  # worker processes before the kill
    killed_pid: int | None
    killed_worker: int | None  # its index, from the supervisor's log
    killed_after: int  # messages acknowledged when it was killed
    killed_at: float  # seconds after the first connect
    delivered_at_kill: int  # files in the mailboxes just after the kill
    restarted_pid: int | None  # the new worker the supervisor started
    restarted_after: float | None  # seconds after the kill
    errors: int  # the load's failed sessions (those on the killed worker, at least)
    drained_at: float  # seconds after the first connect: the spool was empty
    note: str = ""


_NUMBER = re.compile(rb"^Subject: bench (\d+)\r?$", re.MULTILINE)
KILL_POLL_SECONDS = 0.005
RESTART_WAIT = 60.0  # seconds after the kill: a worker not restarted by then never is


def _numbers(boxes: list[Path]) -> tuple[Counter[int], int, int]:
    """Bench numbers of the files in `boxes` (new/ and cur/): (count per number, files,
    files without a number)."""
    found: Counter[int] = Counter()
    files = unnumbered = 0
    for box in boxes:
        for sub in ("new", "cur"):
            try:
                names = os.listdir(box / sub)
            except FileNotFoundError:
                continue
            for name in names:
                files += 1
                with open(box / sub / name, "rb") as handle:
                    match = _NUMBER.search(handle.read(16384))
                if match is None:
                    unnumbered += 1
                else:
                    found[int(match.group(1))] += 1
    return found, files, unnumbered


def _worker_index(log: Path, pid: int) -> int | None:
    """The worker number the supervisor logged for `pid` ("worker_started")."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if '"worker_started"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("pid") == pid and isinstance(event.get("worker"), int):
            return int(event["worker"])
    return None


def _acknowledged(record: Path) -> int:
    try:
        return record.stat().st_size // RECORD_BYTES
    except FileNotFoundError:
        return 0


def _queued(peer: Gsmtp) -> int | str:
    """The messages in the spool, or why they could not be counted now (a shard the
    killed worker left is unreadable until its new worker has recovered it: read as 0,
    the cell counted the Maildirs before anything was delivered)."""
    try:
        return peer.queued()
    except sqlite3.Error as error:
        return f"unknown ({error})"


def run_kill_cell(
    peer: Gsmtp,
    messages: int,
    *,
    connections: int = 100,
    per_session: int = 100,
    size: int = KiB,
) -> KillCell:
    """Load the started `peer` as the local cell does, kill -9 its busiest worker once
    half of the messages were acknowledged, then wait for the restart and the empty
    spool and count every acknowledged number in the Maildirs."""
    before = set(children(peer.pid))
    if not before:
        raise RuntimeError("gsmtp runs as one process here (server.workers = 1): no worker")
    # The port answers once one worker serves; a worker killed before every one is
    # ready is the node failing to start (the supervisor stops it, by design), not a
    # crash to ride out: wait for the node's "workers_started".
    started_by = time.monotonic() + 60
    while '"workers_started"' not in (peer.workdir / "gsmtp.log").read_text(errors="replace"):
        if time.monotonic() > started_by:
            raise RuntimeError("the node did not log workers_started within 60 s")
        time.sleep(POLL_SECONDS / 10)
    record = peer.workdir / "acknowledged.txt"
    limit = _load_limit(messages)
    argv = load_argv(
        peer.port,
        connections=connections,
        messages=per_session,
        size=size,
        to=E2E_LOCAL,
        options=[*_load_options(messages), "--record", str(record)],
    )
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: int | None = None
    killed_after, killed_at, delivered_at_kill = 0, 0.0, 0
    restarted: int | None = None
    restarted_after: float | None = None

    def look_for_restart() -> None:
        nonlocal restarted, restarted_after
        if killed is not None and restarted is None:
            new = set(children(peer.pid)) - before
            if new:
                restarted, restarted_after = min(new), time.time() - killed_at

    try:
        while load.poll() is None:
            done = _acknowledged(record)
            if killed is None and done >= messages // 2:
                victim = max(children(peer.pid), key=open_fds)
                os.kill(victim, signal.SIGKILL)
                killed, killed_after, killed_at = victim, done, time.time()
                delivered_at_kill = peer.delivered()[0]
            look_for_restart()
            time.sleep(KILL_POLL_SECONDS)
        stdout, stderr = load.communicate(timeout=limit + 120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = load_result(stdout, stderr)
    first = float(result["started_at"])
    deadline = time.monotonic() + max(120.0, messages / 50)
    drained_at = 0.0
    while time.monotonic() < deadline:
        look_for_restart()
        if _queued(peer) == 0 and (killed is None or restarted is not None):
            drained_at = time.time() - first
            break
        if killed is not None and restarted is None and time.time() > killed_at + RESTART_WAIT:
            break  # the supervisor did not restart it: nothing more will come
        time.sleep(POLL_SECONDS)
    acknowledged = {int(line) for line in record.read_text().split()}
    found, files, unnumbered = _numbers(peer.mailboxes())
    missing = len(acknowledged - set(found))
    notes = []
    if killed is None:
        notes.append("the load ended before half was acknowledged: no worker was killed")
    elif restarted is None:
        notes.append("the killed worker was not seen restarted")
    if not drained_at:
        notes.append(f"{_queued(peer)} messages still queued when the wait ran out")
    return KillCell(
        peer.name,
        messages,
        len(acknowledged),
        files,
        missing,
        sum(count - 1 for count in found.values()),
        len(set(found) - acknowledged),
        unnumbered,
        len(before),
        killed,
        _worker_index(peer.workdir / "gsmtp.log", killed) if killed is not None else None,
        killed_after,
        round(killed_at - first, 3) if killed is not None else 0.0,
        delivered_at_kill,
        restarted,
        round(restarted_after, 3) if restarted_after is not None else None,
        int(result["errors"]),
        round(drained_at, 3),
        "; ".join(notes),
    )


def measure_kill(messages: int, *, workers: int | None = None, log: bool = True) -> KillCell | str:
    """The no-message-lost cell on a fresh gsmtp (`workers` None: its default), or why
    it could not run."""
    peer = Gsmtp("gsmtp", e2e="local", workers=workers)
    outcome: KillCell | str = peer.missing() or ""
    if not outcome:
        with cell_directory("bench-e2e-kill-") as workdir:
            try:
                peer.start(Path(workdir))
                outcome = run_kill_cell(peer, messages)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
                outcome = f"failed: {error}"
            finally:
                peer.stop()
    if log:
        print(f"  e2e kill: {describe_kill(outcome)}", flush=True)
    return outcome


def describe_kill(cell: KillCell | str) -> str:
    """One line for the log and RESULTS.md."""
    if isinstance(cell, str):
        return f"skipped, {cell}"
    if cell.killed_pid is None:
        kill = "no worker killed"
    else:
        which = f"worker {cell.killed_worker}" if cell.killed_worker is not None else "a worker"
        restart = (
            f"restarted as PID {cell.restarted_pid} {cell.restarted_after:.1f} s later"
            if cell.restarted_pid is not None and cell.restarted_after is not None
            else "not seen restarted"
        )
        kill = (
            f"kill -9 of {which} (PID {cell.killed_pid}, 1 of {cell.workers}) at"
            f" {cell.killed_at:.1f} s, after {cell.killed_after:,} acknowledged and"
            f" {cell.delivered_at_kill:,} delivered; {restart}"
        )
    return (
        f"{cell.accepted:,} of {cell.messages:,} answered 250, {cell.files:,} files in the"
        f" Maildirs: missing {cell.missing}, duplicates {cell.duplicates},"
        f" delivered without a 250 seen {cell.delivered_unacknowledged}"
        f" ({cell.errors} sessions dropped or failed); {kill}; spool empty"
        f" {cell.drained_at:.1f} s after the first connect"
        + (f"; {cell.note}" if cell.note else "")
    )


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--size", type=int, default=KiB)
    parser.add_argument("--peers", default="", help="comma-separated: gsmtp, postfix, probe")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.peers.split(",") if name.strip()}
    cells, skipped, _ = measure(args.messages, size=args.size, wanted=wanted, log=not args.json)
    kill: KillCell | str = "not asked for"
    if not wanted or "gsmtp" in wanted:
        kill = measure_kill(args.messages, log=not args.json)
    if args.json:
        killed = kill if isinstance(kill, str) else asdict(kill)
        print(json.dumps({"cells": [asdict(c) for c in cells], "skipped": skipped, "kill": killed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
