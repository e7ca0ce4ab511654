"""Idle capacity: open N connections that read the greeting and then stay silent, and
report the node's memory growth per connection.

    python -m bench.idle --target 127.0.0.1:2525 -n 10000 --pid PID

Raises RLIMIT_NOFILE to its hard limit and spreads the connections over several
127.0.0.x source addresses (ephemeral ports run out near 28,000 per address). At the end
every connection is asked for a NOOP: one that does not answer 250 counts as dropped.

The node is PID and every process below it: with `server.workers` > 1 the PID a
harness started is the supervisor, which holds no connection, and the workers it forked
do (reading the supervisor alone measured 0.0 KiB per connection). The figure is the
growth of the node's summed PSS (proportional set size, /proc/<pid>/smaps_rollup), not
of its summed RSS: a worker forked from the supervisor shares pages with it (and the
workers share library pages with each other), and RSS counts such a page once in every
process that maps it. Summed PSS charges each shared page once in total, split among
its sharers, so the sum is the node's real memory and its growth is what holding the
connections cost: a page copied on write (shared before, private after) adds a page to
summed PSS and nothing to summed RSS, and a library page a second worker starts to
touch adds to summed RSS but no memory. RSS growth is reported beside it. Where
smaps_rollup cannot be read (kernels before 4.14), the figure falls back to RSS and
`memory` says so. PSS also splits a library page with processes outside the node, so
the figure is only clean on a machine where nothing else starts or stops meanwhile, as
in `make bench`, which runs this cell alone.

Per worker: each process's own growth, and the connections it holds, counted as the
growth of its open file descriptors (one socket per connection), so an uneven spread
across the workers shows.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from bench.load import parse_target  # noqa: E402
from bench.proctree import node_pids, open_fds  # noqa: E402

PER_SOURCE = 2000


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _pss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    rss_kib: int
    pss_kib: int | None  # None: smaps_rollup unreadable here
    fds: int


def sample(pid: int) -> dict[int, ProcessMemory]:
    """Memory and open descriptors of every process of the node, by PID."""
    found: dict[int, ProcessMemory] = {}
    for proc in node_pids(pid):
        rss = _status_kib(proc, "VmRSS:")
        if rss is not None:
            found[proc] = ProcessMemory(proc, rss, _pss_kib(proc), open_fds(proc))
    return found


def _summed(memory: dict[int, ProcessMemory], pss: bool) -> int:
    return sum((m.pss_kib or 0) if pss else m.rss_kib for m in memory.values())


def growth(before: dict[int, ProcessMemory], held: dict[int, ProcessMemory]) -> dict[str, Any]:
    """The node's growth between two samples, and each process's share of it. A process
    that was not there before (a worker restarted meanwhile) counts from zero."""
    pss = all(m.pss_kib is not None for m in [*before.values(), *held.values()])
    memory = "pss" if pss else "rss"
    processes = []
    for proc, after in held.items():
        earlier = before.get(proc) or ProcessMemory(proc, 0, 0, 0)
        grew = (after.pss_kib or 0) - (earlier.pss_kib or 0)
        processes.append(
            {
                "pid": proc,
                "rss_growth_kib": after.rss_kib - earlier.rss_kib,
                "pss_growth_kib": grew if pss else None,
                "connections": after.fds - earlier.fds,
            }
        )
    return {
        "memory": memory,
        "processes": len(held),
        "rss_before_kib": _summed(before, False),
        "rss_held_kib": _summed(held, False),
        "rss_growth_kib": _summed(held, False) - _summed(before, False),
        "pss_growth_kib": _summed(held, True) - _summed(before, True) if pss else None,
        "growth_kib": _summed(held, pss) - _summed(before, pss),
        "per_process": processes,
    }


def open_one(target: tuple[str, int], source: str) -> socket.socket | None:
    try:
        sock = socket.create_connection(target, timeout=30, source_address=(source, 0))
        if not sock.recv(512).startswith(b"220"):
            sock.close()
            return None
        return sock
    except OSError:
        return None


def still_there(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"NOOP\r\n")
        return sock.recv(512).startswith(b"250")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle")
    parser.add_argument("--target", type=parse_target, default=("127.0.0.1", 2525))
    parser.add_argument("-n", "--connections", type=int, default=10000)
    parser.add_argument(
        "--pid", type=int, required=True, help="the server's PID (its descendants are summed too)"
    )
    parser.add_argument("--hold", type=float, default=2.0, help="seconds to hold them idle")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 50000:
        parser.error("connections must be 1..50000")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.connections + 100 > hard:
        parser.error(f"RLIMIT_NOFILE hard limit {hard} is too low for {args.connections}")
    baseline = sample(args.pid)
    pool = Pool(500)
    sources = [
        f"127.0.{2 + i // 250}.{1 + i % 250}" for i in range(args.connections // PER_SOURCE + 1)
    ]
    jobs = [
        pool.spawn(open_one, args.target, sources[i // PER_SOURCE]) for i in range(args.connections)
    ]
    pool.join(timeout=300)
    socks = [job.value for job in jobs if job.value is not None]
    time.sleep(args.hold)
    held = sample(args.pid)
    checks = [pool.spawn(still_there, sock) for sock in socks]
    pool.join(timeout=120)
    alive = sum(1 for job in checks if job.value)
    for sock in socks:
        sock.close()
    gevent.sleep(0)
    grown = growth(baseline, held)
    result = {
        "connections": args.connections,
        "opened": len(socks),
        "dropped": args.connections - alive,
        **grown,
        "kib_per_connection": round(grown["growth_kib"] / max(len(socks), 1), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
