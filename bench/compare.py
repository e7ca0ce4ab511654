"""Side-by-side benchmark: gsmtp against the peers a user would pick instead, one run.

    make bench            (or: python -m bench.compare [--quick] [--no-idle] [--no-e2e])

Starts the peers on free loopback ports, each in a new directory of its own, and runs
the same matrix of loads on each (C connections × M messages per session × S bytes, each
cell a few seconds, sessions repeated). The cells other than the key cells, and the
idle-connection memory, are measured once, peer after peer. The key cells (KEY_CELLS),
and the `workers` cells (gsmtp with server.workers = 2 and = 1, where gsmtp has that
setting, at the first key cell), run in three rounds (--quick: one): in each round every
peer is started fresh, runs each of its key cells once and is stopped, the order of the
peers reversed every other round, and each cell keeps the median of its rounds (see
`measure`: this machine's speed drifts within minutes, and the targets are ratios
between peers). After every start, the harness checks that each message a durable peer
accepted is stored. Then the end-to-end cells of bench.e2e (N messages delivered into
Maildirs, or relayed to a sink, timed to the last delivery, in rounds too; the physical
probe beside them; and the no-message-lost cell, a worker killed with SIGKILL during the
local load), and it writes bench/RESULTS.md (ratios, since these machines are noisy) and
bench/results.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from bench import peers
from bench.peers import RECIPIENT, Gsmtp, Peer, all_peers
from bench.report import idle_spread
from bench.workdirs import cell_directory, exit_on_sigterm, remove_all

HERE = Path(__file__).parent
KiB = 1024
KEY_CELLS = [(100, 100, KiB), (100, 1, KiB), (10, 100, 100 * KiB)]
WORKERS_ROUNDS = 5  # the workers pair's rounds (the key cells have 3): see `measure`
IDLE_PEERS = ("gsmtp", "aiosmtpd-discard", "gevent-sink")  # idle-connection memory measured
E2E_MESSAGES = 30000
E2E_MESSAGES_QUICK = 5000


@dataclass
class Cell:
    connections: int
    messages: int
    size: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.connections, self.messages, self.size)

    def label(self) -> str:
        return f"C={self.connections} M={self.messages} {self.size // KiB} KiB"


@dataclass
class Measurement:
    msgs_per_s: float
    sessions_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_percent: float
    accepted: int
    errors: int
    runs: list[float] = field(default_factory=list)
    # CPU per accepted message: the peer's processes (children included), and the
    # load generator's own (it shares the machine: what it uses, the peer does not get).
    cpu_us_per_msg: float = 0.0
    load_cpu_us_per_msg: float = 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process, its live descendants, and its reaped children."""
    hertz = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = fields
    total = 0.0
    for proc, fields in stats.items():
        ancestor = proc
        while ancestor not in (0, 1) and ancestor != pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == pid:
            total += int(fields[11]) + int(fields[12])
            if proc == pid:
                total += int(fields[13]) + int(fields[14])
    return total / hertz


def run_load(peer: Peer, cell: Cell, seconds: float) -> Measurement:
    cpu_before = tree_cpu_seconds(peer.pid)
    started = time.monotonic()
    result = peers.run_load(
        peer.port,
        connections=cell.connections,
        messages=cell.messages,
        size=cell.size,
        to=RECIPIENT,
        options=["--duration", str(seconds), "--max-seconds", str(seconds + 30)],
        timeout=seconds + 120,
    )
    elapsed = time.monotonic() - started
    load_cpu = float(result.get("cpu_seconds", 0.0))  # bench.load's own, start-up excluded
    server_cpu = tree_cpu_seconds(peer.pid) - cpu_before
    accepted = max(int(result["accepted"]), 1)
    return Measurement(
        result["msgs_per_s"],
        result["sessions_per_s"],
        result["p50_ms"],
        result["p99_ms"],
        round(server_cpu / elapsed * 100, 1),
        result["accepted"],
        result["errors"],
        cpu_us_per_msg=round(server_cpu / accepted * 1e6, 1),
        load_cpu_us_per_msg=round(load_cpu / accepted * 1e6, 1),
    )


