"""Side-by-side benchmark: gsmtp against the peers a user would pick instead, one run.

    make bench            (or: python -m bench.compare [--quick] [--no-idle] [--no-e2e])

Starts each peer in turn on a free loopback port, runs the same matrix of loads
(C connections × M messages per session × S bytes, each cell a few seconds, sessions
repeated), repeats the key cells and the end-to-end cells three times and keeps the
median (--quick: once each), checks that every
message a durable peer accepted is stored, measures idle-connection memory, runs the
`workers` cells (gsmtp with server.workers = 2 and = 1, where gsmtp has that setting)
and the end-to-end cells of bench.e2e (N messages delivered into Maildirs, or relayed
to a sink, timed to the last delivery; the physical probe beside them; and the
no-message-lost cell, a worker killed with SIGKILL during the local load), and writes
bench/RESULTS.md (ratios, since these machines are noisy) and bench/results.png.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers
from bench.peers import RECIPIENT, Gsmtp, Peer, all_peers
from bench.report import idle_spread
from bench.workdirs import cell_directory, exit_on_sigterm, remove_all

HERE = Path(__file__).parent
KiB = 1024
KEY_CELLS = [(100, 100, KiB), (100, 1, KiB), (10, 100, 100 * KiB)]
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


def measure_peer(peer: Peer, cells: list[Cell], seconds: float, repeats: int) -> dict[Any, Any]:
    results: dict[Any, Any] = {}
    accepted = 0
    for cell in cells:
        runs = []
        for _ in range(repeats if cell.key in KEY_CELLS else 1):
            settle(peer)
            runs.append(run_load(peer, cell, seconds))
        accepted += sum(run.accepted for run in runs)
        best = sorted(runs, key=lambda m: m.msgs_per_s)[len(runs) // 2]
        best.runs = [run.msgs_per_s for run in runs]
        results[cell.key] = best
        print(
            f"  {peer.name:<17} {cell.label():<22} {best.msgs_per_s:>9,.0f} msg/s"
            f"  p99 {best.p99_ms:>7.1f} ms  cpu {best.cpu_percent:>5.0f}%"
            f" ({best.cpu_us_per_msg:,.0f} µs/msg, load {best.load_cpu_us_per_msg:,.0f})"
            f"  errors {best.errors}",
            flush=True,
        )
    settle(peer, limit=60)
    stored = peer.stored()
    results["accepted"] = accepted
    results["stored"] = stored
    if stored is not None:
        verdict = "ok" if stored >= accepted else "MISSING MESSAGES"
        print(f"  {peer.name}: accepted {accepted}, stored {stored}: {verdict}", flush=True)
    return results


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
    }
    # The workers cells: acknowledged rate at the first key cell, gsmtp with two
    # worker processes against one (skipped while gsmtp has no server.workers).
    workers = [Gsmtp("gsmtp-w2", workers=2), Gsmtp("gsmtp-w1", workers=1)]
    for peer in all_peers() + workers:
        if wanted and peer.name not in wanted:
            continue
        reason = peer.missing()
        if reason:
            print(f"skipping {peer.name}: {reason}", flush=True)
            report["skipped"][peer.name] = reason
            continue
        report["descriptions"][peer.name] = peer.description
        report["durable"][peer.name] = peer.durable
        peer_cells = [Cell(*KEY_CELLS[0])] if peer in workers else cells
        with cell_directory(f"bench-{peer.name}-") as workdir:
            print(f"{peer.name}: {peer.description}", flush=True)
            try:
                peer.start(Path(workdir))
                report["results"][peer.name] = measure_peer(peer, peer_cells, args.seconds, repeats)
                if not args.no_idle and peer.name in ("gsmtp", "aiosmtpd-discard", "gevent-sink"):
                    report["idle"][peer.name] = measure_idle(peer, args.idle)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
                print(f"  {peer.name} failed: {error}", flush=True)
                report["skipped"][peer.name] = f"failed: {error}"
            finally:
                peer.stop()
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
