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
lost or duplicated messages says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.peers import (
    E2E_LOCAL,
    E2E_RELAY,
    MAILBOXES,
    SINK_HOST,
    BareSink,
    Gsmtp,
    Peer,
    Postfix,
    run_load,
)

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


def _load(
    port: int, to: str, messages: int, connections: int, per_session: int, size: int
) -> dict[str, Any]:
    limit = max(300.0, messages / 20)
    options = ["--mailboxes", str(MAILBOXES), "--total", str(messages)]
    return run_load(
        port,
        connections=connections,
        messages=per_session,
        size=size,
        to=to,
        options=[*options, "--max-seconds", str(limit)],
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
    with tempfile.TemporaryDirectory(prefix=f"bench-e2e-{peer.name}-") as workdir:
        try:
            peer.start(Path(workdir))
            return run_cell(peer, kind, messages, size=size, sink=sink)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as error:
            return f"failed: {error}"
        finally:
            peer.stop()


def measure(
    messages: int, *, size: int = KiB, wanted: set[str] | None = None, log: bool = True
) -> tuple[list[EndToEnd], dict[str, str], dict[str, str]]:
    """Every end-to-end cell: (cells, skipped {peer: reason}, descriptions)."""
    cells: list[EndToEnd] = []
    skipped: dict[str, str] = {}
    descriptions: dict[str, str] = {}

    def keep(kind: str, peer: Peer, outcome: EndToEnd | str) -> None:
        key = f"{kind}: {peer.name}"
        if isinstance(outcome, str):
            skipped[key] = outcome
            if log:
                print(f"  e2e {key} skipped: {outcome}", flush=True)
            return
        descriptions[key] = peer.description
        cells.append(outcome)
        if log:
            print(
                f"  e2e {key:<22} acknowledged {outcome.acknowledged_per_s:>8,.0f} msg/s,"
                f" delivered {outcome.delivered_per_s:>8,.0f} msg/s"
                f" ({outcome.accepted} accepted, {outcome.delivered} delivered"
                f"{', ' + outcome.note if outcome.note else ''})",
                flush=True,
            )

    def base(peer: Peer) -> str:
        return "postfix" if peer.name.startswith("postfix") else peer.name

    for peer in (Gsmtp("gsmtp", e2e="local"), Postfix("local")):
        if not wanted or base(peer) in wanted:
            keep("local", peer, _run_peer(peer, "local", messages, size))
    if not wanted or "probe" in wanted or "gsmtp" in wanted:
        for mode in ("fsync", "syncfs"):
            with tempfile.TemporaryDirectory(prefix="bench-e2e-probe-") as workdir:
                try:
                    probe = run_probe(Path(workdir), messages, mode)
                except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                    skipped[f"probe ({mode})"] = f"failed: {error}"
                    continue
            cells.append(probe)
            if log:
                print(f"  e2e probe ({mode}): {probe.delivered_per_s:,.0f} files/s", flush=True)
    for make in (
        lambda at: Gsmtp("gsmtp", e2e="relay", smarthost=at),
        lambda at: Postfix("relay", sink=at),
    ):
        with tempfile.TemporaryDirectory(prefix="bench-e2e-sink-") as sinkdir:
            sink = BareSink(SINK_HOST)
            try:
                sink.start(Path(sinkdir))
                peer = make((SINK_HOST, sink.port))
                if not wanted or base(peer) in wanted:
                    keep("relay", peer, _run_peer(peer, "relay", messages, size, sink))
            except (RuntimeError, OSError) as error:
                skipped["relay sink"] = f"failed: {error}"
            finally:
                sink.stop()
    return cells, skipped, descriptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--size", type=int, default=KiB)
    parser.add_argument("--peers", default="", help="comma-separated: gsmtp, postfix, probe")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = {name.strip() for name in args.peers.split(",") if name.strip()}
    cells, skipped, _ = measure(args.messages, size=args.size, wanted=wanted, log=not args.json)
    if args.json:
        print(json.dumps({"cells": [asdict(c) for c in cells], "skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