def settle(peer: Peer, limit: float = 20.0) -> None:
    """Let background work (deliveries, queue managers) finish before the next cell."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(peer.pid)
        time.sleep(0.5)
        if tree_cpu_seconds(peer.pid) - before < 0.05:
            return


def median_of(runs: list[Measurement]) -> Measurement:
    """The run with the median rate (of an even number, the upper one), with every
    run's rate in the order they ran (report.py draws their spread as error bars)."""
    kept = sorted(runs, key=lambda m: m.msgs_per_s)[len(runs) // 2]
    return replace(kept, runs=[run.msgs_per_s for run in runs])


@dataclass
class PeerRuns:
    """Everything one peer measured over all its starts (one for the other cells and the
    idle connections, one a round for the key cells), for the report: a start's counts
    are added only once the start has finished and was checked."""

    runs: dict[tuple[int, int, int], list[Measurement]] = field(default_factory=dict)
    accepted: int = 0
    stored: int | None = None  # None: the peer keeps nothing to count
    # Accepted and not stored, summed over the starts that fell short: in the sums a
    # start that stored more than it was seen to accept could hide another's shortfall.
    missing: int = 0
    failures: list[str] = field(default_factory=list)
    idle: dict[str, Any] | None = None

    def results(self) -> dict[Any, Any]:
        """report["results"][peer]: each cell's median Measurement, and the counts."""
        results: dict[Any, Any] = {key: median_of(runs) for key, runs in self.runs.items()}
        results.update(accepted=self.accepted, stored=self.stored)
        if self.missing:
            results["missing"] = self.missing
        return results


def print_cell(peer: Peer, cell: Cell, m: Measurement, note: str = "") -> None:
    print(
        f"  {peer.name:<17} {cell.label():<22} {m.msgs_per_s:>9,.0f} msg/s"
        f"  p99 {m.p99_ms:>7.1f} ms  cpu {m.cpu_percent:>5.0f}%"
        f" ({m.cpu_us_per_msg:,.0f} µs/msg, load {m.load_cpu_us_per_msg:,.0f})"
        f"  errors {m.errors}{note}",
        flush=True,
    )


def measure_peer(peer: Peer, cells: list[Cell], seconds: float, into: PeerRuns) -> None:
    """Each of `cells` once on the started `peer`, then the check that it stored every
    message it accepted (durable peers), all added to `into`."""
    found = []
    for cell in cells:
        settle(peer)
        found.append(run_load(peer, cell, seconds))
        print_cell(peer, cell, found[-1])
    settle(peer, limit=60)
    accepted = sum(run.accepted for run in found)
    stored = peer.stored()
    if stored is not None:
        verdict = "ok" if stored >= accepted else "MISSING MESSAGES"
        print(f"  {peer.name}: accepted {accepted}, stored {stored}: {verdict}", flush=True)
        into.stored = (into.stored or 0) + stored
        into.missing += max(accepted - stored, 0)
    into.accepted += accepted
    for cell, run in zip(cells, found, strict=True):
        into.runs.setdefault(cell.key, []).append(run)


def start_and_measure(
    peer: Peer, cells: list[Cell], seconds: float, into: PeerRuns, *, idle: int = 0, when: str = ""
) -> None:
    """Start `peer` fresh in a new directory of its own, measure `cells` (and hold `idle`
    connections), stop it. A failure is kept in `into.failures` (`when`: which start)
    and loses only this start's measurements."""
    with cell_directory(f"bench-{peer.name}-") as workdir:
        try:
            peer.start(Path(workdir))
            if cells:
                measure_peer(peer, cells, seconds, into)
            if idle:
                into.idle = measure_idle(peer, idle)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
            print(f"  {peer.name} failed{when}: {error}", flush=True)
            into.failures.append(f"failed{when}: {error}")
        finally:
            peer.stop()


Ordered = TypeVar("Ordered")


def round_order(peers: list[Ordered], rounds: int) -> list[list[Ordered]]:
    """The order of the peers in each round of a repeated cell (the key cells here, the
    end-to-end cells in bench.e2e): as given, then reversed, and so on (A B C, C B A,
    A B C), so the peer that ran first in one round runs last in the next and a slow
    stretch of the machine falls on every peer alike, not on whichever ran during it.
    Neighbours stay neighbours (the workers pair, last)."""
    return [list(peers) if number % 2 == 0 else peers[::-1] for number in range(rounds)]


def measure(
    peers: list[Peer],
    cells: list[Cell],
    seconds: float,
    repeats: int,
    *,
    workers: Sequence[Peer] = (),
    workers_repeats: int = 0,
    idle: int = 0,
) -> dict[str, PeerRuns]:
    """Every peer's cells. The cells not in KEY_CELLS and the idle connections (`idle`
    of them, for IDLE_PEERS) run once, peer after peer, one start each. The key cells,
    and the first of them for the `workers` peers, run in `repeats` rounds: every peer
    started fresh in each round, in `round_order`. This machine's speed drifts by up to
    2× within minutes: run peer after peer, a slow stretch fell on one peer and swung
    the ratios between peers that the targets are; in alternating rounds it falls on
    all of them, and the median of each cell's rounds is kept.

    The `workers` pair runs in `workers_repeats` rounds if that is more: after the
    common rounds, rounds of the pair alone, still alternating. Its ratio swings more
    than any other between rounds of one run (1.12× to 1.52×, the two sides depending
    on how the threads of one process and of the load generator share two cores), so
    a median of three rounds was about as noisy as one round."""
    found = {peer.name: PeerRuns() for peer in peers}

    def key_cells(peer: Peer) -> list[Cell]:
        if peer in workers:
            return [Cell(*KEY_CELLS[0])]
        return [cell for cell in cells if cell.key in KEY_CELLS]

    for peer in peers:
        others = [] if peer in workers else [c for c in cells if c.key not in KEY_CELLS]
        holds = idle if peer.name in IDLE_PEERS else 0
        if others or holds:
            start_and_measure(peer, others, seconds, found[peer.name], idle=holds)
    # The pair's own rounds only where the pair is measured (not with --peers gsmtp).
    total = max(repeats, workers_repeats if any(peer in workers for peer in peers) else 0)
    rounds = round_order([peer for peer in peers if key_cells(peer)], total)
    for number, order in enumerate(rounds, 1):
        if number > repeats:
            order = [peer for peer in order if peer in workers]
        names = ", ".join(peer.name for peer in order)
        print(f"key cells, round {number} of {total}: {names}", flush=True)
        for peer in order:
            when = f" in round {number}"
            start_and_measure(peer, key_cells(peer), seconds, found[peer.name], when=when)
    if total > 1:
        print("key cells, the median of their rounds:", flush=True)
        for peer in peers:
            for cell in key_cells(peer):
                runs = found[peer.name].runs.get(cell.key)
                if runs:
                    kept = median_of(runs)
                    print_cell(
                        peer, cell, kept, "  runs " + " / ".join(f"{r:,.0f}" for r in kept.runs)
                    )
    return found


def measure_idle(peer: Peer, count: int) -> dict[str, Any] | None:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.idle",
            "--target",
            f"127.0.0.1:{peer.port}",
            "-n",
            str(count),
            "--pid",
            str(peer.pid),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if output.returncode != 0 or not output.stdout.strip():
        print(f"  idle run failed for {peer.name}: {output.stderr.strip()[-300:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    print(
        f"  {peer.name:<17} {count} idle: {result['kib_per_connection']:.1f} KiB each"
        f" ({result['memory'].upper()} summed over {result['processes']} processes;"
        f" connections per process {idle_spread(result)}), {result['dropped']} dropped",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(prog="python -m bench.compare")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each cell")
    parser.add_argument("--quick", action="store_true", help="key cells only, once each")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-connection run")
    parser.add_argument("--idle", type=int, default=10000, help="idle connections to hold")
    parser.add_argument("--peers", default="", help="comma-separated subset of peer names")
    parser.add_argument("--out", default=str(HERE), help="where RESULTS.md and results.png go")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end cells")
    parser.add_argument(
        "--e2e-messages",
        type=int,
        default=0,
        help=f"messages per end-to-end cell ({E2E_MESSAGES}; {E2E_MESSAGES_QUICK} with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        cells = [Cell(*key) for key in KEY_CELLS]
    else:
        cells = [Cell(c, m, s) for s in (KiB, 100 * KiB) for m in (1, 100) for c in (1, 10, 100)]
    repeats = 1 if args.quick else 3
    workers_repeats = 1 if args.quick else WORKERS_ROUNDS
    wanted = {name.strip() for name in args.peers.split(",") if name.strip()}
    report: dict[str, Any] = {
        "skipped": {},
        "results": {},
        "idle": {},
        "descriptions": {},
        "durable": {},
        "e2e": [],
        "e2e_skipped": {},
        "e2e_descriptions": {},
        "machine": machine(),
        "repeats": repeats,
        "workers_repeats": workers_repeats,
    }
    # The workers cells: acknowledged rate at the first key cell, gsmtp with two
    # worker processes against one (skipped while gsmtp has no server.workers).
    workers: list[Peer] = [Gsmtp("gsmtp-w2", workers=2), Gsmtp("gsmtp-w1", workers=1)]
    available = []
    for peer in all_peers() + workers:
        if wanted and peer.name not in wanted:
            continue
        reason = peer.missing()
        if reason:
            print(f"skipping {peer.name}: {reason}", flush=True)
            report["skipped"][peer.name] = reason
            continue
        print(f"{peer.name}: {peer.description}", flush=True)
        report["descriptions"][peer.name] = peer.description
        report["durable"][peer.name] = peer.durable
        available.append(peer)
    idle = 0 if args.no_idle else args.idle
    measured = measure(
        available,
        cells,
        args.seconds,
        repeats,
        workers=workers,
        workers_repeats=workers_repeats,
        idle=idle,
    )
    for name, peer_runs in measured.items():
        if peer_runs.runs:
            report["results"][name] = peer_runs.results()
        if peer_runs.idle is not None:
            report["idle"][name] = peer_runs.idle
        if peer_runs.failures:
            report["skipped"][name] = "; ".join(peer_runs.failures)
    if not args.no_e2e:
        from bench import e2e

        count = args.e2e_messages or (E2E_MESSAGES_QUICK if args.quick else E2E_MESSAGES)
        print(f"end to end: {count:,} messages of 1 KiB at C=100 M=100 per cell", flush=True)
        found, skipped, descriptions = e2e.measure(count, wanted=wanted, repeats=repeats)
        report["e2e"], report["e2e_skipped"], report["e2e_descriptions"] = (
            found,
            skipped,
            descriptions,
        )
        if not wanted or "gsmtp" in wanted:
            report["e2e_kill"] = e2e.measure_kill(count)
    cross = {} if args.quick else cross_check(report)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from bench.report import write_plot, write_results

    write_results(Path(args.out) / "RESULTS.md", report, cells, cross, report["machine"])
    write_plot(Path(args.out) / "results.png", report)
    print(f"wrote {Path(args.out) / 'RESULTS.md'}")
    remove_all()  # every cell's files, once nothing is measured any more
    return 0


def cross_check(report: dict[str, Any]) -> dict[str, float]:
    """One cell measured with Postfix's smtp-source, an independent load generator."""
    import shutil

    if not shutil.which("smtp-source"):
        return {}
    found: dict[str, float] = {}
    for peer in all_peers():
        if peer.name not in ("gsmtp", "postfix") or peer.name not in report["results"]:
            continue
        with cell_directory(f"bench-xcheck-{peer.name}-") as workdir:
            try:
                peer.start(Path(workdir))
                started = time.monotonic()
                subprocess.run(
                    [
                        "smtp-source",
                        "-s",
                        "100",
                        "-m",
                        "10000",
                        "-l",
                        "1024",
                        "-d",
                        "-f",
                        "load@bench.test",
                        "-t",
                        RECIPIENT,
                        f"127.0.0.1:{peer.port}",
                    ],
                    check=True,
                    capture_output=True,
                    timeout=300,
                )
                found[peer.name] = round(10000 / (time.monotonic() - started), 1)
                print(f"  smtp-source → {peer.name}: {found[peer.name]:,.0f} msg/s", flush=True)
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                print(f"  smtp-source → {peer.name} failed: {error}", flush=True)
            finally:
                peer.stop()
    return found


def machine() -> dict[str, str]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "host": platform.node(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
